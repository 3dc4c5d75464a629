"""The frontier benchmark's parts on a tiny model built here: every configuration's compressed vectors and byte
counts against closed forms and independent references (dense masks, the store's own reconstructions), the
per-row assembly through a stand-in evaluator, Pareto fronts and the goals check against brute force, the table,
the plots and the CLI flag. The real-model run is ``tvbasis bench --frontier`` itself."""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tinymodels import make_family
from tvbasis.bench.bench import BenchConfig, _state
from tvbasis.bench.frontier import (
    PEER_FAMILIES,
    PLANS,
    Config,
    Context,
    annotate,
    compress,
    default_configs,
    dominating,
    goals,
    make_plots,
    markdown_table,
    measure,
    pareto_front,
    run_frontier,
    timing_breakdown,
    timing_lines,
)
from tvbasis.compress import TALL_LAMBDAS, CodecPlan, tensor_kind, truncated_svd, tsvc_compress
from tvbasis.errors import ConfigError
from tvbasis.eval.metrics import AdditionResult, NegationResult
from tvbasis.store import BasisStore
from tvbasis.vectors import TaskVector

T = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    pre, fts, _, _ = make_family(root, T=T, seed=2)
    tasks = list(fts)
    tvs = {t: _state(TaskVector.from_checkpoints(pre, fts[t])) for t in tasks}
    return root, pre, {t: str(p) for t, p in fts.items()}, tasks, tvs


def _ctx(family, dev=None, keep=False) -> Context:
    root, pre, fts, tasks, tvs = family
    return Context(tasks, tvs, Path(pre), fts, root / "stores", keep, dev or (lambda v, t: 0.0))


def _numel(tvs) -> dict[str, int]:
    return {k: x.numel() for k, x in next(iter(tvs.values())).items()}


def test_byte_counts_of_the_peers(family) -> None:
    ctx = _ctx(family)
    n = _numel(ctx.tvs)
    D = sum(n.values())
    shapes = {k: tuple(x.shape) for k, x in ctx.tvs[ctx.tasks[0]].items()}
    assert compress(Config("f", "task vectors", "full"), ctx).nbytes == T * 4 * D
    for bits in (2, 3, 4):
        c = compress(Config("q", "TVQ / RTVQ", "tvq", {"bits": bits}), ctx)
        assert c.nbytes == T * sum(math.ceil(v * bits / 8) + 8 for v in n.values())
    c = compress(Config("r", "TVQ / RTVQ", "rtvq", {"base_bits": 3, "offset_bits": 2}), ctx)
    assert c.nbytes == sum((math.ceil(3 * v / 8) + 8) + T * (math.ceil(2 * v / 8) + 8) for v in n.values())
    c = compress(Config("s", "TSV-C", "tsvc"), ctx)
    # the store keeps U·diag(s) and V (4·k·(m + n)); the authors' code keeps U, s and V apart (4·k·(m + n + 1))
    want = sum(4 * int(min(s) * (1 / T)) * (s[0] + s[1]) if len(s) == 2 else 4 * math.prod(s)
               for s in shapes.values())
    assert c.nbytes == T * want
    for t in ctx.tasks:  # the store gives TSV-C's truncation (against torch.linalg.svd)
        for k, x in ctx.tvs[t].items():
            assert torch.allclose(c.vectors[t][k], tsvc_compress(x, T)[0], atol=1e-5)
    c = compress(Config("b", "BitDelta", "bitdelta"), ctx)
    linear = [k for k in n if ".layer." in k and k.endswith("weight") and len(shapes[k]) == 2]
    assert c.nbytes == T * sum(math.ceil(n[k] / 8) + 2 if k in linear else 2 * n[k] for k in n)


