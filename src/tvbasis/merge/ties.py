"""TIES-merging (Yadav et al. 2023) and plain top-k magnitude merging."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.ops import bcast, weighted_sum
from tvbasis.merge.sign import disjoint_merge, elect_sign
from tvbasis.merge.trim import ROUNDINGS, magnitude_mask


class _Trimming(BaseMerger):
    trims = True
    ranks_per_tensor = True
    per_task_params = ("density",)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {**BaseMerger.choices, "rounding": ROUNDINGS}

    def _trimmed(self, x: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        assert self.density is not None
        mask = magnitude_mask(x, self.task_values("density", ctx, x.shape[0]),
                              ctx.thresholds if self.needs_global_thresholds else None, self.params["rounding"])
        return torch.where(mask, x, 0.0)


class Ties(_Trimming):
    """Trim each task to its top-``density`` magnitudes, elect a sign per coordinate (``sign``: total or
    frequency), then the disjoint mean of the agreeing weighted entries (``normalize``; else their sum)."""

    name = "ties"
    defaults: ClassVar[dict[str, Any]] = {"density": 0.2, "sign": "total", "normalize": True, "trim_scope": "tensor",
                                          "rounding": "ceil"}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        wx = self._trimmed(x, ctx).mul_(bcast(w, x))
        return disjoint_merge(wx, w, elect_sign(wx, self.params["sign"]), self.params["normalize"])


class TopK(_Trimming):
    """Trim each task to its top-``density`` magnitudes, then the weighted mean (``normalize``; else the sum)."""

    name = "topk"
    defaults: ClassVar[dict[str, Any]] = {"density": 0.2, "normalize": True, "trim_scope": "tensor", "rounding": "ceil"}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        return weighted_sum(self._trimmed(x, ctx), w, self.params["normalize"])
