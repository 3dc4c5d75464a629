"""Confining names read from untrusted files (shard indexes, manifests) to the directory that holds them.

A name such as ``../../etc/passwd``, ``/abs/path`` or ``sub/x.safetensors`` in a ``weight_map`` would make a
reader open a file the user never pointed at; a symlink whose target lies elsewhere does the same. Every name is
therefore required to be a plain file name, and a symlink to resolve inside the directory.

One exception keeps the Hugging Face hub cache readable: there every file of ``models--org--name/snapshots/<rev>/``
is a symlink to ``../../blobs/<sha256>``; a symlink from a ``snapshots/<rev>`` directory into that repository's
``blobs/`` directory is accepted (``allowed_roots``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tvbasis.errors import CheckpointError, TvbasisError

_SEPARATORS = ("/", "\\")  # a backslash too: an index written on Windows must not name a subfolder


def allowed_roots(directory: Path) -> list[Path]:
    """Resolved directories a symlink inside ``directory`` may point into: the directory itself and, for a Hugging
    Face cache snapshot (``.../snapshots/<rev>``), the repository's ``blobs`` directory."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def within(path: Path, roots: list[Path]) -> bool:
    """Whether the resolved ``path`` lies inside (strictly below) one of ``roots`` (resolved directories)."""
    return any(path != r and path.is_relative_to(r) for r in roots)


def plain_name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain file name (None when it is one)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a file name"
    if not name or name in (".", ".."):
        return "is not a file name"
    if "\0" in name:
        return "contains a NUL byte"
    if name.startswith("/") or os.path.isabs(name):
        return "is an absolute path"
    if any(s in name for s in _SEPARATORS):
        return "contains a path separator (only plain file names in the same directory are allowed)"
    return None


def confined_file(directory: Path, name: str, what: str, error: type[TvbasisError] = CheckpointError) -> Path:
    """``directory / name``, refusing with ``error`` (a message starting with ``what``) a name that is not a plain
    file name inside ``directory``: empty, ``.``/``..``, absolute, holding a path separator or NUL, or a symlink
    whose target resolves outside the directory (or into a symlink loop). Existence is not checked.

    ``what`` says where the name comes from, e.g. ``f"{index}: weight_map entry for tensor 'w'"``."""
    problem = plain_name_problem(name)
    if problem is not None:
        raise error(f"{what}: {name!r} {problem}")
    path = directory / name
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise error(f"{what}: {name!r} is a dangling or looping symlink") from None
        if not within(target, allowed_roots(directory)):
            raise error(f"{what}: {name!r} is a symlink to {target}, outside {directory}")
    return path
