"""Small tensor helpers shared by the merge kernels."""

from __future__ import annotations

import torch


def bcast(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T,) weights viewed to broadcast against (T, *shape)."""
    return w.view(-1, *([1] * (x.dim() - 1)))


def weighted_sum(x: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_t w_t·x_t, divided by Σ_t w_t when ``normalize`` (mergekit: a divisor with |Σ w| < 1e-8 counts as 1)."""
    out = torch.tensordot(w, x, dims=1)
    if normalize:
        s = float(w.sum())
        if abs(s) >= 1e-8:
            out /= s
    return out
