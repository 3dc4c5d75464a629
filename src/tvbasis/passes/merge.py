"""The merge pass: any merge method applied tensor by tensor to the T task-vector slices (lazy).

``merge_tensor`` merges the slices of one tensor, in row chunks when it is big (the per-tensor kernels live in
``tvbasis.merge``); ``merge_task_vectors`` is the lazy merged task vector of a set of fine-tunes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from tvbasis.engine import Run, as_run
from tvbasis.errors import ConfigError, TensorMismatchError
from tvbasis.io import Checkpoint, TensorSpec, check_finite, open_checkpoint, row_chunks
from tvbasis.merge import MergeContext, MergeSpec, get_merger, global_thresholds
from tvbasis.merge.settings import TensorPlan
from tvbasis.passes.thresholds import taskset_thresholds
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, TaskSet, chunk_for
from tvbasis.vectors import Producer, TaskVector

#: per-task elements of one row chunk when a big tensor is merged in pieces; None derives it from T
#: (taskset.chunk_for: ITEM_BYTES over the T + 1 slices), which keeps a merge's memory flat in T
MERGE_CHUNK_ELEMENTS: int | None = None

Reader = Callable[[int, int], torch.Tensor]
BaseReader = Callable[[], torch.Tensor]


def merge_tensor(spec: MergeSpec, read: Reader, tensor: TensorSpec, num_tasks: int, weights: torch.Tensor,
                 thresholds: torch.Tensor | None = None, fisher_read: Reader | None = None, device: str = "cpu",
                 chunk_elements: int | None = MERGE_CHUNK_ELEMENTS, base_read: BaseReader | None = None,
                 per_task: Mapping[str, tuple[float, ...]] | None = None, rows: tuple[int, int] | None = None,
                 cuts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Merge the T slices of one tensor; ``read(a, b)`` returns rows [a, b) of the T slices, (T, b − a, ...).
    ``base_read()`` returns the whole pretrained tensor for methods that need it (slerp); ``per_task`` gives
    per-task parameter values (mergekit's per-model densities), see ``MergeContext``.

    ``rows``: only rows [a, b) of the merged tensor, the same values as those rows of the whole merge. A tensor
    merged whole (small, or a method that needs all of it) is merged whole and sliced; a big one reads only
    those rows, plus, for a per-tensor trim, the two passes over the whole tensor that find its cuts, which
    ``cuts`` (a dict kept by the caller, keyed by tensor name) remembers for the next row range.

    Small tensors are merged whole (per-tensor trims keep exactly ceil(density·n) entries). A tensor bigger than
    ``chunk_elements`` per task is merged in row chunks so memory is the T slices of one chunk plus the output:
    a per-tensor trim then first finds each task's exact k-th largest magnitude in this tensor with two
    streaming passes over its chunks (radix selection) and keeps |δ| ≥ it (a few more only where magnitudes tie
    at the cut); DARE masks are chunk-invariant by construction; the other methods are elementwise."""
    merger = get_merger(spec)
    chunk_elements = chunk_for(num_tasks, chunk_elements)
    rows_total = tensor.shape[0] if tensor.shape else 1
    per_task = dict(per_task or {})
    if not tensor.shape or tensor.numel <= chunk_elements or merger.whole_tensor:
        x = read(0, rows_total).to(device)
        fisher = fisher_read(0, rows_total).to(device) if fisher_read is not None else None
        base = base_read().to(device, torch.float32) if base_read is not None and merger.needs_base else None
        out = merger.merge(x, weights.to(device), MergeContext(name=tensor.name, thresholds=thresholds,
                                                               fisher=fisher, base=base, per_task=per_task)).cpu()
        return out if rows is None or not tensor.shape else out[rows[0]:rows[1]]
    chunks = list(row_chunks(tensor, chunk_elements))
    chunk_merger = merger
    if merger.density is not None and not merger.needs_global_thresholds and merger.ranks_per_tensor:
        found = cuts.get(tensor.name) if cuts is not None else None
        if found is None:
            def factory() -> Iterator[torch.Tensor]:
                for a, b in chunks:
                    yield read(a, b).reshape(num_tasks, -1)
            found = global_thresholds(factory, num_tasks, per_task.get("density", merger.density),
                                      merger.params.get("rounding", "ceil"))
            if cuts is not None:
                cuts[tensor.name] = found
        thresholds = found
        per_task.pop("density", None)  # the per-task cuts are in the thresholds now
        chunk_merger = get_merger(MergeSpec(spec.method, {**spec.params, "trim_scope": "global"}))
    first, end = rows if rows is not None else (0, rows_total)
    step = chunks[0][1] - chunks[0][0]
    out = torch.empty((end - first, *tensor.shape[1:]), dtype=torch.float32)
    for a in range(first, end, step):  # every method here is elementwise given the cuts: any row split agrees
        b = min(end, a + step)
        x = read(a, b).to(device)
        fisher = fisher_read(a, b).to(device) if fisher_read is not None else None
        out[a - first:b - first] = chunk_merger.merge(x, weights.to(device), MergeContext(
            name=tensor.name, offset=a, thresholds=thresholds, fisher=fisher, per_task=per_task)).cpu()
    return out


