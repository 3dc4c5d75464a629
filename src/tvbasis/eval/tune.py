"""Choosing λ on the user's dev files: addition (one λ, or one per task), negation, any combination.

The same grid and search as the benchmark, from ``metrics``: one λ for θ₀ + λ·τ is ``Evaluator.search_addition``
(every grid point, or coarse-to-fine; the best mean dev score wins, ties to the smaller λ), negation is
``Evaluator.search_negation`` (λ minimising the target's dev accuracy with the control's kept ≥ threshold × the
pretrained's, walking λ upwards and stopping at the first λ that breaks it, as the benchmark does).

One λ per task (θ₀ + Σ_t λ_t·τ_t) is a coordinate search over the same grid: start from the best shared λ, then
for each task in turn choose its λ_t with the others fixed (``metrics.choose_lambda``), keeping a change only when
it raises the mean dev score; repeat until a round changes nothing (at most ``rounds`` rounds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tvbasis.errors import ConfigError
from tvbasis.eval.metrics import (
    CONTROL_THRESHOLD,
    DEFAULT_GRID,
    Evaluator,
    NegationResult,
    choose_lambda,
    dev_score,
)

Delta = Mapping[str, torch.Tensor]


def combine_deltas(vectors: Mapping[str, Delta], coefs: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Σ_t coef_t·τ_t over the union of the vectors' tensors (coef 1 when ``coefs`` is None; tasks missing
    from ``coefs`` are left out)."""
    out: dict[str, torch.Tensor] = {}
    for t, vec in vectors.items():
        c = 1.0 if coefs is None else coefs.get(t)
        if c is None or c == 0:
            continue
        for k, v in vec.items():
            if k in out:
                out[k].add_(v.float(), alpha=float(c))
            else:
                out[k] = v.float() * float(c)
    return out


@dataclass
class TuneResult:
    """What ``tune`` chose and the dev (and, with held-out files, test) accuracies at that choice."""

    mode: str                                   # addition | addition-per-task | combine | negation
    criterion: str                              # accuracy | normalized | negation
    lam: float | None = None                    # the shared λ (None for per-task)
    lams: dict[str, float] = field(default_factory=dict)
    score: float = float("nan")                 # the selection score at the choice (mean dev)
    curve: dict[float, float] = field(default_factory=dict)  # λ -> dev score (shared λ) / target dev (negation)
    dev: dict[str, float] = field(default_factory=dict)
    pretrained_dev: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    pretrained_test: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per-task search: λ_t and score after each round
    negation: NegationResult | None = None

    @property
    def coefficients(self) -> dict[str, float]:
        """Task -> coefficient of the chosen edit (per-task λ_t); empty for a shared λ."""
        return dict(self.lams)

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x
        d = {"mode": self.mode, "criterion": self.criterion, "lambda": self.lam, "lambdas": self.lams or None,
             "score": self.score, "curve": self.curve, "dev": self.dev, "pretrained_dev": self.pretrained_dev,
             "test": self.test or None, "pretrained_test": self.pretrained_test or None,
             "rounds": self.rounds or None,
             "negation": self.negation.to_dict() if self.negation is not None else None}
        return clean(d)


def _iterate(ev: Evaluator, desc: str) -> Any:
    def it(grid: Sequence[float]) -> Iterable[float]:
        if not ev.progress:
            return list(grid)
        from tqdm.auto import tqdm
        return tqdm(list(grid), desc=desc, unit="λ", leave=False)
    return it


def _baseline(ev: Evaluator, tasks: Sequence[str], report: str | None) -> tuple[dict[str, float], dict[str, float]]:
    return ev.zero_shot("dev", tasks), (ev.zero_shot(report, tasks) if report else {})


def tune_addition(ev: Evaluator, delta: Delta, tasks: Sequence[str] | None = None,
                  grid: Sequence[float] = DEFAULT_GRID, search: str = "grid",
                  finetuned_dev: Mapping[str, float] | None = None, report: str | None = None,
                  mode: str = "addition") -> TuneResult:
    """One λ for θ₀ + λ·delta (the sum of the task vectors, a store's addition, or any combination): the best
    mean dev score over ``tasks`` (normalized by ``finetuned_dev`` when given)."""
    names = list(tasks or ev.tasks)
    pre_dev, pre_test = _baseline(ev, names, report)
    r = ev.search_addition(delta, grid, names, finetuned_dev=finetuned_dev, search=search, report=report)
    return TuneResult(mode=mode, criterion=r.criterion, lam=r.lam, score=r.curve[r.lam], curve=r.curve, dev=r.dev,
                      pretrained_dev=pre_dev, test=r.test, pretrained_test=pre_test)


