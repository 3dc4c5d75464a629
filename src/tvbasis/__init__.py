"""tvbasis: task vector bases — compress T task vectors into M < T basis vectors and keep task arithmetic working.

The public face::

    from tvbasis import TaskVector, merge_task_vectors, MergeSpec, build_store, StoreSpec, open_store, RunOptions
"""

from tvbasis._version import __version__
from tvbasis.engine import RunOptions
from tvbasis.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    OutputExistsError,
    StoreError,
    TensorMismatchError,
    TvbasisError,
    UnknownTaskError,
)
from tvbasis.merge import MergeSpec
from tvbasis.passes import merge_task_vectors
from tvbasis.store import BasisStore, StoreSpec, WriteOptions, add_task, build_store, open_store
from tvbasis.store.lifecycle import remove_task, rename_task
from tvbasis.store.load import load_task
from tvbasis.store.lora_export import export_lora
from tvbasis.vectors import TaskVector

__all__ = ["BasisStore", "CheckpointError", "ConfigError", "MergeSpec", "NonFiniteError", "OutputExistsError",
           "RunOptions", "StoreError", "StoreSpec", "TaskVector", "TensorMismatchError", "TvbasisError", "UnknownTaskError",
           "__version__", "add_task", "build_store", "export_lora", "load_task", "merge_task_vectors", "open_store",
           "WriteOptions", "remove_task", "rename_task"]
