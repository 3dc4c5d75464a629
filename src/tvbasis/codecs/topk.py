"""Magnitude sparsification: ``topk`` (kept values) and ``ternary`` (kept signs, one scale).

Both keep the k = ceil(density·n) entries of largest |x| of the flattened tensor (density read as the exact
decimal it was written as, so 0.05·1000 keeps 50). Ties at the threshold are broken by ``torch.topk``.

* ``topk``: x̂ = x on the kept support, 0 elsewhere. Values are float16 ``values`` or child ``values`` of the
  NEXT codec (``topk:density=0.05+int8``).
* ``ternary`` (ComPEFT's form): x̂ = a·sign(x) on the kept support with a = mean |x| over it, the least-squares
  scale for that support and sign pattern (argmin_a Σ_S (x_i − a·s_i)² = Σ_S |x_i| / |S|). Zeros are never
  kept (k is capped at the number of nonzeros), since a sign code would turn them into ±a. Stored: the support,
  ``signs`` (uint8, ceil(k/8) bytes, 1 = positive) and ``scale`` (float16, one value).

The support is stored in whichever form is smaller, counted exactly: ``gaps`` (the distance from each kept
position to the previous one, minus one, as LEB128 varints: 7 bits per byte, the high bit set on every byte but
a number's last — one byte per kept entry while the gaps stay below 128, i.e. about 8–10 bits at densities from
1/32 down to 1/100, where an int32 position costs 32), ``index`` (int32 positions, 4·k bytes, only where gaps
of 2^28 and more make varints longer) or ``mask`` (bit-packed, ceil(n/8) bytes; wins above a density of about
1/8). Stores written before the gaps form (``index``/``mask`` only) read unchanged; UltraDelta's ``ultra``
codec keeps the two older forms (its stores' bytes as its paper counts them). Memory: |x| and a bool mask, about
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


#: a varint holds at most 5 bytes of 7 bits (gaps below 2^35; every tensor here has fewer elements)
_VARINT_MAX_BYTES = 5


def varint_encode(values: torch.Tensor) -> torch.Tensor:
    """Non-negative integers as LEB128 varints (uint8): 7 bits per byte, low bits first, the high bit set on every
    byte of a number but its last."""
    v = values.reshape(-1).long().cpu()
    if v.numel() and int(v.min()) < 0:
        raise ValueError("varint_encode: negative value")
    nbytes = torch.ones_like(v)
    for j in range(1, _VARINT_MAX_BYTES):
        nbytes += (v >= (1 << (7 * j))).long()
    owner = torch.repeat_interleave(torch.arange(v.numel()), nbytes)
    start = torch.cumsum(nbytes, 0) - nbytes
    j = torch.arange(owner.numel()) - start[owner]
    byte = (v[owner] >> (7 * j)) & 0x7F
    byte |= (j < nbytes[owner] - 1).long() << 7
    return byte.to(torch.uint8)


def varint_decode(data: torch.Tensor, count: int, what: str = "varints") -> torch.Tensor:
    """The ``count`` integers :func:`varint_encode` wrote (int64); ValueError for a stream that is not exactly
    ``count`` well-formed varints of at most 5 bytes."""
    b = data.reshape(-1).to(torch.uint8).cpu().long()
    if b.numel() == 0:
        if count:
            raise ValueError(f"{what}: empty stream, expected {count} numbers")
        return torch.zeros(0, dtype=torch.long)
    last = (b & 0x80) == 0
    if not bool(last[-1]) or int(last.sum()) != count:
        raise ValueError(f"{what}: the stream holds {int(last.sum())} complete numbers, expected {count}")
    owner = torch.cumsum(last.long(), 0) - last.long()  # number of each byte
    ends = torch.nonzero(last).reshape(-1)
    start = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1] + 1])
    j = torch.arange(b.numel()) - start[owner]
    if int(j.max()) >= _VARINT_MAX_BYTES:
        raise ValueError(f"{what}: a number longer than {_VARINT_MAX_BYTES} bytes")
    out = torch.zeros(count, dtype=torch.long)
    out.index_add_(0, owner, (b & 0x7F) << (7 * j))
    return out


def encode_support(index: torch.Tensor, n: int, gaps: bool = False) -> tuple[str, torch.Tensor]:
    """Store ascending positions ``index`` among n as ('index', int32) or ('mask', packed bits), the smaller; with
    ``gaps``, also as ('gaps', uint8 varints of the distances minus one) where that is the smallest."""
    k = index.numel()
    best = packed_size(n, 1)
    if gaps and k:
        g = index.long().cpu().clone()
        g[1:] = g[1:] - g[:-1] - 1
        stream = varint_encode(g)
        if stream.numel() < min(best, 4 * k):
            return "gaps", stream.to(index.device)
    if 4 * k < best and n <= _INT32_MAX:
        return "index", index.to(torch.int32)
    mask = torch.zeros(n, dtype=torch.bool, device=index.device)
    mask[index] = True
    return "mask", pack_bits(mask)


def decode_support(tensors: dict[str, torch.Tensor], n: int, k: int | None = None) -> torch.Tensor:
    """Ascending int64 positions from what :func:`encode_support` stored (``k``: how many, needed for 'gaps');
    ValueError for gaps that do not make k positions inside n."""
    if "gaps" in tensors:
        if k is None:
            raise ValueError("a 'gaps' support needs its count k")
        g = varint_decode(tensors["gaps"], k, "the support's gaps")
        index = torch.cumsum(g + 1, 0) - 1
        if k and int(index[-1]) >= n:
            raise ValueError(f"the support's gaps reach position {int(index[-1])} of a tensor of {n}")
        return index.to(tensors["gaps"].device)
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


def _stored_k(enc: Encoded, n: int, spec: str) -> int | None:
    """The kept count an encoding records (meta ``k``), checked to lie in 0..n; None where none is recorded."""
    k = enc.meta.get("k")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"codec {spec!r}: the encoding's kept count k = {k!r} is not an integer in 0..{n}")
    return k


class TopK(Codec):
    """Keep the density fraction of largest-magnitude entries; values float16 or through the NEXT codec."""

    name = "topk"
    params = (_density_param(),)
    takes_next = True

    def _encode(self, x: torch.Tensor) -> Encoded:
        flat = x.reshape(-1)
        n = flat.numel()
        k = keep_count(float(self.values["density"]), n)
        return self.encode_at(x, _top_support(flat, k))

    def encode_at(self, x: torch.Tensor, index: torch.Tensor) -> Encoded:
        """The encoding of ``x`` keeping the entries at ascending positions ``index`` (``encode`` keeps the top
        k; a budget build passes the top k it found among the nonzeros, the same set up to ties)."""
        flat = x.reshape(-1)
        kind, support = encode_support(index, flat.numel(), gaps=True)
        values = flat[index]
        meta = {"k": int(index.numel()), "support": kind}
        if self.next is None:
            return self._make(x, {kind: support, "values": to_fp16(values, self.name, "a kept value")}, meta)
        return self._make(x, {kind: support}, meta, {"values": self.next.encode(values)})

    def decode_values(self, enc: Encoded) -> torch.Tensor:
        """The kept values as decoded (float32, in position order)."""
        return enc.tensors["values"].float() if self.next is None else self.next.decode(enc.children["values"])

    def _decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        index = decode_support(enc.tensors, n, _stored_k(enc, n, self.spec))
        values = self.decode_values(enc)
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
        kind, support = encode_support(index, n, gaps=True)
        kept = flat[index]
        scale = kept.abs().double().mean().float().reshape(1) if k else torch.zeros(1, device=x.device)
        tensors = {kind: support, "signs": pack_bits(kept > 0), "scale": to_fp16(scale, self.name, "the scale")}
        return self._make(x, tensors, {"k": k, "support": kind})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        index = decode_support(enc.tensors, n, _stored_k(enc, n, self.spec))
        positive = unpack_bits(enc.tensors["signs"], index.numel())
        a = enc.tensors["scale"].float()
        out = torch.zeros(n, dtype=torch.float32, device=index.device)
        out[index] = torch.where(positive, a, -a)
        return out
