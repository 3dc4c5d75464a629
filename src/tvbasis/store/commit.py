"""Writing a store safely: one exclusive writer at a time, and every change switched in by one atomic step.

- **Lock.** Every writer of an existing store (add-task, ``build --force`` onto it, upgrade, gc) holds an exclusive
  ``filelock`` on ``STORE/.tvbasis.lock`` for its whole run and re-reads the manifest under it, so two writers
  never both update the same old state (no lost update). A second writer waits up to ``lock_timeout`` seconds and
  then fails with one clear line.
- **Generations.** The store directory itself is never replaced. A change writes its new data files completely
  (fsynced) under new, generation-specific names (``bases.g{N}…``) next to the old ones, then switches the
  manifest (``tvbasis.json``) in one ``rename`` — the single commit point — and only then removes the old
  generation's files. Killed anywhere (``kill -9`` included), the store is in its old state or its new one; the
  leftovers (a temporary, new files no manifest names) are removed by the next writer or ``tvbasis gc``. An open
  store holds descriptors of its files, so readers see the old state or the new one, never a mix.
- **Foreign entries** (anything that is not the manifest, the lock, a tvbasis data file name or a tvbasis
  temporary) are never touched: a user's notes or subdirectory inside a store survive every write.
- **A new store** is written into a temporary sibling directory and moved into place with
  ``renameat2(RENAME_NOREPLACE)``: when two builds race for one new ``--out``, the second fails unless ``--force``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import filelock

from tvbasis.errors import ConfigError, OutputExistsError, StoreError
from tvbasis.io import cleanup_stale_temps, fsync_dir, rename_noreplace
from tvbasis.io.atomic import _TEMP_RE, fsync_tree, replace_atomically, temp_path, unmark_temp
from tvbasis.store.coded import CodedData, CodedWriter
from tvbasis.store.decoded import plausibility_problems
from tvbasis.store.faults import fault_point, interrupts_deferred
from tvbasis.store.format import FORMAT_VERSION, MANIFEST, Digests, Manifest
from tvbasis.store.integrity import StoreData
from tvbasis.store.layout import generation_of, is_store_file, renamed

log = logging.getLogger(__name__)

LOCK_NAME = ".tvbasis.lock"
#: seconds a writer waits for another writer of the same store by default
DEFAULT_LOCK_TIMEOUT = 300.0


# ---------------------------------------------------------------------------------------------------- lock
@contextmanager
def store_lock(root: Path, timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the store's exclusive writer lock; wait up to ``timeout`` seconds (None or < 0: forever; 0: fail at
    once when another writer holds it)."""
    root = Path(root)
    if not (root / MANIFEST).is_file():  # never leave a lock file in a directory that is not a store
        raise StoreError(f"{root}: not a tvbasis store (no {MANIFEST})")
    path = root / LOCK_NAME
    wait = -1.0 if timeout is None or timeout < 0 else float(timeout)
    lock = filelock.FileLock(str(path), timeout=wait)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StoreError(f"{root}: another tvbasis process is writing this store (lock {LOCK_NAME} held); gave up "
                         f"after {wait:g} s (--lock-timeout SECONDS waits longer)") from None
    except OSError as e:
        raise StoreError(f"{root}: cannot take the store's writer lock ({e.strerror}); is the store writable?") \
            from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------- entries
def is_tvbasis_entry(name: str) -> bool:
    """Names tvbasis creates in a store directory: the manifest, the lock, data/index files, temporaries."""
    return name in (MANIFEST, LOCK_NAME) or is_store_file(name) or _TEMP_RE.match(name) is not None


def foreign_entries(root: Path) -> list[str]:
    """Entries of the store directory tvbasis did not create (left alone by every write)."""
    try:
        return sorted(e.name for e in os.scandir(root) if not is_tvbasis_entry(e.name))
    except OSError:
        return []


