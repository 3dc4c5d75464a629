"""The continual experiment (``bench/continual.py``) on tiny models, with a stand-in scorer: the checkpoint schedule,
the stores at each step (tasks, order, bytes), the vectors handed to the scorer against sums computed here, the
old/new split of the accuracies, bad ``first``, and the result's JSON and its claims line."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tinymodels import dense_vector, finetune_states, pretrained_state, save_hf
from tvbasis.bench import continual
from tvbasis.bench.claims import _continual_line
from tvbasis.bench.continual import checkpoint_schedule, evaluator_scorer, initial_tasks, run_continual
from tvbasis.errors import ConfigError
from tvbasis.eval.metrics import AdditionResult
from tvbasis.store import open_store

#: arrival order: not the tasks' sorted order, so a sort anywhere shows
ORDER = ("task4", "task2", "task3", "task1", "task5", "task0")  # centres 1, 2, 0, 1, 2, 0


# --------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("first,T,k,expected", [
    (18, 36, 4, [18, 24, 30, 36]),
    (3, 6, 4, [3, 4, 5, 6]),
    (18, 36, 3, [18, 27, 36]),
    (18, 36, 2, [18, 36]),
    (3, 6, 10, [3, 4, 5, 6]),  # more checkpoints than steps: every step once
    (5, 6, 4, [5, 6]),
    (3, 5, 4, [3, 4, 5]),  # 3 + 2/3 and 3 + 4/3 both round to 4
    (2, 7, 3, [2, 5, 7]),  # 2 + 2.5 rounds half up
])
def test_checkpoint_schedule(first: int, T: int, k: int, expected: list[int]) -> None:
    assert checkpoint_schedule(first, T, k) == expected


@pytest.mark.parametrize("k", [1, 0, -3])
def test_checkpoint_schedule_needs_two_checkpoints(k: int) -> None:
    with pytest.raises(ConfigError, match=f"checkpoints = {k}"):
        checkpoint_schedule(3, 6, k)


def test_initial_tasks_default_and_bounds() -> None:
    assert initial_tasks(36, 4) == 18 and initial_tasks(6, 2) == 3
    assert initial_tasks(6, 3) == 4  # T // 2 = 3 is not > M: raised to M + 1
    assert initial_tasks(6, 2, 5) == 5
    with pytest.raises(ConfigError, match="first = 2 must satisfy M = 2"):
        initial_tasks(6, 2, 2)
    with pytest.raises(ConfigError, match="first = 6 must satisfy"):
        initial_tasks(6, 2, 6)
    with pytest.raises(ConfigError, match=r"max\(T // 2, M \+ 1\) = 6"):  # M = 5, T = 6: nothing left to arrive
        initial_tasks(6, 5)


# --------------------------------------------------------------------------------------------------- fixtures
def _family(root: Path, noise: float) -> tuple[Path, dict[str, str], dict[str, dict[str, torch.Tensor]]]:
    """6 fine-tunes around 3 centres (task t at centre t % 3), in the arrival order ORDER, and their task
    vectors computed here (float64 ft − pre, then float32). With noise 0 the task vectors span 3 dimensions."""
    pre = pretrained_state(0)
    sds = finetune_states(pre, 6, clusters=3, seed=1, noise=noise)
    pre_p = save_hf(pre, root / "pre")
    paths = {f"task{t}": save_hf(sd, root / f"ft{t}") for t, sd in enumerate(sds)}
    tvs = {f"task{t}": {k: v.float() for k, v in dense_vector(pre, sd).items()} for t, sd in enumerate(sds)}
    return pre_p, {n: str(paths[n]) for n in ORDER}, {n: tvs[n] for n in ORDER}


def _value(task: str) -> float:
    """The stand-in's normalized test accuracy of a task (distinct per task)."""
    return 0.5 + 0.07 * int(task[-1])


