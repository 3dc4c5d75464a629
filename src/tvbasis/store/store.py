"""BasisStore: the on-disk format of a task vector basis, how to build one, and arithmetic on it.

A store is a directory::

    tvbasis.json                         manifest (format version, method, tasks, B, W, errors, Gram, ...)
    bases-00001-of-0000N.safetensors     per parameter name one tensor of shape (M, *param_shape)
    bases.safetensors.index.json         (when sharded)
    mean-….safetensors                   PCA only: the mean task vector μ, one tensor per parameter

Building takes two streaming passes over the checkpoints: the Gram pass (``tvbasis.gram``) and the
materialisation pass below, which writes the bases and accumulates, in float64, the cross-Grams UᵀV and UᵀU of
the stored bases U with the task vectors V. From those the least-squares coefficients and every task's exact
reconstruction error follow without a further pass. All operations on a store (reconstruct, combine, addition,
apply, add-task) read only the store and, where they write a model, the pretrained checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis import __version__
from tvbasis.bases import BASIS_METHODS, BasisFit, get_basis_method
from tvbasis.engine import Engine, get_engine
from tvbasis.errors import ConfigError, StoreError, UnknownTaskError
from tvbasis.gram import GramResult, compute_gram, cosine_from_gram, cross_of, gram_of, row_sq_norms
from tvbasis.io import (
    Checkpoint,
    TensorSpec,
    check_output,
    dtype_name,
    open_checkpoint,
    parse_dtype,
    plan_shards,
    replace_atomically,
    row_chunks,
    temp_sibling,
)
from tvbasis.io.writer import PositionalShard, shard_names, write_index
from tvbasis.merge import MergeContext, MergeSpec, get_merger
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, TaskSet, layer_group, structure_fingerprint
from tvbasis.vectors import Producer, TaskVector

FORMAT = "tvbasis.basis_store"
FORMAT_VERSION = 1
MANIFEST = "tvbasis.json"
ALL = "*"  # the single group of a non-layerwise store
RANDOM_BLOCK = 1 << 20  # rows of a random basis are generated in blocks of about this many elements


# ------------------------------------------------------------------------------------------------ helpers
def _spec_json(s: TensorSpec) -> dict[str, Any]:
    return {"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype)}


def _spec_from_json(d: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(str(d["name"]), tuple(int(x) for x in d["shape"]), getattr(torch, str(d["dtype"])))


def _stacked(spec: TensorSpec, n: int, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(spec.name, (n, *spec.shape), dtype)


def random_rows(seed: int, spec: TensorSpec, M: int, total_params: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of the M random basis tensors for parameter ``spec``: (M, b − a, *rest) float32.

    Generated in fixed row blocks seeded by (seed, crc32(name), block start), so the same rows come out
    whatever chunking a pass uses; entries ~ N(0, 1/D) so each basis vector has about unit norm."""
    if not spec.shape:
        gen = torch.Generator().manual_seed(_seed(seed, spec.name, 0))
        return torch.randn((M,), generator=gen) / math.sqrt(total_params)
    row = max(1, spec.numel // spec.shape[0])
    block = max(1, RANDOM_BLOCK // row)
    parts = []
    start = (a // block) * block
    while start < b:
        stop = min(spec.shape[0], start + block)
        gen = torch.Generator().manual_seed(_seed(seed, spec.name, start))
        blk = torch.randn((M, stop - start, *spec.shape[1:]), generator=gen)
        parts.append(blk[:, max(a, start) - start: min(b, stop) - start])
        start = stop
    return torch.cat(parts, dim=1) / math.sqrt(total_params)


def _seed(seed: int, name: str, start: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7919 + int(start)) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------ layout
class StoreLayout:
    """Where each parameter's stacked bases (and PCA mean) live in the shard files."""

    def __init__(self, specs: Sequence[TensorSpec], M: int, dtype_of: Mapping[str, torch.dtype],
                 with_bases: bool, with_mean: bool, max_shard_size: int | str) -> None:
        self.bases = plan_shards([_stacked(s, M, dtype_of[s.name]) for s in specs], max_shard_size) if with_bases else []
        self.means = plan_shards([s.with_dtype(dtype_of[s.name]) for s in specs], max_shard_size) if with_mean else []
        self.bases_files = shard_names("bases", len(self.bases)) if self.bases else []
        self.mean_files = shard_names("mean", len(self.means)) if self.means else []

    def shards(self, root: Path) -> tuple[dict[str, PositionalShard], dict[str, PositionalShard]]:
        b = {s.name: sh for specs, f in zip(self.bases, self.bases_files)
             for sh in [PositionalShard(root / f, specs)] for s in specs}
        m = {s.name: sh for specs, f in zip(self.means, self.mean_files)
             for sh in [PositionalShard(root / f, specs)] for s in specs}
        return b, m


# ------------------------------------------------------------------------------------------ materialise
class MaterialiseTask:
    """Work unit of the materialisation pass: computes the M bases (and μ) of one row chunk of one tensor,
    writes them into the preallocated shards, returns float64 cross-Grams UᵀV and UᵀU of what was stored."""

    def __init__(self, taskset: TaskSet, fits: Mapping[str, BasisFit], group_of: Mapping[str, str],
                 dtype_of: Mapping[str, torch.dtype], bases: Mapping[str, PositionalShard],
                 means: Mapping[str, PositionalShard], device: str, total_params: int,
                 thresholds: Mapping[str, torch.Tensor] | None = None,
                 fisher: list[Checkpoint] | None = None) -> None:
        self.taskset, self.fits, self.group_of, self.dtype_of = taskset, dict(fits), dict(group_of), dict(dtype_of)
        self.bases, self.means, self.device, self.total_params = dict(bases), dict(means), device, total_params
        self.thresholds = dict(thresholds or {})
        self.fisher = fisher

    def __call__(self, item: tuple[str, int, int]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        name, a, b = item
        fit = self.fits[self.group_of.get(name, ALL)]
        if fit.inner is not None:
            return self._nonlinear(name, fit)
        spec = self.taskset.specs[name]
        rows = (a, b) if spec.shape else None
        x = self.taskset.deltas(name, rows).to(self.device)
        chunk_shape = x.shape[1:]
        if fit.random_seed is not None:
            s = random_rows(fit.random_seed, spec, fit.M, self.total_params, a, b).to(self.device)
        else:
            assert fit.B is not None
            # bases and μ in one product: U = [Bᵀ; mean weights] X
            coef = fit.B.T if fit.mean_weights is None else np.vstack([fit.B.T, np.asarray(fit.mean_weights)[None]])
            Ct = torch.as_tensor(coef, dtype=torch.float32, device=self.device)
            s = (Ct @ x.reshape(x.shape[0], -1)).reshape(Ct.shape[0], *chunk_shape)
        return self._store_and_measure(name, fit, a, s, x)

    def _store_and_measure(self, name: str, fit: BasisFit, a: int, s: torch.Tensor,
                           x: torch.Tensor) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """Write rows starting at ``a`` of s: the M bases (M, rows, ...), then μ as row M when the fit has a mean
        (PCA); return C, K and direct errors. Consumes x (the residuals are formed in place)."""
        spec = self.taskset.specs[name]
        group = self.group_of.get(name, ALL)
        dtype = self.dtype_of[name]
        u = s.to(dtype).to(torch.float32)  # exactly what is stored
        row_elems = spec.numel // spec.shape[0] if spec.shape else 1
        start = a * row_elems if spec.shape else 0
        if fit.random_seed is None:
            shard = self.bases[name]
            for m in range(fit.M):
                shard.write_elements(name, m * spec.numel + start, u[m].cpu(), dtype)
        if fit.mean_weights is not None:
            self.means[name].write_elements(name, start, u[fit.M].cpu(), dtype)
        C = cross_of(u, x).cpu().numpy()
        K = gram_of(u).cpu().numpy()
        err2 = np.zeros(0)
        if w_known_before_pass(fit):
            # residuals measured directly: exact even when they are tiny (the formula from G, C, K cancels)
            coef = torch.as_tensor(_coef_matrix(fit).T, dtype=torch.float32, device=u.device)  # (T, M[+1])
            r = x.reshape(x.shape[0], -1).addmm_(coef, u.reshape(u.shape[0], -1), alpha=-1)  # x is not used again
            err2 = row_sq_norms(r).cpu().numpy()
        return group, C, K, err2

    def _nonlinear(self, name: str, fit: BasisFit) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """Cluster bases by a non-linear inner merge: each basis is merged over the whole tensor (in row chunks
        when big, see ``merge_tensor``), then written and measured chunk by chunk."""
        from tvbasis.merging import merge_tensor
        assert fit.labels is not None and fit.inner is not None
        spec = self.taskset.specs[name]
        group = self.group_of.get(name, ALL)
        labels = np.asarray(fit.labels)
        th = self.thresholds.get(group)
        bases = []
        for m in range(fit.M):
            idx = np.flatnonzero(labels == m).tolist()

            def read(a: int, b: int, idx: list[int] = idx) -> torch.Tensor:
                return self.taskset.deltas(name, (a, b) if spec.shape else None, tasks=idx)
            fisher_read = None
            if self.fisher is not None:
                from tvbasis.merging import fisher_rows
                members = [self.fisher[i] for i in idx]

                def fisher_read(a: int, b: int, members: list[Checkpoint] = members) -> torch.Tensor:
                    return fisher_rows(members, spec, a, b)
            bases.append(merge_tensor(fit.inner, read, spec, len(idx), torch.ones(len(idx)),
                                      None if th is None else th[idx], fisher_read, self.device, MERGE_ROWS_ELEMENTS))
        S = torch.stack(bases)
        assert fit.mean_weights is None  # inner merges make cluster bases, which have no mean
        C, K = np.zeros((fit.M, self.taskset.T)), np.zeros((fit.M, fit.M))
        for a, b in row_chunks(spec, MERGE_ROWS_ELEMENTS):
            x = self.taskset.deltas(name, (a, b) if spec.shape else None).to(self.device)
            s = (S[:, a:b] if spec.shape else S).to(self.device)
            _, c, k, _ = self._store_and_measure(name, fit, a, s, x)
            C += c
            K += k
        return group, C, K, np.zeros(0)


#: per-task elements of one row chunk when non-linear bases are written and measured
MERGE_ROWS_ELEMENTS = 2 * 2**20


def w_known_before_pass(fit: BasisFit) -> bool:
    """True when the coefficients do not depend on the materialised bases (so residuals can be measured in the
    pass): fixed W (autoencoder, PCA) or cluster scales that G already gives exactly (linear inner merges)."""
    return fit.refit is None or (fit.refit == "cluster_scale" and fit.B is not None)


def _refit(fit: BasisFit, C: np.ndarray, K: np.ndarray) -> None:
    """Least-squares coefficients from the exact cross-Grams (in place)."""
    M = fit.M
    if fit.refit == "full":
        Kmm = K[:M, :M] + 1e-12 * max(np.trace(K[:M, :M]), 1e-300) / M * np.eye(M)
        fit.W = np.linalg.solve(Kmm, C[:M])
    elif fit.refit == "cluster_scale":
        assert fit.labels is not None
        W = np.zeros((M, len(fit.labels)))
        for t, m in enumerate(fit.labels):
            W[m, t] = C[m, t] / K[m, m] if K[m, m] > 0 else 0.0
        fit.W = W


def _coef_matrix(fit: BasisFit) -> np.ndarray:
    """(M[+1], T) coefficients of each task on the stored vectors U = [bases; μ]."""
    if fit.mean_coef is None:
        return fit.W
    return np.vstack([fit.W, fit.mean_coef[None, :]])


def squared_errors(Gg: np.ndarray, C: np.ndarray, K: np.ndarray, fit: BasisFit) -> np.ndarray:
    """‖v_t − v̂_t‖² for every task of one group: G_tt − 2·w_tᵀC_t + w_tᵀKw_t (exact, float64)."""
    Wf = _coef_matrix(fit)
    return np.diag(Gg) - 2 * np.einsum("mt,mt->t", Wf, C) + np.einsum("mt,mn,nt->t", Wf, K, Wf)


# --------------------------------------------------------------------------------------------------- build
def build_store(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint], method: str,
                M: int | None, out: str | Path, options: Mapping[str, Any] | None = None, layerwise: bool = False,
                dtype: str | torch.dtype | None = None, include: Iterable[str] | None = None,
                exclude: Iterable[str] | None = None, max_shard_size: int | str = "5GB", force: bool = False,
                engine: Engine | str | None = None, device: str = "cpu",
                chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
                fisher: Mapping[str, str | Path] | None = None) -> BasisStore:
    """Fit a basis of the T fine-tunes and write it as a store at ``out`` (atomically).

    ``fisher`` (task -> diagonal Fisher safetensors) is needed by a cluster basis with ``inner="fisher"``."""
    out = Path(out)
    basis = get_basis_method(method, **dict(options or {}))
    fisher_ckpts = None
    if method == "cluster" and (options or {}).get("inner") == "fisher":
        if not fisher or set(fisher) != set(finetuned):
            raise ConfigError(f"--inner fisher needs one Fisher file per task (--fisher NAME=FILE for each of "
                              f"{sorted(finetuned)}); got {sorted(fisher or {})}")
        fisher_ckpts = [open_checkpoint(fisher[n]) for n in finetuned]
    elif fisher:
        raise ConfigError("--fisher is only used by --method cluster --inner fisher")
    check_output(out, force)
    taskset = TaskSet.open(pretrained, finetuned, include, exclude)
    if M is not None and (M < 1 or M >= taskset.T):
        raise ConfigError(f"-M must satisfy 1 <= M < T = {taskset.T} (got M = {M}): "
                          "a basis is only a compression when M < T")
    eng = get_engine(engine)
    gram = compute_gram(taskset, eng, layer_group if layerwise else None, device, chunk_elements)
    zero = [taskset.names[t] for t in range(taskset.T) if gram.G[t, t] == 0]
    if zero:
        raise ConfigError(f"fine-tune(s) {zero} equal the pretrained model (zero task vector)")
    groups = dict(gram.group_grams) if layerwise else {ALL: gram.G}
    group_of = dict(gram.group_of) if layerwise else {}
    fits = {g: basis.fit(Gg, M) for g, Gg in groups.items()}
    first = next(iter(fits.values()))
    if layerwise and first.labels is not None and any(f.M != first.M for f in fits.values()):
        # eigengap may choose different M per group: storage needs one M per parameter; fix it at the first's
        fits = {g: basis.fit(Gg, first.M) for g, Gg in groups.items()}
    Mfit = first.M
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    dtype_of = {n: (out_dtype or s.dtype) for n, s in taskset.specs.items()}
    specs = list(taskset.specs.values())
    layout = StoreLayout(specs, Mfit, dtype_of, with_bases=first.random_seed is None,
                         with_mean=first.mean_weights is not None, max_shard_size=max_shard_size)
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        bases, means = layout.shards(tmp)
        for sh in {id(v): v for v in [*bases.values(), *means.values()]}.values():
            sh.create()
        thresholds = _inner_thresholds(taskset, fits, group_of, eng, chunk_elements)
        nonlinear = first.inner is not None  # merged whole per tensor (chunked inside the work unit when big)
        items = [(s.name, 0, s.shape[0] if s.shape else 1) for s in specs] if nonlinear else taskset.items(chunk_elements)
        total = sum(s.numel for s in specs)
        task = MaterialiseTask(taskset, fits, group_of, dtype_of, bases, means, device, total, thresholds,
                               fisher_ckpts)
        T = taskset.T
        nU = Mfit + (1 if first.mean_weights is not None else 0)
        C = {g: np.zeros((nU, T)) for g in fits}
        K = {g: np.zeros((nU, nU)) for g in fits}
        direct = {g: np.zeros(T) for g in fits}
        for g, c, k, e in eng.map(task, items, desc="materialise bases",
                                  sizes=[taskset.item_bytes(i) for i in items]):
            C[g] += c
            K[g] += k
            if e.size:
                direct[g] += e
        for sh in {str(v.path): v.path for v in [*bases.values(), *means.values()]}.values():
            PositionalShard.fsync(sh)
        write_index(tmp, "bases", layout.bases, layout.bases_files)
        write_index(tmp, "mean", layout.means, layout.mean_files)
        err2 = np.zeros(T)
        for g, fit in fits.items():
            if w_known_before_pass(fit):
                err2 += direct[g]
            else:
                _refit(fit, C[g], K[g])
                err2 += squared_errors(groups[g], C[g], K[g], fit)
        norms = gram.norms
        rel = np.sqrt(np.clip(err2, 0.0, None)) / np.where(norms > 0, norms, 1.0)
        manifest = _manifest(basis, method, dict(options or {}), Mfit, layerwise, taskset, finetuned, gram, fits,
                             group_of, C, K, norms, rel, dtype_of, layout, include, exclude)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BasisStore.open(out)


def _inner_thresholds(taskset: TaskSet, fits: Mapping[str, BasisFit], group_of: Mapping[str, str], eng: Engine,
                      chunk_elements: int | None) -> dict[str, torch.Tensor]:
    """Per-task global trim thresholds for inner merges with trim_scope=global (two extra streaming passes)."""
    out: dict[str, torch.Tensor] = {}
    for g, fit in fits.items():
        if fit.inner is None:
            continue
        merger = get_merger(fit.inner)
        if not merger.needs_global_thresholds:
            continue
        from tvbasis.merge import global_thresholds
        names = [n for n in taskset.specs if group_of.get(n, ALL) == g]
        keep = set(names)
        items = [i for i in taskset.items(chunk_elements) if i[0] in keep]

        def factory(items: list[tuple[str, int, int]] = items) -> Iterable[torch.Tensor]:
            for x in eng.map(_DeltaChunk(taskset), items, desc="trim thresholds"):
                yield x.reshape(x.shape[0], -1)
        assert merger.density is not None
        out[g] = global_thresholds(factory, taskset.T, merger.density)
    return out


class _DeltaChunk:
    def __init__(self, taskset: TaskSet) -> None:
        self.taskset = taskset

    def __call__(self, item: tuple[str, int, int]) -> torch.Tensor:
        name, a, b = item
        return self.taskset.deltas(name, (a, b) if self.taskset.specs[name].shape else None)


def _manifest(basis: Any, method: str, options: dict[str, Any], M: int, layerwise: bool, taskset: TaskSet,
              finetuned: Mapping[str, Any], gram: GramResult, fits: Mapping[str, BasisFit],
              group_of: Mapping[str, str], C: Mapping[str, np.ndarray], K: Mapping[str, np.ndarray],
              norms: np.ndarray, rel: np.ndarray, dtype_of: Mapping[str, torch.dtype], layout: StoreLayout,
              include: Iterable[str] | None, exclude: Iterable[str] | None) -> dict[str, Any]:
    pre = taskset.pretrained
    T = taskset.T
    tasks = [{"name": n, "source": str(getattr(finetuned[n], "path", finetuned[n])), "norm": float(norms[t]),
              "rel_error": float(rel[t]), "error_exact": True} for t, n in enumerate(taskset.names)]
    first = next(iter(fits.values()))
    counts = (np.bincount(first.labels, minlength=M).tolist() if first.labels is not None else None)
    vec_bytes = T * sum(s.numel * dtype_of[s.name].itemsize for s in taskset.specs.values())
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool": f"tvbasis {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "method": method, "options": options, "M": M, "T": T, "layerwise": layerwise,
        "task_like": bool(basis.task_like),
        "tasks": tasks, "member_counts": counts,
        "groups": {g: f.to_json() for g, f in fits.items()},
        "group_of": dict(group_of),
        "cross": {g: {"C": C[g].tolist(), "K": K[g].tolist()} for g in fits},
        "gram": gram.G.tolist(),
        "group_grams": {g: v.tolist() for g, v in gram.group_grams.items()} if layerwise else {},
        "pretrained": {"path": str(pre.root_dir or pre.path), "fingerprint": structure_fingerprint(pre),
                       "checksum": gram.pretrained_checksum, "checksum_chunk_elements": gram.chunk_elements},
        "tensors": [_spec_json(s) for s in taskset.specs.values()],
        "store_dtypes": {n: dtype_name(d) for n, d in dtype_of.items()},
        "files": {"bases": layout.bases_files, "mean": layout.mean_files},
        "task_vectors_bytes": vec_bytes,
        "include": list(include or []), "exclude": list(exclude or []),
    }


# --------------------------------------------------------------------------------------------------- store
class BasisStore:
    """A basis store on disk. Cheap to open (reads the manifest and shard headers)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.M: int = int(manifest["M"])
        self.method: str = manifest["method"]
        self.task_names: list[str] = [t["name"] for t in manifest["tasks"]]
        self.fits = {g: BasisFit.from_json(d) for g, d in manifest["groups"].items()}
        self.group_of: dict[str, str] = dict(manifest.get("group_of", {}))
        self.specs = {d["name"]: _spec_from_json(d) for d in manifest["tensors"]}
        self.total_params = sum(s.numel for s in self.specs.values())
        files = manifest.get("files", {})
        self._bases = self._open_part("bases", files.get("bases", []))
        self._mean = self._open_part("mean", files.get("mean", []))
        self._check_shards()

    # -- open --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> BasisStore:
        root = Path(path)
        mf = root / MANIFEST
        if not root.exists():
            raise StoreError(f"{root}: no such store")
        if not mf.is_file():
            raise StoreError(f"{root}: not a tvbasis store (no {MANIFEST})")
        try:
            manifest = json.loads(mf.read_text())
        except Exception as e:
            raise StoreError(f"{mf}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mf}: not a tvbasis basis store manifest (format {manifest.get('format')!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(f"{mf}: store format version {version} is newer than this tvbasis "
                             f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade tvbasis")
        if manifest.get("method") not in BASIS_METHODS:
            raise StoreError(f"{mf}: unknown basis method {manifest.get('method')!r}")
        return cls(root, manifest)

    def _open_part(self, prefix: str, files: list[str]) -> Checkpoint | None:
        if not files:
            return None
        target = self.root / (files[0] if len(files) == 1 else f"{prefix}.safetensors.index.json")
        try:
            return open_checkpoint(target)
        except Exception as e:
            raise StoreError(f"{self.root}: cannot open the store's {prefix} shards: {e}") from None

    def _check_shards(self) -> None:
        for name, s in self.specs.items():
            if self._bases is not None:
                want = (self.M, *s.shape)
                if name not in self._bases or self._bases.spec(name).shape != want:
                    got = self._bases.spec(name).shape if name in self._bases else "missing"
                    raise StoreError(f"{self.root}: bases tensor {name!r} is {got}, expected shape {want}")
            if self._mean is not None and (name not in self._mean or self._mean.spec(name).shape != s.shape):
                raise StoreError(f"{self.root}: mean tensor {name!r} missing or of the wrong shape")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (BasisStore.open, (str(self.root),))

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.task_names)

    @property
    def nbytes(self) -> int:
        """Bytes on disk (all files of the store, manifest included)."""
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    @property
    def task_vectors_bytes(self) -> int:
        """Bytes the T task vectors would take (in the stored dtype)."""
        per = sum(s.numel * getattr(torch, self.manifest["store_dtypes"][n]).itemsize for n, s in self.specs.items())
        return per * self.T

    @property
    def gram(self) -> np.ndarray:
        return np.asarray(self.manifest["gram"], dtype=np.float64)

    @property
    def cosine(self) -> np.ndarray:
        return cosine_from_gram(self.gram)

    @property
    def labels(self) -> list[int] | None:
        return self.fits[next(iter(self.fits))].labels

    @property
    def rel_errors(self) -> dict[str, float]:
        return {t["name"]: float(t["rel_error"]) for t in self.manifest["tasks"]}

    def task_index(self, task: str) -> int:
        try:
            return self.task_names.index(task)
        except ValueError:
            raise UnknownTaskError(f"{self.root}: no task named {task!r}; the store holds {self.task_names}") from None

    # -- reading bases -----------------------------------------------------------------------------------
    def bases_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(M, *shape) float32 bases of one parameter (or rows [a, b) of each)."""
        spec = self.specs[name]
        fit = self.fits[self.group_of.get(name, ALL)]
        a, b = rows if rows is not None else (0, spec.shape[0] if spec.shape else 1)
        if fit.random_seed is not None:
            return random_rows(fit.random_seed, spec, self.M, self.total_params, a, b)
        assert self._bases is not None
        if rows is None or not spec.shape:
            t = self._bases.get(name)
        else:
            t = self._bases.get_inner_rows(name, a, b)
        return t.to(torch.float32)

    def mean_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if self._mean is None:
            return None
        t = self._mean.get(name) if rows is None else self._mean.get_rows(name, *rows)
        return t.to(torch.float32)

    # -- arithmetic --------------------------------------------------------------------------------------
    def _coefficients(self, alpha: Mapping[str, float]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        a = np.zeros(self.T)
        for task, c in alpha.items():
            a[self.task_index(task)] += float(c)
        coefs = {g: f.W @ a for g, f in self.fits.items()}
        means = {g: float(f.mean_coef @ a) if f.mean_coef is not None else 0.0 for g, f in self.fits.items()}
        return coefs, means

    def combine(self, alpha: Mapping[str, float], name: str | None = None) -> TaskVector:
        """Σ_t α_t·v̂_t = S·(W·α) (+ μ·Σ mean_coef·α): addition, negation, analogy in one pass."""
        if not alpha:
            raise ConfigError("combine needs at least one task coefficient")
        coefs, means = self._coefficients(alpha)
        label = name or " + ".join(f"{c:g}*{t}" for t, c in alpha.items())
        return self._vector(_Combination(self, coefs, means), label)

    def reconstruct(self, task: str) -> TaskVector:
        """v̂_t from the store alone."""
        self.task_index(task)
        return self.combine({task: 1.0}, name=f"reconstructed {task}")

    def addition(self, outer: MergeSpec | None = None, tasks: Sequence[str] | None = None) -> TaskVector:
        """The multi-task vector. Without ``outer``: as the paper, the sum of the bases (for task-like bases;
        PCA and random bases, which are not task vectors themselves, sum the reconstructions). With ``outer``:
        that merge method over the bases (task-like) or over the reconstructions of ``tasks``."""
        selected = list(tasks) if tasks else list(self.task_names)
        for t in selected:
            self.task_index(t)
        whole = set(selected) == set(self.task_names)
        task_like = bool(self.manifest.get("task_like", True))
        if outer is None:
            if task_like and whole:
                return self._vector(_SumOfBases(self), "sum of bases")
            return self.combine({t: 1.0 for t in selected}, name="sum of reconstructions")
        merger = get_merger(outer)
        if merger.needs_fisher:
            raise ConfigError("fisher cannot be an outer merge of a store (no Fisher weights for bases)")
        operands = _Operands(self, None if (task_like and whole) else selected)
        thresholds = None
        if merger.needs_global_thresholds:
            from tvbasis.merge import global_thresholds
            names = list(self.specs)

            def factory() -> Iterable[torch.Tensor]:
                for n in names:
                    x = operands(n)
                    yield x.reshape(x.shape[0], -1)
            assert merger.density is not None
            thresholds = global_thresholds(factory, operands.count, merger.density)
        return self._vector(_OuterMerge(operands, outer, thresholds), f"{outer.method} of bases")

    def _vector(self, fn: Producer, name: str) -> TaskVector:
        tv = TaskVector.from_producer(self.specs, fn, None, name)
        tv.expected_pretrained = dict(self.manifest["pretrained"])
        return tv

    # -- pretrained check --------------------------------------------------------------------------------
    def check_pretrained(self, pretrained: Checkpoint) -> None:
        """Cheap structural check (names, shapes, dtypes); the content checksum is verified while streaming."""
        check_pretrained_structure(self.manifest["pretrained"], pretrained, self.root)

    # -- add a task --------------------------------------------------------------------------------------
    def add_task(self, name: str, finetuned: str | Path | Checkpoint, pretrained: str | Path | Checkpoint,
                 engine: Engine | str | None = None) -> BasisStore:
        from tvbasis.store_update import add_task
        return add_task(self, name, finetuned, pretrained, engine)

    def summary(self) -> dict[str, Any]:
        first = self.fits[next(iter(self.fits))]
        return {
            "path": str(self.root), "method": self.method, "options": self.manifest.get("options", {}),
            "M": self.M, "T": self.T, "layerwise": self.manifest.get("layerwise", False),
            "tasks": self.task_names, "bytes_on_disk": self.nbytes, "task_vectors_bytes": self.task_vectors_bytes,
            "compression": self.task_vectors_bytes / max(1, self.nbytes),
            "rel_errors": self.rel_errors,
            "errors_exact": {t["name"]: bool(t.get("error_exact", True)) for t in self.manifest["tasks"]},
            "norms": {t["name"]: t["norm"] for t in self.manifest["tasks"]},
            "cosine": self.cosine.tolist(), "labels": first.labels,
            "loss": first.stats.get("loss"), "lower_bound": first.stats.get("lower_bound"),
            "stats": {g: {k: v for k, v in f.stats.items() if k not in ("loss_history", "laplacian_spectrum")}
                      for g, f in self.fits.items()} if len(self.fits) <= 4 else {},
            "pretrained": self.manifest["pretrained"],
        }


def check_pretrained_structure(ref: Mapping[str, Any], pretrained: Checkpoint, root: Path) -> None:
    fp = structure_fingerprint(pretrained)
    if ref.get("fingerprint") and fp != ref["fingerprint"]:
        raise StoreError(f"{root}: was built from another pretrained model ({ref.get('path')}); "
                         f"{pretrained.path} has different tensor names, shapes or dtypes")


class _Combination(Producer):
    fresh = True

    def __init__(self, store: BasisStore, coefs: Mapping[str, np.ndarray], means: Mapping[str, float]) -> None:
        self.store, self.coefs, self.means = store, dict(coefs), dict(means)

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        g = self.store.group_of.get(name, ALL)
        S = self.store.bases_rows(name, rows)
        c = torch.as_tensor(self.coefs[g], dtype=torch.float32)
        out = torch.tensordot(c, S, dims=1)
        if self.means[g] != 0.0:
            mu = self.store.mean_rows(name, rows)
            assert mu is not None
            out.add_(mu, alpha=self.means[g])
        return out


class _SumOfBases(Producer):
    fresh = True

    def __init__(self, store: BasisStore) -> None:
        self.store = store

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        return self.store.bases_rows(name, rows).sum(0)


class _Operands:
    """Per tensor: the M bases (task-like stores) or the reconstructions of chosen tasks (T', *shape)."""

    def __init__(self, store: BasisStore, tasks: list[str] | None) -> None:
        self.store = store
        self.idx = None if tasks is None else [store.task_index(t) for t in tasks]
        self.count = store.M if tasks is None else len(tasks)

    def __call__(self, name: str) -> torch.Tensor:
        S = self.store.bases_rows(name)
        if self.idx is None:
            return S
        fit = self.store.fits[self.store.group_of.get(name, ALL)]
        Wf = torch.as_tensor(fit.W[:, self.idx].T, dtype=torch.float32)  # (T', M)
        out = torch.tensordot(Wf, S, dims=1)
        if fit.mean_coef is not None:
            mu = self.store.mean_rows(name)
            assert mu is not None
            out += torch.as_tensor(fit.mean_coef[self.idx], dtype=torch.float32).view(-1, *[1] * mu.dim()) * mu
        return out


class _OuterMerge(Producer):
    fresh = True

    def __init__(self, operands: _Operands, spec: MergeSpec, thresholds: torch.Tensor | None) -> None:
        self.operands, self.spec, self.thresholds = operands, spec, thresholds

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        x = self.operands(name)
        merged = get_merger(self.spec).merge(x, torch.ones(x.shape[0]), MergeContext(name=name, thresholds=self.thresholds))
        return merged if rows is None or not merged.dim() else merged[rows[0]:rows[1]]


def write_manifest_atomic(root: Path, manifest: Mapping[str, Any]) -> None:
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