def test_tall_chooses_lambda_per_task_on_dev(family) -> None:
    """The stand-in dev score is −‖v̂ − v_t‖: the chosen λ_t must be the grid's best by a dense re-computation."""
    _, _, _, tasks, tvs = family
    keys = sorted(tvs[tasks[0]])
    V = {t: np.concatenate([tvs[t][k].double().numpy().ravel() for k in keys]) for t in tasks}
    mtl = sum(V.values())

    def dense_err(t: str, lam: float) -> float:
        m = np.abs(V[t]) >= lam * np.abs(mtl - V[t])
        return float(np.linalg.norm(np.where(m, mtl, 0.0) - V[t]))

    def dev(v, t):
        return -math.sqrt(sum(float((v[k].double() - tvs[t][k].double()).pow(2).sum()) for k in v))

    c = compress(Config("tall", "TALL", "tall"), _ctx(family, dev))
    D = sum(_numel(tvs).values())
    assert c.nbytes == sum(4 * v + T * math.ceil(v / 8) for v in _numel(tvs).values()) and c.nbytes < 4 * D * 2
    for k in keys:  # TALL's multi-task vector for addition is its stored τ_MTL = Σ_t τ_t
        assert torch.allclose(c.addition[k], sum(tvs[t][k] for t in tasks))
    for t in tasks:
        errs = {lam: dense_err(t, lam) for lam in TALL_LAMBDAS}
        best = min(errs.values())
        near = [lam for lam, e in errs.items() if e <= best * (1 + 1e-5) + 1e-9]
        assert c.extra["lambda"][t] in near
        got = np.concatenate([c.vectors[t][k].double().numpy().ravel() for k in keys])
        lam = c.extra["lambda"][t]
        m = np.abs(V[t]) >= lam * np.abs(mtl - V[t])
        close = np.abs(np.abs(V[t]) - lam * np.abs(mtl - V[t])) > 1e-6
        np.testing.assert_allclose(got[close], np.where(m, mtl, 0.0)[close], rtol=1e-5, atol=1e-7)


def test_plans_and_bases_rows(family) -> None:
    ctx = _ctx(family)
    spec = "embedding=sparse-rows+int8;matrix=lowrank:rank=3+int8;vector=float16"
    c = compress(Config("p", "tvbasis M=0", "plan", {"plan": spec}), ctx)
    plan = CodecPlan.parse(spec)
    want = sum(plan.codec_for(k, tuple(x.shape)).encode(x).nbytes for t in ctx.tasks for k, x in ctx.tvs[t].items())
    assert c.nbytes == want
    # the store alone: the vectors are the store's own reconstructions, bytes its bases + mean + coefficients
    M = 2
    c = compress(Config("s", "basis store", "bases", {"basis": "pca", "bases_plan": None, "residual": None}, M),
                 _ctx(family, keep=True))
    store = BasisStore.open(ctx.stores / "frontier-s")  # every row is a store on disk, named after its label
    D = sum(_numel(ctx.tvs).values())
    assert c.nbytes == 4 * (M + 1) * D + 4 * T * (M + 1)
    for t in ctx.tasks:
        ref = store.reconstruct(t).to_state_dict()
        for k in ref:
            assert torch.allclose(c.vectors[t][k], ref[k], atol=1e-6)
    # coded bases + a lossless residual plan: every task comes back exactly, whatever the bases' coding error
    lossless = "embedding=float32;matrix=float32;vector=float32"
    store_dir = ctx.stores / "frontier-s"
    store.close()
    shutil.rmtree(store_dir)
    c = compress(Config("r", "tvbasis M=2", "bases",
                        {"basis": "pca", "bases_plan": "embedding=none;matrix=int2;vector=float16",
                         "residual": lossless}, M), ctx)
    for t in ctx.tasks:
        for k, x in ctx.tvs[t].items():
            assert torch.allclose(c.vectors[t][k], x, atol=1e-6)
    assert c.extra["per_task_bytes"] == T * 4 * D and c.extra["coded_bases_bytes"] > 0
    assert c.extra["dense_bytes"] == 0  # the bases are coded, not dense
    assert not (ctx.stores / "frontier-r").exists()  # keep_stores=False: removed once read
    assert c.nbytes == c.extra["coded_bases_bytes"] + c.extra["per_task_bytes"] + c.extra["coefficient_bytes"]


def test_default_configs_cover_peers_and_budgets() -> None:
    cs = default_configs(6)
    methods = {c.method for c in cs}
    assert methods == {"full", "tall", "tsvc", "tvq", "rtvq", "bitdelta", "deltacome", "ultradelta", "plan", "bases",
                       "budget"}
    budgets = ["16x", "32x", "64x", "128x", "256x"]
    plain = [c for c in cs if c.method == "budget" and "calibration" not in c.params and "probe" not in c.params]
    assert [c.params["budget"] for c in plain] == budgets
    assert [c.params["budget"] for c in cs if c.method == "budget" and c.params.get("calibration")] == budgets[2:]
    assert [c.params["budget"] for c in cs if c.method == "budget" and c.params.get("probe")] == budgets[2:]
    assert {c.family for c in cs if c.method in ("deltacome", "ultradelta")} <= set(PEER_FAMILIES)
    assert {c.M for c in cs if c.method == "bases"} == {1, 2, 4}
    assert len({c.label for c in cs}) == len(cs)
    assert all(c.M < 3 for c in default_configs(3))
    for spec in PLANS.values():
        CodecPlan.parse(spec)
    assert tensor_kind("embeddings.position_embeddings.weight", (512, 384)) == "embedding"


