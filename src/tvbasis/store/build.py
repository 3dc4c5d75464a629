"""Building a store: the Gram pass, a fit from G per layer group, the materialisation pass, the manifest.

Two streaming reads of the checkpoints in all (plus two more per global trim of an inner merge), and one read
back of the written data files (from the page cache) for their digests. The output is written to a temporary
directory next to ``out`` and moved into place when everything, manifest included, is on disk (``store.commit``):
a new ``out`` by a no-replace rename (a second build racing for the same new ``out`` fails unless ``force``), an
existing store (``force``) as a new generation inside it, under its writer lock. ``out`` may not be, contain or lie
inside an input.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import BasisFit, BasisMethod, check_M
from tvbasis.compress import Coder
from tvbasis.engine import Engine, Run, as_run
from tvbasis.engine.local import LocalEngine
from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint, TensorSpec, check_output, dtype_name, parse_dtype, plan_shards
from tvbasis.io.atomic import check_not_input
from tvbasis.io.checksum import structure_fingerprint
from tvbasis.io.writer import PositionalShard
from tvbasis.merge import MergeSpec, get_merger
from tvbasis.methods import FACTOR_SPACE, MASK, StorePlan, get_store_method, zero_fit
from tvbasis.passes import WHOLE_VECTOR, GramResult, MaterialiseTask, compute_gram, open_fisher, taskset_thresholds
from tvbasis.store.commit import Staging, commit_new_store, output_kind, output_path, store_lock
from tvbasis.store.faults import fault_point
from tvbasis.store.format import Cross, Digests, Manifest, PretrainedRef, StoreFiles, TaskEntry, coded_keys
from tvbasis.store.integrity import digest_file
from tvbasis.store.layout import file_names
from tvbasis.store.residual_pass import ResidualMaterialiseTask
from tvbasis.store.spec import StoreSpec, WriteOptions
from tvbasis.store.store import BasisStore
from tvbasis.taskset import TaskSet, layer_group


class StoreLayout:
    """Where each parameter's stacked bases (and PCA mean) live in the shard files."""

    def __init__(self, specs: list[TensorSpec], M: int, dtype_of: Mapping[str, torch.dtype],
                 with_bases: bool, with_mean: bool, max_shard_size: int | str) -> None:
        self.bases = plan_shards([TensorSpec(s.name, (M, *s.shape), dtype_of[s.name]) for s in specs],
                                 max_shard_size) if with_bases else []
        self.means = plan_shards([s.with_dtype(dtype_of[s.name]) for s in specs], max_shard_size) if with_mean else []
        self.bases_files = file_names("bases", len(self.bases)) if self.bases else []
        self.mean_files = file_names("mean", len(self.means)) if self.means else []

    def shards(self, root: Path) -> tuple[dict[str, PositionalShard], dict[str, PositionalShard]]:
        b = {s.name: sh for specs, f in zip(self.bases, self.bases_files)
             for sh in [PositionalShard(root / f, specs)] for s in specs}
        m = {s.name: sh for specs, f in zip(self.means, self.mean_files)
             for sh in [PositionalShard(root / f, specs)] for s in specs}
        return b, m

    def create(self, root: Path) -> tuple[dict[str, PositionalShard], dict[str, PositionalShard]]:
        bases, means = self.shards(root)
        for sh in {id(v): v for v in [*bases.values(), *means.values()]}.values():
            sh.create()
        return bases, means

    def finish(self, root: Path, bases: Mapping[str, PositionalShard], means: Mapping[str, PositionalShard]) -> None:
        """fsync every data file (no index files: the manifest lists the files and their tensors)."""
        for path in {str(v.path): v.path for v in [*bases.values(), *means.values()]}.values():
            PositionalShard.fsync(path)
            fault_point(f"data file {path.name} written")

    def digests(self, root: Path, manifest: Manifest, chunk_elements: int) -> Digests:
        """Read the written files back (page cache) for their size, SHA-256 and per-chunk digests."""
        files = {}
        for part, shards, names in (("bases", self.bases, self.bases_files), ("mean", self.means, self.mean_files)):
            for specs, f in zip(shards, names):
                files[f] = digest_file(root / f, manifest, part, [s.name for s in specs], chunk_elements)
        return Digests(chunk_elements, files)