def open_fisher(fisher: Mapping[str, str | Path] | None, names: Sequence[str], what: str) -> list[Checkpoint]:
    """One diagonal-Fisher checkpoint per task, in task order; ConfigError unless exactly one per task is given."""
    if not fisher or set(fisher) != set(names):
        raise ConfigError(f"{what} needs one Fisher file per task (--fisher NAME=FILE for each of "
                          f"{sorted(names)}); got {sorted(fisher or {})}")
    return [open_checkpoint(fisher[n]) for n in names]


def fisher_rows(files: list[Checkpoint], spec: TensorSpec, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of one tensor's diagonal Fisher weights, one file per task: (T, b − a, ...) float32."""
    name = spec.name
    parts = []
    for f in files:
        if name not in f:
            raise TensorMismatchError(f"{f.path}: Fisher weights have no tensor {name!r}")
        if f.spec(name).shape != spec.shape:
            raise TensorMismatchError(f"{f.path}: Fisher tensor {name!r} has shape {f.spec(name).shape}, "
                                      f"expected {spec.shape}")
        t = f.get_rows(name, a, b) if spec.shape else f.get(name)
        check_finite(t, str(f.path), name)
        parts.append(t.to(torch.float32))
    return torch.stack(parts)


class MergeProducer(Producer):
    """Per tensor: read the T deltas (in row chunks when big) and merge them (picklable: runs on any engine)."""

    fresh = True

    def __init__(self, taskset: TaskSet, spec: MergeSpec, weights: torch.Tensor, thresholds: torch.Tensor | None,
                 fisher: list[Checkpoint] | None, device: str = "cpu",
                 chunk_elements: int | None = MERGE_CHUNK_ELEMENTS, plan: TensorPlan | None = None) -> None:
        self.taskset, self.spec, self.weights, self.thresholds = taskset, spec, weights, thresholds
        self.fisher, self.device, self.chunk_elements, self.plan = fisher, device, chunk_elements, plan
        #: per-tensor trim cuts found for one row range, reused by the next (T floats per tensor)
        self._cuts: dict[str, torch.Tensor] = {}

    def _fisher_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        assert self.fisher is not None
        return fisher_rows(self.fisher, self.taskset.specs[name], a, b)

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        spec = self.taskset.specs[name]

        def read(a: int, b: int) -> torch.Tensor:
            return self.taskset.deltas(name, (a, b) if spec.shape else None)

        fisher_read = None
        if self.fisher is not None:
            def fisher_read(a: int, b: int) -> torch.Tensor:
                return self._fisher_rows(name, a, b)
        def base_read() -> torch.Tensor:
            return self.taskset.pretrained.get(name).to(torch.float32)

        merge_spec, weights, per_task, scale = self.spec, self.weights, None, 1.0
        if self.plan is not None:  # per-tensor values (mergekit's gradients, filters, per-model parameters)
            tm = self.plan.for_tensor(name)
            merge_spec, per_task, scale = tm.spec, tm.per_task, tm.scale
            weights = torch.tensor(tm.weights, dtype=torch.float32)
        out = merge_tensor(merge_spec, read, spec, self.taskset.T, weights, self.thresholds, fisher_read,
                           self.device, self.chunk_elements, base_read, per_task, rows if spec.shape else None,
                           self._cuts)
        if scale != 1.0:
            out.mul_(scale)
        return out

    def row_reads(self, name: str) -> bool:
        """Rows of a big tensor cost their share of it unless the tensor's method merges whole tensors."""
        spec = self.spec if self.plan is None else self.plan.for_tensor(name).spec
        return not get_merger(spec).whole_tensor


def merge_task_vectors(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                       spec: MergeSpec, weights: Mapping[str, float] | None = None,
                       fisher: Mapping[str, str | Path] | None = None, include: Iterable[str] | None = None,
                       exclude: Iterable[str] | None = None, run: Run = None,
                       chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
                       plan: TensorPlan | None = None) -> TaskVector:
    """The merged task vector of the fine-tunes (lazy; global trim thresholds are found up front). ``plan``
    gives each tensor its own method parameters, weights and scale (a mergekit config's gradients and filters;
    ``tvbasis.merge.settings``); it is bound to the tensor names here."""
    opts = as_run(run)
    merger = get_merger(spec)
    taskset = TaskSet.open(pretrained, finetuned, include, exclude)
    if plan is not None:
        plan = plan.bind(taskset.pretrained.keys())
    w = dict(weights or {})
    unknown = set(w) - set(taskset.names)
    if unknown:
        raise ConfigError(f"--weight given for unknown model(s) {sorted(unknown)}; models: {taskset.names}")
    wt = torch.tensor([float(w.get(n, 1.0)) for n in taskset.names], dtype=torch.float32)
    fisher_ckpts = open_fisher(fisher, taskset.names, "fisher merge") if merger.needs_fisher else None
    thresholds = None
    if merger.needs_global_thresholds:
        assert merger.density is not None
        if merger.params.get("rounding", "ceil") != "ceil":
            raise ConfigError(f"merge {spec.method!r}: rounding={merger.params['rounding']} (mergekit's per-tensor "
                              f"count) applies to trim_scope=tensor")
        thresholds = taskset_thresholds(taskset, opts.get_engine(), merger.density, chunk_elements=chunk_elements)
    return TaskVector.from_producer(taskset.specs, MergeProducer(taskset, spec, wt, thresholds, fisher_ckpts,
                                                                 opts.device, plan=plan),
                                    taskset.pretrained, f"{spec.method} merge")
