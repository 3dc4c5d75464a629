"""Gram pass, basis methods, the BasisStore and arithmetic on it, against dense references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tinymodels import dense_vector, flat, pretrained_state, save_hf
from tvbasis.errors import ConfigError, StoreError, UnknownTaskError
from tvbasis.io import open_checkpoint
from tvbasis.store import BasisStore, build_store


def test_pca_with_M_T_minus_1_is_exact(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    store = build_store(pre_p, fts, "pca", 5, tmp_path / "s")
    for t, name in enumerate(store.task_names):
        assert store.rel_errors[name] < 1e-5
        rec = store.reconstruct(name).to_state_dict()
        ref = dense_vector(pre, sds[t])
        err = (flat(rec) - flat(ref)).norm() / flat(ref).norm()
        assert err < 1e-5


@pytest.mark.parametrize("method,opts", [("autoencoder", {"steps": 800}), ("pca", {}), ("random", {}),
                                         ("random-sample", {}), ("cluster", {}),
                                         ("cluster", {"inner": "ties", "inner_params": {"density": 0.5}})])
def test_reported_errors_equal_measured(fam, tmp_path, method, opts):
    pre_p, fts, pre, sds = fam
    store = build_store(pre_p, fts, method, 3, tmp_path / "s", opts)
    assert store.M == 3 and store.T == 6
    for t, name in enumerate(store.task_names):
        ref = flat(dense_vector(pre, sds[t]))
        measured = float((flat(store.reconstruct(name).to_state_dict()) - ref).norm() / ref.norm())
        assert abs(measured - store.rel_errors[name]) < 1e-4, (name, measured, store.rel_errors[name])


def test_layerwise_never_worse(fam, tmp_path):
    pre_p, fts, *_ = fam
    a = build_store(pre_p, fts, "pca", 2, tmp_path / "a")
    b = build_store(pre_p, fts, "pca", 2, tmp_path / "b", layerwise=True)
    ea, eb = np.array(list(a.rel_errors.values())), np.array(list(b.rel_errors.values()))
    assert (eb**2).sum() <= (ea**2).sum() + 1e-9
    assert len(b.fits) > 1


def test_combine_equals_dense_reference(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    store = build_store(pre_p, fts, "autoencoder", 3, tmp_path / "s", {"steps": 500})
    alpha = {"task0": 1.0, "task3": -0.5, "task5": 0.25}
    got = flat(store.combine(alpha).to_state_dict())
    rec = {n: flat(store.reconstruct(n).to_state_dict()) for n in alpha}
    ref = sum(c * rec[n] for n, c in alpha.items())
    assert torch.allclose(got, ref, atol=1e-5)
    bases = open_checkpoint(tmp_path / "s" / "bases.safetensors")
    add = flat(store.addition().to_state_dict())
    keys = sorted(store.specs)
    assert torch.allclose(add, torch.cat([bases.get(k).sum(0).reshape(-1).double() for k in keys]), atol=1e-6)


def test_store_roundtrip_and_inspect_fields(fam, tmp_path):
    pre_p, fts, *_ = fam
    store = build_store(pre_p, fts, "cluster", None, tmp_path / "s")
    again = BasisStore.open(tmp_path / "s")
    assert again.task_names == list(fts) and again.M == store.M
    s = again.summary()
    assert s["bytes_on_disk"] > 0 and s["task_vectors_bytes"] > s["bytes_on_disk"] * 0.5 * 6 / store.M / 2
    assert len(s["cosine"]) == 6 and s["labels"] is not None


def test_edit_applies_and_checks_pretrained(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    store = build_store(pre_p, fts, "pca", 5, tmp_path / "s")
    out = (-store.reconstruct("task1")).apply_to(pre_p, 0.5, tmp_path / "neg")
    m = open_checkpoint(out)
    k = "pooler.dense.weight"
    assert torch.allclose(m.get(k), pre[k] - 0.5 * (sds[1][k] - pre[k]), atol=1e-5)
    # same structure, other weights: caught by the checksum while streaming; nothing written
    other = save_hf(pretrained_state(seed=9), tmp_path / "other")
    with pytest.raises(StoreError, match="checksum"):
        store.reconstruct("task1").apply_to(other, 1.0, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # another architecture: caught up front
    small = {k: v for k, v in pretrained_state().items() if "layer.1" not in k}
    with pytest.raises(StoreError, match="another pretrained"):
        store.check_pretrained(open_checkpoint(save_hf(small, tmp_path / "small")))


def test_bad_inputs(fam, tmp_path):
    pre_p, fts, *_ = fam
    with pytest.raises(ConfigError, match="M < T"):
        build_store(pre_p, fts, "pca", 6, tmp_path / "x")
    with pytest.raises(ConfigError, match="-M 0 .*needs --residual"):  # M = 0 is pure per-task compression
        build_store(pre_p, fts, "autoencoder", 0, tmp_path / "x")
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s")
    with pytest.raises(UnknownTaskError, match="nope"):
        store.reconstruct("nope")
    mf = json.loads((tmp_path / "s" / "tvbasis.json").read_text())
    mf["format_version"] = 99
    (tmp_path / "s" / "tvbasis.json").write_text(json.dumps(mf))
    with pytest.raises(StoreError, match="newer"):
        BasisStore.open(tmp_path / "s")
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "t")
    shard = tmp_path / "t" / "bases.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match="truncated"):
        BasisStore.open(tmp_path / "t")


def test_nonlinear_cluster_bases_chunked_equal_whole(fam, tmp_path, monkeypatch):
    import tvbasis.passes.materialise as st
    pre_p, fts, pre, sds = fam
    opts = {"inner": "ties", "inner_params": {"density": 0.3}}
    whole = build_store(pre_p, fts, "cluster", 3, tmp_path / "w", opts)
    monkeypatch.setattr(st, "MERGE_ROWS_ELEMENTS", 40)  # every tensor in several row chunks
    chunked = build_store(pre_p, fts, "cluster", 3, tmp_path / "c", opts)
    for t in whole.task_names:
        a = flat(whole.reconstruct(t).to_state_dict())
        b = flat(chunked.reconstruct(t).to_state_dict())
        assert torch.allclose(a, b, atol=1e-5)
        assert abs(whole.rel_errors[t] - chunked.rel_errors[t]) < 1e-5


def test_cluster_with_fisher_inner_merge(fam, tmp_path):
    from safetensors.torch import save_file
    pre_p, fts, pre, sds = fam
    fisher = {}
    for t, n in enumerate(fts):
        f = tmp_path / f"fisher{t}.safetensors"
        save_file({k: torch.full_like(v, float(t + 1)) for k, v in pre.items() if v.is_floating_point()}, str(f))
        fisher[n] = f
    store = build_store(pre_p, fts, "cluster", 3, tmp_path / "s", {"inner": "fisher"}, fisher=fisher)
    # constant Fisher weights per task: each basis is the (t+1)-weighted mean of its members
    k = "pooler.dense.weight"
    labels = store.labels
    bases = open_checkpoint(tmp_path / "s" / "bases.safetensors").get(k)
    for m in range(3):
        idx = [t for t in range(6) if labels[t] == m]
        ref = sum((t + 1) * (sds[t][k] - pre[k]) for t in idx) / sum(t + 1 for t in idx)
        assert torch.allclose(bases[m], ref, atol=1e-5)
    with pytest.raises(ConfigError, match="Fisher file per task"):
        build_store(pre_p, fts, "cluster", 3, tmp_path / "x", {"inner": "fisher"})
