"""Magnitude sparsification: ``topk`` (kept values) and ``ternary`` (kept signs, one scale).

Both keep the k = ceil(density·n) entries of largest |x| of the flattened tensor (density read as the exact
decimal it was written as, so 0.05·1000 keeps 50). Ties at the threshold are broken by ``torch.topk``.

* ``topk``: x̂ = x on the kept support, 0 elsewhere. Values are float16 ``values`` or child ``values`` of the
  NEXT codec (``topk:density=0.05+int8``).
* ``ternary`` (ComPEFT's form): x̂ = a·sign(x) on the kept support with a = mean |x| over it, the least-squares
  scale for that support and sign pattern (argmin_a Σ_S (x_i − a·s_i)² = Σ_S |x_i| / |S|). Zeros are never
  kept (k is capped at the number of nonzeros), since a sign code would turn them into ±a. Stored: the support,
  ``signs`` (uint8, ceil(k/8) bytes, 1 = positive) and ``scale`` (float16, one value).

The support is stored in whichever form is smaller, counted exactly: ``index`` (int32 positions, 4·k bytes)
or ``mask`` (bit-packed, ceil(n/8) bytes); the mask wins once density > 1/32. Memory: |x| and a bool mask, about
1.25 times the tensor, plus the kept entries.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from tvbasis.codecs.base import Codec, to_fp16
from tvbasis.codecs.bits import pack_bits, packed_size, unpack_bits
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param

_INT32_MAX = torch.iinfo(torch.int32).max


def keep_count(density: float, n: int) -> int:
    """ceil(density·n) with density taken as its shortest decimal (``repr``), so float noise never adds one."""
    return min(n, math.ceil(Fraction(repr(density)) * n))


def encode_support(index: torch.Tensor, n: int) -> tuple[str, torch.Tensor]:
    """Store ascending positions ``index`` among n as ('index', int32) or ('mask', packed bits), the smaller."""
    k = index.numel()
    if 4 * k < packed_size(n, 1) and n <= _INT32_MAX:
        return "index", index.to(torch.int32)
    mask = torch.zeros(n, dtype=torch.bool, device=index.device)
    mask[index] = True
    return "mask", pack_bits(mask)


def decode_support(tensors: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Ascending int64 positions from what :func:`encode_support` stored."""
    if "index" in tensors:
        return tensors["index"].long()
    return torch.nonzero(unpack_bits(tensors["mask"], n)).reshape(-1)


def _density_param() -> Param:
    return Param("density", float, 0.1, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)


def _top_support(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions of the k largest |x|."""
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    return torch.sort(idx).values


class TopK(Codec):
    """Keep the density fraction of largest-magnitude entries; values float16 or through the NEXT codec."""

    name = "topk"
    params = (_density_param(),)
    takes_next = True

    def _encode(self, x: torch.Tensor) -> Encoded:
        flat = x.reshape(-1)
        n = flat.numel()
        k = keep_count(float(self.values["density"]), n)
        index = _top_support(flat, k)
        kind, support = encode_support(index, n)
        values = flat[index]
        meta = {"k": k, "support": kind}
        if self.next is None:
            return self._make(x, {kind: support, "values": to_fp16(values, self.name, "a kept value")}, meta)
        return self._make(x, {kind: support}, meta, {"values": self.next.encode(values)})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        index = decode_support(enc.tensors, n)
        values = enc.tensors["values"].float() if self.next is None else self.next.decode(enc.children["values"])
        out = torch.zeros(n, dtype=torch.float32, device=index.device)
        out[index] = values.to(out.device)
        return out


class Ternary(Codec):
    """Top-k support kept as signs times one mean-|x| scale (ComPEFT)."""

    name = "ternary"
    params = (_density_param(),)

    def _encode(self, x: torch.Tensor) -> Encoded:
        flat = x.reshape(-1)
        n = flat.numel()
        nonzero = int(torch.count_nonzero(flat))
        k = min(keep_count(float(self.values["density"]), n), nonzero)
        index = _top_support(flat, k)
        kind, support = encode_support(index, n)
        kept = flat[index]
        scale = kept.abs().double().mean().float().reshape(1) if k else torch.zeros(1, device=x.device)
        tensors = {kind: support, "signs": pack_bits(kept > 0), "scale": to_fp16(scale, self.name, "the scale")}
        return self._make(x, tensors, {"k": k, "support": kind})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        index = decode_support(enc.tensors, n)
        positive = unpack_bits(enc.tensors["signs"], index.numel())
        a = enc.tensors["scale"].float()
        out = torch.zeros(n, dtype=torch.float32, device=index.device)
        out[index] = torch.where(positive, a, -a)
        return out
