"""Shared pieces of the merge methods: parameter validation, weighting, trimming, sign election."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import MergeContext


class BaseMerger:
    """Binds and validates parameters; subclasses implement ``_merge``."""

    name = ""
    #: accepted parameters and their defaults
    defaults: dict[str, Any] = {}
    trims = False
    needs_fisher = False

    def __init__(self, params: Mapping[str, Any]) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"merge method {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                              f"accepted: {sorted(self.defaults) or 'none'}")
        self.params = {**self.defaults, **params}
        self.density: float | None = None
        if self.trims:
            d = self.params["density"]
            if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < float(d) <= 1:
                raise ConfigError(f"merge method {self.name!r}: density must be in (0, 1], got {d!r}")
            self.density = float(d)
        scope = self.params.get("trim_scope", "tensor")
        if scope not in ("tensor", "global"):
            raise ConfigError(f"merge method {self.name!r}: trim_scope must be 'tensor' or 'global', got {scope!r}")
        sign = self.params.get("sign", "total")
        if sign not in ("total", "frequency"):
            raise ConfigError(f"merge method {self.name!r}: sign must be 'total' or 'frequency', got {sign!r}")
        self.needs_global_thresholds = self.trims and scope == "global"

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if deltas.dim() < 1 or deltas.shape[0] != weights.shape[0]:
            raise ConfigError(f"merge {self.name!r} of {ctx.name!r}: {deltas.shape[0]} task slices but "
                              f"{weights.shape[0]} weights")
        if self.needs_global_thresholds and ctx.thresholds is None:
            raise ConfigError(f"merge {self.name!r} with trim_scope=global needs per-task thresholds")
        return self._merge(deltas.to(torch.float32), weights.to(deltas.device, torch.float32), ctx)

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError


def bcast(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T,) weights viewed to broadcast against (T, *shape)."""
    return w.view(-1, *([1] * (x.dim() - 1)))


def topk_mask(x: torch.Tensor, density: float, thresholds: torch.Tensor | None) -> torch.Tensor:
    """Per task, keep the top ``density`` fraction of magnitudes.

    Per tensor (thresholds None): exactly k = ceil(density·n) entries per task are kept (ties at the threshold
    broken by torch.topk's order). Global: keep |x| ≥ the task's threshold (from ``global_thresholds``)."""
    T = x.shape[0]
    flat = x.reshape(T, -1).abs()
    if thresholds is not None:
        th = thresholds.to(flat.device, torch.float32).view(T, 1)
        return (flat >= th).reshape(x.shape)
    n = flat.shape[1]
    k = min(n, max(1, math.ceil(density * n))) if n else 0
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    idx = torch.topk(flat, k, dim=1, sorted=False).indices
    mask.scatter_(1, idx, True)
    return mask.reshape(x.shape)


def elect_sign(x: torch.Tensor, w: torch.Tensor, how: str) -> torch.Tensor:
    """TIES sign election over tasks: 'total' = sign of the weighted sum (mass), 'frequency' = majority."""
    if how == "frequency":
        s = torch.sign(x).sum(0)
    else:
        s = (x * bcast(w, x)).sum(0)
    return torch.where(s >= 0, 1.0, -1.0).to(x.dtype)


def disjoint_merge(x: torch.Tensor, w: torch.Tensor, sign: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Average (or sum) the weighted entries whose sign agrees with the elected sign; zero where none agree."""
    agree = (torch.sign(x) == sign.unsqueeze(0)) & (x != 0)
    wx = torch.where(agree, x * bcast(w, x), 0.0)
    total = wx.sum(0)
    if not normalize:
        return total
    denom = torch.where(agree, bcast(w, x).expand_as(x), 0.0).sum(0)
    return torch.where(denom != 0, total / torch.where(denom != 0, denom, 1.0), 0.0)


DARE_BLOCK_ROWS = 256


def dare_mask(shape: torch.Size, density: float, seed: int, name: str, task: int, offset: int,
              device: torch.device) -> torch.Tensor:
    """Bernoulli(density) keep-mask for rows [offset, offset + shape[0]) of tensor ``name``, task ``task``.

    Drawn in blocks of DARE_BLOCK_ROWS rows, each from a generator seeded by (seed, crc32(name), task, block),
    so a chunk of a tensor gets exactly the rows of the whole tensor's mask: results do not depend on walk order
    or chunking."""
    if len(shape) == 0:
        g = torch.Generator().manual_seed(_mix(seed, name, task, 0))
        return (torch.rand((), generator=g) < density).to(device)
    stop = offset + shape[0]
    parts = []
    b = offset // DARE_BLOCK_ROWS
    while b * DARE_BLOCK_ROWS < stop:
        lo = b * DARE_BLOCK_ROWS
        g = torch.Generator().manual_seed(_mix(seed, name, task, b))
        blk = torch.rand((DARE_BLOCK_ROWS, *shape[1:]), generator=g) < density
        parts.append(blk[max(offset, lo) - lo: min(stop, lo + DARE_BLOCK_ROWS) - lo])
        b += 1
    return torch.cat(parts).to(device)


def _mix(seed: int, name: str, task: int, row: int) -> int:
    h = zlib.crc32(f"{int(seed)}|{name}|{task}|{row}".encode())
    return (h * 0x9E3779B1 + int(seed)) % (2**63 - 1)
