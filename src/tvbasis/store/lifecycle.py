"""A store's life cycle beyond add-task: remove a task, rename a task.

Both run as add-task does (``store/update.py``): under the store's writer lock, on the state read under it, and
commit one new generation (``store/commit.py``: new data files staged, then the manifest switched in one rename,
then the old generation's files removed), so a killed or concurrent run leaves the old state or the new one.

**remove-task** drops the task from the store without refitting anything:

* the bases (and a PCA mean, a TALL store's τ_MTL, a lora-joint store's shared bases while a task still uses
  them) are kept as they are — they were fit with the removed task and still carry its share: the paper's sum of
  bases (``addition`` mode ``paper``) and a TALL store's s_0 include it. The other tasks' reconstructions and
  reported errors do not change (their coefficients are not refit);
* the task's coefficients (its column of W, its mean coefficient, its row of B, its cluster label and cluster
  count), its Gram row and column, and its per-task coded entries (residual, mask or core) are dropped; a
  lora-joint cluster left without tasks loses its shared bases too;
* coded files that held the task's entries are rewritten without them (the other entries copied, every tensor
  checked against its digest as it is read); dense bases files are untouched.

**rename-task** changes the name everywhere the manifest uses it (task entry, per-task coded entry keys, TALL
``lambdas``); coded files holding its entries are rewritten under the new keys (the key is part of the file's
header), the data unchanged.

Refused, with the store unchanged: removing the last task, an unknown name, a new name that exists or is not a
valid task name (the rules of add-task's names), a store without digests (``tvbasis upgrade`` first).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tvbasis.errors import ConfigError
from tvbasis.store.commit import (
    DEFAULT_LOCK_TIMEOUT,
    Staging,
    commit_generation,
    next_generation,
    remove_leftovers,
    store_lock,
)
from tvbasis.store.format import NONE_CODEC, Manifest, entry_key, task_name_problem
from tvbasis.store.store import BasisStore
from tvbasis.store.update import DEFAULT_CODED_SHARD, needs_digests


def remove_task(store: BasisStore | str | Path, name: str,
                lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BasisStore:
    """Remove task ``name`` from the store (bases kept; see the module docstring); returns the reopened store."""
    root = store.root if isinstance(store, BasisStore) else Path(store)
    with store_lock(root, lock_timeout):
        current = BasisStore.open(root)
        try:
            i = current.task_index(name)
            if current.T == 1:
                raise ConfigError(f"{root}: {name!r} is the store's only task; a store needs at least one (delete "
                                  "the store instead)")
            needs_digests(current, "remove-task")
            remove_leftovers(root, current.manifest)
            new = _without(current.manifest, i)
            keys: dict[str, str | None] = dict.fromkeys(_keys_of(current.manifest, name))
            keys.update(_orphan_shared(current, new))
            return _commit(current, new, keys)
        finally:
            current.close()


def rename_task(store: BasisStore | str | Path, old: str, new_name: str,
                lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BasisStore:
    """Rename task ``old`` to ``new_name`` (see the module docstring); returns the reopened store."""
    problem = task_name_problem(new_name)
    if problem is not None:
        raise ConfigError(f"invalid task name: {problem}")
    root = store.root if isinstance(store, BasisStore) else Path(store)
    with store_lock(root, lock_timeout):
        current = BasisStore.open(root)
        try:
            i = current.task_index(old)
            if new_name in current.task_names:
                raise ConfigError(f"{root}: already has a task named {new_name!r}")
            needs_digests(current, "rename-task")
            remove_leftovers(root, current.manifest)
            new = copy.deepcopy(current.manifest)
            new.tasks[i].name = new_name
            new.gram_estimated_rows = sorted(new_name if t == old else t for t in new.gram_estimated_rows)
            lambdas = new.options.get("lambdas")
            if isinstance(lambdas, dict) and old in lambdas:
                new.options["lambdas"] = {new_name if t == old else t: v for t, v in lambdas.items()}
            keys: dict[str, str | None] = {}
            if current.manifest.coded is not None and current.manifest.has_residuals:
                keys = {entry_key("residual", p, old): entry_key("residual", p, new_name) for p in current.specs}
            return _commit(current, new, keys)
        finally:
            current.close()


def _without(mf: Manifest, i: int) -> Manifest:
    """The manifest without task ``i``'s coefficients, Gram row/column, labels and entries (bases kept)."""
    new = copy.deepcopy(mf)
    name = new.tasks[i].name
    keep = [j for j in range(mf.T) if j != i]
    new.tasks.pop(i)
    new.T = mf.T - 1
    new.gram = mf.gram[np.ix_(keep, keep)]
    new.group_grams = {g: G[np.ix_(keep, keep)] for g, G in mf.group_grams.items()}
    new.gram_estimated_rows = [t for t in new.gram_estimated_rows if t != name]
    for fit in new.groups.values():
        fit.W = fit.W[:, keep]
        if fit.B is not None:
            fit.B = fit.B[keep]
        if fit.mean_weights is not None:
            fit.mean_weights = fit.mean_weights[keep]
        if fit.mean_coef is not None:
            fit.mean_coef = fit.mean_coef[keep]
        if fit.labels is not None:
            sizes = fit.cluster_sizes()
            sizes[fit.labels[i]] -= 1
            fit.labels = [fit.labels[j] for j in keep]
            if "cluster_sizes" in fit.stats:
                fit.stats = {**fit.stats, "cluster_sizes": sizes}
    for cross in new.cross.values():
        cross.C = cross.C[:, keep]
    if new.member_counts is not None:
        first = next(iter(mf.groups.values()))
        if first.labels is not None:
            counts = list(new.member_counts)
            counts[first.labels[i]] -= 1
            new.member_counts = counts
    lambdas = new.options.get("lambdas")
    if isinstance(lambdas, dict) and name in lambdas:
        new.options["lambdas"] = {t: v for t, v in lambdas.items() if t != name}
    if new.coded is not None:
        drop = set(_keys_of(mf, name))
        new.coded.entries = {k: e for k, e in new.coded.entries.items() if k not in drop}
    return new


