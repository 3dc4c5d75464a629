"""Fold a new task into an existing store without the original fine-tunes.

One streaming pass over (pretrained, new fine-tune, store) gives, per layer group, the inner products c = U·v of
the new task vector v with the stored vectors U and ‖v‖²; ``tvbasis.bases.extend`` turns them into the fit for
T + 1 tasks. Cluster stores then rewrite their bases (one more pass) into a copy of the store that is swapped
in; every other store only rewrites its manifest.

The new task's reconstruction error is exact. Inner products between the new task and the old ones are not
available without the old checkpoints; where they are needed (the Gram/cosine matrix, the errors of old tasks
whose basis changed) they are estimated from the old tasks' reconstructions and flagged ``error_exact: false``.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch

from tvbasis.bases.extend import Extension, extend_fit
from tvbasis.engine import Engine, Run, as_run
from tvbasis.errors import ConfigError, StoreError
from tvbasis.io import Checkpoint, open_checkpoint, open_finetuned, replace_atomically, temp_sibling
from tvbasis.io.checksum import check_pretrained_checksum, chunk_digests
from tvbasis.io.writer import PositionalShard
from tvbasis.passes import ALL
from tvbasis.store.format import MANIFEST, Cross, Manifest, TaskEntry
from tvbasis.store.store import BasisStore
from tvbasis.vectors import DiffSource, KeyFilter, changed_specs, vector_specs


class _Project:
    """Work unit: per tensor, U·v and ‖v‖² in float64 (and the pretrained's digests for the checksum)."""

    def __init__(self, store: BasisStore, pre: Checkpoint, ft: Checkpoint, chunk: int | None) -> None:
        self.store, self.pre, self.ft, self.chunk = store, pre, ft, chunk

    def __call__(self, name: str) -> tuple[str, np.ndarray, float, list[tuple[str, bytes]]]:
        v = DiffSource(self.pre, self.ft).get(name).reshape(-1).to(torch.float64)
        rows = [self.store.bases_rows(name).reshape(self.store.M, -1)]
        mu = self.store.mean_rows(name)
        if mu is not None:
            rows.append(mu.reshape(1, -1))
        U = torch.cat(rows).to(torch.float64)
        digests = chunk_digests(self.store.specs[name], self.pre.get(name), self.chunk) if self.chunk else []
        return self.store.group_of.get(name, ALL), (U @ v).numpy(), float(v @ v), digests


def _check_covers(store: BasisStore, pre: Checkpoint, ft: Checkpoint) -> None:
    mf = store.manifest
    specs = vector_specs(pre, ft, KeyFilter.of(mf.include, mf.exclude))
    if ft.changed_tensors() is not None:  # an adapter: zero elsewhere, so it fits if the store covers those
        outside = sorted(set(changed_specs(specs, [ft])) - set(store.specs))
        if outside:
            raise StoreError(f"{ft.path}: the adapter changes {len(outside)} tensor(s) the store {store.root} does "
                             f"not cover: {', '.join(outside[:4])}")
    elif set(specs) != set(store.specs):
        raise StoreError(f"{ft.path}: covers other tensors than the store {store.root}"
                         + (" (the store was built from LoRA adapters: it covers only the tensors they change)"
                            if len(store.specs) < len(specs) else ""))


def add_task(store: BasisStore, name: str, finetuned: str | Path | Checkpoint, pretrained: str | Path | Checkpoint,
             run: Run = None) -> BasisStore:
    """Add task ``name`` (a fine-tune or LoRA adapter of ``pretrained``) to ``store``; returns the reopened store."""
    if name in store.task_names:
        raise ConfigError(f"{store.root}: already has a task named {name!r}")
    if not name or "=" in name or "," in name or name == "all":
        raise ConfigError(f"invalid task name {name!r}")
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    ft = open_finetuned(finetuned, pre)
    store.check_pretrained(pre)
    _check_covers(store, pre, ft)
    mf = store.manifest
    ref = mf.pretrained
    chunk = ref.checksum_chunk_elements if ref.checksum else None
    eng = as_run(run).get_engine()
    names = list(store.specs)
    nU = next(iter(store.fits.values())).n_stored
    c = {g: np.zeros(nU) for g in store.fits}
    vv = {g: 0.0 for g in store.fits}
    digests: list[tuple[str, bytes]] = []
    for g, ci, vi, d in eng.map(_Project(store, pre, ft, chunk), names, desc=f"project {name}",
                                sizes=[2 * pre.spec(n).nbytes for n in names]):
        c[g] += ci
        vv[g] += vi
        digests.extend(d)
    if chunk is not None:
        check_pretrained_checksum(digests, ref.to_json(), pre.path)
    if sum(vv.values()) == 0:
        raise ConfigError(f"{ft.path}: equals the pretrained model (zero task vector)")
    new = copy.deepcopy(mf)
    T = store.T
    ext: dict[str, Extension] = {}
    err2 = 0.0
    inner = np.zeros(T)  # ⟨v, v̂_t⟩ summed over groups
    for g, fit in store.fits.items():
        cross = mf.cross[g]
        e = ext[g] = extend_fit(fit, c[g], vv[g], cross.C, cross.K)
        inner += e.inner_estimate
        Gg = np.zeros((T + 1, T + 1))
        Gg[:T, :T] = mf.gram_of_group(g)
        Gg[T, :T] = Gg[:T, T] = e.inner_estimate
        Gg[T, T] = vv[g]
        if g in new.group_grams:
            new.group_grams[g] = Gg
        err2 += float(e.fit.squared_errors(Gg, e.C, e.K)[T])
        new.cross[g] = Cross(e.C, e.K)
        new.groups[g] = e.fit
    norm = float(np.sqrt(sum(vv.values())))
    G2 = np.zeros((T + 1, T + 1))
    G2[:T, :T] = mf.gram
    G2[T, :T] = G2[:T, T] = inner
    G2[T, T] = norm**2
    new.gram = G2
    new.gram_estimated_rows = sorted(set(new.gram_estimated_rows) | {name})
    new.T = T + 1
    entry = TaskEntry(name, str(ft.path), norm, float(np.sqrt(max(err2, 0.0))) / norm, added=True)
    new.tasks.append(entry)
    updates = {g: e.update for g, e in ext.items() if e.update is not None}
    if not updates:
        new.write(store.root)
        return BasisStore.open(store.root)
    first = next(iter(ext.values()))
    assert first.update is not None
    entry.cluster = first.update[0]
    if new.member_counts is not None:
        new.member_counts = first.fit.cluster_sizes()
    _update_old_errors(new, {g: e.update[0] for g, e in ext.items() if e.update is not None})
    return _rewrite_cluster_store(store, new, pre, ft, updates, eng)  # type: ignore[arg-type]


def _update_old_errors(manifest: Manifest, chosen: dict[str, int]) -> None:
    """Errors of the old tasks whose basis changed, estimated (their checkpoints are not available)."""
    T = manifest.T - 1
    err2 = np.zeros(T + 1)
    for g, fit in manifest.groups.items():
        cross = manifest.cross[g]
        err2 += fit.squared_errors(manifest.gram_of_group(g), cross.C, cross.K)
    for t in range(T):
        if any(fit.labels is not None and fit.labels[t] == chosen[g] for g, fit in manifest.groups.items()):
            task = manifest.tasks[t]
            task.rel_error = float(np.sqrt(max(err2[t], 0.0))) / task.norm if task.norm else 0.0
            task.error_exact = False


class _Rewrite:
    def __init__(self, store: BasisStore, pre: Checkpoint, ft: Checkpoint, ab: dict[str, tuple[int, float, float]],
                 shards: dict[str, PositionalShard], dtype_of: dict[str, torch.dtype]) -> None:
        self.store, self.pre, self.ft, self.ab, self.shards, self.dtype_of = store, pre, ft, ab, shards, dtype_of

    def __call__(self, name: str) -> None:
        m, a, b = self.ab[self.store.group_of.get(name, ALL)]
        S = self.store.bases_rows(name)
        S[m] = a * S[m] + b * DiffSource(self.pre, self.ft).get(name)
        spec = self.store.specs[name]
        for i in range(self.store.M):
            self.shards[name].write_elements(name, i * spec.numel, S[i], self.dtype_of[name])


def _rewrite_cluster_store(store: BasisStore, manifest: Manifest, pre: Checkpoint, ft: Checkpoint,
                           updates: dict[str, tuple[int, float, float]], eng: Engine) -> BasisStore:
    """Write the updated bases into a copy of the store (same shard files and order), then swap it in."""
    dtype_of = {n: getattr(torch, d) for n, d in manifest.store_dtypes.items()}
    tmp = temp_sibling(store.root)
    tmp.mkdir()
    try:
        shards: dict[str, PositionalShard] = {}
        for f in manifest.files.bases:
            sh = PositionalShard(tmp / f, open_checkpoint(store.root / f).specs())
            sh.create()
            shards.update({s.name: sh for s in sh.specs})
        for _ in eng.map(_Rewrite(store, pre, ft, updates, shards, dtype_of), list(store.specs), desc="update bases"):
            pass
        for path in {str(v.path): v.path for v in shards.values()}.values():
            PositionalShard.fsync(path)
        for f in store.root.iterdir():
            if f.is_file() and f.name != MANIFEST and f.name not in manifest.files.bases:
                shutil.copy2(f, tmp / f.name)  # index, mean shards
        manifest.write(tmp)
        replace_atomically(tmp, store.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BasisStore.open(store.root)
