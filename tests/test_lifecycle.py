"""remove-task and rename-task: one new generation under the lock; the remaining tasks' reconstructions unchanged
and still measured against the dense task vectors computed here; refusals leave the store byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tinymodels import dense_vector, make_family
from tvbasis.cli import main
from tvbasis.errors import ConfigError, UnknownTaskError
from tvbasis.store import BasisStore, build_store
from tvbasis.store.lifecycle import remove_task, rename_task

STORES = {
    "pca": dict(method="pca", M=2),
    "cluster": dict(method="cluster", M=2, options={"inner": "mean"}),
    "residual-int8": dict(method="pca", M=1, residual="int8"),
    "lowrank-M0": dict(method="pca", M=0, residual="lowrank:rank=2"),
    "tall": dict(method="tall", M=None),
}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("life")
    pre_p, fts, pre, sds = make_family(root, T=4, clusters=2)
    vecs = {n: dense_vector(pre, sd) for n, sd in zip(fts, sds)}
    return root, pre_p, fts, vecs


def _build(fam, kind: str, out: Path) -> BasisStore:
    _, pre_p, fts, _ = fam
    kw = dict(STORES[kind])
    return build_store(pre_p, fts, kw.pop("method"), kw.pop("M"), out, **kw)


def _dense(store: BasisStore, task: str) -> dict[str, torch.Tensor]:
    tv = store.reconstruct(task)
    return {k: tv.get(k).clone() for k in tv.keys()}


def _rel(got: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[k].double() - v[k]).pow(2).sum()) for k in got)
    return (num / sum(float(v[k].pow(2).sum()) for k in got)) ** 0.5


@pytest.mark.parametrize("kind", list(STORES))
def test_remove_keeps_the_other_tasks_exactly(fam, tmp_path, kind):
    _, _, _, vecs = fam
    store = _build(fam, kind, tmp_path / "s")
    before = {t: _dense(store, t) for t in store.task_names}
    errors = store.rel_errors
    gen = store.manifest.generation
    coded_before = store.manifest.coded.nbytes("residual/") if store.manifest.coded is not None else 0
    new = remove_task(store, "task1")
    assert new.task_names == ["task0", "task2", "task3"]
    assert new.manifest.generation > gen
    assert new.verify() == []
    with pytest.raises(UnknownTaskError):
        new.reconstruct("task1")
    for t in new.task_names:
        after = _dense(new, t)
        for k in after:
            assert torch.equal(after[k], before[t][k]), (t, k)
        # the reported error is still the measured one, against the dense vector written here
        assert new.rel_errors[t] == pytest.approx(errors[t], abs=1e-12)
        assert _rel(after, vecs[t]) == pytest.approx(new.rel_errors[t], rel=1e-3, abs=1e-5)
    # the Gram matrix is the remaining tasks' inner products, computed here
    keys = sorted(next(iter(vecs.values())))
    V = np.stack([torch.cat([vecs[t][k].reshape(-1) for k in keys]).numpy() for t in new.task_names], 1)
    np.testing.assert_allclose(new.gram, V.T @ V, rtol=1e-5)
    if store.manifest.coded is not None and store.manifest.has_residuals:
        assert new.manifest.coded.nbytes("residual/") < coded_before
    reopened = BasisStore.open(tmp_path / "s")
    assert reopened.task_names == new.task_names


@pytest.mark.parametrize("kind", ["pca", "residual-int8", "tall"])
def test_rename_keeps_the_data(fam, tmp_path, kind):
    store = _build(fam, kind, tmp_path / "s")
    before = _dense(store, "task2")
    err = store.rel_errors["task2"]
    new = rename_task(store, "task2", "sst/2 é")
    assert new.task_names == ["task0", "task1", "sst/2 é", "task3"]
    assert new.verify() == []
    after = _dense(new, "sst/2 é")
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert new.rel_errors["sst/2 é"] == err
    with pytest.raises(UnknownTaskError):
        new.reconstruct("task2")
    # and back, then a removal of the renamed task
    back = rename_task(new, "sst/2 é", "task2")
    assert back.task_names == store.task_names
    assert remove_task(back, "task2").T == 3


def test_refusals_leave_the_store_unchanged(fam, tmp_path):
    store = _build(fam, "residual-int8", tmp_path / "s")
    manifest = (tmp_path / "s" / "tvbasis.json").read_bytes()
    files = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != ".tvbasis.lock")
    with pytest.raises(UnknownTaskError):
        remove_task(store, "nosuch")
    with pytest.raises(ConfigError, match="already has a task named 'task0'"):
        rename_task(store, "task1", "task0")
    for bad in ("", "all", "a=b", "a,b", "x\ny"):
        with pytest.raises(ConfigError, match="invalid task name"):
            rename_task(store, "task1", bad)
    with pytest.raises(UnknownTaskError):
        rename_task(store, "nosuch", "x")
    assert (tmp_path / "s" / "tvbasis.json").read_bytes() == manifest
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != ".tvbasis.lock") == files


def test_removing_the_last_task_is_refused(fam, tmp_path):
    store = _build(fam, "pca", tmp_path / "s")
    for t in ["task0", "task1", "task2"]:
        store = remove_task(store, t)
    manifest = (tmp_path / "s" / "tvbasis.json").read_bytes()
    with pytest.raises(ConfigError, match="only task"):
        remove_task(store, "task3")
    assert (tmp_path / "s" / "tvbasis.json").read_bytes() == manifest


def test_lora_stores(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from tests.servemodels import lora_family
    from tvbasis.store.lora_factor_space import build_lora_store

    pre_p, ads, pre, merged = lora_family(tmp_path, T=3, target_modules=["query", "value"])
    for method, kw in (("factors", {}), ("joint", {"k": 4, "clusters": 2})):
        store = build_lora_store(pre_p, ads, tmp_path / method, method=method, **kw)
        before = {t: _dense(store, t) for t in store.task_names}
        # remove every member of one joint cluster: its shared bases go with the last one
        labels = [t.cluster for t in store.manifest.tasks]
        gone = [store.task_names[i] for i, c in enumerate(labels) if c == labels[0]] if method == "joint" \
            else ["task0"]
        if len(gone) == store.T:
            gone = gone[:-1]
        for t in gone:
            store = remove_task(store, t)
        store = rename_task(store, store.task_names[0], "kept")
        assert store.verify() == []
        kept_old = [t for t in before if t not in gone][0]
        after = _dense(store, "kept")
        assert all(torch.equal(after[k], before[kept_old][k]) for k in after)
        if method == "factors":  # exact: the adapter's own ΔW, from PEFT's merge
            for k in after:
                torch.testing.assert_close(after[k].double(), merged[kept_old][k].double() - pre[k].double(),
                                           rtol=0, atol=1e-6)
        if method == "joint":
            shared = {k.split("/")[1] for k in store.manifest.coded.entries if k.startswith("shared/")}
            assert shared == {str(t.cluster) for t in store.manifest.tasks}


def test_cli(fam, tmp_path, capsys):
    _build(fam, "residual-int8", tmp_path / "s")
    assert main(["-q", "remove-task", str(tmp_path / "s"), "task3"]) == 0
    out = capsys.readouterr().out
    assert "task3" in out and "task0" in out  # the errors after, per remaining task
    assert main(["-q", "rename-task", str(tmp_path / "s"), "task0", "first", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ["first", "task1", "task2"]
    assert BasisStore.open(tmp_path / "s").task_names == ["first", "task1", "task2"]
    assert main(["-q", "remove-task", str(tmp_path / "s"), "nosuch"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0]
    assert main(["-q", "rename-task", str(tmp_path / "s"), "task1", "all"]) != 0
    capsys.readouterr()
    assert main(["remove-task", "--help"]) == 0
    assert "bases are kept" in capsys.readouterr().out
