"""The global trim-threshold pass: each task's exact k-th largest magnitude over a whole task vector (or over the
tensors of one layer group), found by two streaming radix-selection passes (``tvbasis.merge.global_thresholds``).

Used by merges with ``trim_scope=global``, by cluster bases whose inner merge trims globally, and by outer merges
of a store over its bases or reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence

import torch

from tvbasis.engine import Engine
from tvbasis.merge import global_thresholds
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, Item, TaskSet


class DeltaChunk:
    """Work unit: the (T, n) task-vector slices of one item (picklable: runs on any engine)."""

    def __init__(self, taskset: TaskSet) -> None:
        self.taskset = taskset

    def __call__(self, item: Item) -> torch.Tensor:
        name, a, b = item
        x = self.taskset.deltas(name, (a, b) if self.taskset.specs[name].shape else None)
        return x.reshape(x.shape[0], -1)


def taskset_thresholds(taskset: TaskSet, engine: Engine, density: float, names: Collection[str] | None = None,
                       chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
                       desc: str = "global trim thresholds") -> torch.Tensor:
    """(T,) thresholds over the task vectors of ``taskset`` (only the tensors in ``names`` when given)."""
    items = [i for i in taskset.items(chunk_elements) if names is None or i[0] in names]

    def factory() -> Iterator[torch.Tensor]:
        yield from engine.map(DeltaChunk(taskset), items, desc=desc, sizes=[taskset.item_bytes(i) for i in items])
    return global_thresholds(factory, taskset.T, density)


def operand_thresholds(operands: Callable[[str], torch.Tensor], names: Sequence[str], count: int,
                       density: float) -> torch.Tensor:
    """(count,) thresholds over vectors given per tensor by ``operands(name)`` -> (count, *shape)."""
    def factory() -> Iterator[torch.Tensor]:
        for n in names:
            x = operands(n)
            yield x.reshape(x.shape[0], -1)
    return global_thresholds(factory, count, density)
