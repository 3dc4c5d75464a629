"""Executes per-tensor work units: ``local`` (threads overlapping reads with compute) or ``ray`` (a cluster).

Every streaming pass in tvbasis (Gram, merges, basis materialisation, reconstruction, apply) is a map of a
pure function over work items (groups of tensor names) followed by a reduction on the driver. Work functions
and their arguments must be picklable (checkpoints pickle as their paths and are reopened by the worker), so
the same pass runs on threads or on Ray workers unchanged. Results come back in item order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def progress_bar(total: int, desc: str | None, enabled: bool, unit_scale: bool, unit: str) -> Any:
    """A tqdm bar over ``total`` units, hidden when disabled or without a description; bytes shown in decimal
    units when ``unit_scale``."""
    return tqdm(total=total, desc=desc, disable=not enabled or desc is None, unit=unit,
                unit_scale=unit_scale, unit_divisor=1000, dynamic_ncols=True, leave=False)


class Engine(ABC):
    """Maps a picklable function over work items; results are yielded in item order."""

    name: str = "engine"
    workers: int = 1

    @abstractmethod
    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str | None = None,
            sizes: Sequence[int] | None = None) -> Iterator[R]:
        """Yield fn(item) for each item, in order. ``sizes`` (bytes per item) drive the progress bar."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release what the engine holds (a Ray engine that started Ray shuts it down)."""


