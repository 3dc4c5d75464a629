"""DARE (Yu et al. 2024): drop each delta entry with probability 1 − density, rescale survivors by 1/density,
then merge linearly (``dare_linear``) or with TIES sign election and disjoint mean (``dare_ties``).

Randomness. The keep-mask of task t in tensor ``name`` is drawn on the CPU (so it is the same on every device)
in blocks of whole rows (dim 0): block b holds rows [b·R, (b+1)·R) with R = max(1, 2²⁰ // elements per row) and
is drawn from its own generator seeded by blake2b(seed, name, t, b). A chunk of rows (``ctx.offset`` > 0) draws
the blocks it overlaps (each only up to the chunk's last row: CPU uniform draws are sequential, so a shorter
draw is a prefix of the longer one; a test checks this) and slices them, so chunked merges equal the
unchunked merge sliced, and no result depends on the order tensors are visited in.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import torch

from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.sign import disjoint_merge, elect_sign

BLOCK_ELEMENTS = 1 << 20


def _seed(seed: int, name: str, task: int, block: int) -> int:
    h = hashlib.blake2b(f"{seed}|{task}|{block}|{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def dare_mask(shape: tuple[int, ...], density: float, seed: int, name: str, task: int, offset: int = 0) -> torch.Tensor:
    """CPU Bernoulli(density) keep-mask for rows [offset, offset + shape[0]) of tensor ``name``, task ``task``."""
    return uniforms(shape, seed, name, task, offset) < density


def uniforms(shape: tuple[int, ...], seed: int, name: str, task: int, offset: int = 0) -> torch.Tensor:
    """CPU uniform [0, 1) draws for rows [offset, offset + shape[0]) of tensor ``name``, task ``task`` (the
    draws behind ``dare_mask``; DELLA compares them with per-entry keep probabilities)."""
    if len(shape) == 0:
        g = torch.Generator().manual_seed(_seed(seed, name, task, 0))
        return torch.rand((), generator=g)
    if shape[0] == 0 or math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.float32)
    row = math.prod(shape[1:])
    rows = max(1, BLOCK_ELEMENTS // max(row, 1))
    stop = offset + shape[0]
    parts = []
    for b in range(offset // rows, -(-stop // rows)):
        lo = b * rows
        g = torch.Generator().manual_seed(_seed(seed, name, task, b))
        # only the rows up to ``stop`` are drawn: uniform draws are sequential, so they are a prefix of the block
        blk = torch.rand((min(stop, lo + rows) - lo, *shape[1:]), generator=g)
        parts.append(blk[max(offset, lo) - lo:])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class DareLinear(BaseMerger):
    """Drop-and-rescale each task (``density``, ``seed``, ``rescale``), then Σ w_t·δ_t (``normalize``: / Σ w_t)."""

    name = "dare_linear"
    trims = True
    per_task_params = ("density",)
    defaults: ClassVar[dict[str, Any]] = {"density": 0.5, "seed": 0, "rescale": True, "normalize": False}

    def _weighted_dropped(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        """w_t·mask_t·δ_t (/ density when rescaling), one new (T, *shape) tensor."""
        assert self.density is not None
        dens = self.task_values("density", ctx, x.shape[0])
        scale = w / torch.tensor(dens, dtype=torch.float32, device=w.device) if self.params["rescale"] else w
        out = torch.empty_like(x)
        for t in range(x.shape[0]):
            torch.mul(x[t], scale[t], out=out[t])
            if dens[t] < 1.0:
                keep = dare_mask(tuple(x.shape[1:]), dens[t], self.params["seed"], ctx.name, t, ctx.offset)
                out[t].masked_fill_(~keep.to(x.device), 0.0)
        return out

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        out = self._weighted_dropped(x, w, ctx).sum(0)
        s = float(w.sum())
        if self.params["normalize"] and abs(s) >= 1e-8:
            out /= s
        return out


class DareTies(DareLinear):
    """Drop-and-rescale each task, then TIES sign election (``sign``) and disjoint mean (``normalize``)."""

    name = "dare_ties"
    defaults: ClassVar[dict[str, Any]] = {"density": 0.5, "seed": 0, "rescale": True, "sign": "total",
                                          "normalize": True}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        wx = self._weighted_dropped(x, w, ctx)
        return disjoint_merge(wx, w, elect_sign(wx, self.params["sign"]), self.params["normalize"])
