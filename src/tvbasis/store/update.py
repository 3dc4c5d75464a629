"""Fold a new task into an existing store without the original fine-tunes; add digests to a version-1 store.

One streaming pass over (pretrained, new fine-tune, store), in the row chunks of the pretrained checksum (which
are the chunks of the store's digests, so every read is whole chunks), gives per layer group the inner products
c = U·v of the new task vector v with the stored vectors U and ‖v‖²; memory stays flat in the tensor size.
``tvbasis.bases.extend`` turns them into the fit for T + 1 tasks. Cluster stores then rewrite their bases (one
more pass, again in row chunks) into new data files of the next generation; every other store only switches to
a new manifest (``store.commit``). The whole update runs under the store's writer lock, on the state read under
it: two add-tasks on one store both land, one after the other.

The new task's reconstruction error is exact. Inner products between the new task and the old ones are not
available without the old checkpoints; where they are needed (the Gram/cosine matrix, the errors of old tasks
whose basis changed) they are estimated from the old tasks' reconstructions and flagged ``error_exact: false``.

LoRA stores (``lora-factors``, ``lora-joint``) take a new LoRA adapter in factor space (``_add_lora_task``): no
ΔW is expanded; the Gram row is ⟨ΔW_new, ΔW̃_t⟩ from the stored entries (exact where every old task is stored
exactly). A lora-factors store appends the adapter's own factors; a lora-joint store projects it onto the shared
bases of the cluster that reconstructs it best (least-squares cores, exact error), keeping its own factors for a
tensor that cluster has no bases of. A full fine-tune is coded by a lora-factors store's residual codec
(``lowrank:rank=R``, the generic path); a lora-joint store refuses it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from tvbasis.bases.extend import Extension, extend_fit
from tvbasis.codecs import Encoded, decode, parse_codec
from tvbasis.codecs.base import sq_dist64
from tvbasis.compress import Coder
from tvbasis.engine import Engine, Run, as_run
from tvbasis.errors import ConfigError, StoreError
from tvbasis.io import Checkpoint, check_finite, open_checkpoint, open_finetuned, row_chunks
from tvbasis.io.checksum import check_pretrained_checksum, chunk_key, tensor_digest
from tvbasis.io.lora import LoraCheckpoint
from tvbasis.io.writer import PositionalShard
from tvbasis.lora import Source
from tvbasis.methods import FACTOR_SPACE, get_store_method, zero_fit
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store.commit import (
    DEFAULT_LOCK_TIMEOUT,
    Staging,
    commit_generation,
    next_generation,
    remove_leftovers,
    store_lock,
)
from tvbasis.store.decoded import plausibility_problems
from tvbasis.store.faults import fault_point
from tvbasis.store.format import (
    FORMAT_VERSION,
    JOINT_CORE,
    Cross,
    Digests,
    Manifest,
    TaskEntry,
    entry_key,
    task_name_problem,
)
from tvbasis.store.integrity import digest_fd, digest_file
from tvbasis.store.lora_entries import (
    Term,
    dense_entry,
    factor_entry,
    inner,
    pretrained_digests,
    project,
    stored_term,
)
from tvbasis.store.store import BasisStore
from tvbasis.vectors import DiffSource, KeyFilter, changed_specs, vector_specs

Item = tuple[str, int, int]
#: a task stored with at most this relative error is exact up to float32 rounding (its Gram entries are exact)
EXACT_REL = 1e-6
#: shard size of the coded files add-task writes
DEFAULT_CODED_SHARD = "5GB"


def _items(store: BasisStore, chunk: int) -> list[Item]:
    return [(s.name, a, b) for s in store.specs.values() for a, b in row_chunks(s, chunk)]


def _rows(store: BasisStore, item: Item) -> tuple[int, int] | None:
    name, a, b = item
    return (a, b) if store.specs[name].shape else None


class _Project:
    """Work unit: per row chunk, U·v and ‖v‖² in float64, and the pretrained chunk's checksum digest."""

    def __init__(self, store: BasisStore, pre: Checkpoint, ft: Checkpoint) -> None:
        self.store, self.pre, self.ft = store, pre, ft

    def __call__(self, item: Item) -> tuple[str, np.ndarray, float, tuple[str, bytes]]:
        name, a, b = item
        rows = _rows(self.store, item)
        pre = self.pre.get(name) if rows is None else self.pre.get_rows(name, a, b)
        digest = (chunk_key(name, a, b), tensor_digest(chunk_key(name, a, b), pre))
        v = DiffSource(self.pre, self.ft).get_with(pre, name, rows).reshape(-1).to(torch.float64)
        parts = [self.store.bases_rows(name, rows).reshape(self.store.M, v.numel())]
        mu = self.store.mean_rows(name, rows)
        if mu is not None:
            parts.append(mu.reshape(1, -1))
        U = torch.cat(parts).to(torch.float64)
        return self.store.group_of.get(name, WHOLE_VECTOR), (U @ v).numpy(), float(v @ v), digest


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


