"""Linear merges: task arithmetic (Ilharco et al. 2023) and the (weighted) mean."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.ops import weighted_sum


class TaskArithmetic(BaseMerger):
    """Σ_t w_t·δ_t; ``normalize`` divides by Σ_t w_t (the weighted mean)."""

    name = "task_arithmetic"
    linear = True
    defaults: ClassVar[dict[str, Any]] = {"normalize": False}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        return weighted_sum(x, w, self.params["normalize"])


class Mean(TaskArithmetic):
    """task_arithmetic with normalize=True: Σ w_t·δ_t / Σ w_t, the plain mean with the default unit weights."""

    name = "mean"
    defaults: ClassVar[dict[str, Any]] = {"normalize": True}
