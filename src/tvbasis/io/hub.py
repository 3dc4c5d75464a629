"""Hugging Face hub ids as model paths, resolved offline through the local Hugging Face cache.

Wherever a model path is expected (``--pretrained``, ``--finetuned``, the Python API's paths), ``ORG/NAME`` or
``ORG/NAME@REVISION`` that is not an existing local path is looked up in the local Hugging Face cache
(``huggingface_hub.snapshot_download(..., local_files_only=True)``: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) and replaced by its snapshot folder. Nothing is ever downloaded: a model that is not
in the cache is one line saying so and how to fetch it. A local path always wins over a hub id of the same
spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tvbasis.errors import CheckpointError

__all__ = ["HUB_ID", "resolve_model_path"]

#: ORG/NAME[@REVISION], as the hub spells repository ids (a revision: a branch, tag or commit hash)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")


def _cache_dir() -> str | None:
    """The cache folder in force now (read at each call, so that a changed ``HF_HUB_CACHE`` is honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_model_path(path: str | Path) -> Path:
    """``path`` as a local path: itself when it exists, is a ``Path`` object (always local) or does not look like a
    hub id; for a string ``ORG/NAME[@REV]`` not on disk, its snapshot folder in the local Hugging Face cache. CheckpointError (one line) when the id is
    not cached, or when huggingface_hub is not installed."""
    p = Path(path).expanduser()
    if isinstance(path, Path) or p.exists():
        return p
    m = HUB_ID.match(str(path))
    if m is None:
        return p
    repo, rev = m.group("repo"), m.group("rev")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{path}: no such file or directory (as a Hugging Face hub id it needs huggingface_hub "
                              "to be looked up in the local cache: pip install huggingface_hub)") from None
    cache = _cache_dir()
    try:
        folder = snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        raise CheckpointError(
            f"{path}: no such file or directory, and not in the local Hugging Face cache ({where}); tvbasis never "
            f"downloads: fetch it first (huggingface-cli download {repo}"
            f"{f' --revision {rev}' if rev else ''}) or give a local path") from None
    return Path(folder)