class Recorder:
    """A stand-in scorer: records (task names, delta) of every call; accuracies from ``_value``."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, torch.Tensor]]] = []

    def __call__(self, names: Sequence[str], delta: Mapping[str, torch.Tensor]) -> AdditionResult:
        self.calls.append((list(names), {k: v.clone() for k, v in delta.items()}))
        norm = {t: _value(t) for t in names}
        return AdditionResult(lam=0.4, dev={t: 0.0 for t in names}, test={t: 0.8 * norm[t] for t in names},
                              normalized_test=norm)


def _run(tmp: Path, pre_p: Path, ft_dirs: dict[str, str], tvs: dict, method: str, options: dict, M: int,
         score: Recorder, **kw: Any) -> dict[str, Any]:
    return run_continual(work=tmp / "work", pre_dir=pre_p, ft_dirs=ft_dirs, encoder=None, tasks={}, tvs=tvs,
                         ft_dev=dict.fromkeys(ft_dirs, 0.9), ft_test=dict.fromkeys(ft_dirs, 0.8), grid=(0.5, 1.0),
                         search="grid", method=method, options=options, M=M, score=score, **kw)


def _true_sum(tvs: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([tvs[n][k].double() for n in names]).sum(0) for k in tvs[names[0]]}


def _close(delta: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], tol: float = 1e-5) -> bool:
    assert set(delta) == set(ref)
    return all(torch.allclose(delta[k].double(), ref[k], atol=tol, rtol=tol) for k in ref)


def _dir_bytes(path: Path) -> int:
    """Sizes of the store's files as the file system reports them (the writer lock file excluded)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != ".tvbasis.lock")


def _store_tasks(path: Path) -> list[str]:
    store = open_store(path)
    try:
        return list(store.task_names)
    finally:
        store.close()


def _calls_per_step(calls: list, schedule: list[int], first: int) -> list[list]:
    """The recorder's calls split by step: add_task, rebuild (not at n = first), task_arithmetic."""
    out, i = [], 0
    for n in schedule:
        k = 2 if n == first else 3
        out.append(calls[i:i + k])
        i += k
    assert i == len(calls)
    return out


# --------------------------------------------------------------------------------------------------- runs
def test_lossless_stores_hand_the_true_sums_to_the_scorer(tmp_path: Path) -> None:
    """Task vectors spanning 3 dimensions, PCA with M = 2 and its mean: every store reconstructs exactly, so the
    add-task, rebuild and task-arithmetic vectors at each step all equal the sum of the first n true vectors."""
    pre_p, ft_dirs, tvs = _family(tmp_path, noise=0.0)
    rec = Recorder()
    result = _run(tmp_path, pre_p, ft_dirs, tvs, "pca", {}, 2, rec, first=3)
    assert [s["T"] for s in result["steps"]] == [3, 4, 5, 6]
    for n, calls in zip([3, 4, 5, 6], _calls_per_step(rec.calls, [3, 4, 5, 6], 3)):
        ref = _true_sum(tvs, ORDER[:n])
        for names, delta in calls:
            assert names == list(ORDER[:n])
            assert _close(delta, ref)
    last = result["steps"][-1]
    for kind in ("add_task", "rebuild"):
        assert last[kind]["rel_errors"].keys() == set(ORDER)
        assert max(last[kind]["rel_errors"].values()) < 1e-4
    assert last["add_task"]["addition"] == "sum of reconstructions"


