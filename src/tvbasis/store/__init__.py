"""Basis stores: the typed on-disk format (``format``), reading and arithmetic (``store``), building (``build``)
and folding in a new task (``update``)."""

from pathlib import Path

from tvbasis.store.build import build_store
from tvbasis.store.format import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, manifest_fields
from tvbasis.store.store import BasisStore
from tvbasis.store.update import add_task


def open_store(path: str | Path) -> BasisStore:
    """Open (and validate) the store at ``path``."""
    return BasisStore.open(path)


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "BasisStore", "Manifest", "add_task", "build_store",
           "manifest_fields", "open_store"]
