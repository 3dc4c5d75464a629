"""Tensor metadata shared by readers and writers, and size parsing."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from tvbasis.errors import ConfigError

#: safetensors dtype codes <-> torch dtypes
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'bf16' -> torch.bfloat16; None stays None (meaning: keep the checkpoint's dtype)."""
    if name is None:
        return None
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the name configs and manifests use)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in its dtype."""
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        """Whether the dtype is floating point (integer buffers and masks are not part of a task vector)."""
        return self.dtype.is_floating_point

    def with_dtype(self, dtype: torch.dtype) -> TensorSpec:
        """The same tensor in another dtype."""
        return TensorSpec(self.name, self.shape, dtype)


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as Hugging Face does); '512MiB' -> 536870912; ints pass through."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot parse size {text!r}; expected e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit in {text!r}")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return value


def human_bytes(n: float) -> str:
    """A byte count in decimal units, e.g. 1234567 -> '1.23 MB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
