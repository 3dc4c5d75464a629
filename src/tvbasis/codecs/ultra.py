"""``ultra``: UltraDelta's per-tensor code (Wang et al., NeurIPS 2025, arXiv 2505.13563): uniform quantisation, then
distribution-aware pruning, then a rescale.

As the reference code (``xiaohuiwang000/UltraDelta``, ``src/ultradelta_compression.py``), for one tensor x:

1. **Uniform quantisation** at ``bits`` b over the tensor's range: q = round((x − min x)/(max x − min x)·(2^b − 1)),
   x_q = min + q·(max − min)/(2^b − 1) (``quantize_delta``: no integer zero point, so 0 is not always a level).
2. **Distribution-aware pruning** (``mask_unique_values``): the kept fraction ``density`` is 1 − the sparsity s;
   with s₀ the fraction of x_q already exactly 0, each quantisation level keeps its elements but for
   round(count·s′) of them, chosen at random, with s′ = max(0, (s − s₀)/(1 − s₀)) — so every level loses the same
   share and the histogram of the kept values keeps its shape. The choice is seeded (``seed``): a permutation of
   the positions from ``torch.Generator().manual_seed(seed)`` ranks the candidates of every level.
3. **Rescale**: x̂ = ``scale``·x_q on the kept positions, 0 elsewhere. ``scale=none`` is 1/density (DARE's
   1/(1 − s)); the store method sets it to UltraDelta's global factor — 1/(1 − s_target) for every tensor of a task,
   times the trace-norm ratio (``tvbasis.compress.ultradelta``).

Stored: the kept positions (``index`` int32 or a bit ``mask``, whichever is smaller: ``tvbasis.codecs.topk``),
``q`` (the kept codes bit-packed at b bits, ⌈k·b/8⌉ bytes) and ``range`` (float32 [min, max], 8 bytes). The scale
is a parameter of the spec (recorded with the entry), not a stored tensor. A constant tensor keeps one level; an
all-zero tensor stores nothing but its range.

Memory: the codes (1 byte per element), a random permutation (4 bytes per element) and a level mask at a time;
not chunked (the permutation ranks the whole tensor).
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, expect_numel
from tvbasis.codecs.bits import pack_uint, packed_size, unpack_uint
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param
from tvbasis.codecs.topk import decode_support, encode_support


def uniform_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
    """(codes uint8 in [0, 2^b − 1], min, max) of the flattened ``x``; a constant tensor has codes 0."""
    flat = x.reshape(-1).float()
    lo, hi = float(flat.min()), float(flat.max())
    levels = (1 << bits) - 1
    if not hi > lo:
        return torch.zeros(flat.numel(), dtype=torch.uint8, device=flat.device), lo, hi
    q = torch.round((flat - lo) / (hi - lo) * levels).clamp_(0, levels).to(torch.uint8)
    return q, lo, hi


def level_values(lo: float, hi: float, bits: int) -> torch.Tensor:
    """The 2^b dequantised levels min + k·(max − min)/(2^b − 1), float32 (all = min for a constant tensor)."""
    levels = (1 << bits) - 1
    k = torch.arange(levels + 1, dtype=torch.float32)
    if not hi > lo:
        return torch.full((levels + 1,), lo, dtype=torch.float32)
    return k / levels * torch.tensor(hi - lo, dtype=torch.float32) + torch.tensor(lo, dtype=torch.float32)


def quantized_std(x: torch.Tensor, bits: int) -> float:
    """Standard deviation (population, as the reference's ``sqrt(mean((v − mean)²))``) of the quantised tensor x_q,
    in float64 from the level histogram; 0 for a tensor of fewer than 2 elements."""
    if x.numel() < 2:
        return 0.0
    q, lo, hi = uniform_quantize(x, bits)
    counts = torch.bincount(q.long(), minlength=1 << bits).double()
    vals = level_values(lo, hi, bits).double()
    n = counts.sum()
    mean = (counts * vals).sum() / n
    return float(((counts * (vals - mean) ** 2).sum() / n).sqrt())


def prune_levels(q: torch.Tensor, zero_levels: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Ascending positions kept by the distribution-aware pruning of codes ``q`` (see the module docstring).
    ``zero_levels``: bool per level, True where the level's value is exactly 0 (never stored: it decodes to 0)."""
    n = q.numel()
    nlev = zero_levels.numel()
    counts = torch.bincount(q.long(), minlength=nlev).cpu()
    zeros = int(counts[zero_levels.cpu()].sum())
    rate = 1.0 - density
    cur = zeros / n
    sub = 0.0 if cur >= 1.0 else max(0.0, (rate - cur) / (1.0 - cur))
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(n, generator=g, dtype=torch.int32).to(q.device)  # CPU generator: same on any device
    keep = torch.zeros(n, dtype=torch.bool, device=q.device)
    for level in range(nlev):
        c = int(counts[level])
        if c == 0 or bool(zero_levels[level]):
            continue
        drop = round(c * sub)  # Python's round, as the reference
        at = q == level
        if drop == 0:
            keep |= at
        elif drop < c:
            r = rank[at]
            kth = torch.kthvalue(r, drop).values
            keep[at] = r > kth
    return torch.nonzero(keep).reshape(-1)


class Ultra(Codec):
    """UltraDelta's tensor code: b-bit uniform levels, each level pruned to ``density`` at random, rescaled."""

    name = "ultra"
    params = (Param("density", float, 0.03, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
              Param("bits", int, 4, "an integer in 1..8", lambda v: 1 <= v <= 8),
              Param("scale", float, None, "a number > 0", lambda v: v > 0.0, optional=True),
              Param("seed", int, 0, "an integer >= 0", lambda v: v >= 0))

    @property
    def factor(self) -> float:
        """The rescale applied to the kept values: the ``scale`` parameter, or 1 / ``density`` when none is given."""
        s = self.values["scale"]
        return float(s) if s is not None else 1.0 / float(self.values["density"])

    def _encode(self, x: torch.Tensor) -> Encoded:
        bits = int(self.values["bits"])
        q, lo, hi = uniform_quantize(x, bits)
        zero_levels = level_values(lo, hi, bits) == 0.0
        index = prune_levels(q, zero_levels, float(self.values["density"]), int(self.values["seed"]))
        kind, support = encode_support(index, q.numel())
        tensors = {kind: support, "q": pack_uint(q[index], bits),
                   "range": torch.tensor([lo, hi], dtype=torch.float32)}
        return self._make(x, tensors, {"k": int(index.numel()), "support": kind})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        bits = int(self.values["bits"])
        n = enc.numel
        lo, hi = (float(v) for v in expect_numel(enc.tensors["range"], 2, self.name, "range").float())
        index = decode_support(enc.tensors, n)
        k = index.numel()
        if k and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"codec {self.spec!r}: a stored position lies outside the tensor")
        q = unpack_uint(expect_numel(enc.tensors["q"], packed_size(k, bits), self.name, "codes"), bits, k)
        out = torch.zeros(n, dtype=torch.float32, device=index.device)
        out[index] = level_values(lo, hi, bits).to(index.device)[q.long()] * self.factor
        return out
