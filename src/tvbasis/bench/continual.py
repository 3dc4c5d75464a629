"""Continual merging: tasks arrive one at a time; a store grown by add-task against a store rebuilt from scratch.

The fine-tunes arrive in the order of ``ft_dirs``. Store A is built (``build_store``, the row's basis method,
options and M) on the first ``first`` tasks (default T // 2, at least M + 1); every later task is then folded into
it with ``add_task``, without the earlier fine-tunes. At ``checkpoints`` evenly spaced task counts n from ``first``
to T (both always included) three multi-task vectors over the first n tasks are scored by addition:

* ``add_task``: store A's default addition (``BasisStore.addition()``; ``addition=`` picks a mode), after the
  n − first add-tasks so far. At n = first it is the plain build.
* ``rebuild``: a store built from scratch on the first n tasks with the same method, options and M, and its
  addition. At n = first it is the same build as store A, so store A's numbers are reused there and the step says
  so (``reused_add_task_store: true``).
* ``task_arithmetic``: the sum of the n true task vectors (reference; nothing compressed).

Addition is the benchmark's: θ₀ + λ·delta with λ chosen on the dev splits of the n tasks (mean normalized dev
accuracy), test accuracy at that λ, normalized by each fine-tune's own test accuracy (``Evaluator.search_addition``
restricted to the n tasks). Every entry also gives the mean normalized test accuracy over the old tasks (the first
``first``) and over the new ones (those that arrived later; null at n = first): whether folding new tasks into the
store hurts them, or the old ones.

Bytes: for a store, ``BasisStore.nbytes``, the bytes on disk of its manifest and data files at that step (add-task
replaces the previous generation's files, so the old generation is not counted: it is deleted); for task
arithmetic, the bytes of the n task vectors held in memory (numel × element size of each tensor, as the
benchmark's ``vector_bytes``).

What add-task changes (``store/update.py``, ``bases/extend.py``): a cluster store without coded parts (no
residuals, no coded bases) rewrites the one basis the new task v joins (the basis of highest cosine with v) into
new data files as s_m ← a·s_m + b·v, (a, b) = (n_m/(n_m+1), 1/(n_m+1)) when the inner merge normalizes (mean,
TIES) and (1, 1) when it sums; v enters whole: a TIES inner merge is not re-run (no trimming, no sign election), so
a cluster-ties basis after add-task is not the basis a rebuild makes even for the same members. A cluster store
with coded parts puts v in its nearest cluster and keeps every basis. Every other store (pca, autoencoder, random,
random-sample) keeps its bases and mean unchanged (no data file is rewritten) and only appends v's least-squares
coefficients on their span. So where the store's default addition is the paper's sum of the bases Σ_m s_m
(task-like stores: autoencoder, random-sample, cluster; PCA built with ``addition="paper"``), the add-task vector
of every store but a cluster store without coded parts is the same vector at every step: the new tasks change
only which tasks λ is chosen and scored on. ``addition="reconstructions"`` sums the reconstructions Σ_t v̂_t
instead, which include them.

Each entry's ``addition`` field names the vector scored (``"sum of bases"``, ``"sum of reconstructions"``, …).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tvbasis.bench.states import float_state as _state
from tvbasis.bench.states import sum_states, vector_bytes
from tvbasis.engine import RunOptions
from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.metrics import AdditionResult, Evaluator, mean
from tvbasis.eval.tasks import Task
from tvbasis.store.build import build_store
from tvbasis.store.spec import StoreSpec, WriteOptions
from tvbasis.store.store import BasisStore
from tvbasis.store.update import add_task

#: score(task names, delta) -> the addition result of θ₀ + λ·delta over those tasks (λ chosen on their dev splits)
Scorer = Callable[[Sequence[str], Mapping[str, torch.Tensor]], AdditionResult]


# --------------------------------------------------------------------------------------------------- schedule
def initial_tasks(T: int, M: int, first: int | None = None) -> int:
    """The number of tasks store A is built on: ``first``, or T // 2 raised to M + 1; must satisfy
    M < first <= T − 1 (a store needs M < its T, and at least one task must arrive later)."""
    chosen = max(T // 2, M + 1) if first is None else first
    if isinstance(chosen, bool) or not isinstance(chosen, int) or not M < chosen <= T - 1:
        given = "default max(T // 2, M + 1)" if first is None else "first"
        raise ConfigError(f"continual: {given} = {chosen} must satisfy M = {M} < first <= T - 1 = {T - 1} "
                          f"(T = {T} tasks)")
    return chosen


def checkpoint_schedule(first: int, T: int, checkpoints: int = 4) -> list[int]:
    """``checkpoints`` task counts evenly spaced from ``first`` to T inclusive (rounded half up, duplicates
    dropped): first = 18, T = 36, 4 -> [18, 24, 30, 36]."""
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 2:
        raise ConfigError(f"continual: checkpoints = {checkpoints} must be an integer >= 2 (the first and last step)")
    if not 1 <= first <= T:
        raise ConfigError(f"continual: first = {first} must satisfy 1 <= first <= T = {T}")
    span, k = T - first, checkpoints - 1
    return sorted({first + (2 * i * span + k) // (2 * k) for i in range(checkpoints)})


# --------------------------------------------------------------------------------------------------- scoring
def evaluator_scorer(evaluator: Evaluator, grid: Sequence[float], search: str, finetuned_dev: Mapping[str, float],
                     finetuned_test: Mapping[str, float]) -> Scorer:
    """The benchmark's addition (``Evaluator.search_addition``) restricted to the given tasks."""

    def score(names: Sequence[str], delta: Mapping[str, torch.Tensor]) -> AdditionResult:
        return evaluator.search_addition(delta, grid, tasks=list(names), finetuned_dev=finetuned_dev,
                                         finetuned_test=finetuned_test, search=search)

    return score