def test_stores_tasks_bytes_and_the_task_arithmetic_vector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lossy cluster store (add-task rewrites its bases): the rebuild store at each step holds exactly the
    first n tasks, the add-task store at the end all T in arrival order, bytes are the stores' file sizes, and the
    task-arithmetic vector is the sum of the true task vectors."""
    pre_p, ft_dirs, tvs = _family(tmp_path, noise=0.05)
    sizes: dict[str, list[int]] = {"build": [], "add": []}
    built: list[tuple[list[str], Path, list[str]]] = []
    added: list[str] = []
    real_build, real_add = continual.build_store, continual.add_task

    def build(pre: Any, finetuned: Mapping[str, Any], **kw: Any) -> Any:
        store = real_build(pre, finetuned, **kw)
        built.append((list(finetuned), Path(kw["out"]), list(store.task_names)))
        sizes["build"].append(_dir_bytes(Path(kw["out"])))
        return store

    def add(store: Any, name: str, finetuned: Any, pretrained: Any, **kw: Any) -> Any:
        grown = real_add(store, name, finetuned, pretrained, **kw)
        added.append(name)
        sizes["add"].append(_dir_bytes(grown.root))
        return grown

    monkeypatch.setattr(continual, "build_store", build)
    monkeypatch.setattr(continual, "add_task", add)
    rec = Recorder()
    result = _run(tmp_path, pre_p, ft_dirs, tvs, "cluster", {"inner": "mean"}, 2, rec, first=3, checkpoints=3,
                  label="cluster-mean", keep_stores=True)
    schedule = [3, 5, 6]  # 3 + 1.5 rounds half up
    assert [s["T"] for s in result["steps"]] == schedule
    stores = tmp_path / "work" / "stores"
    a_path, r_path = stores / "continual-cluster-mean-addtask", stores / "continual-cluster-mean-rebuild"

    # the builds: store A on the first 3, then one rebuild per later checkpoint on exactly the first n
    assert built[0][:2] == (list(ORDER[:3]), a_path)
    assert [(b[0], b[1], b[2]) for b in built[1:]] == [(list(ORDER[:n]), r_path, list(ORDER[:n])) for n in (5, 6)]
    assert added == list(ORDER[3:])
    assert _store_tasks(a_path) == list(ORDER) and _store_tasks(r_path) == list(ORDER)

    # bytes: the file sizes right after the store's last change before each checkpoint
    steps = {s["T"]: s for s in result["steps"]}
    assert steps[3]["add_task"]["bytes"] == sizes["build"][0] == steps[3]["rebuild"]["bytes"]
    assert steps[5]["add_task"]["bytes"] == sizes["add"][1] and steps[6]["add_task"]["bytes"] == sizes["add"][2]
    assert steps[5]["rebuild"]["bytes"] == sizes["build"][1] and steps[6]["rebuild"]["bytes"] == sizes["build"][2]
    opened = open_store(a_path)
    assert steps[6]["add_task"]["bytes"] == _dir_bytes(a_path) == opened.nbytes
    opened.close()
    assert steps[3]["rebuild"]["reused_add_task_store"] and not steps[5]["rebuild"]["reused_add_task_store"]
    assert steps[5]["add_task"]["tasks_added"] == list(ORDER[3:5]) and steps[6]["add_task"]["tasks_added"] == [ORDER[5]]

    # task arithmetic: the last call of every step, the sum of the true vectors; its bytes n float32 vectors
    one = sum(v.numel() * 4 for v in tvs["task0"].values())
    for n, calls in zip(schedule, _calls_per_step(rec.calls, schedule, 3)):
        names, delta = calls[-1]
        assert names == list(ORDER[:n]) and _close(delta, _true_sum(tvs, ORDER[:n]))
        assert not _close(calls[0][1], _true_sum(tvs, ORDER[:n]), tol=1e-3)  # the lossy store's sum differs
        assert steps[n]["task_arithmetic"]["bytes"] == n * one

    # accuracies: old = the first 3 arrivals, new = the later ones
    for n in schedule:
        old = [_value(t) for t in ORDER[:3]]
        new = [_value(t) for t in ORDER[3:n]]
        for kind in ("add_task", "rebuild", "task_arithmetic"):
            e = steps[n][kind]
            assert e["mean_normalized_test_old"] == pytest.approx(sum(old) / 3)
            assert e["mean_normalized_test"] == pytest.approx((sum(old) + sum(new)) / n)
            if n == 3:
                assert e["mean_normalized_test_new"] is None
            else:
                assert e["mean_normalized_test_new"] == pytest.approx(sum(new) / len(new))
            assert e["lam"] == 0.4

    assert result["method"] == "cluster-mean" and result["basis_method"] == "cluster" and result["first"] == 3
    assert result["order"] == list(ORDER) and result["options"] == {"inner": "mean"} and result["M"] == 2
    text = json.dumps(result, allow_nan=False)
    line = _continual_line({"continual": json.loads(text)}, "b", 1)
    assert line.verdict in ("holds", "does not hold") and "T = 6" in line.numbers


def test_fixed_bases_sum_is_the_same_vector_at_every_step(tmp_path: Path) -> None:
    """random-sample keeps its bases on add-task, so its default addition (the sum of the bases) never changes;
    ``addition="reconstructions"`` sums the reconstructions, which grow with the tasks (module docstring)."""
    pre_p, ft_dirs, tvs = _family(tmp_path, noise=0.05)
    for mode in (None, "reconstructions"):
        rec = Recorder()
        result = _run(tmp_path, pre_p, ft_dirs, tvs, "random-sample", {}, 2, rec, first=3, checkpoints=2,
                      addition=mode)
        first_call, last_call = rec.calls[0][1], rec.calls[2][1]  # add_task at T = 3 and at T = 6
        unchanged = all(torch.equal(first_call[k], last_call[k]) for k in first_call)
        assert unchanged == (mode is None)
        assert result["steps"][-1]["add_task"]["addition"] == ("sum of bases" if mode is None
                                                               else "sum of reconstructions")


def test_stores_are_removed_by_default(tmp_path: Path) -> None:
    pre_p, ft_dirs, tvs = _family(tmp_path, noise=0.05)
    ft_dirs = {n: ft_dirs[n] for n in ORDER[:4]}
    result = _run(tmp_path, pre_p, ft_dirs, tvs, "random", {}, 1, Recorder(), checkpoints=2)
    assert result["first"] == 2 and [s["T"] for s in result["steps"]] == [2, 4]
    assert list((tmp_path / "work" / "stores").iterdir()) == []


@pytest.mark.parametrize("first", [1, 2, 6, 9])
def test_bad_first_is_a_config_error(tmp_path: Path, first: int) -> None:
    pre_p, ft_dirs, tvs = _family(tmp_path, noise=0.05)
    with pytest.raises(ConfigError, match=f"first = {first} must satisfy M = 2 < first <= T - 1 = 5"):
        _run(tmp_path, pre_p, ft_dirs, tvs, "pca", {}, 2, Recorder(), first=first)
    assert not (tmp_path / "work" / "stores").exists()  # refused before anything is built


def test_missing_inputs_are_config_errors(tmp_path: Path) -> None:
    pre_p, ft_dirs, tvs = _family(tmp_path, noise=0.05)
    with pytest.raises(ConfigError, match=r"no task vectors for task\(s\) \['task2'\]"):
        _run(tmp_path, pre_p, ft_dirs, {n: v for n, v in tvs.items() if n != "task2"}, "pca", {}, 2, Recorder())
    with pytest.raises(ConfigError, match="an encoder"):
        run_continual(work=tmp_path, pre_dir=pre_p, ft_dirs=ft_dirs, encoder=None, tasks={}, tvs=tvs,
                      ft_dev=dict.fromkeys(ft_dirs, 0.9), ft_test=dict.fromkeys(ft_dirs, 0.8), grid=(1.0,),
                      search="grid", method="pca", options={}, M=2)


def test_evaluator_scorer_restricts_the_benchmark_search() -> None:
    seen: dict[str, Any] = {}

    class Fake:
        def search_addition(self, delta: Any, grid: Any, **kw: Any) -> str:
            seen.update(kw, delta=delta, grid=grid)
            return "result"

    dev, test = {"a": 0.9, "b": 0.8}, {"a": 0.7, "b": 0.6}
    score = evaluator_scorer(Fake(), (0.2, 0.4), "refine", dev, test)  # type: ignore[arg-type]
    delta = {"w": torch.ones(2)}
    assert score(("a",), delta) == "result"
    assert seen == {"tasks": ["a"], "finetuned_dev": dev, "finetuned_test": test, "search": "refine",
                    "delta": delta, "grid": (0.2, 0.4)}
