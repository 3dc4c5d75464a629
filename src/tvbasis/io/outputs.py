"""The output rules, in one place: every command that writes calls ``check_output`` before any work.

1. An output may never be, contain or lie inside an input (paths resolved, symlinks followed): replacing it would
   destroy an input, possibly while it is still being read.
2. An existing output is replaced only with ``--force``.
3. ``--force`` never deletes a non-empty directory that is not a tvbasis output of the same kind, recognised by
   what tvbasis writes into each (``output_kind_of``): a store by its manifest (updated in place, never deleted),
   a model directory by its model card ("Model written by tvbasis") or a ``tvbasis*.json`` record (PEFT export,
   assembled models), a basis folder in the paper's layout by the ``tvbasis_method`` its method_info.json
   records. A user's folder, or an output of another kind (a store given as ``merge --out``), is refused with
   one line.
4. The parent is created if missing and must be writable.

A file output (``eval --json``, a task vector) replaced with ``--force`` is the file the user named; a directory
there is a directory, so rule 3 applies to it too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tvbasis.errors import ConfigError, OutputExistsError

#: the file a store is recognised by (store/format.py's MANIFEST; io cannot import store)
STORE_MANIFEST = "tvbasis.json"


def check_not_input(out: Path, inputs: Sequence[str | Path]) -> None:
    """Rule 1: refuse an output that is, contains, or lies inside one of ``inputs``."""
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


def _head(path: Path, n: int = 4096) -> str:
    """The first ``n`` bytes of a regular file (not a symlink) as text; "" for anything else."""
    try:
        if path.is_symlink() or not path.is_file():
            return ""
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


def output_kind_of(path: Path) -> str | None:
    """The kind of tvbasis output a directory is (``store``, ``tvb``, ``model``), None for anything else."""
    if not path.is_dir() or path.is_symlink():
        return None
    if (path / STORE_MANIFEST).is_file():
        return "store"
    if '"tvbasis_method"' in _head(path / "method_info.json"):
        return "tvb"
    if "Model written by tvbasis" in _head(path / "README.md"):
        return "model"
    try:
        names = [e.name for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
    except OSError:
        return None
    if any(n.startswith("tvbasis") and n.endswith(".json") for n in names):
        return "model"
    return None


def is_empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return not any(True for _ in it)
    except OSError:
        return False


#: ``kind`` of a check that leaves rule 3 to a later check (the writer's own ``AtomicOutput``, or a store
#: builder's ``output_kind``): the early, cheap check of a command before any work
ANY = "any"


def check_replaceable(out: Path, force: bool, kind: str | None) -> None:
    """Rules 2 and 3 for an existing ``out``; nothing when ``out`` does not exist."""
    if not os.path.lexists(out):
        return
    if not force:
        raise OutputExistsError(f"{out}: already exists (pass --force to overwrite)")
    if kind != ANY and out.is_dir() and not out.is_symlink() and not is_empty_dir(out):
        found = output_kind_of(out)
        if found is None or kind is None or found != kind:
            what = "a tvbasis store" if found == "store" else (f"a tvbasis {found} output" if found else
                                                                "a non-empty directory that tvbasis did not write")
            need = f"a {kind} output" if kind else "a file"
            raise ConfigError(f"{out}: is {what}, not {need}; --force replaces only an output of the same kind "
                              "(remove it yourself, or choose another output path)")


def check_output(out: str | Path, force: bool, inputs: Sequence[str | Path] = (), kind: str | None = ANY) -> None:
    """All four rules, before any work. ``kind``: the kind of directory output about to be written (None for a
    file output, which never replaces a non-empty directory; ``ANY``: rule 3 is checked later by the writer)."""
    out = Path(out)
    check_not_input(out, inputs)
    check_replaceable(out, force, kind)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{parent}: exists and is not a directory") from None
    except OSError as e:
        raise ConfigError(f"{parent}: cannot create the output's folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{parent}: directory is not writable")