def _num(x: float) -> float | None:
    """A float for JSON: NaN (an empty mean) becomes None."""
    x = float(x)
    return None if math.isnan(x) else x


def _accuracy(res: AdditionResult, old: Sequence[str], new: Sequence[str]) -> dict[str, Any]:
    norm = res.normalized_test
    return {"lam": float(res.lam), "mean_test": _num(res.mean_test),
            "mean_normalized_test": _num(res.mean_normalized_test),
            "mean_normalized_test_old": _num(mean(norm[t] for t in old if t in norm)),
            "mean_normalized_test_new": _num(mean(norm[t] for t in new if t in norm)) if new else None,
            "normalized_test": {t: _num(v) for t, v in norm.items()}}


def _store_entry(store: BasisStore, names: Sequence[str], old: Sequence[str], new: Sequence[str], score: Scorer,
                 addition: str | None) -> dict[str, Any]:
    t0 = time.time()
    tv = store.addition(mode=addition)
    res = score(names, _state(tv))
    return {**_accuracy(res, old, new), "addition": tv.name, "bytes": int(store.nbytes),
            "rel_errors": {t: float(e) for t, e in store.rel_errors.items()}, "seconds": round(time.time() - t0, 3)}


def _arithmetic_entry(tvs: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str], old: Sequence[str],
                      new: Sequence[str], score: Scorer) -> dict[str, Any]:
    t0 = time.time()
    total = sum_states(tvs, names)
    res = score(names, total)
    del total
    return {**_accuracy(res, old, new), "addition": "sum of task vectors",
            "bytes": sum(vector_bytes(tvs[n]) for n in names), "rel_errors": None,
            "seconds": round(time.time() - t0, 3)}


# --------------------------------------------------------------------------------------------------- the run
def _check_inputs(order: Sequence[str], tvs: Mapping[str, Any], ft_dev: Mapping[str, float],
                  ft_test: Mapping[str, float]) -> None:
    for what, have in (("task vectors", tvs), ("fine-tuned dev accuracies", ft_dev),
                       ("fine-tuned test accuracies", ft_test)):
        missing = [n for n in order if n not in have]
        if missing:
            raise ConfigError(f"continual: no {what} for task(s) {missing}")


class _Builder:
    """build_store with the row's method, options and M on a prefix of the arrival order."""

    def __init__(self, pre_dir: Path, ft_dirs: Mapping[str, str], method: str, options: Mapping[str, Any], M: int,
                 run: RunOptions) -> None:
        self.pre_dir, self.ft_dirs, self.method, self.options, self.M, self.run = (pre_dir, ft_dirs, method,
                                                                                   options, M, run)

    def __call__(self, names: Sequence[str], out: Path) -> tuple[BasisStore, float]:
        t0 = time.time()
        spec = StoreSpec(self.method, M=self.M, options=dict(self.options))
        store = build_store(self.pre_dir, {n: self.ft_dirs[n] for n in names}, spec=spec, out=out, run=self.run,
                            write=WriteOptions(force=True))
        return store, time.time() - t0


