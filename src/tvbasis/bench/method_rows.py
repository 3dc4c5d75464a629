"""The bench rows of issue 29's methods, next to task arithmetic on the same fine-tunes and evaluator:

- ``merge_rows`` (``bench --fl-merges``): AWD over task arithmetic (the paper's global form: the redundant
  vector's coefficients from the Gram matrix of the whole task vectors) and the one-shot-FL aggregation rules
  fednova (each fine-tune's own step count), fedgma (rho 0.5), median and cclip (the whole vectors' norms; the
  clip at the smallest norm). Scale λ searched on dev like the SVD merges; negation as task arithmetic's.
- ``atlas_rows`` (``bench --atlas``): aTLAS addition — per-tensor coefficients learned on every task's dev
  examples (supervised), tested — and few-shot adaptation of the first task from the OTHER tasks (as aTLAS leaves
  the target's own vector out): from their task vectors and from a PCA store's M bases built on them, with k
  training examples per class (``atlas_shots``), the best epoch chosen on the target's dev split.
- ``linearized_rows`` (``bench --linearized``): tangent task arithmetic — every task fine-tuned linearised, its
  vectors added and negated in the linearised model — beside the standard rows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tvbasis.bench.states import float_state, sum_states
from tvbasis.eval.atlas import AtlasSettings, learn_coefficients
from tvbasis.eval.finetune import FinetuneResult, FinetuneSettings, finetune
from tvbasis.eval.finetune_modes import linearized
from tvbasis.eval.metrics import AdditionResult, Evaluator, NegationResult, mean, normalized_accuracy
from tvbasis.eval.tasks import Split, Task

States = Mapping[str, Mapping[str, torch.Tensor]]


def gram_of(tvs: States) -> torch.Tensor:
    """(T, T) float64 Gram matrix of the task vectors (in-memory state dicts), tensor by tensor."""
    names = list(tvs)
    G = torch.zeros(len(names), len(names), dtype=torch.float64)
    for k in tvs[names[0]]:
        X = torch.stack([tvs[n][k].reshape(-1).to(torch.float64) for n in names])
        G += X @ X.T
    return G


def fl_merge_specs(tvs: States, steps: Mapping[str, int]) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (merge method, params) of the data-free rows, global statistics computed from ``tvs``."""
    from tvbasis.merge.awd import awd_coefficients

    names = list(tvs)
    G = gram_of(tvs)
    b = awd_coefficients(G)
    norms = G.diagonal().sqrt()
    return {
        "AWD (task arithmetic)": ("awd", {"coefs": ",".join(f"{float(v):.9g}" for v in b)}),
        "FedNova": ("fednova", {"steps": ",".join(str(int(steps[n])) for n in names)}),
        "FedGMA (rho 0.5)": ("fedgma", {"rho": 0.5}),
        "median": ("median", {}),
        "CClip (rho = min norm)": ("cclip", {"norms": ",".join(f"{float(v):.9g}" for v in norms)}),
    }


def merge_rows(pre_dir: Path, ft_dirs: Mapping[str, str], tvs: States, results: Mapping[str, FinetuneResult],
               search: Callable[[Mapping[str, torch.Tensor]], AdditionResult], true_neg: list[NegationResult],
               true_ext: list[NegationResult], all_vectors: int, run: Any = None) -> list[dict[str, Any]]:
    """The AWD and one-shot-FL rows (dicts for ``bench.Row``)."""
    from tvbasis.merge import MergeSpec
    from tvbasis.passes import merge_task_vectors

    steps = {n: int((r.meta.get("train") or {}).get("steps", 1)) for n, r in results.items()}
    rows = []
    for label, (method, params) in fl_merge_specs(tvs, steps).items():
        t0 = time.time()
        merged = float_state(merge_task_vectors(pre_dir, dict(ft_dirs), MergeSpec(method, params), run=run))
        add = search(merged)
        del merged
        rows.append({"method": label, "M": None, "bytes_stored": all_vectors, "addition": add,
                     "negation": true_neg, "negation_extended": true_ext, "seconds": time.time() - t0,
                     "extra": {"negation_vector": "true task vector", "merge": method,
                               "params": {k: v for k, v in params.items() if k not in ("coefs", "norms")}}})
    return rows


def _result(ev: Evaluator, delta: Mapping[str, torch.Tensor], names: Sequence[str], ft_test: Mapping[str, float],
            ft_dev: Mapping[str, float] | None = None) -> AdditionResult:
    dev = ev.with_delta(delta, 1.0, "dev", list(names))
    test = ev.with_delta(delta, 1.0, "test", list(names))
    return AdditionResult(lam=1.0, dev=dev, test=test,
                          normalized_test={t: normalized_accuracy(test[t], ft_test[t]) for t in names},
                          criterion="learned coefficients")


def _combined(result: Any, comps: States) -> dict[str, torch.Tensor]:
    per = result.per_component()
    out: dict[str, torch.Tensor] = {}
    for c, tv in comps.items():
        for k, v in tv.items():
            a = per[c].get(k)
            if a is None:
                continue
            out[k] = out[k] + a * v.float() if k in out else a * v.float()
    return out


