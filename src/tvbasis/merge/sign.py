"""TIES sign election and disjoint merge (Yadav et al. 2023), with mergekit's semantics.

Both work on the WEIGHTED trimmed deltas w_t·δ_t, as mergekit does, so a negative weight flips a task's vote."""

from __future__ import annotations

import torch


def elect_sign(wx: torch.Tensor, how: str) -> torch.Tensor:
    """The elected sign per coordinate, +1.0 or -1.0 (float32, shape of one slice).

    'total': sign of Σ_t w_t·δ_t (the TIES paper's mass); 'frequency': sign of Σ_t sign(w_t·δ_t) (majority).
    A zero vote elects +, as in mergekit."""
    s = torch.sign(wx).sum(0) if how == "frequency" else wx.sum(0)
    return torch.where(s >= 0, 1.0, -1.0)


def disjoint_merge(wx: torch.Tensor, w: torch.Tensor, sign: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sum of the weighted entries whose sign agrees with the elected one (zeros never agree); with
    ``normalize``, divided by the sum of the agreeing tasks' weights (a zero divisor counts as 1, as in mergekit).
    Coordinates where no task agrees are zero.

    Computed as s·Σ_t max(s·w_t·δ_t, 0) with s the elected sign: one (T, *shape) temporary."""
    prod = wx * sign
    denom = torch.tensordot(w, (prod > 0).to(torch.float32), dims=1) if normalize else None
    total = prod.clamp_min_(0.0).sum(0).mul_(sign)
    if denom is None:
        return total
    return total.div_(denom.masked_fill_(denom == 0, 1.0))