def fit_groups(basis: BasisMethod, groups: Mapping[str, np.ndarray], M: int | None) -> dict[str, BasisFit]:
    """One fit per layer group; one M for all (the eigengap may choose different M per group: the store needs
    one M per parameter, so it is fixed at the first group's)."""
    fits = {g: basis.fit(Gg, M) for g, Gg in groups.items()}
    first = next(iter(fits.values()))
    if any(f.M != first.M for f in fits.values()):
        fits = {g: basis.fit(Gg, first.M) for g, Gg in groups.items()}
    return fits


def _input_paths(*items: object) -> list[Path]:
    out = []
    for x in items:
        if isinstance(x, Checkpoint):
            out.append(Path(str(x.path)))
            if x.root_dir is not None:
                out.append(Path(str(x.root_dir)))
        elif x is not None:
            out.append(Path(str(x)))
    return out


#: the parameters of the keyword form of ``build_store`` before ``StoreSpec`` (deprecated; one release)
_LEGACY_PARAMS = ("pretrained", "finetuned", "method", "M", "out", "options", "layerwise", "dtype", "include",
                  "exclude", "max_shard_size", "force", "run", "chunk_elements", "fisher", "lock_timeout", "residual",
                  "codec")
_SPEC_FIELDS = ("method", "M", "options", "layerwise", "dtype", "include", "exclude", "fisher", "residual", "codec")
_WRITE_FIELDS = ("max_shard_size", "force", "chunk_elements", "lock_timeout")


