"""Exact per-task magnitude thresholds over a whole task vector, in bounded memory (two streaming passes).

Non-negative float32 values order like their int32 bit patterns, so the k-th largest |x| is found by radix
selection: pass 1 histograms the top 16 bits of every |x| per task and finds the bucket holding the k-th
largest; pass 2 histograms the low 16 bits of the values inside that bucket, which pins the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from tvbasis.errors import ConfigError

_BINS = 1 << 16
_SUB = 1 << 22  # elements per histogram sub-block (bounds the int64 temporaries to ~32 MB)


def _blocks(chunk: torch.Tensor, T: int) -> Iterable[tuple[int, torch.Tensor]]:
    """(task, int32 bit patterns of |x|) sub-blocks of one (T, n) chunk."""
    flat = chunk.detach().reshape(T, -1)
    for i in range(T):
        row = flat[i]
        for a in range(0, row.shape[0], _SUB):
            yield i, row[a:a + _SUB].to("cpu", torch.float32).abs().contiguous().view(torch.int32)


def global_thresholds(iter_factory: Callable[[], Iterable[torch.Tensor]], num_tasks: int,
                      density: float) -> torch.Tensor:
    """(T,) float32 thresholds t_i such that keeping |x| ≥ t_i keeps task i's top ceil(density·D) magnitudes
    (more only where values tie at the threshold). ``iter_factory()`` yields (T, n) chunks; called twice."""
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    T = num_tasks
    hi = torch.zeros((T, _BINS), dtype=torch.int64)
    total = 0
    for chunk in iter_factory():
        total += chunk.reshape(T, -1).shape[1]
        for i, b in _blocks(chunk, T):
            hi[i] += torch.bincount((b >> 16).to(torch.int64), minlength=_BINS)
    if total == 0:
        return torch.zeros(T)
    k = min(total, max(1, math.ceil(density * total)))
    above = hi.flip(1).cumsum(1).flip(1)  # above[i, j] = number of values whose top bits are >= j
    bucket = (above >= k).sum(1) - 1      # the bucket holding the k-th largest value
    nxt = (bucket + 1).clamp(max=_BINS - 1).view(T, 1)
    strictly_above = above.gather(1, nxt).view(T) * (bucket + 1 < _BINS)
    rank_in = k - strictly_above          # rank of the k-th largest inside its bucket (>= 1)
    lo = torch.zeros((T, _BINS), dtype=torch.int64)
    for chunk in iter_factory():
        for i, b in _blocks(chunk, T):
            inside = b[(b >> 16) == int(bucket[i])]
            if inside.numel():
                lo[i] += torch.bincount((inside & 0xFFFF).to(torch.int64), minlength=_BINS)
    above_lo = lo.flip(1).cumsum(1).flip(1)
    low_bits = (above_lo >= rank_in.view(T, 1)).sum(1) - 1
    bits = ((bucket << 16) | low_bits).to(torch.int32)
    return bits.view(torch.float32).clone()
