"""Issue 15's protocol, seeds and claims: fast, offline, with stand-in evaluators and results built here.

The full protocol's grids and dev size; negation over the whole grid (no early stop) and the extended grid
sharing its evaluations; --seeds K (per-seed values, mean and sample std); the fine-tune cache per seed; the
bad-task filter; ``separated``; the claims table's verdicts; the theory plots."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from tvbasis.bench import bench, seeds
from tvbasis.bench.bench import BenchConfig, Row, markdown_table
from tvbasis.bench.claims import claims_lines, claims_table
from tvbasis.bench.plots import make_plots
from tvbasis.bench.spread import aggregate, compare, separated
from tvbasis.bench.task_filter import filter_tasks, majority_baseline
from tvbasis.errors import ConfigError
from tvbasis.eval.finetune import FinetuneSettings, _task_record, config_hash, finetune_dir
from tvbasis.eval.metrics import AdditionResult, Evaluator, choose_lambda
from tvbasis.eval.tasks import TASK_NAMES, Split, Task

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("mcid", "DBPedia", "stackoverflow", "banking")


# --------------------------------------------------------------------------- the protocol
def test_full_protocol_grids_and_dev_size() -> None:
    cfg = BenchConfig.full_protocol().resolved()
    assert cfg.grid == tuple(round(0.05 * i, 2) for i in range(21)) and cfg.search == "grid"
    assert cfg.max_dev >= 200 and cfg.tasks == TASK_NAMES
    assert cfg.neg_grid == tuple(round(0.05 * i, 2) for i in range(1, 21)) and cfg.neg_early_stop is False
    assert cfg.neg_grid_extended == tuple(round(0.1 * i, 1) for i in range(1, 31))
    assert "pca-paper" in cfg.methods and bench.STORE_ROWS["pca-paper"] == ("pca", {"addition": "paper"})
    assert set(bench.DEFAULT_METHODS) < set(cfg.methods) and cfg.stitch
    assert cfg.svd_merges == ("TSV-M", "Iso-C", "Iso-CTS")
    calls: list[float] = []
    best, curve = choose_lambda(cfg.grid, lambda lam: calls.append(lam) or -abs(lam - 0.35), cfg.search)
    assert len(calls) == 21 and best == 0.35 and len(curve) == 21  # every point, no refine shortcut


def test_all_rows_is_the_paper_row_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from tvbasis.bench import seeds
    from tvbasis.cli import main

    seen: list[BenchConfig] = []

    def record(cfg: BenchConfig) -> None:  # the config the CLI would run, and no run
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(seeds, "run_seeds", record)
    for argv in (["--all-rows"], ["--all-rows", "--no-stitch"], ["--stitch"], ["--all-rows", "--methods", "pca"]):
        with pytest.raises(SystemExit):
            main(["bench", "--work", "/nonexistent-never-written", *argv])
    full, nostitch, stitch, pca = seen
    assert full.methods == ("autoencoder", "pca", "cluster-mean", "cluster-ties", "random", "random-sample")
    assert full.svd_merges == ("TSV-M", "Iso-C", "Iso-CTS") and full.stitch
    assert not nostitch.stitch and nostitch.svd_merges == full.svd_merges
    assert stitch.stitch and stitch.methods == ("pca", "cluster-mean")
    assert pca.methods == ("pca",)


def test_default_bench_is_unchanged() -> None:
    cfg = BenchConfig().resolved()
    assert cfg.grid == (0.2, 0.4, 0.6, 0.8, 1.0) and cfg.search == "grid" and cfg.max_dev == 32
    assert cfg.neg_grid == (0.25, 0.5, 0.75, 1.0) and cfg.neg_early_stop and cfg.neg_grid_extended is None
    assert cfg.methods == ("pca", "cluster-mean") and cfg.seeds == 1  # the quick default's basis rows
    assert cfg.svd_merges == ("Iso-C",) and cfg.merges and not cfg.stitch
    assert cfg.task_filter is False  # only --tasks many filters by default
    assert BenchConfig(task_filter=True).resolved().task_filter is True
    assert cfg.eval_dtype == "float32"  # bfloat16 only when asked
    with pytest.raises(ConfigError, match="--eval-dtype 'float16'"):
        BenchConfig(eval_dtype="float16").resolved()


class _Encoder:
    edited = False

    def reset(self) -> None:
        pass


class StandIn(Evaluator):
    """An evaluator without a model: accuracies of θ₀ − λ·τ are formulas of λ; every dev evaluation counted."""

    def __init__(self) -> None:
        self.encoder, self.progress, self.calls = _Encoder(), False, []  # type: ignore[assignment]
        self.tasks = {"t": None, "c": None}  # type: ignore[dict-item]

    def zero_shot(self, split: str = "test", tasks: Any = None) -> dict[str, float]:
        return {"t": 0.8, "c": 0.9}

    def _at(self, delta: Any, scale: float, split: str, tasks: Any) -> dict[str, float]:
        self.lam = -scale  # the edit θ₀ − λ·τ stays in place
        if split == "dev":
            self.calls.append(self.lam)
        return self._accs()

    def accuracy(self, task: str, split: str = "test") -> float:
        return self._accs()[task]

    def _accs(self) -> dict[str, float]:
        # the target falls with λ; the control drops below 95 % after λ = 0.4 and recovers at λ ≥ 1.5
        lam = self.lam
        return {"t": max(0.0, 0.8 - 0.3 * lam), "c": 0.9 if lam <= 0.4 or lam >= 1.5 else 0.8}


def test_negation_without_early_stop_walks_the_whole_grid_and_the_extended_grid_shares_it() -> None:
    cfg = BenchConfig.full_protocol()
    ev = StandIn()
    cache: dict[float, tuple[float, float]] = {}
    main = ev.search_negation({}, "t", "c", cfg.neg_grid, early_stop=cfg.neg_early_stop, cache=cache)
    assert ev.calls == list(cfg.neg_grid)  # past the first λ that breaks the control (0.45)
    assert main.lam == 0.4 and main.feasible
    ev.calls.clear()
    ext = ev.search_negation({}, "t", "c", cfg.neg_grid_extended, early_stop=False, cache=cache)
    assert ev.calls == [lam for lam in cfg.neg_grid_extended if lam > 1.0]  # λ ≤ 1 came from the cache
    assert ext.lam == 2.7 and ext.target_dev == pytest.approx(0.0)  # beyond λ = 1: reported separately
    early = StandIn().search_negation({}, "t", "c", BenchConfig().neg_grid, early_stop=True)
    assert early.lam == 0.25


def test_rows_and_table_carry_the_extended_negation() -> None:
    ev = StandIn()
    neg = ev.search_negation({}, "t", "c", (0.25, 0.5))
    ext = ev.search_negation({}, "t", "c", (0.25, 0.5, 2.0))
    add = AdditionResult(lam=0.5, dev={"t": 0.7}, test={"t": 0.7}, normalized_test={"t": 0.9})
    row = Row("pca", 2, 500, add, [neg], negation_extended=[ext]).to_dict()
    assert row["negation_extended"][0]["lam"] == 2.0 and row["negation"][0]["lam"] == 0.25
    result = {"vector_bytes": 1000, "zero_shot": {"test": {"t": 0.8, "c": 0.9}},
              "finetuned": {"test": {"t": 0.95, "c": 0.95}}, "rows": [row]}
    table = markdown_table(result)
    assert "neg λ≤3 t (ctrl c %)" in table and "λ=2.00" in table and "λ=0.25" in table


# --------------------------------------------------------------------------- fine-tune cache per seed
def _task(name: str, dev_labels: list[int], classes: int = 3) -> Task:
    split = Split([f"x{i}" for i in range(len(dev_labels))], list(dev_labels))
    return Task(name, tuple(f"l{i}" for i in range(classes)), tuple(f"l{i}" for i in range(classes)),
                {"train": split, "dev": split, "test": split}, domain="intent")


def test_finetune_cache_is_per_seed(tmp_path: Path) -> None:
    s0, s1, d1 = FinetuneSettings(), FinetuneSettings(seed=1, data_seed=1), FinetuneSettings(seed=1, data_seed=0)
    assert finetune_dir(tmp_path, "mcid", s0) == tmp_path / "finetuned" / "mcid"  # seed 0: the existing caches
    dirs = {finetune_dir(tmp_path, "mcid", s) for s in (s0, s1, d1)}
    assert len(dirs) == 3 and finetune_dir(tmp_path, "mcid", s1).parent.name == "seed1"
    assert finetune_dir(tmp_path, "mcid", d1).parent.name == "seed1-data0"
    task = _task("mcid", [0, 1, 2])
    assert len({config_hash(_task_record(task, s, "h")) for s in (s0, s1, d1)}) == 3
    cfg = BenchConfig(seed=3, data_seed=0)
    assert cfg.finetune_settings().seed == 3 and cfg.finetune_settings().data_seed == 0


# --------------------------------------------------------------------------- synthetic results
def _add(norm: float) -> dict[str, Any]:
    return {"lam": 0.5, "dev": {}, "test": {}, "normalized_test": {}, "curve": {"0.5": norm},
            "criterion": "normalized", "mean_test": 0.8 * norm, "mean_normalized_test": norm}


def _neg(target: float, lam: float = 0.5) -> list[dict[str, Any]]:
    return [{"target": "mcid", "control": "DBPedia", "lam": lam, "target_test": target, "control_retained": 0.97,
             "feasible": True, "pretrained_target_test": 0.6}]


def _row(method: str, M: int | None, norm: float, target: float | None = None, err: float | None = None,
         ext: float | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if err is not None:
        extra["rel_errors"] = {t: err for t in TASKS}
    return {"method": method, "M": M, "bytes_stored": 1000 if M else 4000, "addition": _add(norm),
            "negation": _neg(target) if target is not None else [],
            "negation_extended": _neg(ext, 2.0) if ext is not None else [], "extra": extra, "seconds": 1.0}


#: method -> (addition norm, relative reconstruction error) of a synthetic store row
STORES = {"autoencoder": (0.86, 0.5), "pca": (0.90, 0.4), "pca-paper": (0.70, 0.4), "cluster-mean": (0.84, 0.6),
          "random": (0.60, 0.99), "random-sample": (0.80, 0.7)}


def fake_result(seed: int = 0, stores: dict[str, tuple[float, float]] | None = None, jitter: float = 0.0,
                negation_sign: float = 1.0) -> dict[str, Any]:
    """A bench result: zero-shot, task arithmetic and store rows at M = 2; a store's negation gap grows with its
    reconstruction error (``negation_sign`` < 0: shrinks); ``jitter·seed`` shifts every addition."""
    d = jitter * seed
    rows = [_row("zero-shot", None, 0.5), _row("task arithmetic (sum)", None, 0.90 + d, target=0.2, ext=0.15)]
    rows[1]["extra"] = {"negation_vector": "true task vector"}
    rows[0]["bytes_stored"] = 0
    for method, (norm, err) in (stores or STORES).items():
        rows.append(_row(method, 2, norm + d, target=0.2 + negation_sign * 0.3 * err + d, err=err + d,
                         ext=0.15 + negation_sign * 0.2 * err))
    accs = {t: 0.5 for t in TASKS}
    return {"config": {"tasks": list(TASKS), "full": True, "seed": seed}, "tasks": {t: {} for t in TASKS},
            "model": {}, "vector_bytes": 1000, "zero_shot": {"dev": accs, "test": accs},
            "finetuned": {"dev": {t: 0.9 for t in TASKS}, "test": {t: 0.9 + d for t in TASKS}}, "rows": rows,
            "cosine": {"tasks": list(TASKS), "matrix": [[1.0 if i == j else 0.05 for j in range(4)] for i in range(4)],
                       "cluster_labels": [0, 0, 1, 1]},
            "task_filter": None, "timings": {"finetune": 60.0, "total": 600.0}}


# --------------------------------------------------------------------------- seeds
def test_seeds_give_per_seed_values_mean_and_sample_std(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs: list[BenchConfig] = []

    def fake_run(cfg: BenchConfig) -> dict[str, Any]:
        configs.append(cfg)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return dict(fake_result(cfg.seed, jitter=0.01), out=cfg.out)

    monkeypatch.setattr(bench, "run_bench", fake_run)
    cfg = BenchConfig(tasks=TASKS, work=str(tmp_path / "w"), Ms=(2,), seed=5, seeds=2, plots=False, progress=False)
    result = seeds.run_seeds(cfg)
    assert [c.seed for c in configs] == [5, 6] and {c.subset_seed for c in configs} == {5}
    assert [c.finetune_settings().seed for c in configs] == [5, 6]  # fine-tuning seed, and (run_bench) basis seed
    assert configs[1].out == str(tmp_path / "w" / "bench" / "seed-6")
    saved = json.loads((tmp_path / "w" / "bench" / "bench.json").read_text())
    assert saved["seeds"] == [5, 6] and "sample" in saved["std"]
    ae = next(r for r in saved["rows"] if r["method"] == "autoencoder")
    stat = ae["addition"]["mean_normalized_test"]
    values = [0.86 + 0.01 * 5, 0.86 + 0.01 * 6]
    assert stat["per_seed"] == pytest.approx(values)
    assert stat["mean"] == pytest.approx(statistics.mean(values))
    assert stat["std"] == pytest.approx(statistics.stdev(values))  # sample std (divisor K − 1)
    assert ae["M"] == 2 and ae["negation"][0]["target"] == "mcid"
    assert ae["negation"][0]["target_test"]["per_seed"] == pytest.approx([0.2 + 0.3 * 0.5 + 0.01 * s for s in (5, 6)])
    assert saved["timings"]["total"] == 1200.0
    assert " ± " in result["markdown"] and "over 2 seeds" in result["markdown"]
    assert "task arithmetic" in bench.summary_line(result)


def test_aggregate_keeps_strings_and_labels() -> None:
    agg = aggregate([{"a": 1.0, "m": "x", "labels": [0, 1]}, {"a": 3.0, "m": "x", "labels": [1, 0]}])
    assert agg["a"] == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "per_seed": [1.0, 3.0]}
    assert agg["m"] == "x" and agg["labels"] == {"per_seed": [[0, 1], [1, 0]]}


# --------------------------------------------------------------------------- the bad-task filter
def test_task_filter_keeps_tasks_beating_the_majority_baseline() -> None:
    tasks = {"easy": _task("easy", [0, 0, 0, 1]), "hard": _task("hard", [0, 1, 2, 2]),
             "tie": _task("tie", [1, 1, 0, 0]), "flaky": _task("flaky", [0, 1, 2, 0])}
    assert majority_baseline([0, 0, 0, 1]) == 0.75 and majority_baseline([0, 1, 2, 2]) == 0.5
    one = filter_tasks(tasks, {"easy": 0.7, "hard": 0.75, "tie": 0.5, "flaky": 0.9})
    assert list(one.kept) == ["hard", "flaky"] and list(one.dropped) == ["easy", "tie"]  # strictly better only
    assert one.dropped["easy"] == {"finetuned_dev": [0.7], "majority_dev": 0.75, "n_dev": 4}
    two = filter_tasks(tasks, [{"easy": 0.9, "hard": 0.75, "tie": 0.6, "flaky": 0.9},
                               {"easy": 0.8, "hard": 0.75, "tie": 0.6, "flaky": 0.25}])
    assert list(two.kept) == ["easy", "hard", "tie"] and two.dropped["flaky"]["finetuned_dev"] == [0.9, 0.25]
    assert "dropped flaky (fine-tuned dev 90.0, 25.0 % vs majority 50.0 %)" in "\n".join(two.lines())


def test_keep_tasks_rechooses_pairs_and_checks_M() -> None:
    cfg = BenchConfig(tasks=TASK_NAMES, Ms=(2, 4)).resolved()
    kept = cfg.keep_tasks(["banking", "stackoverflow", "clinc", "DBPedia", "mcid"], pairs_given=False)
    assert kept.tasks == ("DBPedia", "banking", "clinc", "mcid", "stackoverflow")
    assert all(a in kept.tasks and b in kept.tasks for a, b in kept.pairs)
    with pytest.raises(ConfigError, match="M must be < 3"):
        cfg.keep_tasks(["banking", "stackoverflow", "clinc"], pairs_given=False)
    given = BenchConfig(tasks=TASK_NAMES, pairs=(("20NG", "hwu"),)).resolved()
    with pytest.raises(ConfigError, match="dropped by the task filter"):
        given.keep_tasks(["banking", "stackoverflow", "clinc", "DBPedia", "mcid"], pairs_given=True)


def test_seeds_with_the_filter_drop_a_task_failing_any_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    names = ("banking", "stackoverflow", "clinc", "DBPedia", "mcid", "hwu")
    tasks = {n: _task(n, [0, 0, 1, 2]) for n in names}  # majority 0.5
    devs = {0: dict.fromkeys(names, 0.8), 1: dict(dict.fromkeys(names, 0.8), hwu=0.5)}
    monkeypatch.setattr(bench, "finetuned_dev_accuracies", lambda cfg: (tasks, devs[cfg.seed]))
    ran: list[BenchConfig] = []
    monkeypatch.setattr(bench, "run_bench", lambda cfg: ran.append(cfg) or dict(fake_result(cfg.seed), out=cfg.out))
    cfg = BenchConfig(tasks=names, task_filter=True, seeds=2, work=str(tmp_path), plots=False, progress=False)
    result = seeds.run_seeds(cfg)
    assert all(c.tasks == tuple(n for n in names if n != "hwu") and not c.task_filter for c in ran)
    assert result["task_filter"]["dropped"]["hwu"] == {"finetuned_dev": [0.8, 0.5], "majority_dev": 0.5, "n_dev": 4}
    assert set(result["task_filter"]["kept"]) == set(names) - {"hwu"}


# --------------------------------------------------------------------------- separated
@pytest.mark.parametrize("a, b, expected", [
    ([0.9, 0.9], [0.8, 0.8], True),  # no spread, different means
    ([0.80, 0.82], [0.79, 0.81], False),  # |Δ| = 0.01 < 0.014 + 0.014
    ([0.90, 0.92, 0.91], [0.80, 0.82, 0.81], True),  # |Δ| = 0.1 > 0.01 + 0.01
    ([0.9], [0.9], False),  # equal
    ([0.5, 0.7], [0.4], True),  # |Δ| = 0.2 > sample std 0.141 + 0
    ([0.3, 0.7], [0.4], False),  # |Δ| = 0.1 < 0.283
    ([], [0.4], False),  # nothing measured
])
def test_separated(a: list[float], b: list[float], expected: bool) -> None:
    reference = bool(a) and abs(statistics.mean(a) - statistics.mean(b)) > (
        (statistics.stdev(a) if len(a) > 1 else 0.0) + (statistics.stdev(b) if len(b) > 1 else 0.0))
    assert separated(a, b) is expected is reference


def test_separated_boundary_is_strict() -> None:
    assert not separated([1.0, 3.0], [2.0 + 2 ** 0.5 + 0.0])  # |Δ| = √2 = std_a exactly: not called
    assert separated([1.0, 3.0], [2.0 + 2 ** 0.5 + 1e-9])
    assert compare([0.9, 0.91], [0.5, 0.51]) == "above" and compare([0.5], [0.9]) == "below"
    assert compare([0.80, 0.82], [0.79, 0.81]) == "within noise" and compare([], [1.0]) == "not measured"


# --------------------------------------------------------------------------- claims
def _verdicts(results: list[dict[str, Any]]) -> dict[str, str]:
    return {line.claim: line.verdict for line in claims_lines(results, ["b"] * len(results))}


def test_claims_verdicts_on_constructed_results() -> None:
    v = _verdicts([fake_result()])
    assert v["(i) bases ≥ heuristic baselines, addition, M = 2"] == "holds"  # autoencoder 0.86 > random-sample 0.80
    assert v["(ii) autoencoder ≥ PCA Σ_m s_m (paper), addition, M = 2"] == "holds"  # 0.86 > 0.70
    assert v["(ii) autoencoder ≥ PCA reconstructions (= task arithmetic), addition, M = 2"] == "does not hold"
    assert v["(iii) some store ≥ full task arithmetic, addition"] == "does not hold"  # pca is left out
    assert v["(iv) spectral clusters ≥ random clusters, addition"] == "not measured"
    assert v["(v) negation error grows with reconstruction error"] == "holds"
    assert v["(v) negation error grows with reconstruction error (extended λ ≤ 3)"] == "holds"
    assert v["(vi) continual add-task ≈ rebuild, addition"] == "not measured"
    assert _verdicts([fake_result(negation_sign=-1.0)])["(v) negation error grows with reconstruction error"] \
        == "does not hold"


def test_claims_within_noise_over_seeds_and_not_measured_rows() -> None:
    # two seeds whose autoencoder and random-sample additions overlap: the difference is within the spread
    runs = [fake_result(s, stores={"autoencoder": (ae, 0.5), "random-sample": (rs, 0.7)})
            for s, (ae, rs) in enumerate([(0.84, 0.81), (0.80, 0.83)])]
    agg = seeds.aggregate_results(runs, [0, 1])
    lines = {line.claim: line for line in claims_lines([agg], ["8 tasks"])}
    first = lines["(i) bases ≥ heuristic baselines, addition, M = 2"]
    assert first.verdict == "within noise" and first.seeds == 2
    assert first.numbers == "autoencoder 82.0 ± 2.8 vs random-sample 82.0 ± 1.4"
    assert lines["(ii) autoencoder ≥ PCA Σ_m s_m (paper), addition, M = 2"].verdict == "not measured"
    assert lines["(ii) autoencoder ≥ PCA Σ_m s_m (paper), addition, M = 2"].numbers == "–"
    assert lines["(v) negation error grows with reconstruction error"].verdict == "not measured"  # 2 stores < 3
    empty = {"rows": [], "config": {}}
    assert set(_verdicts([empty]).values()) == {"not measured"}


def test_claims_random_clusters_and_continual() -> None:
    r = fake_result()
    r["rows"].append(_row("cluster-random-mean", 2, 0.70, err=0.8))
    r["continual"] = {"steps": [{"T": 4, "add_task": {"mean_normalized_test": 0.80},
                                 "rebuild": {"mean_normalized_test": 0.80}}]}
    v = _verdicts([r])
    assert v["(iv) spectral clusters ≥ random clusters (mean), addition, M = 2"] == "holds"  # 0.84 vs 0.70
    assert v["(vi) continual add-task ≈ rebuild, addition"] == "holds"
    r["continual"]["steps"][-1]["add_task"]["mean_normalized_test"] = 0.7
    assert _verdicts([r])["(vi) continual add-task ≈ rebuild, addition"] == "does not hold"
    table = claims_table([r, fake_result()], ["8 tasks, --full", "36 sub-tasks"])
    assert table.startswith("| claim | benchmark |") and "| 36 sub-tasks |" in table and "Verdicts:" in table


def test_claims_cli_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tvbasis.cli.bench import register

    p = argparse.ArgumentParser(prog="tvbasis")
    register(p.add_subparsers(dest="command", required=True))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fake_result()))
    b.write_text(json.dumps(fake_result(negation_sign=-1.0)))
    args = p.parse_args(["bench", "--claims", str(a), str(b), "--out", str(tmp_path / "claims.md")])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert "Does the paper's claim hold here?" in printed and "does not hold" in printed
    assert (tmp_path / "claims.md").read_text().strip() == printed.strip()


def _recording_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[argparse.ArgumentParser, list[BenchConfig]]:
    """The CLI parser with ``run_seeds`` replaced: every bench command records its BenchConfig."""
    from tvbasis.cli.bench import register

    p = argparse.ArgumentParser(prog="tvbasis")
    register(p.add_subparsers(dest="command", required=True))
    seen: list[BenchConfig] = []
    monkeypatch.setattr(seeds, "run_seeds", lambda cfg: seen.append(cfg) or dict(fake_result(), out=str(tmp_path),
                                                                                  markdown="table"))
    return p, seen


def test_cli_protocol_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, seen = _recording_parser(tmp_path, monkeypatch)
    args = p.parse_args(["bench", "--full", "--dev", "300", "--no-negation-extended", "--seeds", "3",
                         "--no-task-filter"])
    assert args.fn(args) == 0
    cfg = seen[-1]
    assert cfg.max_dev == 300 and cfg.neg_grid_extended is None and cfg.seeds == 3 and cfg.task_filter is False
    args = p.parse_args(["bench", "--negation-extended", "--task-filter"])
    assert args.fn(args) == 0
    assert seen[-1].neg_grid_extended == bench.EXTENDED_NEG_GRID and seen[-1].task_filter is True
    assert seen[-1].grid == BenchConfig().grid  # the default run stays the default


# --------------------------------------------------------------------------- theory plots
def test_theory_plots_are_written(tmp_path: Path) -> None:
    agg = seeds.aggregate_results([fake_result(s, jitter=0.01) for s in range(3)], [0, 1, 2])
    paths = {p.name for p in make_plots(agg, tmp_path)}
    assert {"theory_negation.png", "theory_addition.png", "accuracy_vs_bytes.png", "negation.png"} <= paths
    for name in ("theory_negation.png", "theory_addition.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000


# --------------------------------------------------------------------------- v1 / v4 / continual options
def test_sizes_as_fractions_of_T_follow_the_task_filter() -> None:
    assert bench.sizes_for(("T/2", "T/4", "T/8"), 36) == (18, 9, 4)
    assert bench.sizes_for(("T/2", "t/4", "3", "T/8"), 8) == (4, 2, 3, 1)
    assert bench.sizes_for(("T/16", "T/32"), 8) == (1,)  # floor, at least 1, duplicates dropped
    with pytest.raises(ConfigError, match="T/x"):
        bench.sizes_for(("T/x",), 8)
    cfg = BenchConfig(tasks=TASK_NAMES, m_spec=("T/2", "T/4")).resolved()
    assert cfg.Ms == (4, 2)
    kept = cfg.keep_tasks(["banking", "stackoverflow", "clinc", "DBPedia", "mcid", "hwu"], pairs_given=False)
    assert kept.Ms == (3, 1)  # 6 kept tasks: re-read from the spec, not the 8-task sizes


def test_ks_and_continual_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, seen = _recording_parser(tmp_path, monkeypatch)
    args = p.parse_args(["bench", "--ks", "2,4,eigengap", "--m", "T/2,T/4", "--continual", "--continual-m", "1",
                         "--continual-method", "cluster-ties", "--no-merges", "--one-addition"])
    assert args.fn(args) == 0
    cfg = seen[-1]
    assert cfg.ks == (2, 4, "eigengap") and cfg.m_spec == ("T/2", "T/4") and cfg.continual
    assert cfg.continual_M == 1 and cfg.continual_method == "cluster-ties"
    assert cfg.merges is False and cfg.both_additions is False
    assert bench.sizes_of(cfg, "cluster") == (2, 4, "eigengap") and bench.sizes_of(cfg, "pca") == cfg.Ms
    for bad, match in ((["--ks", "2,x"], "--ks expects"), (["--continual-m", "2"], "use it with --continual")):
        with pytest.raises(ConfigError, match=match):
            p.parse_args(["bench", *bad]).fn(p.parse_args(["bench", *bad]))
    with pytest.raises(ConfigError, match="each k must be"):
        BenchConfig(ks=(2, 6)).resolved()  # 6 tasks by default: k = 6 is not < T
    with pytest.raises(ConfigError, match="--continual-method"):
        BenchConfig(continual_method="nope").resolved()


def test_claims_use_pca_paper_mode_and_eigengap_rows() -> None:
    stores = {k: v for k, v in STORES.items() if k != "pca-paper"}
    r = fake_result(stores=stores)
    pca = next(row for row in r["rows"] if row["method"] == "pca")
    pca["extra"]["addition_modes"] = {"reconstructions": _add(0.90), "paper": _add(0.95)}
    ae = next(row for row in r["rows"] if row["method"] == "autoencoder")
    ae["extra"]["addition_modes"] = {"paper": _add(0.86), "reconstructions": _add(0.91)}
    r["rows"] += [_row("cluster-mean", "eigengap", 0.88), _row("cluster-random-mean", "eigengap", 0.80)]
    r["rows"][-2]["extra"]["addition_at_1"] = {"mean_normalized_test": 0.5}
    r["rows"][-1]["extra"]["addition_at_1"] = {"mean_normalized_test": 0.6}
    v = _verdicts([r])
    assert v["(ii) autoencoder ≥ PCA Σ_m s_m (paper), addition, M = 2"] == "does not hold"  # 0.86 vs 0.95
    assert v["(ii) autoencoder S·W·1 ≥ PCA reconstructions, addition, M = 2"] == "holds"  # 0.91 vs 0.90
    assert v["(iv) spectral clusters ≥ random clusters (mean), addition, M = eigengap"] == "holds"
    assert v["(iv) spectral ≥ random clusters (mean), coefficient 1, M = eigengap"] == "does not hold"
    table = bench.markdown_table(r)
    assert "| pca | 2 |" in table and "Addition two ways" in table and "| 95.0 | 90.0 |" in table


def test_tasks_many_runs_the_many_task_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p, seen = _recording_parser(tmp_path, monkeypatch)
    assert p.parse_args(["bench", "--tasks", "many"]).fn(p.parse_args(["bench", "--tasks", "many"])) == 0
    cfg = seen[-1]
    assert (cfg.max_dev, cfg.max_test, cfg.stitch, cfg.merges, cfg.continual) == (8, 32, False, False, True)
    assert cfg.grid == (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2) and cfg.ks == (2, 4, 8, 16, "eigengap")
    assert cfg.resolved().Ms == (18, 9, 4) and len(cfg.resolved().tasks) == 36
    args = p.parse_args(["bench", "--tasks", "many", "--m", "3", "--max-dev", "16"])
    assert args.fn(args) == 0
    assert seen[-1].resolved().Ms == (3,) and seen[-1].max_dev == 16  # flags still override the protocol
    args = p.parse_args(["bench", "--tasks", "DBPedia,banking"])
    assert args.fn(args) == 0
    assert seen[-1].max_dev == BenchConfig().max_dev and seen[-1].ks is None  # other task lists: the default