def run_continual(*, work: Path, pre_dir: Path, ft_dirs: Mapping[str, str], encoder: Encoder | None,
                  tasks: Mapping[str, Task], tvs: Mapping[str, Mapping[str, torch.Tensor]],
                  ft_dev: Mapping[str, float], ft_test: Mapping[str, float], grid: Sequence[float], search: str,
                  method: str, options: Mapping[str, Any], M: int, first: int | None = None, checkpoints: int = 4,
                  label: str | None = None, progress: bool = False, keep_stores: bool = False,
                  addition: str | None = None, score: Scorer | None = None) -> dict[str, Any]:
    """The continual experiment (module docstring); returns the JSON-able result.

    ``ft_dirs``' order is the arrival order. ``score`` replaces the evaluation (default: an ``Evaluator`` of
    ``encoder`` on ``tasks`` through ``evaluator_scorer``); it is called at every checkpoint for add_task, then
    rebuild (not at n = first, where the add-task store is reused), then task_arithmetic. ``addition``: the mode of
    both stores' ``addition()`` (None: the store's default). The stores live under ``work/stores`` and are removed
    at the end unless ``keep_stores``.

    Every entry of a step: ``lam``, ``mean_test``, ``mean_normalized_test`` (and its ``_old`` / ``_new`` parts,
    per-task ``normalized_test``), ``addition`` (the vector's name), ``bytes``, ``rel_errors`` (the store's,
    estimated for old tasks after a cluster add-task; None for task arithmetic) and ``seconds`` (forming and
    scoring the vector). add_task adds ``update_seconds`` (the build at n = first, then the add-tasks since the
    previous checkpoint) and ``tasks_added``; rebuild adds ``build_seconds`` and ``reused_add_task_store``."""
    t_start = time.time()
    order = list(ft_dirs)
    T = len(order)
    first = initial_tasks(T, M, first)
    schedule = checkpoint_schedule(first, T, checkpoints)
    _check_inputs(order, tvs, ft_dev, ft_test)
    if score is None:
        if encoder is None:
            raise ConfigError("continual: an encoder (or a score function) is needed to evaluate the additions")
        score = evaluator_scorer(Evaluator(encoder, {n: tasks[n] for n in order}, progress=False), grid, search,
                                 ft_dev, ft_test)
    name = label or method
    stores = Path(work) / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    paths = {"add_task": stores / f"continual-{name}-addtask", "rebuild": stores / f"continual-{name}-rebuild"}
    run = RunOptions(progress=progress)
    build = _Builder(Path(pre_dir), ft_dirs, method, options, M, run)
    from tqdm.auto import tqdm

    bar = tqdm(total=(T - first) + len(schedule), desc=f"continual {name}", unit="step", disable=not progress)
    store: BasisStore | None = None
    steps: list[dict[str, Any]] = []
    try:
        bar.set_postfix_str(f"build on {first} tasks")
        store, changed = build(order[:first], paths["add_task"])
        added: list[str] = []
        for n in range(first, T + 1):
            if n > first:
                bar.set_postfix_str(f"add-task {order[n - 1]}")
                t0 = time.time()
                grown = add_task(store, order[n - 1], ft_dirs[order[n - 1]], pre_dir, run=run)
                store.close()
                store = grown
                changed += time.time() - t0
                added.append(order[n - 1])
                bar.update(1)
            if n in schedule:
                bar.set_postfix_str(f"evaluate T = {n}")
                steps.append(_step(n, order, first, store, changed, added, build, paths["rebuild"], tvs, score,
                                   addition))
                changed, added = 0.0, []
                bar.update(1)
    finally:
        bar.close()
        if store is not None:
            store.close()
        run.close()
        if not keep_stores:
            for p in paths.values():
                shutil.rmtree(p, ignore_errors=True)
    return {"method": name, "basis_method": method, "options": _plain(options), "M": M, "first": first,
            "order": order, "checkpoints": schedule, "addition_mode": addition, "steps": steps,
            "seconds": round(time.time() - t_start, 2)}


def _step(n: int, order: Sequence[str], first: int, store: BasisStore, changed: float, added: Sequence[str],
          build: _Builder, rebuild_path: Path, tvs: Mapping[str, Mapping[str, torch.Tensor]], score: Scorer,
          addition: str | None) -> dict[str, Any]:
    """One checkpoint: the three additions over the first n tasks of ``order``."""
    names, old, new = list(order[:n]), list(order[:first]), list(order[first:n])
    grown = {**_store_entry(store, names, old, new, score, addition), "update_seconds": round(changed, 3),
             "tasks_added": list(added)}
    if n == first:
        rebuilt = {**_store_entry_copy(grown), "build_seconds": round(changed, 3), "reused_add_task_store": True}
    else:
        fresh, seconds = build(names, rebuild_path)
        try:
            rebuilt = {**_store_entry(fresh, names, old, new, score, addition), "build_seconds": round(seconds, 3),
                       "reused_add_task_store": False}
        finally:
            fresh.close()
    return {"T": n, "tasks": names, "new_tasks": new, "add_task": grown, "rebuild": rebuilt,
            "task_arithmetic": _arithmetic_entry(tvs, names, old, new, score)}


def _store_entry_copy(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The add-task entry without its add-task-only fields (a separate copy: the result is plain JSON)."""
    out = {k: v for k, v in entry.items() if k not in ("update_seconds", "tasks_added")}
    out["normalized_test"] = dict(out["normalized_test"])
    out["rel_errors"] = dict(out["rel_errors"])
    return out


def _plain(x: Any) -> Any:
    """Options as plain JSON (mappings and sequences copied; other values kept)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


__all__ = ["Scorer", "checkpoint_schedule", "evaluator_scorer", "initial_tasks", "run_continual"]
