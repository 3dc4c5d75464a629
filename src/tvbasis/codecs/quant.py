"""Group-wise round-to-nearest integer quantisation: ``int8``, ``int4``, ``int3``, ``int2``.

The tensor is read flattened and cut into consecutive groups of ``group`` elements (the last one may be
shorter). With ``b`` bits:

* ``scheme=symmetric``: Q = 2^(b−1) − 1, scale s = max|x_g| / Q (rounded *up* to float16), codes
  q = round(x/s) ∈ [−Q, Q], x̂ = s·q. Every element has |x − x̂| ≤ s/2.
* ``scheme=affine``: L = 2^b − 1, m = min x_g (rounded *down* to float16), s = (max x_g − m) / L (rounded up),
  q = round((x − m)/s) ∈ [0, L], x̂ = m + s·q. Every element has |x − x̂| ≤ s/2.

Rounding the float16 scale up (and the minimum down) keeps every code inside its range, so the half-step bound
holds for the stored float16 parameters, not just for the exact ones.

Stored: ``q`` (int8 for symmetric int8, else uint8 codes; int4/int2 bit-packed two/four per byte) and
``scale`` (float16, one per group), plus ``min`` (float16 per group) for affine (int3 packs eight codes into three
bytes, ``tvbasis.codecs.bits``). Bytes:
ceil(n·b/8) + 2·ceil(n/group) (symmetric), + another 2·ceil(n/group) (affine).

Encoding and decoding run in chunks of whole groups (about ``CHUNK_ELEMENTS`` elements), so temporaries stay
a small multiple of one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch

from tvbasis.codecs import base
from tvbasis.codecs.base import Codec, check_input, expect_numel, sq_dist64, to_fp16
from tvbasis.codecs.bits import pack_uint_unchecked, packed_size, unpack_uint
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param

SCHEMES = ("symmetric", "affine")


class _IntQuant(Codec):
    bits: ClassVar[int]
    params = (Param("group", int, 128, "an integer >= 1", lambda v: v >= 1),
              Param("scheme", str, "symmetric", choices=SCHEMES))

    @property
    def group(self) -> int:
        return int(self.values["group"])

    @property
    def affine(self) -> bool:
        return self.values["scheme"] == "affine"

    def _groups_per_chunk(self) -> int:
        # a multiple of 8 groups, so every chunk starts on a byte boundary of the packed codes
        g = max(1, base.CHUNK_ELEMENTS // self.group)
        return max(8, g // 8 * 8)

    def _codes(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The integer codes (as float32, symmetric ones centred on 0), the float16 scales and (affine) minima of a
        (groups, group) chunk; one temporary, every step in place."""
        codes = torch.empty_like(v)
        if not self.affine:
            qmax = (1 << (self.bits - 1)) - 1
            s16 = to_fp16(_absmax(v) / qmax, self.name, "a group scale", "ceil")
            torch.div(v, _safe(s16.float())[:, None], out=codes).round_().clamp_(-qmax, qmax)
            return codes, s16, None
        levels = (1 << self.bits) - 1
        m16 = to_fp16(v.amin(dim=1), self.name, "a group minimum", "floor")
        m = m16.float()
        s16 = to_fp16((v.amax(dim=1) - m) / levels, self.name, "a group scale", "ceil")
        torch.sub(v, m[:, None], out=codes).div_(_safe(s16.float())[:, None]).round_().clamp_(0, levels)
        return codes, s16, m16

    def _dequantised(self, flat: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(e0, e1, decode(encode(x))[e0:e1]) of a flat x, a chunk of whole groups at a time, without packing the
        codes: x̂ = s·q, or m + s·q affine, from the same float16 parameters as ``encode``."""
        n, group = flat.numel(), self.group
        n_groups = -(-n // group)
        gpc = self._groups_per_chunk()
        for g0 in range(0, n_groups, gpc):
            g1 = min(g0 + gpc, n_groups)
            e0, e1 = g0 * group, min(g1 * group, n)
            codes, s16, m16 = self._codes(_padded_groups(flat[e0:e1], group))
            codes.mul_(s16.float()[:, None])
            if m16 is not None:
                codes.add_(m16.float()[:, None])
            yield e0, e1, codes.reshape(-1)[: e1 - e0]

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` without packing or unpacking the codes: the same float32 values, bit for bit. For
        the budget's measuring pass, which needs only the error; the stored form's sizes depend on the shape alone."""
        x = check_input(x, self.name)
        flat = x.reshape(-1)
        out = torch.empty(flat.numel(), dtype=torch.float32, device=x.device)
        for e0, e1, values in self._dequantised(flat):
            out[e0:e1] = values
        return out.reshape(x.shape)

    def sq_error(self, x: torch.Tensor) -> float:
        """‖x − decode(encode(x))‖² in float64, chunk by chunk as ``roundtrip`` forms them, without the decoded
        tensor (for a 32 000 × 4096 embedding that is 0.5 GB, and as much again for the difference)."""
        flat = check_input(x, self.name).reshape(-1)
        return sum(sq_dist64(values, flat[e0:e1]) for e0, e1, values in self._dequantised(flat))

    def _encode(self, x: torch.Tensor) -> Encoded:
        flat = x.reshape(-1)
        n, group, bits = flat.numel(), self.group, self.bits
        n_groups = -(-n // group)
        width = 8 if bits == 8 else bits
        q = torch.empty(packed_size(n, width), dtype=torch.uint8, device=x.device)
        scale = torch.empty(n_groups, dtype=torch.float16, device=x.device)
        mins = torch.empty(n_groups, dtype=torch.float16, device=x.device) if self.affine else None
        gpc = self._groups_per_chunk()
        signed8 = bits == 8 and mins is None  # symmetric int8 stores the signed code itself
        if signed8:
            q = q.view(torch.int8)
        for g0 in range(0, n_groups, gpc):
            g1 = min(g0 + gpc, n_groups)
            e0, e1 = g0 * group, min(g1 * group, n)
            codes, s16, m16 = self._codes(_padded_groups(flat[e0:e1], group))
            if not self.affine and not signed8:
                codes.add_((1 << (bits - 1)) - 1)
            if mins is not None:
                mins[g0:g1] = m16
            scale[g0:g1] = s16
            flat_codes = codes.reshape(-1)[: e1 - e0]
            b0 = e0 * width // 8
            if signed8:
                q[e0:e1] = flat_codes  # float -> int8 on assignment (the codes are integers in [-127, 127])
                continue
            packed = _pack_codes(flat_codes.to(torch.uint8), width)
            q[b0:b0 + packed.numel()] = packed
        tensors = {"q": q, "scale": scale}
        if mins is not None:
            tensors["min"] = mins
        return self._make(x, tensors)

    def _decode(self, enc: Encoded) -> torch.Tensor:
        n, group, bits = enc.numel, self.group, self.bits
        width = 8 if bits == 8 else bits
        q, scale, mins = enc.tensors["q"], enc.tensors["scale"], enc.tensors.get("min")
        groups = -(-n // group)
        expect_numel(q, packed_size(n, width), self.name, "codes")
        expect_numel(scale, groups, self.name, "scales")
        if (mins is not None) != self.affine:
            raise ValueError(f"codec {self.spec!r}: stored minima do not match the scheme")
        if mins is not None:
            expect_numel(mins, groups, self.name, "minima")
        signed8 = bits == 8 and mins is None
        if signed8:
            q = q.view(torch.int8) if q.dtype == torch.uint8 else q.to(torch.int8)
        n_groups = scale.numel()
        out = torch.empty(n, dtype=torch.float32, device=q.device)
        gpc = self._groups_per_chunk()
        qoff = float((1 << (bits - 1)) - 1)
        for g0 in range(0, n_groups, gpc):
            g1 = min(g0 + gpc, n_groups)
            e0, e1 = g0 * group, min(g1 * group, n)
            if signed8:
                codes = q[e0:e1].float()
            else:
                b0 = e0 * width // 8
                codes = unpack_uint(q[b0:b0 + packed_size(e1 - e0, width)], width, e1 - e0).float()
            if (g1 - g0) * group != e1 - e0:
                codes = torch.nn.functional.pad(codes, (0, (g1 - g0) * group - (e1 - e0)))
            v = codes.view(-1, group)
            s = scale[g0:g1].float()[:, None]
            if mins is None:
                if not signed8:
                    v.sub_(qoff)
                v.mul_(s)
            else:
                v.mul_(s).add_(mins[g0:g1].float()[:, None])
            out[e0:e1] = v.reshape(-1)[: e1 - e0]
        return out


def _padded_groups(seg: torch.Tensor, group: int) -> torch.Tensor:
    """``seg`` as (groups, group), the last group padded by repeating its last element (keeps min/max/max|x|)."""
    pad = -seg.numel() % group
    if pad:
        seg = torch.cat([seg, seg[-1:].expand(pad)])
    return seg.view(-1, group)


def _absmax(v: torch.Tensor) -> torch.Tensor:
    """max |x| per row of a (groups, group) tensor, as max(max x, −min x): two reductions, no |x| temporary."""
    return torch.maximum(v.amax(dim=1), v.amin(dim=1).neg_())


def _pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """``pack_uint`` for codes already clamped into range (the range check would scan them twice more)."""
    return codes if width == 8 else pack_uint_unchecked(codes, width)


def _safe(s: torch.Tensor) -> torch.Tensor:
    """Scale with zeros replaced by 1 (an all-zero / constant group has codes 0 whatever the divisor)."""
    return torch.where(s > 0, s, torch.ones_like(s))


class Int8(_IntQuant):
    """8-bit group-wise quantisation (1 byte per element)."""

    name = "int8"
    bits = 8


class Int4(_IntQuant):
    """4-bit group-wise quantisation, two codes per byte."""

    name = "int4"
    bits = 4


class Int3(_IntQuant):
    """3-bit group-wise quantisation, eight codes per three bytes (Delta-CoMe's middle precision)."""

    name = "int3"
    bits = 3


class Int2(_IntQuant):
    """2-bit group-wise quantisation, four codes per byte (symmetric: levels {−s, 0, s})."""

    name = "int2"
    bits = 2
