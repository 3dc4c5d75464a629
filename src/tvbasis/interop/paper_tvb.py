"""The paper's released bases (uiuctml/TaskVectorBasis) as tvbasis stores, and tvbasis stores in that layout.

The layout, as written by the authors' ``BasisMethod.save_training_artifacts`` (src/basis_vectors.py) and read
by ``load_and_recover_from_saved_basis`` (src/basis_pipeline.py), one folder per basis::

    basis_vectors.pt    torch.save({"basis_vectors": [s_1, ..., s_M], "num_basis": M, "method": NAME}),
                        each s_m a dict parameter name -> tensor of the parameter's shape
    method_info.json    {"method": NAME, "M": M, "datasets": [task names in order], hyper-parameters ...}
    AWB.pt              AutoencoderBasisMethod: {"A": (T, M), "W": (M, T), "B": (T, M), "metadata": {...}};
                        s_m = Σ_t B[t, m]·v_t (B = softmax(A/τ) over tasks), v̂_t = Σ_m W[m, t]·s_m
    pca_components.pt   PCABasisMethod: {"coefficients": (M, T), "mean_vector": (D,), "singular_values": (M,),
                        "keys_order": [names], "param_shapes": {name: torch.Size}, "total_dim": D, ...};
                        s_m = U[:, m]·S[m] (variance-scaled), v̂_t = μ + Σ_m coefficients[m, t]·s_m

Mapping onto a store: the M basis vectors are the stored bases; AWB's B and W are the fit's B and W
(method ``autoencoder``); PCA's coefficients are W, μ the stored mean (mean weights 1/T, coefficient 1) and
B = H·coefficientsᵀ with H = I − 11ᵀ/T (s_m = V_c·r_m, exactly as tvbasis's own PCA; method ``pca``). Task names
are method_info.json's dataset order. Every file is read with ``torch.load(weights_only=True)``; anything else
(another method, a pickle of objects, shapes that disagree, tensors the pretrained model lacks) is refused
with a message naming the file.

What the folder cannot give is the original task vectors: without them the store's Gram matrix and cross-Grams
are those of the reconstructions (every Gram row flagged estimated, reconstruction errors unknown and recorded
as 0, not exact). With the fine-tunes (``finetuned``) one streaming pass measures G, the cross-Grams and the
exact relative errors.

Not imported: ``RandomBasisMethod`` (its recovery regenerates the bases from a seed with the authors' generator;
tvbasis's random bases are another generator, and the stored fit needs bases linear in the task vectors) and
``RandomSampleMethod`` (the authors' code recovers no task from it).

Export writes the same three files for an ``autoencoder`` or ``pca`` store, and for ``cluster`` (with a linear
inner merge) and ``random-sample`` stores in the autoencoder layout (their bases are Σ_t B[t, m]·v_t too; the
metadata records ``tvbasis_method``). Layerwise stores (one W per layer group), random stores and clusters with a
non-linear inner merge (no B) are refused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import BasisFit, eckart_young_bound, get_basis_method
from tvbasis.bases.autoencoder import AutoencoderBasis
from tvbasis.errors import CheckpointError, ConfigError, StoreError, TensorMismatchError, TvbasisError
from tvbasis.io import (
    TensorSpec,
    check_output,
    dtype_name,
    open_checkpoint,
    parse_dtype,
)
from tvbasis.io.atomic import AtomicOutput, check_not_input
from tvbasis.io.checksum import chunk_digests, combine_digests, structure_fingerprint
from tvbasis.io.reader import safe_torch_load
from tvbasis.methods import get_store_method
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store import BasisStore, Manifest
from tvbasis.store.build import StoreLayout, output_path
from tvbasis.store.commit import DEFAULT_LOCK_TIMEOUT, Staging, commit_new_store, output_kind, store_lock
from tvbasis.store.format import RESERVED_TASK_NAMES, STORE_DTYPES, Cross, PretrainedRef, StoreFiles, TaskEntry
from tvbasis.taskset import TaskSet, chunk_for
from tvbasis.untrusted import load_json, quote

SOURCE = "uiuctml/TaskVectorBasis"
BASIS_FILE = "basis_vectors.pt"
INFO_FILE = "method_info.json"
AWB_FILE = "AWB.pt"
PCA_FILE = "pca_components.pt"
AE, PCA = "AutoencoderBasisMethod", "PCABasisMethod"
_REFUSED = {
    "RandomBasisMethod": "its recovery regenerates the bases from a seed with the authors' own generator over the "
                         "flattened model, which tvbasis does not reproduce",
    "RandomSampleMethod": "the authors' code recovers no task vector from it (only the sampled ones are bases)",
}
#: most datasets (tasks) and values of the bases a folder may claim, and the size of its method_info.json
MAX_TASKS = 10_000
MAX_ELEMENTS = 2**36
MAX_INFO_BYTES = 16 * 2**20
#: the keys the authors' loader (BasisMethod.load_method_from_artifacts) reads from AWB.pt's metadata
_AWB_KEYS = ("M", "steps", "lr", "tau_init", "weight_decay", "grad_clip", "batch_cols", "device", "seed",
             "anneal_every", "anneal_factor", "softmax_w")


# ------------------------------------------------------------------------------------------------ reading
def _load(path: Path) -> Any:
    """torch.load with weights_only=True (tensors, containers, numbers, strings, torch.Size only)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a paper basis folder holds {BASIS_FILE}, {INFO_FILE} and "
                              f"{AWB_FILE} or {PCA_FILE})")
    return safe_torch_load(path, "torch file")


