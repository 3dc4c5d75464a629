"""A pretrained model and T fine-tunes of it, read together one tensor (or row chunk) at a time."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tvbasis.errors import ConfigError
from tvbasis.io import (
    Checkpoint,
    TensorSpec,
    all_finite,
    open_checkpoint,
    open_finetuned,
    row_chunks,
)
from tvbasis.vectors import DiffSource, KeyFilter, changed_specs, vector_specs

#: input bytes of one work item (the T + 1 float32 slices of one row chunk): keeps a pass's memory flat in T.
#: 16 MB rather than more: the stacked float32 deltas of an item then stay under glibc's mmap threshold, so
#: malloc recycles their pages instead of faulting in a fresh mapping per item (2x faster passes, measured in
#: benchmarks/profile_build.py)
ITEM_BYTES = 16 * 2**20
#: the default ``chunk_elements`` of every pass and build: None, i.e. no fixed chunk — each derives its row chunk
#: from T (``chunk_for``: ITEM_BYTES over the T + 1 slices); pass an integer to fix it (tests, benchmarks)
DEFAULT_CHUNK_ELEMENTS: int | None = None


def chunk_for(num_tasks: int, chunk_elements: int | None = None) -> int:
    """Per-task elements of one row chunk: given, or ITEM_BYTES spread over the T + 1 float32 slices."""
    if chunk_elements is not None:
        return max(1, int(chunk_elements))
    return max(1 << 16, ITEM_BYTES // (4 * (num_tasks + 1)))

_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|blocks|block|encoder_layers|decoder_layers)\.\d+)\.")


def layer_group(name: str) -> str:
    """Layer group of a tensor for ``--layerwise``: ``encoder.layer.3`` for ``encoder.layer.3.attn.q.weight``,
    else the top-level module (``embeddings``, ``pooler``, ...)."""
    m = _LAYER_RE.match(name)
    if m:
        return m.group(1)
    return name.split(".")[0] if "." in name else name


Item = tuple[str, int, int]  # (tensor name, row start, row stop)


@dataclass
class TaskSet:
    pretrained: Checkpoint
    names: list[str]
    finetuned: list[Checkpoint]
    specs: dict[str, TensorSpec]

    @classmethod
    def open(cls, pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
             include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> TaskSet:
        if not finetuned:
            raise ConfigError("no fine-tuned models given (use --finetuned NAME=PATH)")
        pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
        keep = KeyFilter.of(include, exclude)
        fts = []
        specs: dict[str, TensorSpec] = {}
        for p in finetuned.values():
            ft = open_finetuned(p, pre)
            specs = vector_specs(pre, ft, keep)
            fts.append(ft)
        specs = changed_specs(specs, fts)  # LoRA adapters only: just the tensors they touch
        if not specs:
            raise ConfigError(f"{pre.path}: no floating-point tensors to compare (check --include/--exclude; "
                              "adapters must change at least one kept tensor)")
        return cls(pre, list(finetuned), fts, specs)

    @property
    def T(self) -> int:
        return len(self.names)

    def deltas(self, name: str, rows: tuple[int, int] | None = None,
               tasks: list[int] | None = None) -> torch.Tensor:
        """The task-vector slices of one tensor (or rows of it), stacked: (T, *shape) float32 — or only those of
        ``tasks`` (indices), in that order. The caller owns the result (a fresh tensor it may modify)."""
        return self.deltas_and_pretrained(name, rows, tasks)[0]

    def deltas_and_pretrained(self, name: str, rows: tuple[int, int] | None = None,
                              tasks: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``deltas`` and the pretrained slice they were taken against (as stored: its own dtype)."""
        spec = self.specs[name]
        which = list(range(self.T)) if tasks is None else list(tasks)
        shape = spec.shape if rows is None or not spec.shape else (rows[1] - rows[0], *spec.shape[1:])
        out = torch.empty((len(which), *shape), dtype=torch.float32)
        pre = self.pretrained.get(name) if rows is None else self.pretrained.get_rows(name, *rows)
        pre32 = pre.to(torch.float32)
        for i, t in enumerate(which):
            ft = self.finetuned[t].get(name) if rows is None else self.finetuned[t].get_rows(name, *rows)
            if ft.dtype == torch.float32:
                torch.sub(ft, pre32, out=out[i])
            else:  # convert straight into the output row: no float32 temporary (bf16/fp16: ~25 % faster)
                out[i].copy_(ft)
                out[i].sub_(pre32)
        if not all_finite(out):
            for t in which:
                DiffSource(self.pretrained, self.finetuned[t]).get(name, rows)  # raises naming file and tensor
        return out, pre

    def items(self, chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS) -> list[Item]:
        """Work items: every tensor, big ones split into row chunks of about chunk_elements per task."""
        out: list[Item] = []
        chunk_elements = chunk_for(self.T, chunk_elements)
        for s in self.specs.values():
            for a, b in row_chunks(s, chunk_elements):
                out.append((s.name, a, b))
        return out

    def item_bytes(self, item: Item) -> int:
        """Bytes read for one item: the T fine-tuned slices plus the pretrained slice."""
        s = self.specs[item[0]]
        rows = (item[2] - item[1]) if s.shape else 1
        per_row = s.numel // max(1, s.shape[0]) if s.shape else 1
        return (self.T + 1) * rows * per_row * self.pretrained.spec(item[0]).dtype.itemsize