def k_shot(task: Task, k: int, seed: int) -> Task:
    """``task`` with its train split cut to at most k examples per class (seeded)."""
    rng = random.Random(f"{seed}:{task.name}:{k}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(task["train"].labels):
        by_class.setdefault(int(y), []).append(i)
    keep = sorted(i for idx in by_class.values() for i in rng.sample(idx, min(k, len(idx))))
    train = Split([task["train"].texts[i] for i in keep], [task["train"].labels[i] for i in keep])
    return replace(task, splits={**task.splits, "train": train})


def atlas_rows(work: Path, pre_dir: Path, ft_dirs: Mapping[str, str], encoder: Any, ev: Evaluator,
               tasks: Mapping[str, Task], tvs: States, ft_test: Mapping[str, float], all_vectors: int,
               shots: Sequence[int], M: int, max_length: int, seed: int, run: Any = None,
               epochs: int = 10) -> list[dict[str, Any]]:
    """aTLAS addition over all task vectors, and few-shot adaptation of the first task (module docstring)."""
    from tvbasis.eval.atlas import store_components
    from tvbasis.store import StoreSpec, WriteOptions, build_store

    names = list(tasks)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    r = learn_coefficients(encoder, tvs, tasks, AtlasSettings(max_length=max_length, seed=seed, epochs=epochs), split="dev")
    add = _result(ev, _combined(r, tvs), names, ft_test)
    rows.append({"method": "aTLAS (per-tensor, dev-trained)", "M": None, "bytes_stored": all_vectors,
                 "addition": add, "seconds": time.time() - t0,
                 "extra": {"mean_coefficients": r.mean_coefficients(), "best_epoch": r.best_epoch}})
    target, others = names[0], names[1:]
    if not others:
        return rows
    sources = {"task vectors": ({n: tvs[n] for n in others}, all_vectors * len(others) // len(names))}
    if len(others) >= 2:  # a store needs M < T
        store = build_store(pre_dir, {n: ft_dirs[n] for n in others}, StoreSpec("pca", M=min(M, len(others) - 1)),
                            work / "stores" / "atlas-fewshot", run, WriteOptions(force=True))
        bases = {c: float_state(tv) for c, tv in store_components(store).items()}
        sources[f"PCA store M={store.M}"] = (bases, int(store.nbytes))
    zs = ev.zero_shot("test", [target])[target]
    for k in shots:
        few = {target: k_shot(tasks[target], k, seed)}
        for label, (comps, nbytes) in sources.items():
            t0 = time.time()
            fr = learn_coefficients(encoder, comps, few, AtlasSettings(max_length=max_length, seed=seed, epochs=epochs),
                                    split="train", select="dev")
            res = _result(ev, _combined(fr, comps), [target], ft_test)
            rows.append({"method": f"aTLAS few-shot k={k} ({label})", "M": None, "bytes_stored": nbytes,
                         "addition": res, "seconds": time.time() - t0,
                         "extra": {"target": target, "from": others, "shots_per_class": k,
                                   "train_examples": len(few[target]["train"]), "zero_shot_test": zs,
                                   "mean_coefficients": fr.mean_coefficients(), "best_epoch": fr.best_epoch}})
    return rows


def linearized_rows(work: Path, settings: FinetuneSettings, encoder: Any, ev: Evaluator, tasks: Mapping[str, Task],
                    grid: Sequence[float], search: str,
                    negations: Callable[[Callable[[str], Mapping[str, torch.Tensor]]],
                                        tuple[list[NegationResult], list[NegationResult]]],
                    all_vectors: int, progress: bool = False) -> list[dict[str, Any]]:
    """Tangent task arithmetic: linearised fine-tunes, their sum and negations in the linearised model. The
    λ search is normalised by each linearised fine-tune's own accuracy in the linearised model."""
    from tvbasis.vectors import TaskVector

    t0 = time.time()
    lin = replace(settings, linearized=True)
    results = {n: finetune(t, work, lin, encoder=encoder, progress=progress) for n, t in tasks.items()}
    tvs = {n: float_state(TaskVector.from_checkpoints(work / "pretrained", r.path)) for n, r in results.items()}
    with linearized(encoder):
        own_test = {n: ev.with_delta(tvs[n], 1.0, "test", [n])[n] for n in tasks}
        own_dev = {n: ev.with_delta(tvs[n], 1.0, "dev", [n])[n] for n in tasks}
        add = ev.search_addition(sum_states(tvs), grid, finetuned_dev=own_dev, finetuned_test=own_test,
                                 search=search)
        neg, neg_ext = negations(lambda t: tvs[t])
    encoder.reset()
    return [{"method": "tangent task arithmetic (linearised fine-tunes)", "M": None, "bytes_stored": all_vectors,
             "addition": add, "negation": neg, "negation_extended": neg_ext, "seconds": time.time() - t0,
             "extra": {"linearised_finetuned_test": own_test, "linearised_finetuned_dev": own_dev,
                       "mean_linearised_finetuned_test": mean(own_test.values()),
                       "finetune_seconds": {n: (r.meta.get("train") or {}).get("seconds") for n, r in
                                            results.items()}}}]
