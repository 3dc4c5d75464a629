"""Fisher-weighted averaging (Matena & Raffel 2022) with diagonal Fisher weights given per task."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.ops import bcast, weighted_sum


class Fisher(BaseMerger):
    """Σ_t w_t·F_t·δ_t / Σ_t w_t·F_t with F_t = max(fisher_t, ``fisher_floor``) from ``ctx.fisher`` (T, *shape).

    Coordinates where Σ_t w_t·F_t == 0 fall back to the weighted mean. ``fisher_floor`` (default 0: the exact
    formula; Matena & Raffel's code uses 1e-6) also sends coordinates no task cares about towards the mean.
    Reading the Fisher files (one safetensors file per task) is the caller's job."""

    name = "fisher"
    needs_fisher = True
    defaults: ClassVar[dict[str, Any]] = {"fisher_floor": 0.0}

    def _check(self) -> None:
        if self.params["fisher_floor"] < 0:
            raise ConfigError(f"merge method 'fisher': fisher_floor must be >= 0, got {self.params['fisher_floor']}")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if ctx.fisher is None:
            raise ConfigError(f"fisher merge of {ctx.name!r}: no Fisher weights given (MergeContext.fisher)")
        if tuple(ctx.fisher.shape) != tuple(x.shape):
            raise ConfigError(f"fisher merge of {ctx.name!r}: Fisher weights of shape {tuple(ctx.fisher.shape)}, "
                              f"deltas of shape {tuple(x.shape)}")
        f = ctx.fisher.to(x.device, torch.float32).clamp_min(self.params["fisher_floor"]).mul_(bcast(w, x))
        den = f.sum(0)
        num = f.mul_(x).sum(0)
        ok = den != 0
        if bool(ok.all()):
            return num.div_(den)
        return torch.where(ok, num.div_(den.masked_fill(~ok, 1.0)), weighted_sum(x, w, True))