class StandIn:
    """An evaluator stand-in: accuracy of θ₀ + λ·δ on task t is 1 − ‖λδ − v_t‖/(2‖v_t‖)."""

    def __init__(self, tvs):
        self.tvs = tvs

    def acc(self, delta, scale, t) -> float:
        v = self.tvs[t]
        num = sum(float((scale * delta[k] - v[k]).pow(2).sum()) for k in v)
        return 1 - math.sqrt(num / sum(float(x.pow(2).sum()) for x in v.values())) / 2

    def with_delta(self, delta, scale, split, tasks):
        return {t: self.acc(delta, scale, t) for t in tasks}

    def search_addition(self, delta, grid, finetuned_dev, finetuned_test, search):
        lam = max(grid)
        test = {t: self.acc(delta, lam, t) for t in self.tvs}
        return AdditionResult(lam, test, test, {t: test[t] / finetuned_test[t] for t in test})

    def search_negation(self, delta, target, control, grid, early_stop):
        a = self.acc(delta, -1.0, target)
        return NegationResult(target, control, 1.0, a, 0.9, a, 0.9, 0.5, 0.9, 0.9, True)


def test_measure_assembles_rows(family) -> None:
    ctx = _ctx(family)
    ev = StandIn(ctx.tvs)
    ft = {t: 0.8 for t in ctx.tasks}
    cfg = BenchConfig(tasks=("banking", "clinc"), grid=(0.5, 1.0), pairs=((ctx.tasks[0], ctx.tasks[1]),),
                      progress=False)
    rows = measure([Config("f", "task vectors", "full"), Config("q", "TVQ / RTVQ", "tvq", {"bits": 2})],
                   ctx, ev, ft, ft, cfg)
    full, q = rows
    assert full["per_task_mean"] == 1.0 and full["rel_errors"][ctx.tasks[0]] == 0.0
    assert full["compression"] == pytest.approx(1.0) and q["compression"] > 10
    for t in ctx.tasks:  # per-task = stand-in accuracy at λ = 1 / fine-tuned accuracy
        xhat = compress(Config("q", "TVQ / RTVQ", "tvq", {"bits": 2}), ctx).vectors[t]
        assert q["per_task"][t] == pytest.approx(ev.acc(xhat, 1.0, t) / 0.8)
        assert q["rel_errors"][t] == pytest.approx(2 * (1 - ev.acc(xhat, 1.0, t)), rel=1e-6)
    assert q["addition"]["lam"] == 1.0 and len(q["negation"]) == 1 and q["peer"] and not q["tvbasis"]
    for r in rows:  # the phases are disjoint slices of the row's wall time
        ph = r["phase_seconds"]
        assert set(ph) == {"compress", "per_task", "addition", "negation"} and min(ph.values()) >= 0
        assert sum(ph.values()) == pytest.approx(r["seconds"], abs=0.05)


def test_a_failing_row_is_named(family) -> None:
    ctx = _ctx(family)
    ev = StandIn(ctx.tvs)
    ft = {t: 0.8 for t in ctx.tasks}
    cfg = BenchConfig(tasks=("banking", "clinc"), grid=(0.5, 1.0), pairs=(), progress=False)

    def broken(c, ctx, seed):
        if c.label == "bad":
            raise ConfigError("--method ultradelta: allocation out of range")
        return compress(c, ctx, seed)

    with pytest.raises(ConfigError, match=r"frontier row 'bad' \(1 of 2 rows done\): --method ultradelta: "
                                          r"allocation out of range; with --resume"):
        measure([Config("f", "task vectors", "full"), Config("bad", "TVQ / RTVQ", "tvq")], ctx, ev, ft, ft, cfg,
                compressor=broken)


