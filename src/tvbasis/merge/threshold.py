"""Exact k-th largest magnitudes per task by radix selection: over a whole task vector in bounded memory
(``global_thresholds``, two streaming passes) or over one in-memory (T, n) block (``kth_largest``).

Non-negative float32 values order like their int32 bit patterns, so the k-th largest |x| is found by radix
selection: pass 1 histograms the top 16 bits of every |x| per task and finds the bucket holding the k-th
largest; pass 2 histograms the low 16 bits of the values inside that bucket, which pins the exact value.
Memory: two (T, 65536) int64 histograms plus one bounded sub-block of a chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from tvbasis.errors import ConfigError

_BINS = 1 << 16
_SUB = 1 << 22  # elements per task and sub-block (bounds the temporaries to ~16 MB per task)


def _bits(chunks: Iterable[torch.Tensor], T: int) -> Iterator[torch.Tensor]:
    """(T, s) int32 bit patterns of |x|, in sub-blocks of at most _SUB columns, for every chunk."""
    for chunk in chunks:
        if chunk.dim() < 1 or chunk.shape[0] != T:
            raise ConfigError(f"global_thresholds: chunk of shape {tuple(chunk.shape)}, expected ({T}, n)")
        flat = chunk.detach().reshape(T, -1)
        for a in range(0, flat.shape[1], _SUB):
            yield abs_bits(flat[:, a:a + _SUB].to(torch.float32))


def _last_reaching(hist: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the highest bin j holding the k-th largest value (the values in bins ≥ j number at least k),
    and how many values lie in bins > j. With c = cumsum(hist): j = #{j' : c[j'] ≤ total − k}."""
    c = hist.cumsum(1)
    j = (c <= (c[:, -1] - k).view(-1, 1)).sum(1)
    return j, c[:, -1] - c.gather(1, j.view(-1, 1)).view(-1)


class _RadixSelect:
    """Two-pass radix selection of the k_t-th largest non-negative float32 per task t."""

    def __init__(self, T: int, device: torch.device) -> None:
        self.T, self.device = T, device
        self.hi = torch.zeros((T, _BINS), dtype=torch.int64, device=device)
        self.lo = torch.zeros((T, _BINS), dtype=torch.int64, device=device)
        self.bucket: list[int] = []

    def add_high(self, bits: torch.Tensor) -> None:
        top = bits.to(self.device) >> 16
        for t in range(self.T):
            self.hi[t] += torch.bincount(top[t], minlength=_BINS)

    def locate(self, k: torch.Tensor) -> None:
        bucket, over = _last_reaching(self.hi, k)
        self.rank = k - over  # rank of the k-th largest among the values in its bucket (≥ 1)
        self.bucket = bucket.tolist()
        self._bucket = bucket

    def add_low(self, bits: torch.Tensor) -> None:
        bits = bits.to(self.device)
        for t in range(self.T):
            row = bits[t]
            inside = row[(row >> 16) == self.bucket[t]]
            if inside.numel():
                self.lo[t] += torch.bincount(inside & 0xFFFF, minlength=_BINS)

    def result(self) -> torch.Tensor:
        low, _ = _last_reaching(self.lo, self.rank)
        return ((self._bucket << 16) | low).to(torch.int32).view(torch.float32)


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |x| for float32 ``x`` (a new tensor; ``.view(torch.float32)`` of it is |x|)."""
    return x.view(torch.int32) & 0x7FFFFFFF


def kth_largest(bits: torch.Tensor, k: int) -> torch.Tensor:
    """(T, 1) float32: the exact k-th largest value of each row of ``bits`` (T, n), the int32 patterns of
    non-negative float32 values (``abs_bits``), 1 ≤ k ≤ n."""
    T = bits.shape[0]
    sel = _RadixSelect(T, bits.device)
    for a in range(0, bits.shape[1], _SUB):
        sel.add_high(bits[:, a:a + _SUB])
    sel.locate(torch.full((T,), k, dtype=torch.int64, device=bits.device))
    for a in range(0, bits.shape[1], _SUB):
        sel.add_low(bits[:, a:a + _SUB])
    return sel.result().view(T, 1)


def global_thresholds(iter_factory: Callable[[], Iterable[torch.Tensor]], num_tasks: int,
                      density: float | Sequence[float], rounding: str = "ceil") -> torch.Tensor:
    """(T,) float32 thresholds: th_t is exactly the ceil(density·D)-th largest |x| of task t over all D entries,
    so keeping |x| ≥ th_t keeps task t's top ceil(density·D) magnitudes (more only where values tie at th_t).
    ``density`` is one fraction or T fractions, one per task; ``rounding="floor"`` counts ⌊density·D⌋ instead.

    ``iter_factory()`` returns a fresh iterator of (T, n) chunks covering the vector once; it is called twice.
    Histograms live on the device of the first chunk; the result is on the CPU."""
    T = int(num_tasks)
    if T < 1:
        raise ConfigError(f"global_thresholds: num_tasks must be >= 1, got {num_tasks}")
    ds = [density] * T if isinstance(density, (int, float)) else list(density)
    if len(ds) != T:
        raise ConfigError(f"global_thresholds: {len(ds)} densities for {T} tasks")
    for d in ds:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ConfigError(f"density must be in (0, 1], got {d!r}")
    sel: _RadixSelect | None = None
    total = 0
    for b in _bits(iter_factory(), T):
        if sel is None:
            sel = _RadixSelect(T, b.device)
        total += b.shape[1]
        sel.add_high(b)
    if sel is None or total == 0:
        return torch.zeros(T, dtype=torch.float32)
    rnd = math.floor if rounding == "floor" else math.ceil
    sel.locate(torch.tensor([min(total, max(1, rnd(d * total))) for d in ds], dtype=torch.int64,
                            device=sel.device))
    for b in _bits(iter_factory(), T):
        sel.add_low(b)
    return sel.result().cpu()
