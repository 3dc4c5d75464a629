"""``sign``: one bit per element plus a float16 scale per row (``scale=row``) or per tensor (``scale=tensor``).

x̂ = a·sign(x) with sign(0) := +1 and a = mean |x| over the row (or the whole tensor), BitDelta's form. For a
fixed sign pattern s ∈ {±1}ⁿ the least-squares scale is argmin_a ‖x − a·s‖² = ⟨x, s⟩/n, which for s = sign(x)
is mean |x|; the error is then ‖x‖² − n·a².

Rows are those of the 2-D view (``as_matrix``). Stored: ``bits`` (uint8, ceil(n/8) bytes over the flattened
tensor, 1 = non-negative) and ``scale`` (float16, one per row or one in all). Encoded and decoded in row chunks.
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, as_matrix, expect_numel, row_chunk, to_fp16
from tvbasis.codecs.bits import pack_bits, packed_size, unpack_bits
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param


class Sign(Codec):
    """1-bit sign code with mean-|x| scales (L2-optimal for the sign pattern)."""

    name = "sign"
    params = (Param("scale", str, "row", choices=("row", "tensor")),)

    def _encode(self, x: torch.Tensor) -> Encoded:
        m = as_matrix(x)
        rows, cols = m.shape
        step = row_chunk(cols)
        bits = torch.empty(packed_size(m.numel(), 1), dtype=torch.uint8, device=x.device)
        row_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
        for r0 in range(0, rows, step):
            chunk = m[r0:r0 + step]
            row_scale[r0:r0 + step] = chunk.abs().mean(dim=1)
            packed = pack_bits(chunk >= 0)
            b0 = r0 * cols // 8
            bits[b0:b0 + packed.numel()] = packed
        if self.values["scale"] == "tensor":
            scale = (row_scale.double().mean()).float().reshape(1)  # equal row lengths: mean of row means
        else:
            scale = row_scale
        return self._make(x, {"bits": bits, "scale": to_fp16(scale, self.name, "a scale")})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        shape = enc.shape
        rows = shape[0] if len(shape) >= 2 else 1
        cols = enc.numel // rows
        bits, scale = enc.tensors["bits"], enc.tensors["scale"].float()
        expect_numel(bits, packed_size(rows * cols, 1), self.name, "sign bits")
        expect_numel(scale, 1 if self.values["scale"] == "tensor" else rows, self.name, "scales")
        out = torch.empty(rows, cols, dtype=torch.float32, device=bits.device)
        step = row_chunk(cols)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            b0 = r0 * cols // 8
            s = unpack_bits(bits[b0:b0 + packed_size((r1 - r0) * cols, 1)], (r1 - r0) * cols).view(r1 - r0, cols)
            a = scale if scale.numel() == 1 else scale[r0:r1, None]
            out[r0:r1] = torch.where(s, a, -a)
        return out
