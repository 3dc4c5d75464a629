"""aTLAS: coefficients learned on one task's examples pick that task's vector, against an independent scorer
(plain transformers, tests/userfiles.Scorer) over a grid of coefficients; saved coefficients re-apply exactly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.userfiles import MAX_LENGTH, Scorer, minilm_family, task_vector
from tvbasis.cli import main
from tvbasis.eval.atlas import AtlasSettings, atlas_vector, learn_coefficients
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.tasks import load_task
from tvbasis.io import open_checkpoint
from tvbasis.store import build_store
from tvbasis.vectors import TaskVector

pytestmark = pytest.mark.slow  # real MiniLM training steps: about 1 min per test on a loaded 2-core machine

TASKS = ("mcid", "DBPedia")
SCALE = 20.0  # the protocol's logit scale: 20 · cosine


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    m = minilm_family(tmp_path_factory)
    scorer = Scorer(m["pre"], MAX_LENGTH)
    task = load_task("mcid", max_train=64, max_dev=16, max_test=16, seed=0)
    rows = list(zip(task["dev"].texts, task["dev"].labels))
    heads = scorer.encode(list(task.label_texts))  # every class of the task, as its zero-shot head has
    gold = torch.tensor([y for _, y in rows])
    tv = {n: task_vector(m["pre"], m["fts"][n]) for n in TASKS}
    g = torch.Generator().manual_seed(0)  # a control component: random, each tensor the norm of mcid's
    tv["noise"] = {k: (lambda r, v=v: r * (v.norm() / r.norm()))(torch.randn(v.shape, generator=g))
                   for k, v in tv["mcid"].items()}
    return {**m, "scorer": scorer, "rows": rows, "heads": heads, "gold": gold, "tv": tv, "task": task}


def scored(fam, coefs):
    """(accuracy, mean cross-entropy, mean entropy) on mcid's dev rows at θ₀ + Σ_c coefs[c]·τ_c (per tensor
    when coefs[c] is a dict), by the independent scorer."""
    delta = {}
    for c, a in coefs.items():
        for k, v in fam["tv"][c].items():
            w = a.get(k, 0.0) if isinstance(a, dict) else a
            delta[k] = delta.get(k, 0) + w * v
    s = fam["scorer"]
    s.set(delta)
    try:
        logits = SCALE * s.encode([x for x, _ in fam["rows"]]) @ fam["heads"].T
    finally:
        s.set()
    acc = float((logits.argmax(-1) == fam["gold"]).float().mean())
    ce = float(torch.nn.functional.cross_entropy(logits, fam["gold"]))
    ent = float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean())
    return acc, ce, ent


def learn(fam, names, **kw):
    settings = AtlasSettings(**{"blockwise": False, "epochs": 4, "batch_size": 8, "lr": 0.4,
                                "max_length": MAX_LENGTH, **kw})
    enc = Encoder(fam["pre"], max_length=MAX_LENGTH)
    return learn_coefficients(enc, {n: fam["tv"][n] for n in names}, {"mcid": fam["task"]}, settings, split="dev")


def test_the_task_vector_of_the_data_dominates_a_random_control(fam):
    r = learn(fam, ("mcid", "noise"))
    a, b = (float(v) for v in r.coefficients[:, 0])
    # the reference, by the independent scorer on a grid: mcid's vector moves the loss, the control does not
    ref = {(x, y): scored(fam, {"mcid": x, "noise": y}) for x in (0.0, 1.0, 2.0) for y in (-0.5, 0.0, 0.5)}
    assert min(ref[(0.0, y)][1] for y in (-0.5, 0.0, 0.5)) > max(ref[(2.0, y)][1] for y in (-0.5, 0.0, 0.5))
    # learned: a positive weight on mcid's vector, and the loss drop is mcid's part of the edit, not the control's
    # (Adam moves every coefficient with a consistent gradient sign at about lr per step, so the control's
    # coefficient need not stay small; its effect does)
    assert a > 0.5 and a > b, (a, b)
    assert scored(fam, {"mcid": a})[1] < scored(fam, {"noise": b})[1] - 0.1
    acc, ce, _ = scored(fam, {"mcid": a, "noise": b})
    assert ce < ref[(0.0, 0.0)][1]
    assert acc == pytest.approx(r.history[r.best_epoch]["select_score"], abs=1 / 16 + 1e-9)
    assert acc >= ref[(0.0, 0.0)][0]


def test_blockwise_entropy_and_the_lazy_edit(fam):
    r = learn(fam, ("mcid", "noise"), blockwise=True, epochs=3)
    assert r.coefficients.shape == (2, len(r.blocks)) and len(r.blocks) > 10
    mean = r.mean_coefficients()
    assert mean["mcid"] > mean["noise"]
    # test-time adaptation: the entropy objective never reads a label, and lowers the entropy
    e = learn(fam, ("mcid", "DBPedia"), objective="entropy", epochs=2)
    ea, eb = (float(v) for v in e.coefficients[:, 0])
    assert scored(fam, {"mcid": ea, "DBPedia": eb})[2] <= scored(fam, {})[2] + 1e-6
    # the lazy edit is Σ_c a_{c,b}·τ_{c,b}, tensor by tensor
    vecs = {n: TaskVector.from_checkpoints(fam["pre"], fam["fts"][n]) for n in TASKS}
    keys = vecs["mcid"].keys()
    coefs = {"mcid": {k: 0.5 + i / 100 for i, k in enumerate(keys)}, "DBPedia": {k: -1.0 for k in keys[::2]}}
    edit = atlas_vector(vecs, coefs)
    for k in keys[:6]:
        want = coefs["mcid"][k] * fam["tv"]["mcid"][k] + coefs["DBPedia"].get(k, 0.0) * fam["tv"]["DBPedia"][k]
        assert torch.allclose(edit.get(k), want, atol=1e-6), k


def test_cli_learns_saves_and_reapplies(fam, tmp_path, capsys):
    dev = ["--task", f"mcid={fam['dev']['mcid']}", "--max-length", str(MAX_LENGTH)]
    fts = [a for n in TASKS for a in ("--finetuned", f"{n}={fam['fts'][n]}")]
    base = ["-q", "tune", "--pretrained", str(fam["pre"]), *dev, "--method", "atlas"]
    coefs = tmp_path / "coefs.json"
    assert main([*base, *fts, "--scalar", "--epochs", "1", "--save-coefficients", str(coefs),
                 "--out", str(tmp_path / "m1")]) == 0
    saved = json.loads(coefs.read_text())
    pre, m1 = open_checkpoint(fam["pre"]), open_checkpoint(tmp_path / "m1")
    for k in list(fam["tv"]["mcid"])[:6]:
        want = pre.get(k).float() + sum(saved["coefficients"][c][k] * fam["tv"][c][k] for c in TASKS)
        assert torch.allclose(m1.get(k).float(), want, atol=1e-5), k
    assert main([*base, *fts, "--apply-coefficients", str(coefs), "--out", str(tmp_path / "m2")]) == 0
    m2 = open_checkpoint(tmp_path / "m2")
    assert all(torch.equal(m1.get(k), m2.get(k)) for k in m1.keys())
    # over a store's bases: the components are the bases
    store = build_store(fam["pre"], fam["fts"], method="pca", M=1, out=tmp_path / "store")
    assert main([*base, "--store", str(store.root), "--scalar", "--epochs", "1", "--save-coefficients",
                 str(tmp_path / "sc.json")]) == 0
    assert set(json.loads((tmp_path / "sc.json").read_text())["components"]) >= {"basis0"}
    capsys.readouterr()
    assert main([*base, *fts, "--negate", "mcid", "--control", "DBPedia"]) != 0
    err = capsys.readouterr().err
    assert "--negate" in err and len(err.strip().splitlines()) == 1


def test_bench_rows_of_the_issue_on_a_tiny_config(fam, tmp_path):
    """The bench rows wired end to end on the session's cached 1-layer fine-tunes (the few-shot store row needs
    three tasks, so only the task-vector source runs here)."""
    from tvbasis.bench.bench import BenchConfig, run_bench

    cfg = BenchConfig(tasks=TASKS, work=str(fam["work"]), out=str(tmp_path / "bench"), num_layers=1, max_train=64,
                      max_dev=8, max_test=16, max_length=MAX_LENGTH, grid=(0.5, 1.0), neg_grid=(1.0,), Ms=(1,),
                      methods=("random-sample",), stitch=False, merges=False, plots=False, progress=False,
                      fl_merges=True, atlas=True, atlas_shots=(2,), atlas_epochs=1, linearized=True)
    result = run_bench(cfg)
    rows = {r["method"]: r for r in result["rows"]}
    for label in ("AWD (task arithmetic)", "FedNova", "FedGMA (rho 0.5)", "median", "CClip (rho = min norm)",
                  "aTLAS (per-tensor, dev-trained)", "aTLAS few-shot k=2 (task vectors)",
                  "tangent task arithmetic (linearised fine-tunes)"):
        assert label in rows, label
        assert 0.0 <= rows[label]["addition"]["mean_test"] <= 1.0
    # equal step counts: FedNova is the mean, so its dev curve at λ is task arithmetic's at λ/2 (two code paths)
    ta, nova = rows["task arithmetic (sum)"]["addition"]["curve"], rows["FedNova"]["addition"]["curve"]
    assert nova["1.0"] == pytest.approx(ta["0.5"]) and nova["2.0"] == pytest.approx(ta["1.0"])
    few = rows["aTLAS few-shot k=2 (task vectors)"]["extra"]
    assert few["target"] == "mcid" and few["from"] == ["DBPedia"]
    assert few["train_examples"] <= 2 * fam["task"].num_classes
    lin = rows["tangent task arithmetic (linearised fine-tunes)"]
    assert len(lin["negation"]) == len(result["config"]["pairs"])
    assert (fam["work"] / "finetuned" / "linear" / "mcid").is_dir()
    assert "FedGMA (rho 0.5)" in result["markdown"]
