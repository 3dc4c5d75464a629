"""Arcee Fusion (mergekit's ``arcee_fusion``): keep the parts of one fine-tune's task vector that matter most.

For the base θ₀ and ONE other model θ₁ = θ₀ + τ, per tensor: importance = |τ| · KL(softmax(θ₁) ‖ softmax(θ₀)),
the KL taken along the last dim (one value per row, broadcast over it; softmax + 1e-8 on both sides); the
threshold is median + 1.5·IQR of the importances, with mergekit's quantiles: the sorted values at index
⌊q·(n − 1)⌋ (no interpolation); the merged task vector is τ where importance ≥ threshold, else 0. mergekit
estimates the quantiles from a random sample of 10⁶ entries on bigger tensors; tvbasis uses every entry (so
the two agree exactly up to 10⁶ entries per tensor). Computed in float32 as mergekit computes in the tensors'
dtype. Needs the pretrained tensor (``ctx.base``) and the whole tensor; no per-task weights.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext


def _quantile(sorted_flat: torch.Tensor, q: float) -> torch.Tensor:
    return sorted_flat[int(q * (sorted_flat.numel() - 1))]


class ArceeFusion(BaseMerger):
    """τ kept where |τ|·KL(softmax(θ₀ + τ) ‖ softmax(θ₀)) ≥ median + 1.5·IQR, per tensor (one fine-tune)."""

    name = "arcee_fusion"
    whole_tensor = True
    needs_base = True
    defaults: ClassVar[dict[str, Any]] = {}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ConfigError(f"merge method 'arcee_fusion' fuses ONE fine-tune into the pretrained model, got "
                              f"{x.shape[0]}")
        if bool((w != 1).any()):
            raise ConfigError(f"merge method 'arcee_fusion' takes no per-task weights (got {w.tolist()})")
        if ctx.base is None:
            raise ConfigError("merge method 'arcee_fusion' needs the pretrained tensor (MergeContext.base); it "
                              "cannot serve as a store's inner or outer merge")
        base = ctx.base.to(torch.float32)
        tau = x[0]
        if tau.numel() == 0:
            return tau.clone()
        eps = 1e-8
        p = torch.softmax(base + tau, dim=-1) + eps
        q = torch.softmax(base, dim=-1) + eps
        kl = torch.sum(p * torch.log(p / q), dim=-1)
        importance = tau.abs() * kl.unsqueeze(-1)
        s = torch.sort(importance.reshape(-1)).values
        median, q1, q3 = _quantile(s, 0.5), _quantile(s, 0.25), _quantile(s, 0.75)
        threshold = median + 1.5 * (q3 - q1)
        return torch.where(importance >= threshold, tau, 0.0)
