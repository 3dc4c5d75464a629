"""The merge methods, each over the T task-vector slices of one tensor (mergekit names and parameters)."""

from __future__ import annotations

from typing import Any

import torch

from tvbasis.merge.base import MergeContext
from tvbasis.merge.common import BaseMerger, bcast, dare_mask, disjoint_merge, elect_sign, topk_mask


class TaskArithmetic(BaseMerger):
    """Σ_t w_t·δ_t (Ilharco et al. 2023); ``normalize`` divides by Σ w_t (weighted mean)."""

    name = "task_arithmetic"
    defaults: dict[str, Any] = {"normalize": False}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        out = torch.tensordot(w, x, dims=1)
        return out / w.sum() if self.params["normalize"] else out


class Mean(TaskArithmetic):
    """Weighted mean of the task slices (task_arithmetic with normalize=True)."""

    name = "mean"
    defaults: dict[str, Any] = {"normalize": True}


class Ties(BaseMerger):
    """TIES-merging (Yadav et al. 2023): trim to ``density``, elect signs, disjoint mean."""

    name = "ties"
    trims = True
    defaults: dict[str, Any] = {"density": 0.2, "sign": "total", "normalize": True, "trim_scope": "tensor"}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        assert self.density is not None
        trimmed = torch.where(topk_mask(x, self.density, ctx.thresholds if self.needs_global_thresholds else None),
                              x, 0.0)
        sign = elect_sign(trimmed, w, self.params["sign"])
        return disjoint_merge(trimmed, w, sign, bool(self.params["normalize"]))


class TopK(BaseMerger):
    """Magnitude top-``density`` per task, then the (weighted) mean over tasks."""

    name = "topk"
    trims = True
    defaults: dict[str, Any] = {"density": 0.2, "normalize": True, "trim_scope": "tensor"}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        assert self.density is not None
        trimmed = torch.where(topk_mask(x, self.density, ctx.thresholds if self.needs_global_thresholds else None),
                              x, 0.0)
        out = torch.tensordot(w, trimmed, dims=1)
        return out / w.sum() if self.params["normalize"] else out


class DareLinear(BaseMerger):
    """DARE (Yu et al. 2024): drop each coordinate with probability 1 − density, rescale kept ones by
    1/density (seeded), then a weighted sum (``normalize``: weighted mean)."""

    name = "dare_linear"
    trims = True
    defaults: dict[str, Any] = {"density": 0.5, "seed": 0, "normalize": False, "rescale": True}

    def _dropped(self, x: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        assert self.density is not None
        if self.density >= 1.0:
            return x
        out = torch.empty_like(x)
        for t in range(x.shape[0]):
            keep = dare_mask(x.shape[1:], self.density, int(self.params["seed"]), ctx.name, t, ctx.offset, x.device)
            out[t] = torch.where(keep, x[t], 0.0)
        return out / self.density if self.params["rescale"] else out

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        d = self._dropped(x, ctx)
        out = torch.tensordot(w, d, dims=1)
        return out / w.sum() if self.params["normalize"] else out


class DareTies(DareLinear):
    """DARE drop-and-rescale followed by TIES sign election and disjoint mean."""

    name = "dare_ties"
    defaults: dict[str, Any] = {"density": 0.5, "seed": 0, "sign": "total", "normalize": True, "rescale": True}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        d = self._dropped(x, ctx)
        return disjoint_merge(d, w, elect_sign(d, w, self.params["sign"]), bool(self.params["normalize"]))


class Fisher(BaseMerger):
    """Fisher-weighted averaging (Matena & Raffel 2022): Σ w_t F_t δ_t / Σ w_t F_t, with F the diagonal Fisher
    of each task; coordinates where Σ w_t F_t ≤ ``fisher_floor`` fall back to the weighted mean."""

    name = "fisher"
    needs_fisher = True
    defaults: dict[str, Any] = {"fisher_floor": 1e-12}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        from tvbasis.errors import ConfigError
        if ctx.fisher is None:
            raise ConfigError(f"fisher merge of {ctx.name!r}: no Fisher weights given")
        f = ctx.fisher.to(x.device, torch.float32).clamp_min(0) * bcast(w, x)
        den = f.sum(0)
        mean = torch.tensordot(w, x, dims=1) / w.sum()
        ok = den > float(self.params["fisher_floor"])
        return torch.where(ok, (f * x).sum(0) / torch.where(ok, den, 1.0), mean)


class Consensus(BaseMerger):
    """TALL-mask consensus merging (Wang et al. 2024): τ = Σ w_t δ_t; task masks m_t = |δ_t| ≥ λ·|τ − δ_t|;
    keep the coordinates selected by at least ``k`` masks: merged = 1[Σ m_t ≥ k] ⊙ τ."""

    name = "consensus"
    defaults: dict[str, Any] = {"k": 2, "mask_lambda": 0.4}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        tau = torch.tensordot(w, x, dims=1)
        masks = x.abs() >= float(self.params["mask_lambda"]) * (tau.unsqueeze(0) - x).abs()
        keep = masks.sum(0) >= int(self.params["k"])
        return torch.where(keep, tau, 0.0)


MERGE_METHODS: dict[str, type[BaseMerger]] = {
    cls.name: cls for cls in (TaskArithmetic, Mean, Ties, TopK, DareLinear, DareTies, Fisher, Consensus)
}
