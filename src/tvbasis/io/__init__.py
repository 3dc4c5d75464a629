"""Checkpoint I/O: lazy per-tensor readers and streaming, atomic Hugging Face writers."""

from tvbasis.io.atomic import (
    AtomicOutput,
    atomic_output,
    cleanup_stale_temps,
    exchange,
    fsync_dir,
    rename_noreplace,
)
from tvbasis.io.finite import all_finite, check_finite
from tvbasis.io.lora import LoraCheckpoint, is_adapter, open_finetuned
from tvbasis.io.paths import confined_file
from tvbasis.io.reader import Checkpoint, open_checkpoint, row_chunks
from tvbasis.io.specs import (
    TensorSpec,
    dtype_name,
    human_bytes,
    parse_dtype,
    parse_size,
)
from tvbasis.io.writer import (
    ModelWriter,
    check_output,
    copy_model_files,
    model_card,
    plan_shards,
    replace_atomically,
    write_safetensors_file,
    write_single_file_atomic,
)

__all__ = [
    "AtomicOutput", "Checkpoint", "LoraCheckpoint", "ModelWriter", "TensorSpec", "all_finite", "atomic_output",
    "check_finite", "check_output", "cleanup_stale_temps", "confined_file", "copy_model_files", "dtype_name",
    "exchange", "fsync_dir", "human_bytes", "is_adapter", "model_card", "open_checkpoint", "open_finetuned",
    "parse_dtype", "parse_size", "plan_shards", "rename_noreplace", "replace_atomically", "row_chunks",
    "write_safetensors_file", "write_single_file_atomic",
]