def _keys_of(mf: Manifest, task: str) -> list[str]:
    if mf.coded is None or not mf.has_residuals:
        return []
    return [entry_key("residual", s.name, task) for s in mf.tensors]


def _orphan_shared(store: BasisStore, new: Manifest) -> dict[str, str | None]:
    """A lora-joint store's shared entries that no remaining task's core uses (dropped with the last member)."""
    if not store.joint or new.coded is None:
        return {}
    used = set()
    for t in new.tasks:
        for p in store.specs:
            key = entry_key("residual", p, t.name)
            if new.coded.entries[key].encoded.get("codec") != NONE_CODEC and t.cluster is not None:
                used.add(entry_key("shared", p, t.cluster))
    orphans = [k for k in new.coded.entries if k.startswith("shared/") and k not in used]
    for k in orphans:
        del new.coded.entries[k]
    return dict.fromkeys(orphans)


def _commit(store: BasisStore, new: Manifest, keys: Mapping[str, str | None]) -> BasisStore:
    """Commit ``new``: coded files holding any of ``keys`` are rewritten with each such entry renamed (to the
    mapped key) or dropped (None); every other entry of those files copied as it is."""
    mf = store.manifest
    if not keys:
        commit_generation(store.root, new, {})
        return BasisStore.open(store.root)
    assert mf.coded is not None and new.coded is not None and store.coded is not None
    affected = sorted({mf.coded.entries[k].file for k in keys})
    moved = [k for k, e in mf.coded.entries.items() if e.file in affected]
    gen = next_generation(store.root, mf)
    with Staging.generation(store.root, "coded") as stage:
        writer = stage.coded_writer(DEFAULT_CODED_SHARD)
        order = []
        for k in moved:
            target = keys[k] if k in keys else k
            if target is None:
                continue
            enc = store.coded.encoded(k) if store.coded.codec_of(k) != NONE_CODEC else None
            shape = tuple(int(x) for x in mf.coded.entries[k].encoded["shape"])
            writer.add(target, enc, shape)
            order.append(target)
        for k, target in keys.items():  # entries renamed: the new key replaces the old one in the manifest
            if target is not None:
                new.coded.entries[target] = new.coded.entries.pop(k)
        files: list[str] = []
        section = None
        if order:
            files, section = writer.finish(order, gen)
        else:
            writer.abort()
        for f in affected:
            new.coded.files.pop(f, None)
        new.files.coded = [f for f in new.files.coded if f not in affected]
        if section is not None:
            new.coded.files.update(section.files)
            new.coded.entries.update(section.entries)
            new.files.coded = [*new.files.coded, *files]
        commit_generation(store.root, new, stage.files(files))
    return BasisStore.open(store.root)
