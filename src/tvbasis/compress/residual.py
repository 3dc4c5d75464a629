"""Bases plus per-task residuals: v_t ≈ v̂_t + decode(r̂_t), with r_t = v_t − v̂_t coded per tensor.

v̂_t is a store's reconstruction Σ_m W[m, t]·s_m (+ mean_coef[t]·μ for PCA), optionally from bases that went
through a codec plan themselves (``code_bases``). The residual is taken against exactly the v̂_t the reader
will rebuild — coded bases included — so the bases' coding error is folded into the residual (RTVQ's "error
correction", for any basis). A plan kind set to ``none`` for the bases leaves that kind to the residuals alone
(useful for embedding tables, whose per-task change is row-sparse while a basis is not).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvbasis.compress.plan import CodecPlan
from tvbasis.compress.svd import SVD


def code_bases(plan: CodecPlan | None, name: str, bases: torch.Tensor, mean: torch.Tensor | None = None,
               svd: SVD | None = None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One tensor's stacked bases (M, ...) and mean (or None) through ``plan``: (Ŝ, μ̂, stored bytes).

    ``plan=None`` keeps them as float32 (bytes 4 per element); ``svd`` as in ``CodecPlan.encode``."""
    if plan is None:
        nbytes = 4 * (bases.numel() + (mean.numel() if mean is not None else 0))
        return bases.float(), (mean.float() if mean is not None else None), nbytes
    rows, nbytes = [], 0
    for m in range(bases.shape[0]):
        xhat, nb = plan.roundtrip(name, bases[m], svd)
        rows.append(xhat)
        nbytes += nb
    out = torch.stack(rows) if rows else bases.float()
    mu = None
    if mean is not None:
        mu, nb = plan.roundtrip(name, mean, svd)
        nbytes += nb
    return out, mu, nbytes


def combine_bases(bases: torch.Tensor, weights: Sequence[float] | torch.Tensor, mean: torch.Tensor | None = None,
                  mean_coef: float = 0.0) -> torch.Tensor:
    """v̂ = Σ_m w_m·s_m (+ mean_coef·μ) for one tensor's stacked bases (M, ...)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    out = torch.tensordot(w, bases.float(), dims=1)
    if mean is not None and mean_coef != 0.0:
        out = out + float(mean_coef) * mean.float()
    return out


def residual_roundtrip(plan: CodecPlan | None, name: str, v: torch.Tensor, vhat: torch.Tensor,
                       svd: SVD | None = None) -> tuple[torch.Tensor, int]:
    """(v̂ + decode(encode(v − v̂)), residual bytes); ``plan=None``: no residual stored (v̂, 0)."""
    if plan is None:
        return vhat.float().clone(), 0
    rhat, nbytes = plan.roundtrip(name, v.float() - vhat.float(), svd)
    return vhat.float() + rhat, nbytes
