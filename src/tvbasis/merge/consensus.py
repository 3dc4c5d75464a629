"""TALL-mask consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.ops import bcast


class Consensus(BaseMerger):
    """τ = Σ_t w_t·δ_t; TALL masks m_t = 1[|w_t·δ_t| ≥ ``mask_lambda``·|τ − w_t·δ_t|]; keep the coordinates
    at least ``k`` tasks claim: merged = 1[Σ_t m_t ≥ k] ⊙ τ. Defaults follow the paper: k = 2, λ = 0.4 (the
    middle of its λ grid 0.2–0.6; tune it per task set)."""

    name = "consensus"
    defaults: ClassVar[dict[str, Any]] = {"k": 2, "mask_lambda": 0.4}

    def _check(self) -> None:
        if self.params["k"] < 1:
            raise ConfigError(f"merge method 'consensus': k must be >= 1, got {self.params['k']}")
        if self.params["mask_lambda"] < 0:
            raise ConfigError(f"merge method 'consensus': mask_lambda must be >= 0, got {self.params['mask_lambda']}")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        wx = x * bcast(w, x)
        tau = wx.sum(0)
        votes = (wx.abs() >= (tau - wx).abs_().mul_(self.params["mask_lambda"])).sum(0)
        return tau.masked_fill_(votes < self.params["k"], 0.0)
