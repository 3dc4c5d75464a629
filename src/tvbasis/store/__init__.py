"""Basis stores: the typed on-disk format (``format``), file layout and digests (``layout``, ``integrity``),
reading and arithmetic (``store``), building (``build``; from LoRA adapters in factor space, and PEFT export:
``factor``), safe writes (``commit``: lock, generations) and folding in a new task (``update``)."""

from pathlib import Path

from tvbasis.store.build import build_store
from tvbasis.store.commit import DEFAULT_LOCK_TIMEOUT, collect_garbage, foreign_entries, store_lock
from tvbasis.store.factor import build_lora_store, export_peft
from tvbasis.store.format import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, manifest_fields
from tvbasis.store.store import BasisStore
from tvbasis.store.update import add_task, upgrade_store


def open_store(path: str | Path) -> BasisStore:
    """Open (and validate) the store at ``path``."""
    return BasisStore.open(path)


__all__ = ["DEFAULT_LOCK_TIMEOUT", "FORMAT", "FORMAT_VERSION", "MANIFEST", "BasisStore", "Manifest", "add_task",
           "build_lora_store", "build_store", "collect_garbage", "export_peft", "foreign_entries", "manifest_fields", "open_store", "store_lock",
           "upgrade_store"]
