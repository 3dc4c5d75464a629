"""Merging fine-tunes: any merge method applied tensor by tensor to the T task-vector slices (lazy)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from tvbasis.engine import Engine, get_engine
from tvbasis.errors import ConfigError, TensorMismatchError
from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.merge import MergeContext, MergeSpec, get_merger, global_thresholds
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, TaskSet
from tvbasis.vectors import Producer, TaskVector, check_finite


class MergeProducer(Producer):
    """Per tensor: read the T deltas, merge them (picklable, so it runs on any engine)."""

    fresh = True

    def __init__(self, taskset: TaskSet, spec: MergeSpec, weights: torch.Tensor, thresholds: torch.Tensor | None,
                 fisher: list[Checkpoint] | None, device: str = "cpu") -> None:
        self.taskset, self.spec, self.weights, self.thresholds = taskset, spec, weights, thresholds
        self.fisher, self.device = fisher, device

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        merger = get_merger(self.spec)
        x = self.taskset.deltas(name).to(self.device)
        fisher = None
        if self.fisher is not None:
            parts = []
            for f in self.fisher:
                if name not in f:
                    raise TensorMismatchError(f"{f.path}: Fisher weights have no tensor {name!r}")
                t = f.get(name)
                if tuple(t.shape) != tuple(x.shape[1:]):
                    raise TensorMismatchError(f"{f.path}: Fisher tensor {name!r} has shape {tuple(t.shape)}, "
                                              f"expected {tuple(x.shape[1:])}")
                check_finite(t, str(f.path), name)
                parts.append(t.to(torch.float32))
            fisher = torch.stack(parts).to(self.device)
        out = merger.merge(x, self.weights.to(self.device), MergeContext(name=name, thresholds=self.thresholds,
                                                                          fisher=fisher)).cpu()
        return out if rows is None or not out.dim() else out[rows[0]:rows[1]]


class _Chunk:
    def __init__(self, taskset: TaskSet) -> None:
        self.taskset = taskset

    def __call__(self, item: tuple[str, int, int]) -> torch.Tensor:
        name, a, b = item
        x = self.taskset.deltas(name, (a, b) if self.taskset.specs[name].shape else None)
        return x.reshape(x.shape[0], -1)


def merge_task_vectors(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                       spec: MergeSpec, weights: Mapping[str, float] | None = None,
                       fisher: Mapping[str, str | Path] | None = None, include: Iterable[str] | None = None,
                       exclude: Iterable[str] | None = None, engine: Engine | str | None = None,
                       device: str = "cpu", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> TaskVector:
    """The merged task vector of the fine-tunes (lazy; global trim thresholds are found up front)."""
    merger = get_merger(spec)
    taskset = TaskSet.open(pretrained, finetuned, include, exclude)
    w = dict(weights or {})
    unknown = set(w) - set(taskset.names)
    if unknown:
        raise ConfigError(f"--weight given for unknown model(s) {sorted(unknown)}; models: {taskset.names}")
    wt = torch.tensor([float(w.get(n, 1.0)) for n in taskset.names], dtype=torch.float32)
    fisher_ckpts = None
    if merger.needs_fisher:
        if not fisher or set(fisher) != set(taskset.names):
            raise ConfigError(f"fisher merge needs one Fisher file per model (--fisher NAME=FILE for each of "
                              f"{taskset.names}); got {sorted(fisher or {})}")
        fisher_ckpts = [open_checkpoint(fisher[n]) for n in taskset.names]
    thresholds = None
    if merger.needs_global_thresholds:
        eng = get_engine(engine)
        items = taskset.items(chunk_elements)

        def factory() -> Iterator[torch.Tensor]:
            yield from eng.map(_Chunk(taskset), items, desc="global trim thresholds",
                               sizes=[taskset.item_bytes(i) for i in items])
        assert merger.density is not None
        thresholds = global_thresholds(factory, taskset.T, merger.density)
    return TaskVector.from_producer(taskset.specs, MergeProducer(taskset, spec, wt, thresholds, fisher_ckpts, device),
                                    taskset.pretrained, f"{spec.method} merge")
