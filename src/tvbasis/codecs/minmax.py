"""``minmax``: per-tensor asymmetric min–max quantisation at ``bits`` bits, with an integer zero point (TVQ's).

For the whole tensor (Kim et al., ICCV 2025, the reference code's ``asymmetric_quantization``)::

    s = (2^b − 1) / (max x − min x),   z = −round(s · min x),   q = clamp(round(s·x + z), 0, 2^b − 1),
    x̂ = (q − z) / s.

The zero point is an integer, so x = 0 comes back exactly whenever min x ≤ 0 ≤ max x (untouched rows of an
embedding stay zero). A constant tensor (max = min) is stored as its one value (s = 0, z = the value).

Stored: ``q`` (codes bit-packed at ``bits`` bits: ⌈n·b/8⌉ bytes) and ``params`` (float32 [s, z]: 8 bytes).
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, expect_numel
from tvbasis.codecs.bits import pack_bits, packed_size, unpack_bits
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param


def minmax_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
    """(codes as int16, scale s, zero point z) of ``x`` at ``bits`` bits (1 ≤ bits ≤ 8). A constant ``x``: codes
    0, s = 0 and z = the constant."""
    if not 1 <= bits <= 8:
        raise ValueError(f"minmax: bits must be in 1..8, got {bits}")
    x = x.float()
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return torch.zeros(x.shape, dtype=torch.int16), 0.0, lo
    levels = (1 << bits) - 1
    scale = torch.tensor(levels, dtype=torch.float32) / torch.tensor(hi - lo, dtype=torch.float32)
    zero = -torch.round(scale * lo)
    q = torch.round(scale * x + zero).clamp_(0, levels).to(torch.int16)
    return q, float(scale), float(zero)


def minmax_dequantize(q: torch.Tensor, scale: float, zero: float) -> torch.Tensor:
    """x̂ = (q − z)/s (float32); a constant tensor (s = 0) decodes to z everywhere."""
    if scale == 0.0:
        return torch.full(q.shape, zero, dtype=torch.float32)
    return (q.float() - torch.tensor(zero, dtype=torch.float32)) / torch.tensor(scale, dtype=torch.float32)


class MinMax(Codec):
    """TVQ's per-tensor asymmetric quantisation (one float32 scale and zero point per tensor)."""

    name = "minmax"
    params = (Param("bits", int, 4, "an integer in 1..8", lambda v: 1 <= v <= 8),)

    def _encode(self, x: torch.Tensor) -> Encoded:
        bits = int(self.values["bits"])
        q, s, z = minmax_quantize(x, bits)
        packed = pack_bitstream(q.reshape(-1), bits)
        return self._make(x, {"q": packed, "params": torch.tensor([s, z], dtype=torch.float32)})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        bits = int(self.values["bits"])
        s, z = (float(v) for v in expect_numel(enc.tensors["params"], 2, self.name, "scale and zero").float())
        q = unpack_bitstream(expect_numel(enc.tensors["q"], packed_size(enc.numel * bits, 1), self.name, "codes"),
                             bits, enc.numel)
        return minmax_dequantize(q, s, z)


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits) as one dense little-endian bit stream: ⌈n·bits/8⌉ uint8 (any width 1..8)."""
    shifts = torch.arange(bits, dtype=torch.int16)
    planes = ((codes.reshape(-1, 1).to(torch.int16) >> shifts) & 1).bool()
    return pack_bits(planes.reshape(-1))


def unpack_bitstream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream`: the first ``n`` codes as int16."""
    planes = unpack_bits(packed, n * bits).reshape(n, bits).to(torch.int16)
    return (planes << torch.arange(bits, dtype=torch.int16)).sum(1, dtype=torch.int16)
