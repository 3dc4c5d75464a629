"""benchmarks/merge_bench_results.py: rows of two runs of one benchmark in one result; refuses other pairs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_bench_results.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("merge_bench_results", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method: str, M: Any, norm: float, **extra: Any) -> dict[str, Any]:
    return {"method": method, "M": M, "addition": {"mean_normalized_test": norm}, "extra": extra}


def _result(rows: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {"seeds": [0, 1], "tasks": {"a": {}, "b": {}}, "rows": rows, **more}


def test_merge_adds_rows_prefers_the_second_shared_row_and_takes_continual(tmp_path: Path) -> None:
    a = _result([_row("task arithmetic (sum)", None, 0.9), _row("autoencoder", 2, 0.8)])
    b = _result([_row("task arithmetic (sum)", None, 0.9, addition_at_1={"mean_normalized_test": 0.6}),
                 _row("cluster-random-mean", 2, 0.7)], continual={"steps": [{"T": 2}]})
    paths = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"]
    paths[0].write_text(json.dumps(a))
    paths[1].write_text(json.dumps(b))
    assert _module().main([str(p) for p in paths]) == 0
    out = json.loads(paths[2].read_text())
    keys = [(r["method"], r["M"]) for r in out["rows"]]
    assert keys == [("task arithmetic (sum)", None), ("autoencoder", 2), ("cluster-random-mean", 2)]
    assert out["rows"][0]["extra"]["addition_at_1"] == {"mean_normalized_test": 0.6}  # the second run's row
    assert out["continual"] == {"steps": [{"T": 2}]}


def test_merge_refuses_runs_that_are_not_one_benchmark() -> None:
    merge = _module().merge
    a = _result([_row("task arithmetic (sum)", None, 0.9)])
    with pytest.raises(SystemExit, match="differs"):
        merge(a, _result([_row("task arithmetic (sum)", None, 0.8)]))
    with pytest.raises(SystemExit, match="seeds or tasks"):
        merge(a, dict(_result([]), seeds=[0, 1, 2]))