def _field(obj: Any, key: str, path: Path) -> Any:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    if key not in obj:
        raise CheckpointError(f"{path}: no {key!r} entry (entries: {', '.join(map(str, obj))})")
    return obj[key]


def _check_stored(t: torch.Tensor, what: str) -> None:
    """A tensor must hold every value it claims: a view with stride 0 (or any layout whose storage is smaller than
    its values) would let a few bytes claim 10⁶ tasks or terabytes of bases."""
    need = t.numel() * t.element_size()
    if need > MAX_ELEMENTS * 8 or t.untyped_storage().nbytes() < need or \
            any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise CheckpointError(f"{what}: shape {tuple(t.shape)} is not backed by stored values (a stride-0 or "
                              "oversized view); refused")


def _matrix(obj: Any, key: str, shape: tuple[int, int], path: Path) -> np.ndarray:
    t = _field(obj, key, path)
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: {key!r} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) == shape:
        _check_stored(t, f"{path}: {key!r}")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {shape} (from the M basis "
                              f"vectors and the T datasets of {INFO_FILE})")
    a = t.detach().double().numpy().copy()
    if not np.isfinite(a).all():
        raise CheckpointError(f"{path}: {key!r} holds NaN or Inf")
    return a


@dataclass
class TvbFolder:
    """A paper basis folder, read and checked: the bases, how each task is recovered, the task names."""

    path: Path
    method: str                       # AutoencoderBasisMethod | PCABasisMethod
    info: dict[str, Any]
    tasks: list[str]
    bases: list[dict[str, torch.Tensor]]
    B: np.ndarray                     # (T, M)
    W: np.ndarray                     # (M, T)
    mean: dict[str, torch.Tensor] | None = None
    notes: tuple[str, ...] = ()

    @property
    def M(self) -> int:
        return len(self.bases)

    @property
    def T(self) -> int:
        return len(self.tasks)