def _legacy_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The new form's arguments of a call in the old keyword form (``build_store(pre, ft, "pca", 2, out, …)``),
    with a DeprecationWarning; None for a call in the new form."""
    if not (len(args) >= 3 and isinstance(args[2], str)) and not (set(kwargs) & {*_SPEC_FIELDS, *_WRITE_FIELDS}):
        return None
    if len(args) > len(_LEGACY_PARAMS):
        raise TypeError(f"build_store() takes at most {len(_LEGACY_PARAMS)} arguments in its old form")
    given = dict(zip(_LEGACY_PARAMS, args))
    twice = set(given) & set(kwargs)
    unknown = set(kwargs) - set(_LEGACY_PARAMS)
    if twice or unknown:
        raise TypeError(f"build_store(): {'repeated' if twice else 'unknown'} argument(s) "
                        f"{sorted(twice or unknown)}")
    given.update(kwargs)
    for need in ("pretrained", "finetuned", "method", "out"):
        if need not in given:
            raise TypeError(f"build_store() missing argument {need!r}")
    warnings.warn("build_store(pretrained, finetuned, method, M, out, options, …) is deprecated and will be removed "
                  "in the next release: pass build_store(pretrained, finetuned, StoreSpec(method, M, …), out, run, "
                  "WriteOptions(…))", DeprecationWarning, stacklevel=3)
    spec = StoreSpec(**{k: given[k] for k in _SPEC_FIELDS if k in given and given[k] is not None})
    write = WriteOptions(**{k: given[k] for k in _WRITE_FIELDS if k in given})
    return given["pretrained"], given["finetuned"], spec, given["out"], given.get("run"), write


def _accepts_the_old_form(fn: Callable[..., BasisStore]) -> Callable[..., BasisStore]:
    @functools.wraps(fn)
    def build(*args: Any, **kwargs: Any) -> BasisStore:
        new = _legacy_call(args, kwargs)
        return fn(*args, **kwargs) if new is None else fn(*new)

    return build


@_accepts_the_old_form
def build_store(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                spec: StoreSpec, out: str | Path, run: Run = None, write: WriteOptions | None = None) -> BasisStore:
    """Build a store of the T fine-tunes as ``spec`` says (its method, ``tvbasis.methods``) and write it at ``out``
    (atomically, as ``write`` says; see the module docstring); ``run``: where it runs.

    A basis method fits M bases from the Gram matrix; ``spec.residual`` also stores every task's residual
    r_t = v_t − v̂_t through that coder (a codec spec, a codec plan ``KIND=SPEC;…`` or ``tsvc``), so each task
    comes back as v̂_t + r̂_t; with ``M = 0`` there are no bases and every task lies in its residual alone;
    ``spec.codec`` stores the bases (and mean) through that coder instead of densely. A per-task compressor
    (``tall``, ``tsvc``, …: ``tvbasis.methods.per_task``) fixes all of these itself.

    The old form ``build_store(pretrained, finetuned, method, M, out, options, …)`` still works for one release,
    with a DeprecationWarning."""
    write = write or WriteOptions()
    out = output_path(out)
    method = get_store_method(spec.method)
    if method.builder == FACTOR_SPACE:
        raise ConfigError(f"--method {spec.method} builds from LoRA adapters in factor space: use "
                          "tvbasis.store.lora_factor_space.build_lora_store")
    opts = as_run(run)
    T_given = len(finetuned)
    options = method.check(dict(spec.options or {}), list(finetuned))
    plan = method.plan(options, list(finetuned), spec.M, spec.residual, spec.codec, spec.layerwise)
    coders = _coders(plan.residual, plan.codec, T_given, plan.M)
    fisher_ckpts = None
    if plan.basis is not None and "inner" in plan.basis.params and get_merger_needs_fisher(plan.basis):
        fisher_ckpts = open_fisher(spec.fisher, list(finetuned), "--inner fisher")
    elif spec.fisher:
        raise ConfigError("--fisher is only used by --method cluster --inner fisher")
    check_not_input(out, _input_paths(pretrained, *finetuned.values(), *(spec.fisher or {}).values()))
    kind = output_kind(out, write.force)
    check_output(out, True)  # the parent exists and is writable
    taskset = TaskSet.open(pretrained, finetuned, spec.include, spec.exclude)
    if plan.M is not None and plan.basis is not None and not (plan.M == 0 and coders.residual is not None):
        check_M(plan.M, taskset.T, spec.method)
    with store_lock(out, write.lock_timeout) if kind == "store" else nullcontext():
        return _build(taskset, spec, plan, out, kind, write, opts, fisher_ckpts, finetuned, coders)


@dataclass
class _Coders:
    residual: Coder | None = None
    bases: Coder | None = None

    @property
    def any(self) -> bool:
        return self.residual is not None or self.bases is not None


def _coders(residual: str | Coder | None, codec: str | None, T: int, M: int | None) -> _Coders:
    try:
        out = _Coders(residual if isinstance(residual, Coder) or residual is None else Coder(residual, T),
                      None if codec is None else Coder(codec, T))
    except ConfigError as e:
        raise ConfigError(f"--{'residual' if residual is not None else 'codec'}: {e}") from None
    if M == 0 and out.residual is None:
        raise ConfigError("-M 0 (no bases) needs --residual CODEC: every task is then stored through that codec")
    if M == 0 and out.bases is not None:
        raise ConfigError("-M 0 stores no bases, so --codec (the bases' codec) does not apply")
    return out


def _fits(plan: StorePlan, method: str, groups: Mapping[str, np.ndarray], T: int,
          coders: _Coders) -> dict[str, BasisFit]:
    if plan.fit is not None:
        fits = {g: plan.fit(T) for g in groups}
    elif plan.M == 0 or plan.basis is None:
        fits = {g: zero_fit(T) for g in groups}
    else:
        fits = fit_groups(plan.basis, groups, plan.M)
    first = next(iter(fits.values()))
    if plan.coded:
        what = "--residual" if coders.residual is not None else "--codec"
        if first.random_seed is not None:
            raise ConfigError(f"{what}: random bases are regenerated from their seed, not stored, and their "
                              "coefficients are fitted after the bases are written; use pca, autoencoder or cluster")
        if first.is_merged:
            raise ConfigError(f"{what}: bases made by a non-linear inner merge ({first.inner.method if first.inner else ''}) "
                              "are not supported with coded parts; use a linear inner merge (mean, task_arithmetic)")
        if coders.residual is not None and not first.residuals_known_in_pass:
            raise ConfigError("--residual needs coefficients fixed before the bases are written (pca, autoencoder, "
                              f"cluster with a linear inner merge); this {method} basis refits them afterwards")
    return fits


def _build(taskset: TaskSet, spec: StoreSpec, plan: StorePlan, out: Path, kind: str, write: WriteOptions,
           opts: Any, fisher_ckpts: list[Checkpoint] | None, finetuned: Mapping[str, Any],
           coders: _Coders) -> BasisStore:
    eng = opts.get_engine()
    gram = compute_gram(taskset, opts, layer_group if spec.layerwise else None, write.chunk_elements)
    zero = [taskset.names[t] for t in range(taskset.T) if gram.G[t, t] == 0]
    if zero:
        raise ConfigError(f"fine-tune(s) {zero} equal the pretrained model (zero task vector)")
    groups = dict(gram.group_grams) if spec.layerwise else {WHOLE_VECTOR: gram.G}
    group_of = dict(gram.group_of) if spec.layerwise else {}
    fits = _fits(plan, spec.method, groups, taskset.T, coders)
    first = next(iter(fits.values()))
    coded = plan.coded
    out_dtype = parse_dtype(spec.dtype) if isinstance(spec.dtype, str) or spec.dtype is None else spec.dtype
    dtype_of = {n: (out_dtype or s.dtype) for n, s in taskset.specs.items()}
    specs = list(taskset.specs.values())
    dense = coders.bases is None
    layout = StoreLayout(specs, first.M, dtype_of, with_bases=first.stores_bases and first.M > 0 and dense,
                         with_mean=first.has_mean and dense, max_shard_size=write.max_shard_size)
    with Staging.new_store(out) as stage:
        tmp = stage.dir
        bases, means = layout.create(tmp)
        total = sum(s.numel for s in specs)
        T, nU = taskset.T, first.n_stored
        writer = stage.coded_writer(write.max_shard_size) if coded else None
        if writer is not None:
            items = [(s.name, 0, s.shape[0] if s.shape else 1) for s in specs]
            task: Any = ResidualMaterialiseTask(taskset, fits, group_of, dtype_of, bases, means, opts.device, total,
                                                tmp, coders.bases, coders.residual, plan.mask_lambdas,
                                                gram.chunk_elements, label=str(out),
                                                sink=writer if isinstance(eng, LocalEngine) else None)
            sizes = [taskset.T * s.numel * 4 for s in specs]
        else:
            thresholds = _inner_thresholds(taskset, fits, group_of, eng, write.chunk_elements)
            # merged bases are merged whole per tensor (chunked inside the work unit when big)
            items = ([(s.name, 0, s.shape[0] if s.shape else 1) for s in specs] if first.is_merged
                     else taskset.items(gram.chunk_elements))
            task = MaterialiseTask(taskset, fits, group_of, dtype_of, bases, means, opts.device, total, thresholds,
                                   fisher_ckpts, label=str(out))
            sizes = [taskset.item_bytes(i) for i in items]
        C = {g: np.zeros((nU, T)) for g in fits}
        K = {g: np.zeros((nU, nU)) for g in fits}
        direct = {g: np.zeros(T) for g in fits}
        for g, c, k, e, *rest in eng.map(task, items, desc="materialise bases", sizes=sizes):
            C[g] += c
            K[g] += k
            if e.size:
                direct[g] += e
            if writer is not None:
                name, entries = rest[0]
                for key, enc in entries.items():
                    writer.add(key, enc, taskset.specs[name].shape)
        layout.finish(tmp, bases, means)
        err2 = np.zeros(T)
        for g, fit in fits.items():
            if coded or fit.residuals_known_in_pass:  # coded: measured against the coefficients used
                err2 += direct[g]
            else:
                fit.refit_from(C[g], K[g])
                err2 += fit.squared_errors(groups[g], C[g], K[g])
        norms = gram.norms
        rel = np.sqrt(np.clip(err2, 0.0, None)) / np.where(norms > 0, norms, 1.0)
        manifest = _manifest(plan, spec, first.M, taskset, finetuned, gram, fits, group_of, C, K, norms, rel,
                             dtype_of, layout)
        if writer is not None:
            order = coded_keys(taskset.names, [s.name for s in specs], first.M, first.has_mean,
                               plan.per_task_entries, coders.bases is not None)
            manifest.files.coded, section = writer.finish(order)
            section.mode = plan.mode
            section.bases_codec = coders.bases.spec if coders.bases is not None else None
            section.residual_codec = (plan.mode if plan.mode == MASK else coders.residual.spec if coders.residual
                                      else None)
            manifest.coded = section
        manifest.digests = layout.digests(tmp, manifest, gram.chunk_elements)
        manifest.write(tmp)
        commit_new_store(tmp, out, manifest, kind, write.force, write.lock_timeout)
    return BasisStore.open(out)


def get_merger_needs_fisher(basis: BasisMethod) -> bool:
    """True when a cluster basis's inner merge needs per-task Fisher weights."""
    return get_merger(MergeSpec(str(basis.params["inner"]), dict(basis.params["inner_params"] or {}))).needs_fisher