def needs_digests(store: BasisStore, what: str) -> None:
    """StoreError for a store without digests (format version 1): writes need them to carry integrity forward."""
    if store.manifest.digests is None:
        raise StoreError(f"{store.root}: store format version {store.manifest.format_version} has no digests of its "
                         f"data; {what} needs version {FORMAT_VERSION}: run `tvbasis upgrade {store.root}` first "
                         "(reading the store works as it is)")


def refuse_unverified(store: BasisStore, what: str) -> None:
    """StoreError unless the store passes ``verify`` (every file against its digests, every coded entry decoded
    and its data consistent with the manifest's numbers): a writer never carries corrupt data into a new
    generation under fresh digests. Reads the whole store once."""
    problems = store.verify()
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise StoreError(f"{what} refuses a store that fails verification: {problems[0]}{more}; nothing changed "
                         f"(run `tvbasis verify {store.root}`)")


def add_task(store: BasisStore | str | Path, name: str, finetuned: str | Path | Checkpoint,
             pretrained: str | Path | Checkpoint, run: Run = None,
             lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BasisStore:
    """Add task ``name`` (a fine-tune or LoRA adapter of ``pretrained``) to the store; returns the reopened store.

    Holds the store's writer lock (waiting up to ``lock_timeout`` seconds) and works on the state read under it,
    so ``store`` may be stale: a task another process added meanwhile is kept."""
    problem = task_name_problem(name)
    if problem is not None:
        raise ConfigError(f"invalid task name: {problem}")
    root = store.root if isinstance(store, BasisStore) else Path(store)
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    ft = open_finetuned(finetuned, pre)
    with store_lock(root, lock_timeout):
        current = BasisStore.open(root)
        try:
            return _add_task(current, name, pre, ft, run)
        finally:
            current.close()


def _add_task(store: BasisStore, name: str, pre: Checkpoint, ft: Checkpoint, run: Run) -> BasisStore:
    if name in store.task_names:
        raise ConfigError(f"{store.root}: already has a task named {name!r}")
    if store.masks:
        raise ConfigError(f"{store.root}: a tall store's multi-task vector τ_MTL sums the tasks it was built from, "
                          "and a new task's mask would select from a vector that lacks it; rebuild the store with the "
                          "new fine-tune instead")
    needs_digests(store, "add-task")
    refuse_unverified(store, "add-task")
    store.check_pretrained(pre)
    _check_covers(store, pre, ft)
    remove_leftovers(store.root, store.manifest)
    if get_store_method(store.method).builder == FACTOR_SPACE:
        if isinstance(ft, LoraCheckpoint):
            return _add_lora_task(store, name, pre, ft)
        if store.joint:
            raise ConfigError(f"{ft.path}: is not a LoRA adapter; a lora-joint store projects adapters' factors "
                              "onto its shared bases (rebuild it, or use a lora-factors store)")
    mf = store.manifest
    ref = mf.pretrained
    eng = as_run(run).get_engine()
    items = _items(store, ref.checksum_chunk_elements)
    nU = next(iter(store.fits.values())).n_stored
    c = {g: np.zeros(nU) for g in store.fits}
    vv = {g: 0.0 for g in store.fits}
    digests: list[tuple[str, bytes]] = []
    sizes = [2 * _item_bytes(store, pre, it) for it in items]
    for g, ci, vi, d in eng.map(_Project(store, pre, ft), items, desc=f"project {name}", sizes=sizes):
        c[g] += ci
        vv[g] += vi
        digests.append(d)
    check_pretrained_checksum(digests, ref.to_json(), pre.path, "; the store is unchanged")
    if sum(vv.values()) == 0:
        raise ConfigError(f"{ft.path}: equals the pretrained model (zero task vector)")
    new = copy.deepcopy(mf)
    T = store.T
    ext: dict[str, Extension] = {}
    err2 = 0.0
    inner = np.zeros(T)  # ⟨v, v̂_t⟩ summed over groups
    for g, fit in store.fits.items():
        cross = mf.cross[g]
        e = ext[g] = extend_fit(fit, c[g], vv[g], cross.C, cross.K, fixed_bases=mf.coded is not None)
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
    _check_finite_fit(new)
    updates = {g: e.update for g, e in ext.items() if e.update is not None}
    first_fit = next(iter(ext.values())).fit
    if mf.coded is not None and first_fit.labels is not None:  # joined a cluster; its stored basis is kept
        entry.cluster = first_fit.labels[-1]
        if new.member_counts is not None:
            new.member_counts = first_fit.cluster_sizes()
    if new.has_residuals:
        assert not updates
        return _add_coded_task(store, new, name, pre, ft, eng)
    if not updates:
        commit_generation(store.root, new, {})
        return BasisStore.open(store.root)
    first = next(iter(ext.values()))
    assert first.update is not None
    entry.cluster = first.update[0]
    if new.member_counts is not None:
        new.member_counts = first.fit.cluster_sizes()
    _update_old_errors(new, {g: e.update[0] for g, e in ext.items() if e.update is not None})
    _check_finite_fit(new)
    return _rewrite_cluster_store(store, new, pre, ft, updates, eng, items)  # type: ignore[arg-type]


class _Residual:
    """Work unit (one whole tensor) of add-task on a store with residuals: r = v − v̂ for the new task through the
    store's residual coder; returns the entry and its exact squared error ‖v − (v̂ + r̂)‖²."""

    def __init__(self, store: BasisStore, new: Manifest, pre: Checkpoint, ft: Checkpoint, coder: Coder) -> None:
        self.store, self.new, self.pre, self.ft, self.coder = store, new, pre, ft, coder

    def __call__(self, name: str) -> tuple[str, Encoded | None, float]:
        fit = self.new.groups[self.store.group_of.get(name, WHOLE_VECTOR)]
        coef = fit.coef_matrix()[:, -1]
        v = DiffSource(self.pre, self.ft).get(name)
        S = self.store.bases_rows(name)
        vhat = torch.tensordot(torch.as_tensor(coef[:fit.M], dtype=torch.float32), S, dims=1)
        if fit.has_mean:
            mu = self.store.mean_rows(name)
            assert mu is not None
            vhat.add_(mu, alpha=float(coef[fit.M]))
        r = v - vhat
        enc = self.coder.encode(name, r)
        return name, enc, sq_dist64(r.reshape(-1), decode(enc).reshape(-1) if enc is not None else 0.0)


def _add_coded_task(store: BasisStore, new: Manifest, name: str, pre: Checkpoint, ft: Checkpoint,
                    eng: Engine) -> BasisStore:
    """The new task's residual entries, in new coded files of the next generation; the old ones stay as they are
    (the bases never change in a store with residuals, so the old residuals stay exact)."""
    assert new.coded is not None and new.coded.residual_codec is not None
    built_T = sum(not t.added for t in new.tasks[:-1]) or store.T
    coder = Coder(new.coded.residual_codec, built_T)
    names = list(store.specs)
    err2: list[float] = []

    def residuals() -> Iterator[tuple[str, Encoded | None]]:
        for tensor, enc, e2 in eng.map(_Residual(store, new, pre, ft, coder), names, desc=f"residual of {name}",
                                       sizes=[4 * store.specs[n].numel for n in names]):
            err2.append(e2)
            yield tensor, enc

    def record_error() -> None:
        task = new.tasks[-1]
        task.rel_error = float(np.sqrt(max(sum(err2), 0.0))) / task.norm if task.norm else 0.0

    return _commit_entries(store, new, name, residuals(), record_error)


def _new_entries(store: BasisStore, name: str, ft: LoraCheckpoint) -> tuple[dict[str, Encoded | None], float, float,
                                                                         np.ndarray, int | None]:
    """The new adapter's entries per tensor (factor space), ‖ΔW‖², its squared error, ⟨ΔW, ΔW̃_t⟩ with every old
    task and (joint stores) the cluster it joins."""
    assert store.coded is not None
    coded, src, T = store.coded, Source(ft), store.T
    touched = set(src.tensors())
    fc = store.manifest.options.get("factor_codec")
    next_codec = None if fc is None else parse_codec(str(fc))
    clusters = sorted({t.cluster for t in store.manifest.tasks if t.cluster is not None})
    diagonal = store.manifest.options.get("cores") == "diagonal"
    entries: dict[str, Encoded | None] = {}
    vv, err2, dots = 0.0, 0.0, np.zeros(T)
    per_cluster = np.zeros(len(clusters))
    fitted: dict[str, list[tuple[torch.Tensor, float] | None]] = {}
    for pname, spec in store.specs.items():
        if pname not in touched:
            entries[pname] = None
            continue
        f = src.factors(pname)
        rows = spec.shape[0] if spec.shape else 1
        term: Term = f if f is not None else src.dense(pname).reshape(rows, -1)
        nrm = inner(term, term)
        vv += nrm
        for t, old in enumerate(store.task_names):
            dots[t] += inner(term, stored_term(coded, entry_key("residual", pname, old), spec))
        if f is None:
            entries[pname], e = dense_entry(term, spec.shape)  # type: ignore[arg-type]
            err2 += e
        elif not store.joint:
            entries[pname], e = factor_entry(f[0], f[1], spec.shape, next_codec, ft.layout(pname))
            err2 += e
        else:
            fits: list[tuple[torch.Tensor, float] | None] = []
            for j, cl in enumerate(clusters):
                if entry_key("shared", pname, cl) in coded.section.entries:
                    fits.append(project(f[0], f[1], *coded.shared(pname, cl), diagonal))
                    per_cluster[j] += fits[-1][1]  # type: ignore[index]
                else:
                    fits.append(None)
                    per_cluster[j] += nrm
            fitted[pname] = fits
    best = int(np.argmin(per_cluster)) if store.joint else 0
    for pname, fits in fitted.items():  # joint: the cores on the best cluster's bases
        got = fits[best]
        if got is None:  # that cluster has no bases of this tensor: the adapter's own factors (exact)
            f = src.factors(pname)
            assert f is not None
            entries[pname], e = factor_entry(f[0], f[1], store.specs[pname].shape, None, ft.layout(pname))
        else:
            layout = ft.layout(pname)
            entries[pname] = Encoded(JOINT_CORE, tuple(store.specs[pname].shape), {"core": got[0].contiguous()},
                                   {"layout": layout} if layout else {})
            e = got[1]
        err2 += e
    return entries, vv, err2, dots, clusters[best] if store.joint else None


def _add_lora_task(store: BasisStore, name: str, pre: Checkpoint, ft: LoraCheckpoint) -> BasisStore:
    """Add a LoRA adapter to a LoRA store in factor space (see the module docstring); one new generation."""
    mf = store.manifest
    ref = mf.pretrained
    check_pretrained_checksum(pretrained_digests(pre, store.specs.values(), ref.checksum_chunk_elements),
                              ref.to_json(), pre.path, "; the store is unchanged")
    entries, vv, err2, dots, cluster = _new_entries(store, name, ft)
    if vv <= 0:
        raise ConfigError(f"{ft.path}: equals the pretrained model (zero task vector)")
    new = copy.deepcopy(mf)
    T = store.T
    G2 = np.zeros((T + 1, T + 1))
    G2[:T, :T] = mf.gram
    G2[T, :T] = G2[:T, T] = dots
    G2[T, T] = vv
    new.gram = G2
    if not all(t.rel_error <= EXACT_REL and t.error_exact for t in mf.tasks):  # ⟨v, ṽ_t⟩ ≠ ⟨v, v_t⟩ if lossy
        new.gram_estimated_rows = sorted(set(new.gram_estimated_rows) | {name})
    new.T = T + 1
    new.groups = {g: zero_fit(T + 1) for g in mf.groups}
    new.cross = {g: Cross(np.zeros((0, T + 1)), np.zeros((0, 0))) for g in mf.groups}
    norm = float(np.sqrt(vv))
    new.tasks.append(TaskEntry(name, str(ft.path), norm, float(np.sqrt(max(err2, 0.0))) / norm, added=True,
                               cluster=cluster))
    _check_finite_fit(new)
    return _commit_entries(store, new, name, entries.items())


def _commit_entries(store: BasisStore, new: Manifest, task: str, entries: Iterable[tuple[str, Encoded | None]],
                    before_commit: Callable[[], None] | None = None) -> BasisStore:
    """Write task ``task``'s entries ((tensor, encoded) pairs, written as they come: a stream is never held whole)
    into coded files of the next generation and commit ``new``; ``before_commit`` runs once every entry is written
    (e.g. to record the task's error measured while coding them)."""
    assert new.coded is not None
    gen = next_generation(store.root, store.manifest)
    with Staging.generation(store.root, "coded") as stage:
        writer = stage.coded_writer(DEFAULT_CODED_SHARD)
        keys = []
        for p, enc in entries:
            keys.append(entry_key("residual", p, task))
            writer.add(keys[-1], enc, store.specs[p].shape)
        files, section = writer.finish(keys, gen)
        if before_commit is not None:
            before_commit()
        new.coded.files.update(section.files)
        new.coded.entries.update(section.entries)
        new.files.coded = [*new.files.coded, *files]
        commit_generation(store.root, new, stage.files(files))
    return BasisStore.open(store.root)


def _item_bytes(store: BasisStore, pre: Checkpoint, item: Item) -> int:
    name, a, b = item
    s = store.specs[name]
    per_row = s.numel // s.shape[0] if s.shape else 1
    return (b - a if s.shape else 1) * per_row * pre.spec(name).dtype.itemsize


def _check_finite_fit(mf: Manifest) -> None:
    """The new manifest's numbers must be finite (they are validated when the store is next opened)."""
    arrays = [mf.gram, *mf.group_grams.values(), *(x for c in mf.cross.values() for x in (c.C, c.K))]
    for f in mf.groups.values():
        arrays += [a for a in (f.W, f.B, f.mean_coef, f.mean_weights) if a is not None]
    if not all(np.isfinite(a).all() for a in arrays) or not all(np.isfinite([t.norm, t.rel_error]).all()
                                                               for t in mf.tasks):
        raise StoreError(f"{mf.tasks[-1].source}: adding this task gives non-finite coefficients (NaN/Inf); the "
                         "store is unchanged")


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
    """Work unit: rows [a, b) of every basis of one tensor, basis m ← α·s_m + β·v, written to the new shard."""

    def __init__(self, store: BasisStore, pre: Checkpoint, ft: Checkpoint, ab: dict[str, tuple[int, float, float]],
                 shards: dict[str, PositionalShard], dtype_of: dict[str, torch.dtype]) -> None:
        self.store, self.pre, self.ft, self.ab, self.shards, self.dtype_of = store, pre, ft, ab, shards, dtype_of

    def __call__(self, item: Item) -> None:
        name, a, _b = item
        rows = _rows(self.store, item)
        m, alpha, beta = self.ab[self.store.group_of.get(name, WHOLE_VECTOR)]
        S = self.store.bases_rows(name, rows)
        S[m] = alpha * S[m] + beta * DiffSource(self.pre, self.ft).get(name, rows)
        spec = self.store.specs[name]
        dtype = self.dtype_of[name]
        stored = S.to(dtype)
        check_finite(stored, f"{self.store.root} (updated bases)", name)
        start = a * (spec.numel // spec.shape[0]) if spec.shape else 0
        for i in range(self.store.M):
            self.shards[name].write_elements(name, i * spec.numel + start, stored[i], dtype)


def _rewrite_cluster_store(store: BasisStore, manifest: Manifest, pre: Checkpoint, ft: Checkpoint,
                           updates: dict[str, tuple[int, float, float]], eng: Engine, items: list[Item]) -> BasisStore:
    """Write the updated bases into new data files (same layout), staged in a temporary directory inside the
    store, then commit them as the next generation."""
    assert manifest.digests is not None
    dtype_of = {n: getattr(torch, d) for n, d in manifest.store_dtypes.items()}
    with Staging.generation(store.root, "bases") as staging:
        stage = staging.dir
        shards: dict[str, PositionalShard] = {}
        for f in manifest.files.bases:
            names = manifest.digests.files[f].tensors
            sh = PositionalShard(stage / f, manifest.stacked_specs("bases", names))
            sh.create()
            shards.update({s.name: sh for s in sh.specs})
        for _ in eng.map(_Rewrite(store, pre, ft, updates, shards, dtype_of), items, desc="update bases"):
            pass
        files = dict(manifest.digests.files)
        for f in manifest.files.bases:
            PositionalShard.fsync(stage / f)
            files[f] = digest_file(stage / f, manifest, "bases", manifest.digests.files[f].tensors,
                                   manifest.digests.chunk_elements)
            fault_point(f"staged {f}")
        manifest.digests = Digests(manifest.digests.chunk_elements, files, manifest.digests.algorithm)
        commit_generation(store.root, manifest, staging.files(manifest.files.bases))
    return BasisStore.open(store.root)


# ---------------------------------------------------------------------------------------------------- upgrade
def upgrade_store(root: str | Path, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> tuple[BasisStore, bool]:
    """Bring a version-1 store to the current format: read every data file once (checking that it is exactly
    what tvbasis writes and holds finite values), record its digests, switch to a current-version manifest. The data
    files are not rewritten. Returns (the store, whether anything changed)."""
    root = Path(root)
    with store_lock(root, lock_timeout):
        store = BasisStore.open(root)
        try:
            mf = store.manifest
            if mf.digests is not None:  # version 2 and later: nothing to add (writes relabel it version 3)
                return store, False
            problems = plausibility_problems(root, mf, store.data, store.coded)
            if problems:  # digests recorded now would vouch for corrupt data from here on
                raise StoreError(f"{problems[0]}; the store is corrupt and cannot be upgraded (rebuild it)")
            new = copy.deepcopy(mf)
            new.format_version = FORMAT_VERSION
            chunk = mf.pretrained.checksum_chunk_elements
            files = {}
            for part, names in (("bases", mf.files.bases), ("mean", mf.files.mean)):
                for f in names:
                    tensors = [n for n, pl in store.data.places[part].items() if pl.file == f]
                    tensors.sort(key=lambda n: store.data.places[part][n].offset)
                    d, bad = digest_fd(store.data.fd_of(f), mf, part, tensors, chunk, f"{root}: {part} file {f}")
                    if bad:
                        raise StoreError(f"{root}: {part} file {f}: tensor {sorted(bad)[0]!r} holds NaN/Inf values; "
                                         "the store is corrupt and cannot be upgraded (rebuild it)")
                    files[f] = d
            new.digests = Digests(chunk, files)
            commit_generation(root, new, {})
        finally:
            store.close()
    return BasisStore.open(root), True