def unreferenced_files(root: Path, manifest: Manifest | None) -> list[str]:
    """tvbasis data/index files in ``root`` that ``manifest`` does not name (leftovers of an interrupted write or
    of an older generation)."""
    keep = set(manifest.files.all()) if manifest is not None else set()
    try:
        return sorted(e.name for e in os.scandir(root)
                      if is_store_file(e.name) and e.name not in keep and not e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def remove_leftovers(root: Path, manifest: Manifest | None) -> list[Path]:
    """Under the lock: remove temporaries of dead processes and data files no manifest names."""
    removed = cleanup_stale_temps(root, in_store=True)
    for name in unreferenced_files(root, manifest):
        fault_point(f"remove {name}")
        try:
            os.unlink(root / name)
        except FileNotFoundError:
            continue
        removed.append(root / name)
    if removed:
        fsync_dir(root)
    return removed


def next_generation(root: Path, manifest: Manifest | None) -> int:
    """A generation no file in ``root`` uses yet."""
    used = [generation_of(e.name) for e in os.scandir(root)] if root.is_dir() else []
    if manifest is not None:
        used.append(manifest.generation)
    return max([0, *used]) + 1


# ---------------------------------------------------------------------------------------------------- validation
def _refusal(out: Path, why: str) -> StoreError:
    return StoreError(f"{out}: refusing to commit a store that its own reader would refuse: {why}; nothing was "
                      "committed (an existing store is unchanged)")


def checked_manifest(manifest: Manifest, out: Path) -> Manifest:
    """The manifest as a reader will parse it: its JSON text through ``Manifest.parse``, the reader's validator
    (a codec chain nested too deep, a name the validator refuses, a non-finite number: refused here)."""
    try:
        text = manifest.dumps().encode()
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise _refusal(out, f"its manifest cannot be written as JSON ({type(e).__name__}: {str(e)[:160]})") \
            from None
    try:
        return Manifest.parse(text, str(out / MANIFEST))
    except StoreError as e:
        raise _refusal(out, str(e)) from None


def validate_store_dir(root: Path, manifest: Manifest, out: Path, new_files: set[str] | None = None) -> None:
    """Before a commit: open the store in ``root`` under ``manifest`` as a reader would (every data file's size and
    header against the manifest) and decode every coded entry in ``new_files`` (all when None), checking finite
    values, shapes and the manifest's recorded norms and errors (``store.decoded``). StoreError, naming ``out``,
    for the first problem."""
    try:
        dfd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise _refusal(out, f"cannot open {root} ({e.strerror})") from None
    data: StoreData | None = None
    coded: CodedData | None = None
    try:
        data = StoreData(root, dfd, manifest)
        coded = CodedData(root, dfd, manifest) if manifest.coded is not None else None
        keys = None
        if new_files is not None and manifest.coded is not None:
            keys = [k for k, e in manifest.coded.entries.items() if e.file in new_files]
        dense = new_files is None or bool(new_files & set(manifest.files.dense()))
        problems = plausibility_problems(root, manifest, data, coded, keys, dense=dense)
    except StoreError as e:
        raise _refusal(out, str(e)) from None
    finally:
        os.close(dfd)
        for x in (data, coded):
            if x is not None:
                x.close()
    if problems:
        raise _refusal(out, problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1
                                           else ""))


