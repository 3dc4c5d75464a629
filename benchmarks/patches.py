"""Prototypes of proposed fixes to the core passes, applied as monkeypatches (this process only).

They exist so the benchmarks can measure a proposed change on the same files in the same run as the code as
it is; the library files are not modified. Variants are cumulative:

* ``base``    the code as it is;
* ``threads`` LocalEngine's pool threads run torch with ``cpu_count // workers`` intra-op threads (1 on this
              2-core machine with 2 workers) instead of every worker thread using all cores: two workers × two
              OpenMP threads oversubscribe the cores and OpenMP's spinning barriers then make the many small
              products of a pass 20× slower (measured: 64 MB Gram item 11 ms with 1 thread, 258 ms with 2 while
              another process keeps the cores busy). ``torch.set_num_threads`` in a pool thread is per thread
              (checked), so this is a ThreadPoolExecutor ``initializer`` in engine.py;
* ``items``   + work items of 16 MB of input (``taskset.ITEM_BYTES``) instead of 64 MB: the stacked (T, rows)
              float32 deltas of a 64 MB item are ~60 MB, above glibc's largest mmap threshold (32 MB), so every
              item's buffer is a fresh mmap whose pages fault in one by one; at 16 MB malloc recycles them.
              Gram pass over 4.3 GB on one thread, warm cache: 4.0 s at 64 MB, 2.3 s at 32 MB, 2.1 s at 16 MB
              (2.4 s with 64 MB items and ``mallopt(M_MMAP_THRESHOLD, 1 GB)``, the same cause). Merges get the
              same rule: a tensor is merged in row chunks of ITEM_BYTES / (4·(T+1)) elements per task instead of
              a fixed ``merging.MERGE_CHUNK_ELEMENTS`` = 2M per task (T × 8 MB of deltas per chunk, ×~5 in TIES
              temporaries, per worker: memory grows with T);
* ``bmm``     + X·Xᵀ and U·Xᵀ as float32 batched products over 1024-element blocks summed in float64
              (``torch.bmm`` then ``sum(0, dtype=float64)``) instead of float32 products over 65536-element
              blocks: same speed on one thread, relative error ~7e-9 of √(G_ii·G_jj) instead of ~1e-7.

``python benchmarks/patches.py VARIANT tvbasis-args...`` runs the CLI with a variant applied (used by the
benchmarks to measure a patched build in a child process).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

import tvbasis.engine as engine_mod
import tvbasis.gram as gram_mod
import tvbasis.merging as merging_mod
import tvbasis.store as store_mod
import tvbasis.taskset as taskset_mod

VARIANTS = ["base", "threads", "items", "bmm"]
ITEM_BYTES = 16 * 2**20
KBLOCK = 1024  # elements per float32 partial product
SUPER = 256  # blocks per bmm call (bounds the (blocks, T, T) partial results)
_ORIG: dict[str, Any] = {"gram_of": gram_mod.gram_of, "cross_of": gram_mod.cross_of,
                         "pool": engine_mod.ThreadPoolExecutor, "item_bytes": taskset_mod.ITEM_BYTES,
                         "merge_init": merging_mod.MergeProducer.__init__}


def _merge_init(self: Any, taskset: Any, *args: Any, **kw: Any) -> None:
    """MergeProducer with row chunks sized by bytes over the T + 1 inputs (unless a chunk is given)."""
    if len(args) < 6 and "chunk_elements" not in kw:
        kw["chunk_elements"] = max(4096, taskset_mod.ITEM_BYTES // (4 * (taskset.T + 1)))
    _ORIG["merge_init"](self, taskset, *args, **kw)


class ThreadLimitedPool(ThreadPoolExecutor):
    """A pool whose threads each use cpu_count // workers torch threads (the proposed engine.py change)."""

    def __init__(self, max_workers: int | None = None, *args: Any, **kw: Any) -> None:
        n = max(1, (os.cpu_count() or 1) // max(1, max_workers or 1))
        super().__init__(max_workers, *args, initializer=torch.set_num_threads, initargs=(n,), **kw)


def fast_gram_of(x: torch.Tensor) -> torch.Tensor:
    return fast_cross_of(x, x)


def fast_cross_of(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """U·Xᵀ in float64 from float32 products summed over KBLOCK-element blocks, the blocks summed in float64."""
    u = u.reshape(u.shape[0], -1).to(torch.float32)
    x = x.reshape(x.shape[0], -1).to(torch.float32)
    n = x.shape[1]
    out = torch.zeros((u.shape[0], x.shape[0]), dtype=torch.float64, device=x.device)
    nb = n // KBLOCK
    for a in range(0, nb, SUPER):
        b = min(nb, a + SUPER)
        ub = u[:, a * KBLOCK:b * KBLOCK].reshape(u.shape[0], b - a, KBLOCK).transpose(0, 1)
        xb = x[:, a * KBLOCK:b * KBLOCK].reshape(x.shape[0], b - a, KBLOCK).transpose(0, 1)
        out += torch.bmm(ub, xb.transpose(1, 2)).sum(0, dtype=torch.float64)
    if nb * KBLOCK < n:
        out.addmm_(u[:, nb * KBLOCK:].double(), x[:, nb * KBLOCK:].double().T)
    return out


def apply_variant(variant: str | int) -> None:
    level = variant if isinstance(variant, int) else VARIANTS.index(variant)
    engine_mod.ThreadPoolExecutor = ThreadLimitedPool if level >= 1 else _ORIG["pool"]  # type: ignore[misc]
    taskset_mod.ITEM_BYTES = ITEM_BYTES if level >= 2 else _ORIG["item_bytes"]
    merging_mod.MergeProducer.__init__ = _merge_init if level >= 2 else _ORIG["merge_init"]  # type: ignore[method-assign]
    g, c = (fast_gram_of, fast_cross_of) if level >= 3 else (_ORIG["gram_of"], _ORIG["cross_of"])
    gram_mod.gram_of, gram_mod.cross_of = g, c
    store_mod.gram_of, store_mod.cross_of = g, c


if __name__ == "__main__":
    apply_variant(sys.argv[1])
    from tvbasis.cli import main
    sys.exit(main(sys.argv[2:]))