def tune_addition_per_task(ev: Evaluator, vectors: Mapping[str, Delta], tasks: Sequence[str] | None = None,
                           grid: Sequence[float] = DEFAULT_GRID, search: str = "grid",
                           finetuned_dev: Mapping[str, float] | None = None, rounds: int = 2,
                           report: str | None = None) -> TuneResult:
    """One λ_t per task vector for θ₀ + Σ_t λ_t·τ_t, by the coordinate search of the module docstring."""
    if not vectors:
        raise ConfigError("per-task λ needs at least one task vector")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    names = list(tasks or ev.tasks)
    order = list(vectors)
    pre_dev, pre_test = _baseline(ev, names, report)

    def score(delta: Delta) -> float:
        return dev_score(ev.at(delta, 1.0, "dev", names), names, finetuned_dev)

    try:
        total = combine_deltas(vectors)
        shared, curve = choose_lambda(grid, lambda lam: dev_score(ev.at(total, lam, "dev", names), names,
                                                                  finetuned_dev),
                                      search, _iterate(ev, "λ shared"))
        lams = {t: shared for t in order}
        best = curve[shared]
        history: list[dict[str, Any]] = [{"round": 0, "lambdas": dict(lams), "score": best}]
        for r in range(1, rounds + 1):
            changed = False
            for t in order:
                offset = combine_deltas(vectors, {s: lams[s] for s in order if s != t})
                tv = vectors[t]

                def at(lam: float, offset: dict[str, torch.Tensor] = offset, tv: Delta = tv, t: str = t,
                       current: float = best) -> float:
                    if lam == lams[t]:
                        return current  # the current choice: its score is known
                    delta = {k: v.clone() for k, v in offset.items()}
                    for k, v in tv.items():
                        if k in delta:
                            delta[k].add_(v.float(), alpha=lam)
                        else:
                            delta[k] = v.float() * lam
                    return score(delta)

                lam_t, c = choose_lambda(grid, at, search, _iterate(ev, f"λ {t} (round {r})"))
                if c[lam_t] > best + 1e-12 and lam_t != lams[t]:
                    lams[t], best, changed = lam_t, c[lam_t], True
            history.append({"round": r, "lambdas": dict(lams), "score": best})
            if not changed:
                break
        final = combine_deltas(vectors, lams)
        dev = ev.at(final, 1.0, "dev", names)
        test = ev.at(final, 1.0, report, names) if report else {}
    finally:
        ev.encoder.reset()
    return TuneResult(mode="addition-per-task", criterion="normalized" if finetuned_dev else "accuracy", lams=lams,
                      score=best, curve=curve, dev=dev, pretrained_dev=pre_dev, test=test, pretrained_test=pre_test,
                      rounds=history)


def tune_negation(ev: Evaluator, delta: Delta, target: str, control: str, grid: Sequence[float] = DEFAULT_GRID,
                  threshold: float = CONTROL_THRESHOLD, report: str | None = None) -> TuneResult:
    """λ for θ₀ − λ·τ_target: the lowest target dev accuracy with the control's ≥ threshold × the pretrained's
    (λ = 0, no edit, when no λ keeps the control)."""
    if not threshold > 0:
        raise ConfigError(f"control threshold must be a positive fraction of the pretrained accuracy, got {threshold}")
    for t in (target, control):
        if t not in ev.tasks:
            raise ConfigError(f"negation: no --task file for {t!r} (tasks given: {', '.join(ev.tasks)})")
    n = ev.search_negation(delta, target, control, grid, threshold, early_stop=True, report=report)
    dev = {target: n.target_dev, control: n.control_dev}
    pre_dev = ev.zero_shot("dev", [target, control])
    test = {target: n.target_test, control: n.control_test} if report else {}
    pre_test = {target: n.pretrained_target_test, control: n.pretrained_control_test} if report else {}
    return TuneResult(mode="negation", criterion="negation", lam=n.lam, score=n.target_dev,
                      curve={lam: tc[0] for lam, tc in n.curve.items()}, dev=dev, pretrained_dev=pre_dev, test=test,
                      pretrained_test=pre_test, negation=n)