# ---------------------------------------------------------------------------------------------------- staging
class Staging:
    """The one staging directory of a write: ``Staging.new_store(out)`` for a whole new store (a temporary sibling
    of ``out``, left over ones of dead processes removed first), ``Staging.generation(root, part)`` for the data
    files of a store's next generation (a temporary inside the store). Used as a context: on any exception every
    coded writer it made is aborted and the directory removed; on leaving it the directory is removed too (a new
    store has been moved out of it by then, a generation's files moved into the store)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._writers: list[CodedWriter] = []

    @classmethod
    def new_store(cls, out: Path) -> Staging:
        cleanup_stale_temps(out.parent, out.name)
        return cls(temp_path(out))

    @classmethod
    def generation(cls, root: Path, part: str) -> Staging:
        return cls(temp_path(root / part))

    def coded_writer(self, max_shard_size: int | str) -> CodedWriter:
        """A writer of coded files in this directory (aborted with it)."""
        writer = CodedWriter(self.dir, max_shard_size)
        self._writers.append(writer)
        return writer

    def files(self, names: Iterable[str]) -> dict[str, Path]:
        """Data file name -> its staged path (``commit_generation``'s ``staged``)."""
        return {f: self.dir / f for f in names}

    def __enter__(self) -> Staging:
        self.dir.mkdir()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is not None:
                for writer in self._writers:
                    writer.abort()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- commits
def _move(src: Path, dst: Path) -> None:
    try:
        rename_noreplace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = temp_path(dst)  # another filesystem: copy under a temporary name, then move in
        shutil.copyfile(src, tmp)
        fsync_tree(tmp)
        rename_noreplace(tmp, dst)
        os.unlink(src)


def commit_generation(root: Path, manifest: Manifest, staged: Mapping[str, Path]) -> Manifest:
    """Under the store lock: switch the store at ``root`` to ``manifest``.

    ``staged`` maps data file names of ``manifest`` to complete, fsynced files (on the same filesystem); they are
    moved in under the names of a new generation (``manifest.files`` and ``manifest.digests`` renamed to match),
    then the manifest is replaced in one rename, then every tvbasis data file it does not name is removed. Returns
    the manifest as written."""
    gen = next_generation(root, manifest)
    names = {old: renamed(old, gen) for old in staged}
    manifest.generation = gen
    if manifest.digests is not None:  # a version-2 store's next generation may hold blob-layout coded files
        manifest.format_version = max(manifest.format_version, FORMAT_VERSION)
    manifest.files.bases = [names.get(f, f) for f in manifest.files.bases]
    manifest.files.mean = [names.get(f, f) for f in manifest.files.mean]
    manifest.files.coded = [names.get(f, f) for f in manifest.files.coded]
    if manifest.coded is not None:
        manifest.coded = manifest.coded.renamed(names)
    if manifest.digests is not None:
        manifest.digests = Digests(manifest.digests.chunk_elements,
                                   {names.get(f, f): d for f, d in manifest.digests.files.items()},
                                   manifest.digests.algorithm)
    for f in manifest.files.all():
        if f not in names.values() and not (root / f).is_file():
            raise StoreError(f"{root}: data file {f} is gone; nothing committed")
    manifest = checked_manifest(manifest, root)
    moved: list[Path] = []
    with interrupts_deferred():
        try:
            for old, src in staged.items():
                fault_point(f"move {names[old]}")
                _move(src, root / names[old])
                moved.append(root / names[old])
            fsync_dir(root)
            fault_point("data files in place")
            # the reader's own checks of what is about to be committed, before the switch
            validate_store_dir(root, manifest, root, set(names.values()))
        except StoreError:
            for p in moved:  # files of a generation no manifest names: ours to remove
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            raise
        manifest.write(root)  # the commit point
        for name in unreferenced_files(root, manifest):
            fault_point(f"remove old {name}")
            try:
                os.unlink(root / name)
            except FileNotFoundError:
                pass
        fsync_dir(root)
    fault_point("committed")
    return manifest


def output_path(out: str | Path) -> Path:
    """``out`` made absolute (``.`` and ``..`` resolved lexically, symlinks kept); refuses a path with no name."""
    p = Path(os.path.abspath(os.path.expanduser(str(out))))
    if not p.name:
        raise ConfigError(f"--out {out}: not a usable output path")
    return p


def output_kind(out: Path, force: bool) -> str:
    """What a build to ``out`` will do: ``new`` (nothing there), ``store`` (a tvbasis store, updated in place
    with --force), ``replace`` (an empty directory or a file, replaced with --force). Refuses an existing output
    without force, and a non-empty directory that is not a store (tvbasis does not delete what it did not
    write)."""
    if not os.path.lexists(out):
        return "new"
    if not force:
        raise OutputExistsError(f"{out}: already exists (pass --force to overwrite)")
    if out.is_dir() and not out.is_symlink():
        if (out / MANIFEST).is_file():
            return "store"
        if any(True for _ in os.scandir(out)):
            raise ConfigError(f"{out}: is a non-empty directory that is not a tvbasis store; refusing to replace it "
                              "(remove it yourself, or choose another --out)")
    return "replace"


def commit_new_store(tmp: Path, out: Path, manifest: Manifest, kind: str, force: bool,
                     lock_timeout: float | None) -> None:
    """Move the complete store in ``tmp`` (manifest and data files) to ``out``: a new path by a no-replace rename
    (another build that got there first wins unless ``force``), an existing store by a new generation inside it
    (``kind == "store"``; the caller holds its lock), an empty directory or a file by one exchange."""
    fault_point("store written")
    if kind == "store":
        manifest = checked_manifest(manifest, out)  # generation-independent checks before anything moves
    else:
        try:
            written = Manifest.read(tmp)
        except StoreError as e:
            raise _refusal(out, str(e).replace(str(tmp), str(out))) from None
        validate_store_dir(tmp, written, out)
        unmark_temp(tmp)  # the temporary's marker does not go into the store
    if kind == "new":
        fsync_tree(tmp)
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            if not force:
                raise OutputExistsError(f"{out}: was created by another process while this store was being built; "
                                        "left untouched (pass --force to overwrite)") from None
            kind = output_kind(out, force)
            if kind == "store":
                with store_lock(out, lock_timeout):
                    commit_new_store(tmp, out, manifest, kind, force, lock_timeout)
                return
        else:
            fsync_dir(out.parent)
            fault_point("committed")
            return
    if kind == "store":
        cleanup_stale_temps(out, in_store=True)
        commit_generation(out, manifest, {f: tmp / f for f in manifest.files.all()})
        shutil.rmtree(tmp, ignore_errors=True)
        return
    with interrupts_deferred():
        replace_atomically(tmp, out)
    fault_point("committed")


def collect_garbage(directory: Path, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> list[Path]:
    """``tvbasis gc``: remove what killed tvbasis runs left behind in ``directory`` — temporaries of dead
    processes that prove tvbasis made them (``io.atomic.cleanup_stale_temps``: a marker inside, never a name
    alone), and, in ``directory`` itself and in each store directly inside it, under that store's writer lock,
    data files its manifest does not name. Foreign entries are never touched, symlinks never followed; a
    directory whose ``tvbasis.json`` is not a valid manifest is not a store (no lock file is left in it); a store
    another process is writing is skipped with a warning and the run goes on."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory (gc does not follow symlinks)")
    stores = [directory] if _is_store(directory) else []
    removed = cleanup_stale_temps(directory, in_store=bool(stores))
    try:
        stores += sorted(Path(e.path) for e in os.scandir(directory)
                         if e.is_dir(follow_symlinks=False) and _is_store(Path(e.path)))
    except OSError:
        pass
    for root in stores:
        try:
            with store_lock(root, lock_timeout):
                try:
                    manifest = Manifest.read(root)
                except StoreError:
                    removed += cleanup_stale_temps(root, in_store=True)  # unreadable now: keep every data file
                    continue
                removed += remove_leftovers(root, manifest)
        except StoreError as e:
            log.warning("gc: skipped %s: %s", root, str(e)[:300])
    return removed


def _is_store(root: Path) -> bool:
    """A directory (not a symlink) whose manifest parses: only then may gc take its lock."""
    if root.is_symlink() or not (root / MANIFEST).is_file() or (root / MANIFEST).is_symlink():
        return False
    try:
        Manifest.read(root)
    except StoreError:
        return False
    return True
