"""``tvbasis tune``: λ chosen on the user's dev files (addition, per-task addition, negation, a combination over a
store) equals an independent search written here with plain transformers calls; the chosen model is written."""

from __future__ import annotations

import json

import pytest
import torch

from tests.userfiles import MAX_LENGTH, Scorer, minilm_family, task_vector
from tvbasis.cli import main
from tvbasis.eval.metrics import choose_lambda
from tvbasis.eval.tasks import label_text
from tvbasis.io import open_checkpoint
from tvbasis.store import build_store

TASKS = ("mcid", "DBPedia")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return minilm_family(tmp_path_factory)


@pytest.fixture(scope="module")
def ref(minilm):
    """The independent scorer at θ₀, each task's dev rows, classes and θ₀ heads, and the task vectors."""
    s = Scorer(minilm["pre"], MAX_LENGTH)
    out = {"scorer": s, "tv": {n: task_vector(minilm["pre"], minilm["fts"][n]) for n in TASKS}, "dev": {}}
    for n in TASKS:
        rows = minilm["rows"][(n, "dev")]
        classes = sorted({y for _, y in rows})
        out["dev"][n] = (rows, classes, s.encode([label_text(c, n) for c in classes]))
    return out


def accs(ref, delta=None, scale=1.0, tasks=TASKS) -> dict[str, float]:
    s = ref["scorer"]
    s.set(delta, scale)
    try:
        return {n: s.accuracy(*ref["dev"][n]) for n in tasks}
    finally:
        s.set()


def combo(ref, coefs: dict[str, float]) -> dict[str, torch.Tensor]:
    keys = ref["tv"][TASKS[0]]
    return {k: sum(c * ref["tv"][t][k] for t, c in coefs.items()) for k in keys}


def best(scores: dict[float, float]) -> float:
    """The grid point of the highest score, the smallest on ties."""
    return max(sorted(scores), key=lambda lam: (scores[lam], -lam))


def dev_args(minilm) -> list[str]:
    return [a for n in TASKS for a in ("--task", f"{n}={minilm['dev'][n]}")] + ["--max-length", str(MAX_LENGTH)]


def ft_args(minilm) -> list[str]:
    return [a for n in TASKS for a in ("--finetuned", f"{n}={minilm['fts'][n]}")]


