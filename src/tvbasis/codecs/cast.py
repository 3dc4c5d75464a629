"""Plain casts: ``float32`` (lossless), ``float16`` and ``bfloat16`` (round to nearest).

Stored: one tensor ``value`` of the original shape. Bytes: numel · (4 | 2 | 2). Relative error of a cast is at
most the unit roundoff, 2⁻¹¹ (float16, inside its range; NonFiniteError beyond ±65504) or 2⁻⁸ (bfloat16).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tvbasis.codecs.base import Codec, to_fp16
from tvbasis.codecs.encoded import Encoded


class _Cast(Codec):
    dtype: ClassVar[torch.dtype]

    def _encode(self, x: torch.Tensor) -> Encoded:
        if self.dtype == torch.float16:
            value = to_fp16(x, self.name, "a value")
        else:
            value = x.to(self.dtype, copy=True)
        return self._make(x, {"value": value.contiguous()})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        return enc.tensors["value"].to(torch.float32)


class Float32(_Cast):
    """Lossless: stores x as float32 (4 bytes per element)."""

    name = "float32"
    dtype = torch.float32


class Float16(_Cast):
    """x rounded to float16 (2 bytes per element)."""

    name = "float16"
    dtype = torch.float16


class BFloat16(_Cast):
    """x rounded to bfloat16 (2 bytes per element; float32's range, 8 significant bits)."""

    name = "bfloat16"
    dtype = torch.bfloat16