def _inner_thresholds(taskset: TaskSet, fits: Mapping[str, BasisFit], group_of: Mapping[str, str], eng: Engine,
                      chunk_elements: int | None) -> dict[str, torch.Tensor]:
    """Per-task global trim thresholds for inner merges with trim_scope=global (two extra streaming passes)."""
    out: dict[str, torch.Tensor] = {}
    for g, fit in fits.items():
        if not fit.is_merged:
            continue
        assert fit.inner is not None
        merger = get_merger(fit.inner)
        if not merger.needs_global_thresholds:
            continue
        assert merger.density is not None
        names = {n for n in taskset.specs if group_of.get(n, WHOLE_VECTOR) == g}
        out[g] = taskset_thresholds(taskset, eng, merger.density, names, chunk_elements, desc="trim thresholds")
    return out


def _manifest(plan: StorePlan, spec: StoreSpec, M: int, taskset: TaskSet, finetuned: Mapping[str, Any],
              gram: GramResult, fits: Mapping[str, BasisFit], group_of: Mapping[str, str],
              C: Mapping[str, np.ndarray], K: Mapping[str, np.ndarray], norms: np.ndarray, rel: np.ndarray,
              dtype_of: Mapping[str, torch.dtype], layout: StoreLayout) -> Manifest:
    pre = taskset.pretrained
    T = taskset.T
    tasks = [TaskEntry(n, str(getattr(finetuned[n], "path", finetuned[n])), float(norms[t]), float(rel[t]))
             for t, n in enumerate(taskset.names)]
    first = next(iter(fits.values()))
    assert gram.pretrained_checksum is not None
    for fit in fits.values():  # record every parameter of an inner merge, defaults included
        if fit.inner is not None:
            fit.inner = MergeSpec(fit.inner.method, dict(get_merger(fit.inner).params))
    return Manifest(
        method=spec.method, options=plan.options, M=M, T=T, layerwise=spec.layerwise, task_like=plan.task_like,
        tasks=tasks, member_counts=first.cluster_sizes() if first.labels is not None else None,
        groups=dict(fits), group_of=dict(group_of),
        cross={g: Cross(C[g], K[g]) for g in fits}, gram=gram.G,
        group_grams=dict(gram.group_grams) if spec.layerwise else {},
        pretrained=PretrainedRef(str(pre.root_dir or pre.path), structure_fingerprint(pre), gram.pretrained_checksum,
                                 gram.chunk_elements),
        tensors=list(taskset.specs.values()),
        store_dtypes={n: dtype_name(d) for n, d in dtype_of.items()},
        files=StoreFiles(layout.bases_files, layout.mean_files),
        task_vectors_bytes=T * sum(s.numel * dtype_of[s.name].itemsize for s in taskset.specs.values()),
        include=list(spec.include or []), exclude=list(spec.exclude or []))
