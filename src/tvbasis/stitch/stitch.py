"""Stitch: θ = θ₀ + Σ_t (m_t / n) ⊙ τ_t, n = the number of masks covering a coordinate (0 where none), no λ.

A lazy ``TaskVector`` whose producer, per localized tensor (in row chunks when big), reads the tasks' masks and
their task-vector slices — from the fine-tunes, or from the values the masks file stores — applies the rule
(``stitch``: each task's own mask; ``shared``: its cluster's majority-vote mask; ``twice``: StitchTwice, its own
mask less what another member of its cluster claims, then overlap averaging across all tasks) and sums.
Memory: the T slices of one chunk plus the output tensor. Tensors the masks do not cover stay at θ₀.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.stitch.format import MaskSet
from tvbasis.stitch.localize import StoredDeltas, TaskSetDeltas, mask_chunks, open_for
from tvbasis.stitch.rules import RULES, cluster_labels, effective_masks, rule_of, stitch_weights
from tvbasis.taskset import chunk_for
from tvbasis.vectors import Producer, TaskVector


class StitchProducer(Producer):
    """Per tensor: the stitched delta Σ_t w_t ⊙ τ_t — or, with ``only``, one task's localized vector
    m_t ⊙ τ_t under the rule (picklable: runs on any engine)."""

    fresh = True

    def __init__(self, masks: MaskSet, read: TaskSetDeltas | StoredDeltas, rule: str = "stitch",
                 labels: list[int] | None = None, only: int | None = None,
                 chunk_elements: int | None = None) -> None:
        self.masks, self.read, self.rule, self.labels, self.only = masks, read, rule, labels, only
        self.chunk = chunk_for(len(read.tasks), chunk_elements)

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        spec = self.masks.specs[name]
        if not spec.shape:
            return self._slice(name, None)
        lo, hi = rows if rows is not None else (0, spec.shape[0])
        out = torch.empty((hi - lo, *spec.shape[1:]), dtype=torch.float32)
        for a, b in mask_chunks(spec, self.chunk):
            a, b = max(a, lo), min(b, hi)
            if a < b:
                out[a - lo: b - lo] = self._slice(name, (a, b))
        return out

    def _slice(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        m = self.masks.stacked_masks(self.read.tasks, name, rows)
        eff = effective_masks(m, self.rule, self.labels)
        x = self.read(name, rows)
        if self.only is not None:
            return x[self.only] * eff[self.only]
        return (stitch_weights(eff) * x).sum(0)


def _open(masks: str | Path | MaskSet) -> MaskSet:
    return masks if isinstance(masks, MaskSet) else MaskSet(masks)


def _setup(masks: MaskSet, pretrained: str | Path | Checkpoint | None,
           finetuned: Mapping[str, str | Path | Checkpoint] | None, rule: str, clusters: Any,
           tasks: Sequence[str] | None) -> tuple[TaskSetDeltas | StoredDeltas, list[int] | None, Checkpoint | None]:
    if rule not in RULES:
        raise ConfigError(f"unknown stitching rule {rule!r}; expected one of {', '.join(RULES)}")
    if finetuned:
        if pretrained is None:
            raise ConfigError("stitching the fine-tunes needs the pretrained model")
        names = list(tasks) if tasks is not None else list(finetuned)
        unknown = [t for t in names if t not in masks.tasks]
        if unknown:
            raise ConfigError(f"{masks.path}: has no mask for task(s) {unknown}; it localizes "
                              f"{', '.join(masks.tasks)}")
        ts = open_for(masks, pretrained, finetuned)
        read: TaskSetDeltas | StoredDeltas = TaskSetDeltas(ts, names)
        pre: Checkpoint | None = ts.pretrained
    else:
        read = StoredDeltas(masks, tasks)
        pre = pretrained if isinstance(pretrained, Checkpoint) else (
            open_checkpoint(pretrained) if pretrained is not None else None)
    labels = cluster_labels(clusters, read.tasks) if rule != "stitch" else None
    if rule == "shared" and read.stored and labels is not None:
        for c in set(labels):
            if len({masks.mask_of[t] for t, lab in zip(read.tasks, labels) if lab == c}) > 1:
                raise ConfigError(f"{masks.path}: the shared mask of a cluster reaches beyond its members' stored "
                                  "values; pass the fine-tunes (--finetuned NAME=PATH), or localize with "
                                  "--shared-mask")
    return read, labels, pre


def _vector(masks: MaskSet, producer: StitchProducer, pre: Checkpoint | None, name: str) -> TaskVector:
    tv = TaskVector.from_producer(masks.specs, producer, pre, name)
    fp = masks.settings.get("pretrained_fingerprint")
    if fp:  # apply_to checks the model's tensor names, shapes and dtypes against those the masks were made on
        tv.expected_pretrained = {"fingerprint": fp, "path": masks.settings.get("pretrained", "unknown"),
                                  "what": f"the masks file {masks.path}"}
        checksum, chunk = masks.settings.get("pretrained_checksum"), masks.settings.get("checksum_chunk_elements")
        if isinstance(checksum, str) and isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0:
            tv.expected_pretrained |= {"checksum": checksum, "checksum_chunk_elements": chunk}  # and the weights
    return tv


def stitch(pretrained: str | Path | Checkpoint | None, finetuned: Mapping[str, str | Path | Checkpoint] | None,
           masks: str | Path | MaskSet, shared_mask: bool = False, stitch_twice: bool = False,
           clusters: Any = None, tasks: Sequence[str] | None = None, rule: str | None = None,
           chunk_elements: int | None = None) -> TaskVector:
    """The stitched task vector Σ_t (m_t / n) ⊙ τ_t (lazy; apply it with ``.apply_to(pretrained, out=...)``,
    scaling_coef 1: L&S has no λ). τ from the fine-tunes when given (the tasks stitched are theirs), else from
    the values in the masks file (all its tasks, or ``tasks``). ``shared_mask`` (SharedMask) and
    ``stitch_twice`` (StitchTwice) need ``clusters``: {task: label}, a label sequence, ``"a=0,b=0,c=1"`` or a
    cluster basis store."""
    ms = _open(masks)
    r = rule_of(shared_mask, stitch_twice, rule)
    read, labels, pre = _setup(ms, pretrained, finetuned, r, clusters, tasks)
    return _vector(ms, StitchProducer(ms, read, r, labels, chunk_elements=chunk_elements), pre,
                   f"{r} of {len(read.tasks)} localized task vectors")


def localized_vector(masks: str | Path | MaskSet, task: str, pretrained: str | Path | Checkpoint | None = None,
                     finetuned: Mapping[str, str | Path | Checkpoint] | None = None, shared_mask: bool = False,
                     stitch_twice: bool = False, clusters: Any = None, rule: str | None = None,
                     chunk_elements: int | None = None) -> TaskVector:
    """One task's localized task vector m_t ⊙ τ_t (lazy) — with shared_mask / stitch_twice, its mask under that
    rule (which depends on the other members of its cluster: all tasks of the fine-tunes / the file take part)."""
    ms = _open(masks)
    r = rule_of(shared_mask, stitch_twice, rule)
    read, labels, pre = _setup(ms, pretrained, finetuned, r, clusters, None)
    if task not in read.tasks:
        raise ConfigError(f"no task {task!r} among {', '.join(read.tasks)}")
    producer = StitchProducer(ms, read, r, labels, only=read.tasks.index(task), chunk_elements=chunk_elements)
    return _vector(ms, producer, pre, f"localized {task}")
