"""The one interface every merge method implements.

A merge method combines the T task-vector slices of ONE tensor (stacked as ``deltas`` of shape (T, *shape),
float32) into one merged slice of shape ``shape``. Methods never see more than one tensor (or one chunk of a
tensor along dim 0) at a time, so a merge over K checkpoints holds about K slices of one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class MergeContext:
    """What a merge may need besides the deltas.

    name: the tensor's name (seeds per-tensor randomness so results do not depend on walk order or chunking
        offset; see ``offset``).
    offset: index along dim 0 where this chunk starts (0 when the whole tensor is passed).
    thresholds: (T,) float32 per-task magnitude thresholds when trimming has global scope, else None.
    fisher: (T, *shape) float32 diagonal Fisher weights for this tensor (fisher merge only), else None.
    """

    name: str = ""
    offset: int = 0
    thresholds: torch.Tensor | None = None
    fisher: torch.Tensor | None = None


class Merger(Protocol):
    """A configured merge method (parameters bound)."""

    name: str
    #: fraction kept by trimming, or None when the method does not trim
    density: float | None
    #: True when trim_scope == "global": the caller must pass per-task thresholds (see merge.thresholds)
    needs_global_thresholds: bool
    #: True when the method needs ctx.fisher
    needs_fisher: bool

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        """deltas (T, *shape) float32, weights (T,) float32 -> merged (*shape) float32."""
        ...


@dataclass(frozen=True)
class MergeSpec:
    """A merge method by name plus its parameters, as given on the command line or in a store manifest."""

    method: str = "task_arithmetic"
    params: dict[str, object] = field(default_factory=dict)
