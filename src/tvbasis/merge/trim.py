"""Magnitude trimming: which entries of each task slice survive a top-``density`` cut.

Per tensor (``trim_scope="tensor"``): each task keeps EXACTLY k = ceil(density·n) entries of its n, the k largest
|δ|; where several entries tie at the cut value the lowest flat indices win, so the result is deterministic and
the same on every device. Because the cut is over the whole tensor, a per-tensor trim must be given the whole
tensor, never a chunk of it.

Global (``trim_scope="global"``): each task keeps |δ| ≥ its threshold over the whole task vector
(``global_thresholds``), so ties at the threshold may keep a few more than ceil(density·D). This is the scope to
use with chunked tensors: the test is elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tvbasis.merge.threshold import abs_bits, kth_largest

#: per-task slice size from which the cut is found by radix selection instead of torch.kthvalue
RADIX_MIN = 1 << 16


#: how a trim turns density·n into a count: ``ceil`` (tvbasis's default) or ``floor`` (mergekit's and PEFT's
#: int(density·n), for configs that must reproduce mergekit entry by entry)
ROUNDINGS = ("ceil", "floor")


def keep_count(n: int, density: float, rounding: str = "ceil") -> int:
    """How many of n entries a top-``density`` trim keeps: ceil(density·n) (``rounding="floor"``: ⌊density·n⌋),
    at least 1 when n > 0."""
    k = math.floor(density * n) if rounding == "floor" else math.ceil(density * n)
    return min(n, max(1, k)) if n else 0


def magnitude_mask(x: torch.Tensor, density: float | Sequence[float],
                   thresholds: torch.Tensor | None = None, rounding: str = "ceil") -> torch.Tensor:
    """Boolean mask (T, *shape) of the entries each task keeps (see the module doc); ``x`` float32.
    ``density`` is one fraction for every task or T fractions, one per task (mergekit's per-model densities);
    ``rounding``: see ``keep_count``."""
    T = x.shape[0]
    if not isinstance(density, (int, float)):
        ds = [float(d) for d in density]
        if len(set(ds)) > 1 and thresholds is None:
            return torch.cat([magnitude_mask(x[t:t + 1], ds[t], rounding=rounding) for t in range(T)])
        density = ds[0]
    if thresholds is not None:
        th = thresholds.to(x.device, torch.float32).view(T, *([1] * (x.dim() - 1)))
        return x.abs() >= th
    bits = abs_bits(x.reshape(T, -1))
    a = bits.view(torch.float32)  # |x|, sharing the bits' memory
    n = a.shape[1]
    k = keep_count(n, density, rounding)
    if k >= n:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    # the exact k-th largest |δ| per task: radix selection (about 2x faster than kthvalue on big slices),
    # kthvalue where the slice is too small to amortise the 65536-bin histograms
    cut = kth_largest(bits, k) if n > RADIX_MIN else torch.kthvalue(a, n - k + 1, dim=1, keepdim=True).values
    mask = a > cut
    need = k - torch.count_nonzero(mask, dim=1).view(T, 1)  # ≥ 1 entries equal to the cut still to keep
    eq = a == cut
    if bool((torch.count_nonzero(eq, dim=1).view(T, 1) > need).any()):  # more ties than room: lowest first
        eq &= eq.cumsum(1, dtype=torch.int32) <= need
    mask |= eq
    return mask.view(x.shape)
