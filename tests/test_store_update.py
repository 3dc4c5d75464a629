"""add-task: folding a new fine-tune into a store without the old checkpoints — every method, layer-wise,
repeated, against least squares on the stored bases and against a store rebuilt from all tasks; streamed in row
chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tinymodels import dense_vector, flat, make_family
from tvbasis.bases import random_rows
from tvbasis.store import BasisStore, add_task, build_store

METHODS = [("pca", {}), ("autoencoder", {"steps": 300}), ("cluster", {}),
           ("cluster", {"inner": "ties", "inner_params": {"density": 0.5}}), ("random", {}), ("random-sample", {})]


@pytest.fixture(scope="module")
def fam7(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam7"), T=7, clusters=3)


def _first(fts: dict, n: int) -> dict:
    return {k: fts[k] for k in list(fts)[:n]}


def _measured(store: BasisStore, task: str, ref: torch.Tensor) -> float:
    return float((flat(store.reconstruct(task).to_state_dict()) - ref).norm() / ref.norm())


def _dense_stored(store: BasisStore) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The stored bases (M, D) and mean (D,) read with the safetensors library (not tvbasis's reader), or regenerated
    from the seed for a random store; tensors in sorted order."""
    keys = sorted(store.specs)
    where = {}
    for part in ("bases", "mean"):
        for f in getattr(store.manifest.files, part):
            with safe_open(str(store.root / f), framework="pt") as h:
                for k in h.keys():
                    where[(part, k)] = h.get_tensor(k).double()
    if not store.manifest.files.bases:
        fit = store.fits["*"]
        U = torch.cat([random_rows(fit.random_seed, k, store.specs[k].shape, store.M, store.total_params, 0,
                                   store.specs[k].shape[0] if store.specs[k].shape else 1).double()
                       .reshape(store.M, -1) for k in keys], 1)
    else:
        U = torch.cat([where[("bases", k)].reshape(store.M, -1) for k in keys], 1)
    mu = torch.cat([where[("mean", k)].reshape(-1) for k in keys]) if store.manifest.files.mean else None
    return U.numpy(), None if mu is None else mu.numpy(), keys