def test_timing_breakdown_by_phase() -> None:
    rows = [{"label": "a", "seconds": 10.0, "phase_seconds": {"compress": 1.0, "per_task": 2.0, "addition": 3.0,
                                                              "negation": 4.0}},
            {"label": "b", "seconds": 20.0, "phase_seconds": {"compress": 5.0, "per_task": 5.0, "addition": 5.0,
                                                              "negation": 5.0}},
            {"label": "old", "seconds": 7.0}]
    result = {"rows": rows, "timings": {"finetune": 60.0, "total": 120.0, "lora": 13.0, "threads": 2}}
    b = timing_breakdown(result)
    # 120 total = 60 fine-tuning + 37 in rows + 13 LoRA + 10 set-up
    assert b == {"fine-tuning": 60.0, "set-up evaluations": 10.0, "rows: compress": 6.0, "rows: per_task": 7.0,
                 "rows: addition": 8.0, "rows: negation": 9.0, "rows (unsplit)": 7.0, "LoRA rows": 13.0,
                 "total": 120.0}
    md = "\n".join(timing_lines(result))
    assert "| fine-tuning | 1.0 | 50 |" in md and "Slowest rows: b 20 s; a 10 s; old 7 s." in md


def _row(label, family, nbytes, per_task, add, tvb, peer, neg=()):
    return {"label": label, "family": family, "bytes_stored": nbytes, "compression": 1000 / nbytes,
            "per_task_mean": per_task, "per_task_min": per_task, "addition": {"mean_normalized_test": add,
                                                                              "lam": 0.5},
            "tvbasis": tvb, "peer": peer, "rel_errors": {"a": 0.1}, "method": "full" if label == "full" else "x", "M": 0,
            "negation": [{"target": "a", "control": "b", "target_test": n, "control_retained": c, "lam": 0.5,
                          "feasible": True} for n, c in neg]}


def test_pareto_front_and_goals_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    pts = [(float(b), float(a)) for b, a in zip(rng.integers(1, 20, 40), rng.random(40).round(2))]
    front = pareto_front(pts)
    brute = sorted({p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts)})
    assert sorted(set(front)) == brute
    rows = [_row("full", "task vectors", 1000, 1.0, 0.93, False, False, [(0.30, 0.99)]),
            _row("peerA", "TALL", 200, 0.99, 0.92, False, True),
            _row("peerB", "TVQ / RTVQ", 50, 0.999, 0.95, False, True),
            _row("tvbA", "tvbasis M=0", 10, 0.995, 0.94, True, False, [(0.31, 0.97)]),
            _row("tvbB", "tvbasis M=0", 100, 0.999, 0.931, True, False, [(0.40, 0.99)])]
    g = goals({"rows": rows})
    assert g["per_task_at_64x"] == ["tvbA"]                                # 100× at 0.995
    for peer in (rows[1], rows[2]):                                        # brute force over tvbasis rows
        want = [r["label"] for r in rows if r["tvbasis"] and r["bytes_stored"] <= peer["bytes_stored"]
                and r["per_task_mean"] >= peer["per_task_mean"]
                and r["addition"]["mean_normalized_test"] >= peer["addition"]["mean_normalized_test"]]
        assert [r["label"] for r in dominating(peer, rows)] == want
    assert g["peers_dominated_by"] == {"peerA": "tvbA", "peerB": None}
    assert g["addition_at_least_task_arithmetic"] == ["tvbA", "tvbB"]
    assert g["negation_within_2_points"] == ["tvbA"]                      # tvbB: 10 points worse than true


