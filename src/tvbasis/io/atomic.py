"""Atomic outputs: write under a temporary sibling, then swap it into place in one step.

Every output (a model directory, a store, a single safetensors file) is written to
``.{name}.tvbasis-tmp-{pid}-{random}`` next to it and only then moved onto its final name, so a reader (or a
crash, ``kill -9`` included) sees either the old output, complete, or the new one, complete: never a mix.

- A new output is moved in with ``renameat2(RENAME_NOREPLACE)``: if another process created the same path
  meanwhile, the move fails (``OutputExistsError`` without force) instead of silently replacing it.
- An existing output (``force``) is swapped with ``renameat2(RENAME_EXCHANGE)`` (new in place, old at the temp
  name, in one step) and the old copy removed afterwards.
- Where ``renameat2`` is missing (not Linux, an old kernel, a filesystem answering EINVAL), both fall back to
  plain renames, with a window: for a replacement, between moving the old output aside and the new one in, the
  path does not exist (a crash there leaves the old output at ``.{name}.tvbasis-xchg-*``, which is never removed
  automatically, and the new one at its temp name); for a new directory, the existence check and the rename are
  two steps (an empty directory created in between is replaced; anything else makes the rename fail); a new file
  is linked in race-free.
- Temporaries left by a killed process are removed by ``cleanup_stale_temps`` at the start of every write to the
  same parent, and by ``tvbasis gc``, only when they prove that tvbasis made them: a temporary directory holds a
  marker file (``.tvbasis-temp``, naming the directory) written when it was created (``make_temp_dir``), and its
  process (the pid in its name) is gone. A file or symlink that merely has a temporary's name is never removed
  (except a temporary file inside a store, under the store's writer lock: the manifest's own temporary), and
  symlinks are never followed. A file output is written inside a marked temporary directory and moved out of it.
  (A process on another host or in another pid namespace sharing the directory is not seen: do not run
  concurrent writers of the same output from different machines.)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from tvbasis.errors import OutputExistsError
from tvbasis.io.outputs import ANY, check_not_input, check_output, check_replaceable

__all__ = ["ANY", "AtomicOutput", "atomic_output", "check_not_input", "check_output", "cleanup_stale_temps",
           "exchange", "fsync_dir", "fsync_tree", "make_temp_dir", "rename_noreplace", "replace_atomically",
           "temp_path"]

TEMP_MARK = ".tvbasis-tmp-"
#: marker file inside every temporary directory tvbasis creates (its content: the directory's name)
TEMP_MARKER = ".tvbasis-temp"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tvbasis-tmp-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
#: errors meaning "renameat2 (or this flag) is not available here": fall back to plain renames
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


# ---------------------------------------------------------------------------------------------- temp names


class _TempPath(type(Path())):  # type: ignore[misc]
    """The path of a temporary (``temp_path``): creating it as a directory (``mkdir``) also writes the marker
    that proves tvbasis made it, so every writer's temporary directory is marked without the writer doing
    anything (paths derived from it are of this class too, but only the temporary's own name gets a marker)."""

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        super().mkdir(mode, parents, exist_ok)
        if _TEMP_RE.match(self.name) and not os.path.lexists(self / TEMP_MARKER):
            with open(self / TEMP_MARKER, "x") as f:
                f.write(self.name + "\n")


def temp_path(out: Path) -> Path:
    """A fresh, recognisable temporary sibling of ``out``: ``.{name}.tvbasis-tmp-{pid}-{random}`` (created by the
    caller; as a directory it holds the marker ``.tvbasis-temp``)."""
    out = Path(out)
    return _TempPath(out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def make_temp_dir(out: Path) -> Path:
    """Create a fresh temporary sibling directory of ``out`` holding the marker that lets ``cleanup_stale_temps``
    and ``tvbasis gc`` prove tvbasis made it."""
    tmp = temp_path(out)
    tmp.mkdir()  # writes the marker
    return tmp


def unmark_temp(tmp: Path) -> None:
    """Remove a temporary directory's marker before it is moved into place as an output."""
    try:
        os.unlink(Path(tmp) / TEMP_MARKER)
    except FileNotFoundError:
        pass


def _mark_old(out: Path, temp_name: str) -> bool:
    """Before an existing directory output is swapped to a temporary's path (and removed there), mark it as that
    temporary, so that if this process dies between the swap and the removal, the old copy left at the temporary's
    path is provably ours. False when ``out`` is not a directory (nothing written)."""
    if out.is_symlink() or not out.is_dir():
        return False
    with open(out / TEMP_MARKER, "w") as f:
        f.write(temp_name + "\n")
    return True


def _marked(path: Path) -> bool:
    """True for a real directory (not a symlink) holding the marker of exactly this temporary."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return False
        marker = path / TEMP_MARKER
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        with open(marker, "rb") as f:
            return f.read(512).decode("utf-8", "replace").strip() == path.name
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # never os.kill(0 or negative): that signals process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree (never following a symlink); missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def cleanup_stale_temps(parent: Path, name: str | None = None, *, in_store: bool = False) -> list[Path]:
    """Remove temporaries (``.{name}.tvbasis-tmp-{pid}-*``) in ``parent`` whose process is gone and that prove
    tvbasis made them (a directory holding its marker; with ``in_store`` — ``parent`` is a store and the caller
    holds its writer lock — also a plain file); only those of output ``name`` when given. Returns the paths
    removed. A temp whose pid is alive (another write in progress, or this process) is kept, and so is every
    symlink and every entry without proof. Errors removing one (permissions) leave it in place."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            continue
        if not (_marked(path) or (in_store and entry.is_file(follow_symlinks=False))):
            continue
        try:
            _remove(path)
        except OSError:
            continue
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------- renameat2

Renamer = Callable[[bytes, bytes, int], int]


@functools.lru_cache(maxsize=1)
def _find_renameat2() -> Renamer | None:
    """libc's renameat2, else the raw syscall (x86_64: 316, aarch64: 276); None off Linux or when neither exists."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    sym = getattr(libc, "renameat2", None)
    if sym is not None:
        sym.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        sym.restype = ctypes.c_int
        return lambda a, b, flags: int(sym(AT_FDCWD, a, AT_FDCWD, b, flags))
    nr = _SYSCALL_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if nr is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long
    return lambda a, b, flags: int(syscall(ctypes.c_long(nr), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(a),
                                           ctypes.c_int(AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(flags)))


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(a, b, flags). True when done; False when unsupported here (caller falls back); raises OSError
    (FileExistsError, FileNotFoundError, ...) for any other failure."""
    fn = _find_renameat2()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def exchange(a: Path, b: Path) -> None:
    """Swap the paths ``a`` and ``b`` (files, directories or symlinks; both must exist) atomically with Linux
    ``renameat2(RENAME_EXCHANGE)``. Elsewhere, or where the filesystem refuses the flag, falls back to three
    renames (b aside, a to b, aside to a): between them ``b`` briefly does not exist, and a crash there leaves
    b's old content at ``.{b}.tvbasis-xchg-*``."""
    a, b = Path(a), Path(b)
    if _renameat2(a, b, RENAME_EXCHANGE):
        return
    for p in (a, b):
        if not os.path.lexists(p):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(p))
    aside = b.parent / f".{b.name}.tvbasis-xchg-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except BaseException:
        os.rename(aside, b)
        raise
    os.rename(aside, a)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, raising FileExistsError if ``dst`` exists, also when it appeared an instant ago
    (``renameat2(RENAME_NOREPLACE)``; fallback: a hard link for a file, a checked rename for a directory)."""
    src, dst = Path(src), Path(dst)
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if src.is_file() and not src.is_symlink():
        try:
            os.link(src, dst)  # fails if dst exists: race-free for a file
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links here: a checked rename
        else:
            os.unlink(src)
            return
    try:
        os.rename(src, dst)  # fails onto a non-empty directory or across types
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


# ---------------------------------------------------------------------------------------------- durability


def fsync_dir(path: Path) -> None:
    """fsync a directory (makes renames/creations inside it durable); a no-op where directories cannot be opened
    or synced (Windows, some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every regular file and directory of a tree (symlinks are not followed)."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_file():
        _fsync_file(path)
        return
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                _fsync_file(p)
        fsync_dir(Path(root))


def replace_atomically(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` onto ``out``. An existing ``out`` is exchanged with ``tmp`` in one step and the old
    copy (now at tmp's path, a stale temp if we die here) removed afterwards; a new ``out`` is a plain rename.
    Files and the parent directory are fsynced, so the result survives a power cut."""
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    while True:
        if os.path.lexists(out):
            try:
                exchange(tmp, out)
            except FileNotFoundError:
                if not os.path.lexists(tmp):
                    raise
                continue  # out vanished meanwhile: a plain move then
            fsync_dir(out.parent)
            _remove(tmp)  # the old output
            return
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            continue  # appeared meanwhile: replace it (this is the force path)
        fsync_dir(out.parent)
        return


# ---------------------------------------------------------------------------------------------- atomic output


class AtomicOutput:
    """An output being written under a temporary sibling (``self.tmp``), swapped into place by ``commit()`` or
    removed by ``abort()``. All checks run in the constructor, before any work (``io.outputs.check_output``): an
    existing ``out`` without ``force`` (OutputExistsError), ``out`` overlapping one of ``inputs``, a non-empty
    directory at ``out`` that is not a tvbasis output of the same ``kind`` (ConfigError). Stale temps of ``out``
    left by dead processes are removed first. ``directory``: the temp is created as an empty directory (apart from
    its marker, removed at commit) and ``kind`` (default ``model``) says which existing outputs ``--force`` may
    replace; else the caller creates the file at ``self.tmp``, which lies inside a marked temporary directory.

    As a context manager it yields the temp path, commits on success and aborts on any exception (KeyboardInterrupt
    included)."""

    def __init__(self, out: str | Path, force: bool = False, inputs: Sequence[str | Path] = (), *,
                 directory: bool = True, kind: str | None = None) -> None:
        self.out = Path(out)
        self.force = force
        self.kind = (kind or "model") if directory else None
        check_output(self.out, force, inputs, self.kind)
        cleanup_stale_temps(self.out.parent, self.out.name)
        self.wrap = make_temp_dir(self.out)
        #: the path the caller writes: the temporary directory itself, or a file inside it
        self.tmp = self.wrap if directory else self.wrap / self.out.name
        self.directory = directory
        self.done = False

    def commit(self) -> Path:
        """Swap the temp in. Without force, refuse (OutputExistsError, temp removed, the intruder untouched) an
        ``out`` that another process created after the constructor's check."""
        if self.done:
            return self.out
        try:
            if self.force and self.directory:
                check_replaceable(self.out, True, self.kind)  # again: what is at ``out`` now
                old_marked = _mark_old(self.out, self.wrap.name)
                unmark_temp(self.wrap)
                try:
                    replace_atomically(self.tmp, self.out)
                except BaseException:
                    if old_marked:
                        unmark_temp(self.out)
                    raise
            elif self.force:
                replace_atomically(self.tmp, self.out)
            else:
                unmark_temp(self.wrap)
                fsync_tree(self.tmp)
                try:
                    rename_noreplace(self.tmp, self.out)
                except FileExistsError:
                    raise OutputExistsError(f"{self.out}: was created by someone else while this output was being "
                                            "written; left untouched (pass --force to overwrite)") from None
                fsync_dir(self.out.parent)
        except BaseException:
            self.abort()
            raise
        self.done = True
        if not self.directory:
            _remove(self.wrap)  # the emptied wrapper (or the old file, moved here by the exchange)
        return self.out

    def abort(self) -> None:
        """Remove the temp (idempotent; a no-op after a commit)."""
        if not self.done:
            self.done = True
            _remove(self.wrap)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.commit()
        else:
            self.abort()


@contextmanager
def atomic_output(out: str | Path, force: bool = False, inputs: Sequence[str | Path] = (), *,
                  directory: bool = True, kind: str | None = None) -> Iterator[Path]:
    """``with atomic_output(out, force, inputs) as tmp:`` write under ``tmp``; on success it replaces ``out`` in one
    step, on any exception (KeyboardInterrupt included) it is removed and ``out`` is untouched. See AtomicOutput
    for the checks."""
    a = AtomicOutput(out, force, inputs, directory=directory, kind=kind)
    try:
        yield a.tmp
    except BaseException:
        a.abort()
        raise
    a.commit()
