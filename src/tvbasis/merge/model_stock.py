"""Model Stock (Jang et al. 2024, arXiv:2403.19522), with mergekit's definition.

For the T ≥ 2 task vectors of one tensor (flattened; with ``filter_wise``, each row separately, a 1-D tensor
being one row): c = the mean over pairs i < j of cos(τ_i, τ_j) = τ_i·τ_j / max(‖τ_i‖·‖τ_j‖, 1e-6), clamped to
[−1, 1]; t = T·c / (1 + (T − 1)·c); the merged model is t·mean(θ_i) + (1 − t)·θ₀, i.e. the merged task vector
t·mean(τ_i). No per-task weights (mergekit has none). Needs the whole tensor (cosines over it). Cosines are
float64.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext


class ModelStock(BaseMerger):
    """t·mean(τ_i) with t = T·c/(1 + (T − 1)·c), c the mean pairwise cosine (per tensor, or per row)."""

    name = "model_stock"
    whole_tensor = True
    defaults: ClassVar[dict[str, Any]] = {"filter_wise": False}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        T = x.shape[0]
        if T < 2:
            raise ConfigError(f"merge method 'model_stock' needs at least two fine-tunes, got {T}")
        if bool((w != 1).any()):
            raise ConfigError(f"merge method 'model_stock' takes no per-task weights (got {w.tolist()})")
        shape = x.shape[1:]
        if self.params["filter_wise"] and x.dim() >= 2:
            v = x.reshape(T, x.shape[1], -1) if x.dim() > 2 else x.reshape(T, 1, -1)
        else:
            v = x.reshape(T, 1, -1)
        v64 = v.to(torch.float64)
        norms = v64.norm(dim=-1)  # (T, rows)
        cos = []
        for i in range(T):
            for j in range(i + 1, T):
                dots = (v64[i] * v64[j]).sum(-1)
                cos.append((dots / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
        c = torch.stack(cos).mean(0)  # (rows,)
        t = T * c / (1 + (T - 1) * c)
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"model_stock of {ctx.name!r}: the mean cosine of the task vectors is "
                              f"-1/(T-1), where Model Stock's ratio is undefined")
        out = v.mean(0) * t.to(torch.float32).unsqueeze(-1)
        return out.reshape(shape)