def test_addition_lambda_and_written_model(minilm, ref, tmp_path):
    grid = [0.5, 1.0]
    out, js = tmp_path / "model", tmp_path / "t.json"
    assert main(["-q", "tune", "--pretrained", str(minilm["pre"]), *ft_args(minilm), *dev_args(minilm),
                 "--grid", ",".join(map(str, grid)), "--out", str(out), "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    total = combo(ref, {t: 1.0 for t in TASKS})
    scores = {lam: sum(accs(ref, total, lam).values()) / len(TASKS) for lam in grid}
    lam = best(scores)
    assert r["mode"] == "addition" and r["lambda"] == lam and r["score"] == pytest.approx(scores[lam])
    assert r["dev"] == pytest.approx(accs(ref, total, lam))
    assert r["pretrained_dev"] == pytest.approx(accs(ref))
    m, pre = open_checkpoint(out), open_checkpoint(minilm["pre"])
    for k in ("embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.weight"):
        assert torch.allclose(m.get(k), pre.get(k) + lam * total[k], atol=1e-6)


def test_negation_keeps_the_control(minilm, ref, tmp_path):
    grid = [0.5, 1.0, 2.0]
    js = tmp_path / "n.json"
    assert main(["-q", "tune", "--pretrained", str(minilm["pre"]), *ft_args(minilm), *dev_args(minilm),
                 "--negate", "DBPedia", "--control", "mcid", "--grid", ",".join(map(str, grid)),
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    floor = 0.95 * accs(ref, tasks=("mcid",))["mcid"]
    target: dict[float, float] = {}
    for lam in grid:  # walk λ upwards; stop at the first λ that breaks the control (the benchmark's search)
        a = accs(ref, ref["tv"]["DBPedia"], -lam)
        if a["mcid"] < floor:
            break
        target[lam] = a["DBPedia"]
    want = min(target, key=lambda lam: (target[lam], lam)) if target else 0.0
    assert r["mode"] == "negation" and r["lambda"] == want
    assert r["negation"]["feasible"] == bool(target)
    if target:
        assert r["dev"]["DBPedia"] == pytest.approx(target[want]) and r["dev"]["mcid"] >= floor


def test_per_task_lambdas_are_coordinate_optimal(minilm, ref, tmp_path):
    grid = [0.5, 1.0]
    js = tmp_path / "p.json"
    assert main(["-q", "tune", "--pretrained", str(minilm["pre"]), *ft_args(minilm), *dev_args(minilm),
                 "--per-task", "--rounds", "4", "--grid", "0.5,1.0", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    lams = r["lambdas"]
    assert set(lams) == set(TASKS) and all(v in grid for v in lams.values())

    def score(coefs: dict[str, float]) -> float:
        return sum(accs(ref, combo(ref, coefs)).values()) / len(TASKS)

    got = score(lams)
    assert r["score"] == pytest.approx(got)
    assert r["rounds"][0]["score"] <= got + 1e-12  # never worse than the best shared λ it starts from
    assert r["rounds"][-1]["lambdas"] == r["rounds"][-2]["lambdas"]  # converged: the last round changed nothing
    for t in TASKS:  # no single task's λ on the grid does better
        for g in grid:
            if g != lams[t]:
                assert score({**lams, t: g}) <= got + 1e-12, (t, g)


def test_combination_over_a_store(minilm, ref, tmp_path):
    # T = 2 and M = 1: a PCA store reconstructs both task vectors exactly (μ + one direction)
    store = build_store(minilm["pre"], {n: minilm["fts"][n] for n in TASKS}, "pca", 1, tmp_path / "store")
    grid = [0.5, 1.0]
    js = tmp_path / "c.json"
    assert main(["-q", "tune", "--pretrained", str(minilm["pre"]), "--store", str(store.root),
                 "--task", f"mcid={minilm['dev']['mcid']}", "--max-length", str(MAX_LENGTH),
                 "--combine", "mcid=1,DBPedia=-0.5",
                 "--grid", "0.5,1.0", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    delta = combo(ref, {"mcid": 1.0, "DBPedia": -0.5})
    scores = {lam: accs(ref, delta, lam, ("mcid",))["mcid"] for lam in grid}
    assert r["mode"] == "combine" and r["lambda"] == best(scores)


def test_choose_lambda_is_the_benchmarks_search():
    calls: list[float] = []

    def score(lam: float) -> float:
        calls.append(lam)
        return -abs(lam - 0.55)

    grid = [round(0.05 * i, 2) for i in range(1, 21)]
    lam, curve = choose_lambda(grid, score, "refine")
    assert lam == 0.55 and len(calls) <= 9 and set(curve) == set(calls)
    lam, curve = choose_lambda([0.2, 0.1, 0.3], lambda x: 1.0)
    assert lam == 0.1 and list(curve) == [0.1, 0.2, 0.3]  # ties go to the smallest λ, every point scored


def test_tune_errors_are_one_line(minilm, tmp_path, capsys):
    base = ["tune", "--pretrained", str(minilm["pre"])]
    cases = [
        ([*ft_args(minilm), *dev_args(minilm), "--negate", "DBPedia"], "--control"),
        ([*ft_args(minilm), *dev_args(minilm), "--negate", "DBPedia", "--control", "mcid", "--per-task"],
         "--per-task"),
        ([*dev_args(minilm)], "--finetuned"),
        ([*ft_args(minilm)], "--task"),
        ([*ft_args(minilm), *dev_args(minilm), "--test", f"mcid={minilm['test']['mcid']}"], "same tasks"),
        ([*ft_args(minilm), *dev_args(minilm), "--add", "mcid,nope"], "'nope'"),
        ([*ft_args(minilm), *dev_args(minilm), "--grid", "a,b"], "bad λ grid"),
    ]
    for args, frag in cases:
        assert main([*base, *args]) != 0, args
        err = capsys.readouterr().err.strip()
        assert frag in err and len(err.splitlines()) == 1, (args, err)
