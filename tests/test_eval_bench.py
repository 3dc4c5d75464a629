"""The bench and its CLI: config checks, table, and one tiny real end-to-end run (2-layer MiniLM, 3 tasks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from tvbasis.bench.bench import BenchConfig, default_pairs, markdown_table
from tvbasis.cli.bench import register
from tvbasis.errors import ConfigError
from tvbasis.eval.tasks import DOMAINS, TASK_NAMES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvbasis")
    p.add_argument("-q", "--quiet", action="store_true")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_default_pairs_are_unrelated_and_distinct() -> None:
    for tasks in (TASK_NAMES, BenchConfig().tasks, ("mcid", "DBPedia", "stackoverflow")):
        pairs = default_pairs(tasks)
        assert len(pairs) == 2 and len({t for t, _ in pairs}) == 2
        for target, control in pairs:
            assert target in tasks and control in tasks and DOMAINS[target] != DOMAINS[control]


def test_full_protocol_config() -> None:
    cfg = BenchConfig.full_protocol().resolved()
    assert cfg.tasks == TASK_NAMES and cfg.max_train == 2000 and cfg.max_test <= 500
    assert cfg.grid[0] == 0.0 and cfg.grid[-1] == 1.0 and len(cfg.grid) == 21 and cfg.search == "grid"
    assert cfg.max_dev >= 200 and not cfg.neg_early_stop and cfg.neg_grid_extended[-1] == 3.0
    assert cfg.Ms == (2, 4) and len(cfg.methods) == 7 and "pca-paper" in cfg.methods and len(cfg.pairs) >= 2


@pytest.mark.parametrize("kwargs, match", [
    ({"tasks": ("banking",)}, "at least 2"),
    ({"tasks": ("banking", "clinc", "hwu"), "Ms": (3,)}, "M must"),
    ({"methods": ("svd",)}, "unknown basis method"),
    ({"pairs": (("banking", "20NG"),)}, "among the benchmark tasks"),
    ({"tasks": ("banking", "nope")}, "unknown task"),
])
def test_bad_bench_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(Exception, match=match):
        BenchConfig(**kwargs).resolved()


def test_cli_flags_parse_and_help() -> None:
    p = _parser()
    a = p.parse_args(["bench", "--full", "--m", "2", "--pairs", "banking:Yahoo,DBPedia:mcid", "--grid", "0.5:1"])
    assert a.full and a.m == "2" and a.fn.__name__ == "cmd_bench"
    assert p.parse_args(["finetune", "--tasks", "banking", "--max-train", "10"]).fn.__name__ == "cmd_finetune"
    from tvbasis.cli.bench import _pairs
    with pytest.raises(ConfigError, match="TARGET:CONTROL"):
        _pairs("banking")
    for cmd in ("bench", "finetune"):
        with pytest.raises(SystemExit) as e:
            p.parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_markdown_table_from_a_result() -> None:
    neg = {"target": "a", "control": "b", "target_test": 0.2, "control_retained": 0.97, "lam": 0.5,
           "feasible": True}
    add = {"lam": 0.4, "mean_test": 0.7, "mean_normalized_test": 0.9}
    result = {"vector_bytes": 1000, "zero_shot": {"test": {"a": 0.5, "b": 0.6}},
              "finetuned": {"test": {"a": 0.8, "b": 0.7}},
              "rows": [{"method": "zero-shot", "M": None, "bytes_stored": 0, "addition": add, "negation": []},
                       {"method": "pca", "M": 2, "bytes_stored": 1500, "addition": add, "negation": [neg]}]}
    table = markdown_table(result)
    assert "| pca | 2 | 1.5 kB | 1.3 | 0.40 | 70.0 | 90.0 | 20.0 (97.0) λ=0.50 |" in table
    assert "| a | 50.0 | 80.0 |" in table


def test_tiny_bench_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the quick default's one SVD-merge row (Iso-C) runs the bench's merge-row path (the three merges' math is
    # checked against numpy references in test_merge_svd.py)
    args = _parser().parse_args([
        "-q", "bench", "--tasks", "mcid,DBPedia,stackoverflow", "--layers", "2", "--max-length", "32",
        "--max-train", "96", "--max-dev", "16", "--max-test", "32", "--grid", "0.5,1.0", "--neg-grid", "0.5,1.0",
        "--m", "2", "--methods", "autoencoder,cluster-mean,random-sample,cluster-random-mean", "--no-stitch",
        "--ks", "eigengap", "--continual", "--continual-first", "2", "--continual-m", "1",
        "--work", str(tmp_path / "work")])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    for row in ("zero-shot", "task arithmetic (sum)", "TIES (density 0.2)", "autoencoder | 2",
                "cluster-mean | eigengap", "cluster-random-mean | eigengap", "random-sample | 2", "Iso-C"):
        assert row in printed
    out = tmp_path / "work" / "bench"
    result = json.loads((out / "bench.json").read_text())
    for png in ("cosine.png", "accuracy_vs_bytes.png", "negation.png"):
        assert (out / png).stat().st_size > 1000
    assert not any((tmp_path / "work" / "stores").iterdir())  # stores are removed once evaluated
    rows = {(r["method"], r["M"]): r for r in result["rows"]}
    zs = rows[("zero-shot", None)]["addition"]["mean_test"]
    ta = rows[("task arithmetic (sum)", None)]
    assert ta["addition"]["mean_test"] > zs
    assert ta["bytes_stored"] == 3 * result["vector_bytes"]
    iso = rows[("Iso-C", None)]
    assert iso["extra"]["merge"] == "iso_c" and iso["bytes_stored"] == ta["bytes_stored"]
    assert iso["addition"]["lam"] in {0.5, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0}  # the grid and the SVD merges' range
    store_rows = [r for (m, M), r in rows.items() if M is not None]
    assert len(store_rows) == 4 and all(0 < r["bytes_stored"] < ta["bytes_stored"] for r in store_rows)
    for n in ta["negation"]:
        assert n["target_test"] <= n["pretrained_target_test"]
    assert len(result["cosine"]["matrix"]) == 3
    # v1: cluster rows at every k of --ks, the eigengap row at the rule's k, random clusters at the same k
    spectral, random = rows[("cluster-mean", "eigengap")], rows[("cluster-random-mean", "eigengap")]
    assert spectral["extra"]["k"] == random["extra"]["k"] == len(set(spectral["extra"]["labels"]))
    assert sorted(np.bincount(spectral["extra"]["labels"])) == sorted(np.bincount(random["extra"]["labels"]))
    # every v4 store's addition both ways; the default mode's entry is the row's own addition
    for (m, M), r in rows.items():
        if M is None or m.startswith("cluster"):
            assert M is None or "addition_modes" not in r["extra"]
            continue
        modes = r["extra"]["addition_modes"]
        assert set(modes) == {"paper", "reconstructions"}
        assert modes[r["extra"]["addition_mode"]]["mean_test"] == r["addition"]["mean_test"]
    # coefficient 1 = the λ-searched result wherever the search chose λ = 1 (the grid holds 1.0)
    for r in (ta, spectral):
        at1 = r["extra"]["addition_at_1"]
        assert at1["lam"] == 1.0 and set(at1["test"]) == set(result["tasks"])
        if r["addition"]["lam"] == 1.0:
            assert at1["test"] == r["addition"]["test"]
    # continual: steps at 2 and 3 tasks; at T = 3 its task-arithmetic reference is the TA row (same 3 vectors,
    # same grid and evaluator: two code paths, one number)
    steps = result["continual"]["steps"]
    assert [st["T"] for st in steps] == [2, 3] and result["continual"]["M"] == 1
    assert sorted(steps[-1]["tasks"]) == sorted(result["tasks"])
    assert steps[-1]["task_arithmetic"]["mean_normalized_test"] == pytest.approx(
        ta["addition"]["mean_normalized_test"])
    assert steps[0]["rebuild"]["mean_normalized_test"] == steps[0]["add_task"]["mean_normalized_test"]
    assert "Continual (cluster-mean" in printed and "Addition two ways" in printed