def read_tvb_folder(folder: str | Path) -> TvbFolder:
    """Read and check a basis folder in the paper's layout (see the module docstring)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (expected a paper basis folder with {BASIS_FILE}, {INFO_FILE}, "
                          f"and {AWB_FILE} or {PCA_FILE})")
    info_path = root / INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"{info_path}: missing (it names the method and the dataset order)")
    try:
        with open(info_path, "rb") as f:
            raw = f.read(MAX_INFO_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{info_path}: not readable ({e.strerror})") from None
    info = load_json(raw, info_path.as_posix(), CheckpointError, MAX_INFO_BYTES)
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_path}: expected a JSON object")
    method = info.get("method")
    if method in _REFUSED:
        raise ConfigError(f"{info_path}: method {method} is not supported: {_REFUSED[method]}; supported: {AE}, {PCA}")
    if method not in (AE, PCA):
        raise ConfigError(f"{info_path}: unknown method {method!r}; supported: {AE}, {PCA}")
    tasks = info.get("datasets")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise CheckpointError(f"{info_path}: 'datasets' must be the non-empty list of task names, in order")
    if len(tasks) > MAX_TASKS:
        raise ConfigError(f"{info_path}: lists {len(tasks)} datasets; at most {MAX_TASKS} are imported")
    for t in tasks:
        if not t or "=" in t or "," in t or t in RESERVED_TASK_NAMES:
            raise ConfigError(f"{info_path}: dataset name {quote(t)} cannot be a task name of a store")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"{info_path}: a dataset is listed twice: {quote(tasks)}")
    T = len(tasks)

    bpath = root / BASIS_FILE
    data = _load(bpath)
    bases = _field(data, "basis_vectors", bpath)
    if not isinstance(bases, list) or not bases:
        raise CheckpointError(f"{bpath}: 'basis_vectors' must be a non-empty list of dicts (name -> tensor)")
    if len(bases) >= T:
        raise ConfigError(f"{root}: M = {len(bases)} basis vectors for T = {T} tasks; a store needs M < T")
    M = len(bases)
    if isinstance(data, Mapping) and data.get("num_basis") not in (None, M):
        raise CheckpointError(f"{bpath}: num_basis is {data['num_basis']}, but it holds {M} basis vectors")
    if info.get("M") not in (None, M):
        raise CheckpointError(f"{info_path}: M is {info['M']}, but {bpath} holds {M} basis vectors")
    if M >= T:
        raise ConfigError(f"{root}: M = {M} basis vectors for T = {T} tasks; a store needs M < T")
    first = bases[0]
    for m, b in enumerate(bases):
        if not isinstance(b, Mapping) or not b or not all(isinstance(v, torch.Tensor) for v in b.values()):
            raise CheckpointError(f"{bpath}: basis vector {m} must be a non-empty dict of tensors")
        if list(b) != list(first) or any(tuple(b[k].shape) != tuple(first[k].shape) for k in b):
            raise CheckpointError(f"{bpath}: basis vector {m} has other tensors or shapes than basis vector 0")
        bad = [k for k, v in b.items() if not v.is_floating_point()]
        if bad:
            raise CheckpointError(f"{bpath}: basis vector {m}: tensor {quote(bad[0])} is not floating point")
        for k, v in b.items():
            _check_stored(v, f"{bpath}: basis vector {m}: tensor {quote(k)}")
    if M * sum(v.numel() for v in first.values()) > MAX_ELEMENTS:
        raise CheckpointError(f"{bpath}: {M} basis vectors of {sum(v.numel() for v in first.values())} values "
                              f"exceed the limit of {MAX_ELEMENTS} values")

    notes: list[str] = []
    if method == AE:
        awb = root / AWB_FILE
        if not awb.is_file():
            found = sorted(p for p in root.glob("AWB*.pt"))
            if len(found) != 1:
                raise CheckpointError(f"{awb}: missing (an {AE} folder holds AWB.pt: A, W, B and metadata)"
                                      + (f"; found several: {[p.name for p in found]}" if found else ""))
            awb = found[0]
        payload = _load(awb)
        B = _matrix(payload, "B", (T, M), awb)
        W = _matrix(payload, "W", (M, T), awb)
        meta = payload.get("metadata") if isinstance(payload, Mapping) else None
        if isinstance(meta, Mapping) and meta.get("softmax_w"):
            notes.append("softmax_w: AWB.pt's W is already the softmaxed decoder (saved as W_final); used as is")
        return TvbFolder(root, method, info, list(tasks), [dict(b) for b in bases], B, W, None, tuple(notes))

    ppath = root / PCA_FILE
    pca = _load(ppath)
    W = _matrix(pca, "coefficients", (M, T), ppath)
    mean_flat = _field(pca, "mean_vector", ppath)
    keys = _field(pca, "keys_order", ppath)
    shapes = _field(pca, "param_shapes", ppath)
    if not isinstance(mean_flat, torch.Tensor) or mean_flat.dim() != 1 or not mean_flat.is_floating_point():
        raise CheckpointError(f"{ppath}: 'mean_vector' must be a flat (D,) floating-point tensor")
    _check_stored(mean_flat, f"{ppath}: 'mean_vector'")
    if not isinstance(keys, list) or not isinstance(shapes, Mapping) or set(keys) != set(first):
        raise CheckpointError(f"{ppath}: 'keys_order' must list the tensors of {BASIS_FILE} "
                              f"({len(first)} tensors), with their 'param_shapes'")
    mean: dict[str, torch.Tensor] = {}
    at = 0
    for k in keys:
        raw_shape = shapes.get(k, ())
        if not isinstance(raw_shape, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in raw_shape):
            raise CheckpointError(f"{ppath}: param_shapes[{quote(k)}] must be a list of integers, got "
                                  f"{quote(raw_shape)}")
        shape = tuple(raw_shape)
        if shape != tuple(first[k].shape):
            raise CheckpointError(f"{ppath}: param_shapes[{k!r}] is {shape}, the basis tensor is {tuple(first[k].shape)}")
        n = math.prod(shape)
        if at + n > mean_flat.numel():
            raise CheckpointError(f"{ppath}: 'mean_vector' has {mean_flat.numel()} entries, fewer than the tensors "
                                  "of keys_order need")
        mean[k] = mean_flat[at:at + n].reshape(shape)
        at += n
    if at != mean_flat.numel():
        raise CheckpointError(f"{ppath}: 'mean_vector' has {mean_flat.numel()} entries, the tensors {at}")
    names = pca.get("dataset_names") if isinstance(pca, Mapping) else None
    if names is not None and (not isinstance(names, list) or list(names) != list(tasks)):
        raise CheckpointError(f"{ppath}: dataset_names {quote(names)} differ from {INFO_FILE}'s datasets "
                              f"{quote(tasks)}")
    B = W.T - W.T.mean(axis=0, keepdims=True)  # H·Wᵀ: s_m = Σ_t (v_t − μ)·W[m, t]
    return TvbFolder(root, method, info, list(tasks), [dict(b) for b in bases], B, W, mean, tuple(notes))


# ------------------------------------------------------------------------------------------------ import
def import_tvb(folder: str | Path, pretrained: str | Path, out: str | Path, *,
               finetuned: Mapping[str, str | Path] | None = None, dtype: str | None = None,
               max_shard_size: int | str = "5GB", force: bool = False) -> BasisStore:
    """A tvbasis store at ``out`` from a paper basis folder, for the pretrained model ``pretrained`` (whose
    tensors the bases must name). ``finetuned`` (task -> fine-tune, every task of the folder) makes the Gram
    matrix and the reconstruction errors exact; without it they are those of the reconstructions."""
    tvb = read_tvb_folder(folder)
    out = output_path(out)
    check_not_input(out, [tvb.path, Path(str(pretrained)), *(Path(str(p)) for p in (finetuned or {}).values())])
    kind = output_kind(out, force)
    check_output(out, True)  # the parent exists and is writable
    pre = open_checkpoint(pretrained)
    names = list(tvb.bases[0])
    missing = [k for k in names if k not in pre]
    if missing:
        raise TensorMismatchError(f"{pre.path}: has no tensor {missing[0]!r} that the basis in {tvb.path} names "
                                  f"({len(missing)} of {len(names)} missing; the pretrained model must be the one "
                                  f"the basis was built from, as a state dict with the same names)")
    for k in names:
        s = pre.spec(k)
        if s.shape != tuple(tvb.bases[0][k].shape) or not s.is_float:
            raise TensorMismatchError(f"{pre.path}: tensor {k!r} is {s.shape} {dtype_name(s.dtype)}, the basis has "
                                      f"{tuple(tvb.bases[0][k].shape)} floating point")
    order = {s.name: i for i, s in enumerate(pre.specs())}
    names.sort(key=order.__getitem__)
    specs = [pre.spec(k) for k in names]
    T, M = tvb.T, tvb.M
    with_mean = tvb.mean is not None
    out_dtype = parse_dtype(dtype)
    dtype_of = {k: out_dtype or (tvb.bases[0][k].dtype if dtype_name(tvb.bases[0][k].dtype) in STORE_DTYPES
                                 else torch.float32) for k in names}

    taskset = None
    if finetuned:
        if set(finetuned) != set(tvb.tasks):
            raise ConfigError(f"--finetuned must give every task of {tvb.path} ({', '.join(tvb.tasks)}); "
                              f"got {', '.join(finetuned)}")
        taskset = TaskSet.open(pre, {t: finetuned[t] for t in tvb.tasks})
        outside = [k for k in names if k not in taskset.specs]
        if outside:
            raise TensorMismatchError(f"the fine-tunes do not change tensor {outside[0]!r} that the basis covers")

    chunk = chunk_for(T)
    layout = StoreLayout(specs, M, dtype_of, with_bases=True, with_mean=with_mean, max_shard_size=max_shard_size)
    with store_lock(out, DEFAULT_LOCK_TIMEOUT) if kind == "store" else nullcontext():
        with Staging.new_store(out) as stage:
            manifest = _write(tvb, pre, specs, dtype_of, layout, taskset, finetuned, chunk, stage.dir)
            commit_new_store(stage.dir, out, manifest, kind, force, DEFAULT_LOCK_TIMEOUT)
    return BasisStore.open(out)


def _options(tvb: TvbFolder) -> dict[str, Any]:
    """The paper's hyper-parameters under tvbasis's option names (autoencoder), where they are valid ones."""
    if tvb.method != AE:
        return {}
    i = tvb.info
    names = {"lr": "lr", "tau_init": "temperature", "steps": "steps", "seed": "seed", "encoder": "encoder",
             "w_activation": "decoder", "weight_decay": "weight_decay"}
    opts = {ours: i[theirs] for theirs, ours in names.items()
            if theirs in i and i[theirs] is not None and ours in AutoencoderBasis.options}
    try:
        get_basis_method("autoencoder", **opts)
    except (TvbasisError, TypeError, ValueError):
        return {}
    return opts


def _write(tvb: TvbFolder, pre: Any, specs: list[TensorSpec], dtype_of: dict[str, torch.dtype], layout: StoreLayout,
           taskset: TaskSet | None, finetuned: Mapping[str, str | Path] | None, chunk: int, tmp: Path) -> Manifest:
    """The data files and the manifest of the imported store, into ``tmp``."""
    T, M = tvb.T, tvb.M
    with_mean = tvb.mean is not None
    nU = M + (1 if with_mean else 0)
    K = np.zeros((nU, nU))
    C = np.zeros((nU, T))
    G = np.zeros((T, T))
    digests: list[tuple[str, bytes]] = []
    bases_sh, means_sh = layout.create(tmp)
    for spec in specs:
        k = spec.name
        S = torch.stack([b[k] for b in tvb.bases]).to(dtype_of[k])
        rows = [S.reshape(M, -1)]
        if not torch.isfinite(S).all():
            raise CheckpointError(f"{tvb.path / BASIS_FILE}: tensor {k!r} holds NaN or Inf")
        bases_sh[k].write_elements(k, 0, S, dtype_of[k])
        if tvb.mean is not None:
            mu = tvb.mean[k].to(dtype_of[k])
            if not torch.isfinite(mu).all():
                raise CheckpointError(f"{tvb.path / PCA_FILE}: the mean of {k!r} holds NaN or Inf")
            means_sh[k].write_elements(k, 0, mu, dtype_of[k])
            rows.append(mu.reshape(1, -1))
        U = torch.cat(rows).double()
        K += (U @ U.T).numpy()
        base = pre.get(k)
        digests.extend(chunk_digests(spec, base, chunk))
        if taskset is not None:
            X = taskset.deltas(k).reshape(T, -1).double()
            G += (X @ X.T).numpy()
            C += (U @ X.T).numpy()
    layout.finish(tmp, bases_sh, means_sh)
    fit = BasisFit(M=M, B=tvb.B, W=tvb.W, mean_weights=np.full(T, 1.0 / T) if with_mean else None,
                   mean_coef=np.ones(T) if with_mean else None)
    coef = fit.coef_matrix()
    exact = taskset is not None
    if not exact:  # the reconstructions stand in for the task vectors
        C = K @ coef
        G = coef.T @ C
    err2 = np.clip(fit.squared_errors(G, C, K), 0.0, None) if exact else np.zeros(T)
    norms = np.sqrt(np.clip(np.diag(G), 0.0, None))
    rel = np.sqrt(err2) / np.where(norms > 0, norms, 1.0)
    info = {k: v for k, v in tvb.info.items() if isinstance(v, (str, int, float, bool)) or v is None}
    fit.stats = {"imported": {"source": SOURCE, "folder": str(tvb.path), "method": tvb.method,
                              "info": info, "notes": list(tvb.notes)}}
    if exact:
        fit.stats.update({"loss": float(err2.sum()) / T**2, "lower_bound": eckart_young_bound(G, M)})
    sources = {t: str(finetuned[t]) for t in tvb.tasks} if finetuned else {}
    tasks = [TaskEntry(t, sources.get(t, f"{tvb.path} (basis only)"), float(norms[i]), float(rel[i]),
                       error_exact=exact) for i, t in enumerate(tvb.tasks)]
    manifest = Manifest(
        method="autoencoder" if tvb.method == AE else "pca",
        options=_options(tvb),
        M=M, T=T, layerwise=False, task_like=tvb.method == AE, tasks=tasks, groups={WHOLE_VECTOR: fit}, group_of={},
        cross={WHOLE_VECTOR: Cross(C, K)}, gram=G, group_grams={},
        pretrained=PretrainedRef(str(pre.root_dir or pre.path), structure_fingerprint(pre),
                                 combine_digests(digests), chunk),
        tensors=[TensorSpec(s.name, s.shape, s.dtype) for s in specs],
        store_dtypes={k: dtype_name(d) for k, d in dtype_of.items()},
        files=StoreFiles(layout.bases_files, layout.mean_files),
        task_vectors_bytes=T * sum(s.numel * dtype_of[s.name].itemsize for s in specs),
        gram_estimated_rows=[] if exact else list(tvb.tasks))
    manifest.digests = layout.digests(tmp, manifest, chunk)
    manifest.write(tmp)
    return manifest


# ------------------------------------------------------------------------------------------------ export
def _paper_method(store: BasisStore) -> str:
    mf = store.manifest
    if mf.layerwise or len(store.fits) != 1:
        raise StoreError(f"{store.root}: a layerwise store has one W per layer group; the paper's layout holds one "
                         f"(M, T) W for the whole model")
    if mf.coded is not None:
        raise StoreError(f"{store.root}: keeps coded parts (per-task residuals, masks or coded bases: "
                         f"{mf.coded.residual_codec or mf.coded.bases_codec}) that the paper's layout has no place for")
    fit = next(iter(store.fits.values()))
    if get_store_method(store.method).stores_mean:
        return PCA
    if fit.random_seed is not None:
        raise StoreError(f"{store.root}: a random store regenerates its bases from a seed with tvbasis's generator; "
                         f"the paper's RandomBasisMethod regenerates them with its own (refused)")
    if fit.B is None or fit.has_mean:
        raise StoreError(f"{store.root}: its bases are made by a non-linear merge ({store.method}); the paper's "
                         f"layout needs B (T, M), how each basis is formed from the task vectors")
    return AE


def export_tvb(store: BasisStore | str | Path, out: str | Path, *, force: bool = False,
               model: str = "", pretrained_label: str | None = None) -> Path:
    """Write ``store`` as a basis folder in the paper's layout (basis_vectors.pt, method_info.json, and AWB.pt or
    pca_components.pt) at ``out``; returns ``out``. Everything is held in memory while writing (the layout is
    one pickle of all M bases)."""
    if not isinstance(store, BasisStore):
        store = BasisStore.open(store)
    method = _paper_method(store)
    out = Path(out)
    check_output(out, force, [store.root], kind="tvb")  # the output rules (io/outputs.py), before any work
    fit = next(iter(store.fits.values()))
    names = list(store.specs)
    M = store.M
    bases: list[dict[str, torch.Tensor]] = [{} for _ in range(M)]
    for k in names:
        S = store.bases_rows(k)
        for m in range(M):
            bases[m][k] = S[m].clone()
    W = torch.as_tensor(fit.W, dtype=torch.float32)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    opts = store.manifest.options
    output = AtomicOutput(out, force, [store.root], kind="tvb")
    tmp = output.tmp
    try:
        torch.save({"basis_vectors": bases, "num_basis": M, "method": method}, tmp / BASIS_FILE)
        if method == AE:
            assert fit.B is not None
            B = torch.as_tensor(fit.B, dtype=torch.float32)
            encoder = opts.get("encoder", get_store_method(store.method).defaults.get("encoder"))
            softmax = encoder == "softmax"  # an autoencoder's encoder (other methods have none)
            tau = float(fit.stats.get("temperature", opts.get("temperature", 1.0)) or 1.0) if softmax else 1.0
            A = tau * torch.log(B.clamp_min(1e-30)) if softmax else B.clone()
            meta: dict[str, Any] = {
                "model": model, "finetuning_mode": "standard", "datasets": list(store.task_names), "M": M,
                "steps": int(opts.get("steps", 0) or 0), "lr": float(opts.get("lr", 0.0) or 0.0),
                "tau_init": float(opts.get("temperature", tau) or tau), "anneal_every": None, "anneal_factor": None,
                "weight_decay": 0.0, "grad_clip": None, "batch_cols": None, "device": "cpu",
                "seed": int(opts.get("seed", 0) or 0), "softmax_w": False,
                "encoder": "softmax" if softmax else "linear", "w_activation": "linear", "gram_dtype": "float64",
                "notes": f"exported by tvbasis from {store.root}", "task_scenario": None, "timestamp": stamp,
                "tau_final": tau, "method": AE, "tvbasis_method": store.method,
                **({"pretrained": pretrained_label} if pretrained_label else {})}
            torch.save({"A": A, "W": W, "B": B, "metadata": meta}, tmp / AWB_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        else:
            mean = [store.mean_rows(k) for k in names]
            assert all(mu is not None for mu in mean)
            flat = torch.cat([mu.reshape(-1) for mu in mean if mu is not None])
            sv = torch.tensor([math.sqrt(sum(float((b[k].double() ** 2).sum()) for k in names)) for b in bases])
            torch.save({"coefficients": W, "mean_vector": flat, "singular_values": sv.float(), "M_actual": M,
                        "total_dim": int(flat.numel()), "keys_order": names,
                        "param_shapes": {k: torch.Size(store.specs[k].shape) for k in names},
                        "dataset_names": list(store.task_names),
                        "storage_info": {"exported_by": "tvbasis", "store": str(store.root)}}, tmp / PCA_FILE)
            info = {"method": PCA, "M": M, "seed": 0, "datasets": list(store.task_names), "timestamp": stamp,
                    "tvbasis_method": "pca", **({"pretrained": pretrained_label} if pretrained_label else {})}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        output.commit()
    except RuntimeError as e:  # torch.save reports a full disk or a write error as a RuntimeError
        output.abort()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{out}: could not write the basis folder ({first}); nothing written") from None
    except BaseException:
        output.abort()
        raise
    return out
