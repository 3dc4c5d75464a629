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
  same parent: their pid is in the name, and a pid that no longer exists marks them stale. (A process on another
  host or in another pid namespace sharing the directory is not seen: do not run concurrent writers of the same
  output from different machines.)
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
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from tvbasis.errors import ConfigError, OutputExistsError

TEMP_MARK = ".tvbasis-tmp-"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tvbasis-tmp-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
#: errors meaning "renameat2 (or this flag) is not available here": fall back to plain renames
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


# ---------------------------------------------------------------------------------------------- temp names


def temp_path(out: Path) -> Path:
    """A fresh, recognisable temporary sibling of ``out``: ``.{name}.tvbasis-tmp-{pid}-{random}``."""
    out = Path(out)
    return out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


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


def cleanup_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Remove temporaries (``.{name}.tvbasis-tmp-{pid}-*``) in ``parent`` whose process is gone; only those of
    output ``name`` when given. Returns the paths removed. A temp whose pid is alive (another write in progress, or
    this process) is kept. Errors removing one (permissions) leave it in place."""
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


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless force; create the parent and check it is writable. Raises before any
    work."""
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise OutputExistsError(f"{out}: already exists (pass --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{parent}: directory is not writable")


def check_not_input(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is, contains, or lies inside one of ``inputs`` (paths resolved, symlinks followed):
    replacing it would destroy an input, possibly while it is still being read."""
    o = Path(out).expanduser().resolve()
    for raw in inputs:
        i = Path(raw).expanduser().resolve()
        if o == i:
            how = "is"
        elif o.is_relative_to(i):
            how = "lies inside"
        elif i.is_relative_to(o):
            how = "contains"
        else:
            continue
        raise ConfigError(f"output {out} {how} the input {raw}: write the output somewhere else")


class AtomicOutput:
    """An output being written under a temporary sibling (``self.tmp``), swapped into place by ``commit()`` or
    removed by ``abort()``. All checks run in the constructor, before any work: an existing ``out`` without
    ``force`` (OutputExistsError), ``out`` overlapping one of ``inputs`` (ConfigError). Stale temps of ``out`` left
    by dead processes are removed first. ``directory``: the temp is created as an empty directory (else the caller
    creates the file at ``self.tmp``).

    As a context manager it yields the temp path, commits on success and aborts on any exception (KeyboardInterrupt
    included)."""

    def __init__(self, out: str | Path, force: bool = False, inputs: Sequence[str | Path] = (), *,
                 directory: bool = True) -> None:
        self.out = Path(out)
        self.force = force
        check_not_input(self.out, [Path(p) for p in inputs])
        check_output(self.out, force)
        cleanup_stale_temps(self.out.parent, self.out.name)
        self.tmp = temp_path(self.out)
        if directory:
            self.tmp.mkdir()
        self.done = False

    def commit(self) -> Path:
        """Swap the temp in. Without force, refuse (OutputExistsError, temp removed, the intruder untouched) an
        ``out`` that another process created after the constructor's check."""
        if self.done:
            return self.out
        try:
            if self.force:
                replace_atomically(self.tmp, self.out)
            else:
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
        return self.out

    def abort(self) -> None:
        """Remove the temp (idempotent; a no-op after a commit)."""
        if not self.done:
            self.done = True
            _remove(self.tmp)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.commit()
        else:
            self.abort()


@contextmanager
def atomic_output(out: str | Path, force: bool = False, inputs: Sequence[str | Path] = (), *,
                  directory: bool = True) -> Iterator[Path]:
    """``with atomic_output(out, force, inputs) as tmp:`` write under ``tmp``; on success it replaces ``out`` in one
    step, on any exception (KeyboardInterrupt included) it is removed and ``out`` is untouched. See AtomicOutput
    for the checks."""
    a = AtomicOutput(out, force, inputs, directory=directory)
    try:
        yield a.tmp
    except BaseException:
        a.abort()
        raise
    a.commit()
