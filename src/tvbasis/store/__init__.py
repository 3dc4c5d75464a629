"""Basis stores: what to build (``spec``: ``StoreSpec``, ``WriteOptions``; every ``--method`` is described in
the registry ``tvbasis.methods``, re-exported here), the LoRA stores built in factor space
(``lora_factor_space``), the typed on-disk format
(``format``), file names and digests (``layout``, ``integrity``), coded files (``coded``) and their checks
(``decoded``), building (``builders``: which function writes each method's store; ``build``: the Gram pass, the
fit, the dense materialisation pass or the ``residual_pass`` of a store with residuals, masks or coded bases;
``ultradelta``: its statistics passes first; ``budget``: ``--budget``/``--quality``), safe writes (``commit``:
lock, staging, generations, gc; ``faults``: the crash points tests inject), reading and arithmetic (``store``), a
task into a loaded model (``apply``, ``load``), folding in a new task and upgrading (``update``), removing or
renaming one (``lifecycle``), LoRA entries and PEFT export (``lora_entries``, ``lora_export``) and the warnings
a store's errors deserve (``notes``)."""

from pathlib import Path

from tvbasis.methods import StoreMethod, StorePlan, get_store_method, register, store_method_names
from tvbasis.store.build import build_store
from tvbasis.store.commit import DEFAULT_LOCK_TIMEOUT, collect_garbage, foreign_entries, store_lock
from tvbasis.store.format import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, manifest_fields
from tvbasis.store.lora_factor_space import build_lora_store, build_lora_store_from_spec, export_peft
from tvbasis.store.spec import StoreSpec, WriteOptions
from tvbasis.store.store import BasisStore
from tvbasis.store.update import add_task, upgrade_store


def open_store(path: str | Path) -> BasisStore:
    """Open (and validate) the store at ``path``."""
    return BasisStore.open(path)


__all__ = ["DEFAULT_LOCK_TIMEOUT", "FORMAT", "FORMAT_VERSION", "MANIFEST", "BasisStore", "Manifest", "StoreMethod",
           "StorePlan", "StoreSpec", "WriteOptions", "add_task", "build_lora_store", "build_lora_store_from_spec",
           "build_store", "collect_garbage", "export_peft", "foreign_entries", "get_store_method", "manifest_fields",
           "open_store", "register", "store_lock", "store_method_names", "upgrade_store"]
