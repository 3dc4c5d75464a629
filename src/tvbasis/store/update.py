"""Fold a new task into an existing store without the original fine-tunes.

One streaming pass over (pretrained, new fine-tune, store bases) gives, per layer group, the inner products
c = Uᵀv of the new task vector v with the stored vectors U and ‖v‖². Then:

* cluster stores: v joins the basis with the highest cosine; that basis is updated with the running member
  count, s ← (n·s + v)/(n + 1) (s ← s + v for a summing inner merge), which needs one more pass to rewrite
  the bases; the new task's coefficient is the least-squares scale onto its basis.
* every other store: the bases stay; the new task gets least-squares coefficients on their span (PCA: on the
  span after subtracting the stored mean), and only the manifest is rewritten.

The new task's reconstruction error is exact. Inner products between the new task and the old ones are not
available without the old checkpoints; where they are needed (the Gram/cosine matrix, the errors of old tasks
whose basis changed) they are estimated from the old tasks' reconstructions and flagged ``error_exact: false``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import BasisFit
from tvbasis.engine import Engine, get_engine
from tvbasis.errors import ConfigError, StoreError
from tvbasis.io import Checkpoint, open_checkpoint, open_finetuned, replace_atomically, temp_sibling
from tvbasis.io.writer import PositionalShard
from tvbasis.store import (
    ALL,
    MANIFEST,
    BasisStore,
    _coef_matrix,
    _refit,
    squared_errors,
    write_manifest_atomic,
)
from tvbasis.taskset import chunk_digests, combine_digests
from tvbasis.vectors import DiffSource, KeyFilter, changed_specs, vector_specs


class _Project:
    def __init__(self, store: BasisStore, pre: Checkpoint, ft: Checkpoint, chunk: int | None) -> None:
        self.store, self.pre, self.ft, self.chunk = store, pre, ft, chunk

    def __call__(self, name: str) -> tuple[str, np.ndarray, float, list[tuple[str, bytes]]]:
        v = DiffSource(self.pre, self.ft).get(name).reshape(-1).to(torch.float64)
        S = self.store.bases_rows(name).reshape(self.store.M, -1)
        rows = [S]
        mu = self.store.mean_rows(name)
        if mu is not None:
            rows.append(mu.reshape(1, -1))
        U = torch.cat(rows).to(torch.float64)
        digests = chunk_digests(self.store.specs[name], self.pre.get(name), self.chunk) if self.chunk else []
        return self.store.group_of.get(name, ALL), (U @ v).numpy(), float(v @ v), digests


def add_task(store: BasisStore, name: str, finetuned: str | Path | Checkpoint, pretrained: str | Path | Checkpoint,
             engine: Engine | str | None = None) -> BasisStore:
    if name in store.task_names:
        raise ConfigError(f"{store.root}: already has a task named {name!r}")
    if not name or "=" in name or "," in name:
        raise ConfigError(f"invalid task name {name!r}")
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    ft = open_finetuned(finetuned, pre)
    store.check_pretrained(pre)
    mf = store.manifest
    specs = vector_specs(pre, ft, KeyFilter.of(mf.get("include"), mf.get("exclude")))
    if ft.changed_tensors() is not None:  # an adapter: zero elsewhere, so it fits if the store covers those
        outside = sorted(set(changed_specs(specs, [ft])) - set(store.specs))
        if outside:
            raise StoreError(f"{ft.path}: the adapter changes {len(outside)} tensor(s) the store {store.root} does "
                             f"not cover: {', '.join(outside[:4])}")
    elif set(specs) != set(store.specs):
        raise StoreError(f"{ft.path}: covers other tensors than the store {store.root}"
                         + (" (the store was built from LoRA adapters: it covers only the tensors they change)"
                            if len(store.specs) < len(specs) else ""))
    ref = mf["pretrained"]
    chunk = int(ref["checksum_chunk_elements"]) if ref.get("checksum") else None
    eng = get_engine(engine)
    names = list(store.specs)
    nU = store.M + (1 if store._mean is not None else 0)
    c = {g: np.zeros(nU) for g in store.fits}
    vv = {g: 0.0 for g in store.fits}
    digests: list[tuple[str, bytes]] = []
    for g, ci, vi, d in eng.map(_Project(store, pre, ft, chunk), names, desc=f"project {name}",
                                sizes=[2 * pre.spec(n).nbytes for n in names]):
        c[g] += ci
        vv[g] += vi
        digests.extend(d)
    if chunk is not None and combine_digests(digests) != ref["checksum"]:
        raise StoreError(f"{pre.path}: is not the pretrained model the store was built from ({ref.get('path')}): "
                         "the weights differ (checksum mismatch)")
    if sum(vv.values()) == 0:
        raise ConfigError(f"{ft.path}: equals the pretrained model (zero task vector)")
    new = copy.deepcopy(mf)
    fits = {g: copy.deepcopy(f) for g, f in store.fits.items()}
    T = store.T
    err2 = 0.0
    chosen: dict[str, int] = {}
    updates: dict[str, tuple[int, float, float]] = {}
    approx_inner = np.zeros(T)  # ⟨v, v̂_t⟩ summed over groups
    for g, fit in fits.items():
        cross = new["cross"][g]
        C, K = np.asarray(cross["C"]), np.asarray(cross["K"])
        approx_inner += _coef_matrix(fit).T @ c[g]
        if fit.labels is not None:
            m, a, b = _join_cluster(fit, c[g], vv[g], K, new)
            chosen[g] = m
            updates[g] = (m, a, b)
            K2 = K.copy()
            K2[m, :] = a * K[m, :] + b * c[g]
            K2[:, m] = K2[m, :]
            K2[m, m] = a * a * K[m, m] + 2 * a * b * c[g][m] + b * b * vv[g]
            C2 = np.hstack([C, c[g][:, None]])
            C2[m, :T] = a * C[m, :] + b * (_coef_matrix(fit).T @ c[g])
            C2[m, T] = a * c[g][m] + b * vv[g]
            fit.labels = [*fit.labels, m]
            fit.W = np.hstack([fit.W, np.zeros((fit.M, 1))])
            if fit.B is not None:
                B = fit.B.copy()
                B[:, m] *= a
                fit.B = np.vstack([B, np.eye(fit.M)[m] * b])
            if fit.refit == "cluster_scale":
                _refit(fit, C2, K2)
            else:
                fit.W[m, T] = 1.0
        else:
            K2 = K
            C2 = np.hstack([C, c[g][:, None]])
            M = fit.M
            Kmm = K[:M, :M] + 1e-12 * max(np.trace(K[:M, :M]), 1e-300) / M * np.eye(M)
            rhs = c[g][:M] - (K[:M, M] if fit.mean_coef is not None else 0.0)
            w = np.linalg.solve(Kmm, rhs)
            fit.W = np.hstack([fit.W, w[:, None]])
            if fit.B is not None:
                fit.B = np.vstack([fit.B, np.zeros((1, M))])
            if fit.mean_coef is not None:
                fit.mean_coef = np.append(fit.mean_coef, 1.0)
            if fit.mean_weights is not None:
                fit.mean_weights = np.append(fit.mean_weights, 0.0)
        Gg = np.zeros((T + 1, T + 1))
        old_g = np.asarray(new["group_grams"][g]) if g in new.get("group_grams", {}) else (
            np.asarray(new["gram"]) if g == ALL else None)
        if old_g is not None:
            Gg[:T, :T] = old_g
        est = _coef_matrix(fit)[:, :T].T @ c[g] if fit.labels is None else approx_inner_group(store.fits[g], c[g])
        Gg[T, :T] = Gg[:T, T] = est
        Gg[T, T] = vv[g]
        if g in new.get("group_grams", {}):
            new["group_grams"][g] = Gg.tolist()
        errs = squared_errors(Gg, C2, K2, fit)
        err2 += float(errs[T])
        new["cross"][g] = {"C": C2.tolist(), "K": K2.tolist()}
        new["groups"][g] = fit.to_json()
    norm = float(np.sqrt(sum(vv.values())))
    G = np.asarray(new["gram"])
    G2 = np.zeros((T + 1, T + 1))
    G2[:T, :T] = G
    G2[T, :T] = G2[:T, T] = approx_inner
    G2[T, T] = norm**2
    new["gram"] = G2.tolist()
    new["gram_estimated_rows"] = sorted(set(new.get("gram_estimated_rows", [])) | {name})
    new["T"] = T + 1
    new["tasks"].append({"name": name, "source": str(ft.path), "norm": norm,
                         "rel_error": float(np.sqrt(max(err2, 0.0))) / norm, "error_exact": True, "added": True})
    if chosen:
        counts = list(new.get("member_counts") or [])
        first = next(iter(chosen.values()))
        if counts:
            counts[first] += 1
            new["member_counts"] = counts
        new["tasks"][-1]["cluster"] = first
        _update_old_errors(new, fits, chosen)
        return _rewrite_cluster_store(store, new, pre, ft, updates, eng)
    write_manifest_atomic(store.root, new)
    return BasisStore.open(store.root)


def approx_inner_group(fit: BasisFit, c: np.ndarray) -> np.ndarray:
    return _coef_matrix(fit).T @ c


def _join_cluster(fit: BasisFit, c: np.ndarray, vv: float, K: np.ndarray, manifest: dict[str, Any]) -> tuple[int, float, float]:
    """Most similar basis by cosine and the update weights (a, b): s ← a·s + b·v."""
    M = fit.M
    cos = [c[m] / np.sqrt(K[m, m] * vv) if K[m, m] > 0 and vv > 0 else -np.inf for m in range(M)]
    m = int(np.argmax(cos))
    counts = manifest.get("member_counts") or np.bincount(fit.labels or [], minlength=M).tolist()
    n = int(counts[m]) if m < len(counts) else int(sum(1 for lab in (fit.labels or []) if lab == m))
    inner = fit.inner.method if fit.inner is not None else ("mean" if fit.B is None or
                                                             np.allclose(fit.B.sum(0), 1.0) else "task_arithmetic")
    if inner == "task_arithmetic" and not (fit.inner and fit.inner.params.get("normalize")):
        return m, 1.0, 1.0
    return m, n / (n + 1.0), 1.0 / (n + 1.0)


def _update_old_errors(manifest: dict[str, Any], fits: dict[str, BasisFit], chosen: dict[str, int]) -> None:
    T = len(manifest["tasks"]) - 1
    err2 = np.zeros(T + 1)
    for g, fit in fits.items():
        C = np.asarray(manifest["cross"][g]["C"])
        K = np.asarray(manifest["cross"][g]["K"])
        Gg = np.asarray(manifest["group_grams"][g]) if g in manifest.get("group_grams", {}) else np.asarray(manifest["gram"])
        err2 += squared_errors(Gg, C, K, fit)
    for t in range(T):
        lab = [fits[g].labels[t] for g in fits if fits[g].labels is not None]  # type: ignore[index]
        if any(lab_g == chosen[g] for g, lab_g in zip(fits, lab)):
            task = manifest["tasks"][t]
            task["rel_error"] = float(np.sqrt(max(err2[t], 0.0))) / task["norm"] if task["norm"] else 0.0
            task["error_exact"] = False


class _Rewrite:
    def __init__(self, store: BasisStore, pre: Checkpoint, ft: Checkpoint, ab: dict[str, tuple[int, float, float]],
                 shards: dict[str, PositionalShard], dtype_of: dict[str, torch.dtype]) -> None:
        self.store, self.pre, self.ft, self.ab, self.shards, self.dtype_of = store, pre, ft, ab, shards, dtype_of

    def __call__(self, name: str) -> None:
        g = self.store.group_of.get(name, ALL)
        m, a, b = self.ab[g]
        S = self.store.bases_rows(name)
        S[m] = a * S[m] + b * DiffSource(self.pre, self.ft).get(name)
        spec = self.store.specs[name]
        for i in range(self.store.M):
            self.shards[name].write_elements(name, i * spec.numel, S[i], self.dtype_of[name])


def _rewrite_cluster_store(store: BasisStore, manifest: dict[str, Any], pre: Checkpoint, ft: Checkpoint,
                           updates: dict[str, tuple[int, float, float]], eng: Engine) -> BasisStore:
    """Write the updated bases into a copy of the store (same shard files and order), then swap it in."""
    dtype_of = {n: getattr(torch, d) for n, d in manifest["store_dtypes"].items()}
    tmp = temp_sibling(store.root)
    tmp.mkdir()
    try:
        shards: dict[str, PositionalShard] = {}
        for f in manifest["files"]["bases"]:
            sh = PositionalShard(tmp / f, open_checkpoint(store.root / f).specs())
            sh.create()
            shards.update({s.name: sh for s in sh.specs})
        for _ in eng.map(_Rewrite(store, pre, ft, updates, shards, dtype_of), list(store.specs), desc="update bases"):
            pass
        for f in store.root.iterdir():
            if f.is_file() and f.name != MANIFEST and f.name not in manifest["files"]["bases"]:
                shutil.copy2(f, tmp / f.name)  # index, mean shards
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_atomically(tmp, store.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BasisStore.open(store.root)
