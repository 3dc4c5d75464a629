"""``mask``: one bit per element saying whether it is nonzero; decodes to 0/1.

For tensors that *are* a support (TALL's per-task masks m_t ∈ {0, 1}): x̂ = 1[x ≠ 0]. Lossless on 0/1 tensors,
and a projection of any other tensor onto its support pattern. Stored: ``bits`` (uint8, ceil(n/8) bytes over the
flattened tensor, 1 = nonzero). Encoded and decoded in chunks.
"""

from __future__ import annotations

import torch

from tvbasis.codecs import base
from tvbasis.codecs.base import Codec, expect_numel
from tvbasis.codecs.bits import pack_bits, packed_size, unpack_bits
from tvbasis.codecs.encoded import Encoded


class Mask(Codec):
    """Support bits: 1 per nonzero element."""

    name = "mask"

    def _encode(self, x: torch.Tensor) -> Encoded:
        flat = x.reshape(-1)
        n = flat.numel()
        bits = torch.empty(packed_size(n, 1), dtype=torch.uint8, device=x.device)
        step = max(8, base.CHUNK_ELEMENTS // 8 * 8)
        for s in range(0, n, step):
            packed = pack_bits(flat[s:s + step] != 0)
            bits[s // 8:s // 8 + packed.numel()] = packed
        return self._make(x, {"bits": bits})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        bits = expect_numel(enc.tensors["bits"], packed_size(n, 1), self.name, "bits")
        out = torch.empty(n, dtype=torch.float32, device=bits.device)
        step = max(8, base.CHUNK_ELEMENTS // 8 * 8)
        for s in range(0, n, step):
            e = min(n, s + step)
            out[s:e] = unpack_bits(bits[s // 8:s // 8 + packed_size(e - s, 1)], e - s).to(torch.float32)
        return out
