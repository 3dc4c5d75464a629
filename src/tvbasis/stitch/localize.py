"""Localize: one binary mask per task over its task vector, written as a masks file (``format``).

The dataless localizer keeps, per localized tensor, the ceil(s·n) entries of largest |τ_t| (``trim_scope="tensor"``,
the default; exactly that many, ties to the lowest index; a tensor too big for one work item is cut at its exact
k-th largest |τ_t|, from two streaming radix-selection passes over its row chunks) or each task's top s over all
localized tensors together (``"global"``: |τ_t| ≥ its exact global threshold). Entries where τ_t = 0 are never
kept (a fine-tune that leaves most of a tensor unchanged, e.g. the embeddings of unseen tokens, gets a smaller
mask there). Which tensors are
localized is an include/exclude pattern (e.g. ``--include 'encoder.layer.*'``); the rest are left out of the masks and
stay at θ₀ when stitching.

``write_mask_set`` is the one streaming pass every masks file is written by: per tensor (big ones in row chunks of
a multiple of 8 rows, so each chunk packs to whole bytes) it reads the T task-vector slices, takes the T masks from a
mask source (magnitudes, masks trained in memory, or another masks file), applies the stitching rule when asked
(``shared``: one majority-vote mask per cluster, M masks stored instead of T; ``twice``: each mask less what another
member of its cluster also claims) and emits the packed masks and the values on their supports. Memory: the T slices
of one chunk, plus the compressed output of one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tvbasis.codecs.bits import pack_bits
from tvbasis.engine import Run, as_run
from tvbasis.errors import ConfigError, TensorMismatchError
from tvbasis.io import Checkpoint, TensorSpec, dtype_name
from tvbasis.io.checksum import chunk_digests, combine_digests, structure_fingerprint
from tvbasis.merge import global_thresholds
from tvbasis.merge.trim import magnitude_mask
from tvbasis.passes.thresholds import taskset_thresholds
from tvbasis.stitch.format import (
    MASKS_CHECKSUM_CHUNK,
    MaskSet,
    base_settings,
    mask_key,
    tensors_meta,
    unpack_range,
    value_key,
    values_dtype,
    write_masks,
)
from tvbasis.stitch.rules import RULES, cluster_labels, effective_masks, majority_masks, rule_of
from tvbasis.taskset import TaskSet, chunk_for

#: default fraction of the localized parameters each mask keeps (L&S: 1 %)
DEFAULT_SPARSITY = 0.01
SCOPES = ("tensor", "global")

Rows = tuple[int, int] | None


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
        raise ConfigError(f"sparsity must be in (0, 1], got {sparsity!r}")
    return float(sparsity)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigError(f"trim scope {scope!r}: expected one of {', '.join(SCOPES)}")
    return scope


def mask_chunks(spec: TensorSpec, chunk_elements: int) -> list[tuple[int, int]]:
    """Row chunks of a tensor for the masks pass: the whole tensor when small, else row ranges whose row count is
    a multiple of 8 (so that every chunk but the last packs to whole bytes)."""
    rows = spec.shape[0] if spec.shape else 1
    if not spec.shape or spec.numel <= chunk_elements:
        return [(0, rows)]
    per_row = max(1, spec.numel // max(1, spec.shape[0]))
    step = max(8, (chunk_elements // per_row) // 8 * 8)
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


# ---------------------------------------------------------------------------------------------- readers
class TaskSetDeltas:
    """The task-vector slices of some tasks of a TaskSet: (T', rows...) float32 (picklable)."""

    def __init__(self, taskset: TaskSet, tasks: Sequence[str] | None = None) -> None:
        self.taskset = taskset
        self.tasks = list(tasks) if tasks is not None else list(taskset.names)
        unknown = [t for t in self.tasks if t not in taskset.names]
        if unknown:
            raise ConfigError(f"no fine-tune given for task(s) {unknown}")
        self.index = [taskset.names.index(t) for t in self.tasks]
        self.stored = False

    def __call__(self, name: str, rows: Rows) -> torch.Tensor:
        spec = self.taskset.specs[name]
        return self.taskset.deltas(name, rows if spec.shape else None, self.index)


class StoredDeltas:
    """The task-vector values a masks file holds (dense, 0 off each task's mask)."""

    def __init__(self, masks: MaskSet, tasks: Sequence[str] | None = None) -> None:
        self.masks = masks
        self.tasks = list(tasks) if tasks is not None else list(masks.tasks)
        for t in self.tasks:
            masks.task_index(t)
        if not masks.has_values:
            raise ConfigError(f"{masks.path}: holds masks only (no task-vector values); pass the fine-tunes "
                              "(--finetuned NAME=PATH)")
        self.stored = True

    def __call__(self, name: str, rows: Rows) -> torch.Tensor:
        return torch.stack([self.masks.values(t, name, rows) for t in self.tasks])


# ---------------------------------------------------------------------------------------------- mask sources
class MagnitudeMasks:
    """Dataless masks: the top ``sparsity`` of |τ_t| per tensor, or against each task's global threshold."""

    def __init__(self, sparsity: float, thresholds: torch.Tensor | None = None) -> None:
        self.sparsity, self.thresholds = sparsity, thresholds

    def prepare(self, name: str, chunks: list[tuple[int, int]], read: Callable[[str, Rows], torch.Tensor],
                T: int) -> torch.Tensor | None:
        """Per-tensor thresholds when the tensor is read in chunks (exact k-th largest over its chunks)."""
        if self.thresholds is not None or len(chunks) == 1:
            return self.thresholds

        def factory() -> Iterator[torch.Tensor]:
            for a, b in chunks:
                yield read(name, (a, b)).reshape(T, -1)
        return global_thresholds(factory, T, self.sparsity)

    def __call__(self, name: str, rows: Rows, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        return top_magnitudes(x, self.sparsity, state)


def top_magnitudes(x: torch.Tensor, sparsity: float, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """(T, ...) bool: per task the ceil(s·n) entries of largest |x| of the slice (exactly that many, ties to the
    lowest flat index), or |x| ≥ its threshold when ``thresholds`` (T,) are given — never an entry where x = 0
    (where fewer than ceil(s·n) entries are non-zero, the mask is smaller)."""
    return magnitude_mask(x, sparsity, thresholds) & (x != 0)


class FileMasks:
    """The masks of some tasks of a masks file."""

    def __init__(self, masks: MaskSet, tasks: Sequence[str]) -> None:
        self.masks, self.tasks = masks, list(tasks)

    def prepare(self, name: str, chunks: list[tuple[int, int]], read: Any, T: int) -> None:
        return None

    def __call__(self, name: str, rows: Rows, x: torch.Tensor, state: None) -> torch.Tensor:
        return self.masks.stacked_masks(self.tasks, name, rows if self.masks.specs[name].shape else None)


class MemoryMasks:
    """Masks held in memory as packed bits: {tensor: [packed uint8 of each task]} (e.g. freshly trained)."""

    def __init__(self, packed: Mapping[str, Sequence[torch.Tensor]], specs: Mapping[str, TensorSpec]) -> None:
        self.packed, self.specs = {k: list(v) for k, v in packed.items()}, dict(specs)

    def prepare(self, name: str, chunks: list[tuple[int, int]], read: Any, T: int) -> None:
        return None

    def __call__(self, name: str, rows: Rows, x: torch.Tensor, state: None) -> torch.Tensor:
        spec = self.specs[name]
        per_row = spec.numel // spec.shape[0] if spec.shape and spec.shape[0] else 1
        a, b = (rows[0] * per_row, rows[1] * per_row) if rows is not None and spec.shape else (0, spec.numel)
        return torch.stack([unpack_range(p, a, b).reshape(x.shape[1:]) for p in self.packed[name]])


# ---------------------------------------------------------------------------------------------- the pass
class EncodeTask:
    """Work unit of the masks pass: one tensor -> its (key, tensor) pairs and support counts (picklable)."""

    def __init__(self, read: TaskSetDeltas | StoredDeltas, source: Any, rule: str, labels: list[int] | None,
                 dtype: torch.dtype | None, specs: Mapping[str, TensorSpec], chunk_elements: int) -> None:
        self.read, self.source, self.rule, self.labels = read, source, rule, labels
        self.dtype, self.specs, self.chunk_elements = dtype, dict(specs), chunk_elements
        self.T = len(read.tasks)
        self.mask_of = list(labels) if rule == "shared" and labels is not None else list(range(self.T))
        self.G = max(self.mask_of) + 1 if self.mask_of else 0

    def __call__(self, name: str) -> tuple[list[tuple[str, torch.Tensor]], list[int], list[int]]:
        spec = self.specs[name]
        chunks = mask_chunks(spec, self.chunk_elements)
        state = self.source.prepare(name, chunks, self.read, self.T)
        packed: list[list[torch.Tensor]] = [[] for _ in range(self.G)]
        values: list[list[torch.Tensor]] = [[] for _ in range(self.T)]
        support, group_support = [0] * self.T, [0] * self.G
        for a, b in chunks:
            rows = (a, b) if spec.shape else None
            x = self.read(name, rows)
            m = self.source(name, rows, x, state)
            eff = effective_masks(m, self.rule, self.labels)
            groups = majority_masks(m, self.labels) if self.rule == "shared" else eff
            for i in range(self.G):  # every chunk but the last holds a multiple of 8 elements: packs whole bytes
                packed[i].append(pack_bits(groups[i]))
                group_support[i] += int(groups[i].sum())
            for t in range(self.T):
                support[t] += int(eff[t].sum())
                if self.dtype is not None:
                    values[t].append(x[t].reshape(-1)[eff[t].reshape(-1)].to(self.dtype))
        out: list[tuple[str, torch.Tensor]] = []
        if self.dtype is not None:
            out += [(value_key(t, name), torch.cat(values[t])) for t in range(self.T)]
        out += [(mask_key(i, name), torch.cat(packed[i])) for i in range(self.G)]
        return out, support, group_support


def write_mask_set(out: str | Path, read: TaskSetDeltas | StoredDeltas, source: Any, specs: Mapping[str, TensorSpec],
                   settings: Mapping[str, Any], rule: str = "stitch", clusters: Any = None,
                   values: str | None = "float32", pretrained: Checkpoint | None = None, force: bool = False,
                   inputs: Sequence[str | Path] = (), run: Run = None,
                   chunk_elements: int | None = None) -> MaskSet:
    """The masks pass (see the module doc): writes ``out`` and returns it opened."""
    if rule not in RULES:
        raise ConfigError(f"unknown stitching rule {rule!r}; expected one of {', '.join(RULES)}")
    tasks = list(read.tasks)
    labels = cluster_labels(clusters, tasks) if rule != "stitch" else None
    dtype = values_dtype(values)
    chunk = chunk_for(len(tasks), chunk_elements)
    task = EncodeTask(read, source, rule, labels, dtype, specs, chunk)
    names = list(specs)
    opts = as_run(run)
    support = [0] * len(tasks)
    group_support = [0] * task.G
    groups = [f"cluster{c}" for c in range(task.G)] if rule == "shared" else tasks

    def parts() -> Iterable[list[tuple[str, torch.Tensor]]]:
        for part, sup, gsup in opts.get_engine().map(task, names, desc="localize",
                                                      sizes=[specs[n].numel * 4 * len(tasks) for n in names]):
            for t, k in enumerate(sup):
                support[t] += k
            for i, k in enumerate(gsup):
                group_support[i] += k
            yield part

    n = sum(s.numel for s in specs.values())

    def metadata() -> dict[str, Any]:
        full = {**base_settings(), **settings, "rule": rule,
                "clusters": dict(zip(tasks, labels)) if labels is not None else None}
        if pretrained is not None:
            full.setdefault("pretrained", str(pretrained.root_dir or pretrained.path))
            full["pretrained_fingerprint"] = structure_fingerprint(pretrained)
            # the content too, of the localized tensors (as a store records it): a pretrained model of the same
            # shapes but other weights is refused when the masks are applied to it
            full["pretrained_checksum"] = combine_digests(
                d for s in specs.values() for d in chunk_digests(s, pretrained.get(s.name), MASKS_CHECKSUM_CHUNK))
            full["checksum_chunk_elements"] = MASKS_CHECKSUM_CHUNK
        return {"tasks": tasks, "masks": groups, "mask_of": dict(zip(tasks, task.mask_of)),
                "tensors": tensors_meta(specs), "values_dtype": dtype_name(dtype) if dtype is not None else "none",
                "settings": full,
                "stats": {"parameters": n, "support": dict(zip(tasks, support)),
                          "density": {t: k / max(1, n) for t, k in zip(tasks, support)},
                          "mask_support": dict(zip(groups, group_support))}}

    path = write_masks(out, parts(), metadata, force=force, inputs=inputs)
    return MaskSet(path)


def localize(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
             out: str | Path, sparsity: float = DEFAULT_SPARSITY, trim_scope: str = "tensor",
             include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             shared_mask: bool = False, stitch_twice: bool = False, clusters: Any = None,
             values: str | None = "float32", force: bool = False, run: Run = None,
             chunk_elements: int | None = None) -> MaskSet:
    """Dataless Localize-and-Stitch localization: per task, the top ``sparsity`` of |τ_t| (per localized tensor,
    or over all of them with ``trim_scope="global"``); ``shared_mask`` / ``stitch_twice`` store the SharedMask
    (M majority-vote masks) / StitchTwice masks of ``clusters`` instead. ``values``: dtype of the stored τ values
    (None: masks only). Writes the masks file ``out`` and returns it opened."""
    rule = rule_of(shared_mask, stitch_twice)
    s = check_sparsity(sparsity)
    check_scope(trim_scope)
    taskset = TaskSet.open(pretrained, finetuned, include, exclude)
    opts = as_run(run)
    th = taskset_thresholds(taskset, opts.get_engine(), s, chunk_elements=chunk_elements) \
        if trim_scope == "global" else None
    settings = {"localizer": "dataless", "sparsity": s, "trim_scope": trim_scope,
                "include": list(include or []), "exclude": list(exclude or []),
                "finetuned": {n: str(getattr(p, "path", p)) for n, p in finetuned.items()}}
    inputs = [str(getattr(p, "path", p)) for p in [pretrained, *finetuned.values()]]
    return write_mask_set(out, TaskSetDeltas(taskset), MagnitudeMasks(s, th), taskset.specs, settings, rule,
                          clusters, values, taskset.pretrained, force, inputs, opts, chunk_elements)


def open_for(masks: MaskSet, pretrained: str | Path | Checkpoint,
             finetuned: Mapping[str, str | Path | Checkpoint]) -> TaskSet:
    """The fine-tunes as a TaskSet over exactly the tensors of ``masks`` (checked against the pretrained)."""
    ts = TaskSet.open(pretrained, finetuned)
    missing = [n for n in masks.specs if n not in ts.specs]
    if missing:
        raise TensorMismatchError(f"{masks.path}: localizes tensor(s) the models do not have as floating-point "
                                  f"tensors: {missing[:3]}")
    for n, s in masks.specs.items():
        if ts.specs[n].shape != s.shape:
            raise TensorMismatchError(f"{masks.path}: tensor {n!r} has shape {s.shape}, the pretrained model "
                                      f"has {ts.specs[n].shape}")
    return replace(ts, specs={n: ts.specs[n] for n in masks.specs})


def derive(masks: str | Path | MaskSet, out: str | Path, rule: str, clusters: Any,
           pretrained: str | Path | Checkpoint | None = None,
           finetuned: Mapping[str, str | Path | Checkpoint] | None = None, values: str | None = None,
           force: bool = False, run: Run = None) -> MaskSet:
    """A masks file of ``rule`` (``shared`` / ``twice``) from a file of per-task masks. Values come from the
    fine-tunes when given (needed for ``shared``: the cluster mask reaches beyond each task's own), else from the
    file."""
    ms = masks if isinstance(masks, MaskSet) else MaskSet(masks)
    tasks = list(finetuned) if finetuned else list(ms.tasks)
    if finetuned:
        if pretrained is None:
            raise ConfigError("derive: the fine-tunes need the pretrained model too")
        read: TaskSetDeltas | StoredDeltas = TaskSetDeltas(open_for(ms, pretrained, finetuned), tasks)
    else:
        if rule == "shared":
            raise ConfigError(f"{ms.path}: shared masks reach beyond each task's stored values; pass the "
                              "fine-tunes (--finetuned NAME=PATH)")
        read = StoredDeltas(ms, tasks)
    vd = values if values is not None else (ms.values_dtype if ms.has_values else "float32")
    settings = {k: v for k, v in ms.settings.items() if k not in ("rule", "clusters")}
    settings["derived_from"] = {"path": str(ms.path), "rule": ms.rule}
    pre = pretrained if isinstance(pretrained, Checkpoint) else (read.taskset.pretrained
                                                                 if isinstance(read, TaskSetDeltas) else None)
    return write_mask_set(out, read, FileMasks(ms, tasks), ms.specs, settings, rule, clusters, vd, pre, force,
                          [ms.path], run)
