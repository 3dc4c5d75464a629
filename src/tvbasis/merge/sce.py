"""SCE (Wan et al. 2024, arXiv:2408.07990, "Select, Calculate, Erase"), with mergekit's definition.

For the T task vectors of one tensor: **select** (``select_topk`` < 1): keep, in every task, the entries whose
variance across the tasks (population variance) is among the ⌊select_topk·m⌋ largest, m the number of entries
of non-zero variance (equal variances ranked by index); **calculate**: w_t = mean(τ_t²) / Σ_s mean(τ_s²)
(1/T when that sum is below 1e-6); **erase**: keep τ_t's entries whose sign equals the sign of Σ_s τ_s (0
elects +); the merged task vector is Σ_t w_t·kept_t / max(Σ_t w_t·[kept_t], 1e-6). No per-task weights (mergekit's
SCE has none). Needs the whole tensor (variances and mean squares over it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext


class SCE(BaseMerger):
    """Select by cross-task variance, weight tasks by their mean square, erase minority signs."""

    name = "sce"
    whole_tensor = True
    defaults: ClassVar[dict[str, Any]] = {"select_topk": 1.0}

    def _check(self) -> None:
        if not 0 <= self.params["select_topk"] <= 1:
            raise ConfigError(f"merge method 'sce': select_topk must be in [0, 1], got {self.params['select_topk']!r}")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if bool((w != 1).any()):
            raise ConfigError(f"merge method 'sce' takes no per-task weights (got {w.tolist()})")
        T = x.shape[0]
        tv = x.clone()
        k_frac = self.params["select_topk"]
        if k_frac < 1:
            var = tv.var(0, unbiased=False).reshape(-1)
            k = int(int(torch.count_nonzero(var)) * k_frac)
            keep = torch.zeros_like(var, dtype=torch.bool)
            if k > 0:
                keep[torch.sort(var.abs(), descending=True, stable=True).indices[:k]] = True
            tv.mul_(keep.view(1, *x.shape[1:]))
        flat = tv.reshape(T, -1)
        ms = flat.double().pow(2).mean(1)
        total = float(ms.sum())
        weights = torch.full((T,), 1.0 / T, dtype=torch.float64) if abs(total) < 1e-6 else ms / total
        elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
        kept = torch.sign(tv) == elected
        ew = weights.to(tv.dtype).view(T, *[1] * (x.dim() - 1)).to(x.device) * kept
        return (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)