@pytest.mark.parametrize("method,opts", METHODS)
def test_add_task_every_method(fam7, tmp_path, method, opts):
    pre_p, fts, pre, sds = fam7
    store = build_store(pre_p, _first(fts, 6), method, 3, tmp_path / "s", opts)
    new = add_task(store, "task6", fts["task6"], pre_p)
    assert new.T == 7 and new.task_names == [f"task{t}" for t in range(7)]
    ref = flat(dense_vector(pre, sds[6]))
    assert abs(_measured(new, "task6", ref) - new.rel_errors["task6"]) < 1e-4  # the new task's error is exact
    assert new.verify() == [] and new.manifest.generation == 2
    if method == "cluster":
        fit = new.fits["*"]
        assert new.manifest.tasks[-1].cluster == fit.labels[0]  # task6 is planted with task0 (6 % 3 == 0)
        assert _measured(new, "task6", ref) < 0.2
        assert new.manifest.member_counts == fit.cluster_sizes() == np.bincount(fit.labels, minlength=3).tolist()
    else:  # the old tasks' reconstructions do not change
        for t in range(6):
            a = flat(store.reconstruct(f"task{t}").to_state_dict())
            b = flat(new.reconstruct(f"task{t}").to_state_dict())
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method,opts", [m for m in METHODS if m[0] != "cluster"])
def test_new_coefficients_are_least_squares_on_the_stored_bases(fam7, tmp_path, method, opts):
    """Non-cluster stores keep their bases: the new task's coefficients must be argmin_w ‖v − μ − Uᵀw‖."""
    pre_p, fts, pre, sds = fam7
    store = build_store(pre_p, _first(fts, 6), method, 3, tmp_path / "s", opts)
    new = add_task(store, "task6", fts["task6"], pre_p)
    U, mu, keys = _dense_stored(new)
    v = flat(dense_vector(pre, sds[6]), keys).numpy()
    target = v - (mu if mu is not None else 0.0)
    w, *_ = np.linalg.lstsq(U.T, target, rcond=None)
    fit = new.fits["*"]
    assert np.allclose(fit.W[:, 6], w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    if mu is not None:
        assert fit.mean_coef[6] == 1.0


def test_random_store_add_task_equals_rebuild_from_all_tasks(fam7, tmp_path):
    """Random bases do not depend on the tasks: add-task and a rebuild from all 7 give the same coefficients."""
    pre_p, fts, pre, sds = fam7
    added = add_task(build_store(pre_p, _first(fts, 6), "random", 3, tmp_path / "a", {"seed": 4}), "task6",
                     fts["task6"], pre_p)
    rebuilt = build_store(pre_p, fts, "random", 3, tmp_path / "b", {"seed": 4})
    assert np.allclose(added.fits["*"].W, rebuilt.fits["*"].W, rtol=1e-4, atol=1e-7)
    for t in ("task0", "task6"):
        assert abs(added.rel_errors[t] - rebuilt.rel_errors[t]) < 1e-5


def test_cluster_mean_add_task_equals_rebuild_bases(fam7, tmp_path):
    """A mean cluster's basis after add-task is the mean of its members: the rebuild's basis of that cluster."""
    pre_p, fts, pre, sds = fam7
    added = add_task(build_store(pre_p, _first(fts, 6), "cluster", 3, tmp_path / "a"), "task6", fts["task6"], pre_p)
    rebuilt = build_store(pre_p, fts, "cluster", 3, tmp_path / "b")
    la, lb = added.fits["*"].labels, rebuilt.fits["*"].labels
    assert all((la[i] == la[j]) == (lb[i] == lb[j]) for i in range(7) for j in range(7))  # same partition
    Ua, _, _ = _dense_stored(added)
    Ub, _, _ = _dense_stored(rebuilt)
    for t in range(7):
        assert np.allclose(Ua[la[t]], Ub[lb[t]], atol=1e-5)
    members = [t for t in range(7) if la[t] == la[6]]
    keys = sorted(added.specs)
    mean = np.mean([flat(dense_vector(pre, sds[t]), keys).numpy() for t in members], 0)
    assert np.allclose(Ua[la[6]], mean, atol=1e-5)


@pytest.mark.parametrize("method", ["pca", "cluster"])
def test_layerwise_add_task(fam7, tmp_path, method):
    pre_p, fts, pre, sds = fam7
    store = build_store(pre_p, _first(fts, 6), method, 2, tmp_path / "s", layerwise=True)
    new = add_task(store, "task6", fts["task6"], pre_p)
    assert len(new.fits) > 1 and new.T == 7
    ref = flat(dense_vector(pre, sds[6]))
    assert abs(_measured(new, "task6", ref) - new.rel_errors["task6"]) < 1e-4
    for g, G in new.manifest.group_grams.items():
        assert G.shape == (7, 7) and G[6, 6] > 0, g
    assert abs(sum(G[6, 6] for G in new.manifest.group_grams.values()) - float(ref @ ref)) < 1e-4 * float(ref @ ref)


@pytest.mark.parametrize("method", ["pca", "cluster"])
def test_repeated_add_tasks(tmp_path, method):
    pre_p, fts, pre, sds = make_family(tmp_path, T=8, clusters=3)
    store = build_store(pre_p, _first(fts, 5), method, 2, tmp_path / "s")
    for t in (5, 6, 7):
        store = add_task(store, f"task{t}", fts[f"task{t}"], pre_p)
        ref = flat(dense_vector(pre, sds[t]))
        assert abs(_measured(store, f"task{t}", ref) - store.rel_errors[f"task{t}"]) < 1e-4
    assert store.T == 8 and store.manifest.generation == 4 and store.verify() == []
    if method == "cluster":
        fit = store.fits["*"]
        assert fit.cluster_sizes() == np.bincount(fit.labels, minlength=2).tolist() == store.manifest.member_counts
        assert sum(fit.cluster_sizes()) == 8
    # only the current generation's files remain
    assert sorted(p.name for p in store.root.iterdir()) == sorted(["tvbasis.json", ".tvbasis.lock",
                                                                    *store.manifest.files.all()])


def test_add_task_streams_row_chunks(fam7, tmp_path, monkeypatch):
    """With a small checksum chunk every read of add-task is one row chunk (memory flat in the tensor size), and
    the result equals add-task over whole tensors."""
    pre_p, fts, pre, sds = fam7
    chunk = 40  # elements: the 50 x 8 embedding is read in 10 chunks of 5 rows
    whole = add_task(build_store(pre_p, _first(fts, 6), "cluster", 3, tmp_path / "w"), "task6", fts["task6"], pre_p)
    small = build_store(pre_p, _first(fts, 6), "cluster", 3, tmp_path / "c", chunk_elements=chunk)
    assert small.manifest.pretrained.checksum_chunk_elements == chunk == small.manifest.digests.chunk_elements
    seen = []
    real = BasisStore.bases_rows

    def spy(self, name, rows=None):
        t = real(self, name, rows)
        seen.append(t[0].numel())
        return t
    monkeypatch.setattr(BasisStore, "bases_rows", spy)
    chunked = add_task(small, "task6", fts["task6"], pre_p)
    monkeypatch.undo()
    assert seen and max(seen) <= chunk  # per basis, never more than one chunk of elements
    assert chunked.fits["*"].labels == whole.fits["*"].labels
    Ua, _, _ = _dense_stored(whole)
    Ub, _, _ = _dense_stored(chunked)
    assert np.allclose(Ua, Ub, atol=1e-6)
    assert abs(whole.rel_errors["task6"] - chunked.rel_errors["task6"]) < 1e-6