def test_table_and_plots(tmp_path: Path) -> None:
    rows = [_row("full", "task vectors", 1000, 1.0, 0.93, False, False, [(0.30, 0.99)]),
            _row("TALL masks", "TALL", 200, 0.99, 0.92, False, True, [(0.35, 0.98)]),
            _row("plan x", "tvbasis M=0", 10, 0.995, 0.94, True, False, [(0.31, 0.97)]),
            _row("plan y", "tvbasis M=0", 20, 0.997, 0.94, True, False, [(0.31, 0.97)])]
    result = {"rows": rows, "all_vectors_bytes": 1000,
              "zero_shot": {"test": {"a": 0.5, "b": 0.6}, "normalized_test": {"a": 0.6, "b": 0.7}},
              "finetuned": {"test": {"a": 0.8, "b": 0.9}}}
    result["goals"] = goals(result)
    md = markdown_table(result)
    assert ("| plan x | tvbasis M=0 | 0.0 kB | 100.0 |  | 99.5 / 99.5 | 0.100 (0.100) | 0.50 | 94.0 |  | "
            "31.0 (97.0) λ=0.50 |") in md
    assert "TALL masks: dominated by plan x" in md and "per-task ≥ 0.99 at ≥ 64×: plan x" in md
    paths = make_plots(result, tmp_path)
    assert [p.name for p in paths] == ["frontier_per_task.png", "frontier_addition.png", "frontier_per_task_min.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_cli_flag_and_bad_m() -> None:
    from tvbasis.cli.bench import register

    p = argparse.ArgumentParser(prog="tvbasis")
    register(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["bench", "--frontier", "--full"])
    assert a.frontier and a.full and a.fn.__name__ == "cmd_bench"
    assert not p.parse_args(["bench"]).frontier
    with pytest.raises(ConfigError, match="M must"):  # checked before any fine-tuning or loading
        run_frontier(BenchConfig(tasks=("banking", "clinc", "hwu")), Ms=(3,))


def test_fast_svd_matches_lapack_on_a_task_matrix(family) -> None:
    x = family[4][family[3][0]]["encoder.layer.0.output.dense.weight"]
    u, s, vh, _ = truncated_svd(x, 3)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    assert torch.allclose((u * s) @ vh, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5)
    assert list(itertools.islice(PLANS, 1)) == ["int4"]


def test_negation_fidelity_on_disk_and_budget_goals(tmp_path: Path) -> None:
    def neg(target_test, feasible=True):
        return {"target": "a", "control": "b", "target_test": target_test, "control_retained": 0.99, "lam": 0.5,
                "feasible": feasible, "pretrained_target_test": 0.60}

    rows = [_row("full", "task vectors", 1000, 1.0, 0.93, False, False),
            _row("peer", "TVQ / RTVQ", 40, 0.99, 0.92, False, True),
            _row("b128", "tvbasis --budget", 6, 0.992, 0.93, True, False),
            _row("b256", "tvbasis --budget", 3, 0.97, 0.93, True, False)]
    for r, n in zip(rows, [neg(0.20), neg(0.30), neg(0.22), neg(0.50, feasible=False)]):
        r["negation"] = [n]
    disk = {"full": None, "peer": 50, "b128": 7, "b256": 4}
    for r in rows:
        r["extra"] = {"store_bytes_on_disk": disk[r["label"]]} if disk[r["label"]] else {}
    annotate(rows, 1000)
    fid = {r["label"]: r["negation_fidelity_min"] for r in rows}
    # (0.60 − acc through the row) / (0.60 − 0.20 through the true vector); an infeasible negation counts 0
    assert fid == pytest.approx({"full": 1.0, "peer": 0.75, "b128": 0.95, "b256": 0.0})
    assert [r["bytes_on_disk"] for r in rows] == [1000, 50, 7, 4]
    assert rows[2]["compression_on_disk"] == pytest.approx(1000 / 7)
    g = goals({"rows": rows})
    assert g["every_task_at_128x_on_disk"] == ["b128"]      # 142.9× on disk, minimum 0.992
    assert g["negation_fidelity_at_least_0.9"] == ["b128"]
    assert g["peers_dominated_on_disk_by"] == {"peer": "b128"}  # b256 is smaller but worse on every other axis
    result = {"rows": rows, "all_vectors_bytes": 1000,
              "zero_shot": {"test": {"a": 0.5}, "normalized_test": {"a": 0.6}}, "finetuned": {"test": {"a": 0.8}}}
    md = markdown_table(result)
    assert "every task ≥ 0.99 (the minimum) at ≥ 128× on disk: b128" in md
    paths = make_plots(result, tmp_path)
    assert "frontier_negation.png" in [p.name for p in paths]


def test_select_configs() -> None:
    from tvbasis.bench.frontier import select_configs

    cs = default_configs(6)
    got = [c.label for c in select_configs(cs, ["budget", "full", "tvq"])]
    want = [c.label for c in cs if c.method in ("full", "budget") or "tvq" in c.label.lower()]
    assert got == want and len(got) == 1 + 5 + 3 + 3 + 4  # budgets plain, calibrated, probed; TVQ int4/3/2, RTVQ
    with pytest.raises(ConfigError, match="matches no frontier row"):
        select_configs(cs, ["nothing-like-this"])
