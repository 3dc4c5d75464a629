"""NearSwap (mergekit's ``nearswap``): take the other model's value where it is near the base's.

For the base θ₀ and ONE other model θ₁ = θ₀ + τ, entrywise: w = clamp(t / max(|τ|, 1e-6), 0, 1) and the merged
model is w·θ₁ + (1 − w)·θ₀, i.e. the merged task vector is w·τ: entries that moved less than t are taken whole,
larger moves are shrunk to magnitude t. No per-task weights; elementwise (chunkable).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext


class NearSwap(BaseMerger):
    """τ·clamp(t/|τ|, 0, 1) for one fine-tune: moves below ``t`` kept, bigger ones cut to magnitude t."""

    name = "nearswap"
    defaults: ClassVar[dict[str, Any]] = {"t": 0.001}

    def _check(self) -> None:
        if self.params["t"] < 0:
            raise ConfigError(f"merge method 'nearswap': t must be >= 0, got {self.params['t']!r}")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ConfigError(f"merge method 'nearswap' takes the base model and ONE other model, got {x.shape[0]}")
        if bool((w != 1).any()):
            raise ConfigError(f"merge method 'nearswap' takes no per-task weights (got {w.tolist()})")
        tau = x[0]
        return tau * (self.params["t"] / tau.abs().clamp(min=1e-6)).clamp(0.0, 1.0)
