"""Accuracy of any encoder state on any task split; normalized accuracy; λ search for addition and negation.

``Evaluator`` tokenises every (task, split) once, builds the frozen heads once, and caches the pretrained
model's embeddings, so evaluating an edit θ₀ + λ·τ costs only the forward passes of the edited model.

* Addition: λ on the grid maximising mean dev score (normalized accuracy when the fine-tuned dev accuracies
  are known, absolute otherwise; the smallest λ wins ties); test accuracy reported at that λ.
* Negation of target t with a control c: λ minimising target dev accuracy subject to control dev accuracy
  ≥ 95 % of the pretrained model's control dev accuracy (λ = 0, i.e. no edit, when no λ qualifies).

``choose_lambda`` is the one grid / coarse-to-fine search, shared by the benchmark and ``tvbasis tune``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from tvbasis.errors import ConfigError, UnknownTaskError
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.evalcache import context_digest
from tvbasis.eval.heads import Head, build_head
from tvbasis.eval.tasks import Task

#: default λ grid: 0.05, 0.10, ..., 1.00
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
#: control accuracy must stay at or above this fraction of the pretrained model's
CONTROL_THRESHOLD = 0.95


def lambda_grid(step: float = 0.05, stop: float = 1.0, start: float | None = None) -> tuple[float, ...]:
    """λ values start, start+step, ..., stop (start defaults to step); rounded to avoid 0.30000000000000004."""
    if step <= 0 or stop <= 0:
        raise ConfigError(f"λ grid needs step > 0 and stop > 0, got step={step}, stop={stop}")
    start = step if start is None else start
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    if n < 1:
        raise ConfigError(f"empty λ grid (start={start}, stop={stop}, step={step})")
    return tuple(round(start + i * step, 6) for i in range(n))


def parse_grid(text: str) -> tuple[float, ...]:
    """'0.1,0.3,0.5' or 'step:stop' (e.g. '0.25:1.0') -> λ values."""
    text = text.strip()
    try:
        if ":" in text:
            step, stop = (float(x) for x in text.split(":"))
            return lambda_grid(step, stop)
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"bad λ grid {text!r}: expected 'a,b,c' or 'step:stop'") from None
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"bad λ grid {text!r}: need one or more finite values >= 0")
    return values


def refine_search(grid: Sequence[float], score: Callable[[float], float], stride: int = 4) -> float:
    """Maximise ``score`` over a sorted grid: every ``stride``-th point (ending at the last), then the
    neighbours at stride/2, stride/4, ... around the best so far. Ties go to the smaller λ."""
    n = len(grid)
    values: dict[int, float] = {}

    def f(i: int) -> float:
        if i not in values:
            values[i] = score(grid[i])
        return values[i]

    for i in range(n - 1, -1, -stride):
        f(i)

    def best() -> int:
        return max(values, key=lambda i: (values[i], -i))

    step = stride // 2
    while step >= 1:
        b = best()
        for j in (b - step, b + step):
            if 0 <= j < n:
                f(j)
        step //= 2
    return grid[best()]


#: the λ searches ``choose_lambda`` knows
SEARCHES = ("grid", "refine")


def choose_lambda(grid: Sequence[float], score: Callable[[float], float], search: str = "grid",
                  iterate: Callable[[Sequence[float]], Iterable[float]] = list) -> tuple[float, dict[float, float]]:
    """The λ of ``grid`` maximising ``score`` (ties: the smallest λ), and every score computed (λ -> score).

    ``search="grid"`` scores every λ (in the order ``iterate`` yields them: a progress bar, say); ``"refine"``
    every 4th grid point, then halves the step around the best one (``refine_search``). The one λ search of the
    benchmark and of ``tvbasis tune``."""
    values = sorted(set(grid))
    if not values:
        raise ConfigError("empty λ grid")
    if search not in SEARCHES:
        raise ConfigError(f"unknown λ search {search!r}; expected 'grid' or 'refine'")
    scores: dict[float, float] = {}

    def f(lam: float) -> float:
        if lam not in scores:
            scores[lam] = score(lam)
        return scores[lam]

    if search == "grid":
        for lam in iterate(values):
            f(lam)
    else:
        refine_search(values, f, stride=4)
    best = max(scores, key=lambda lam: (scores[lam], -lam))
    return best, dict(sorted(scores.items()))


def accuracy(predictions: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    if len(labels) == 0:
        return float("nan")
    return float((predictions.cpu() == labels).float().mean())


def normalized_accuracy(acc: float, finetuned_acc: float) -> float:
    """acc(edited on t) / acc(fine-tuned t on t)."""
    return acc / finetuned_acc if finetuned_acc > 0 else float("nan")


def mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def dev_score(accs: Mapping[str, float], tasks: Sequence[str], finetuned_dev: Mapping[str, float] | None = None
              ) -> float:
    """The selection score of an edit on dev: mean normalized accuracy over ``tasks`` when the fine-tuned dev
    accuracies are known, else mean accuracy."""
    if finetuned_dev:
        return mean(normalized_accuracy(accs[t], finetuned_dev[t]) for t in tasks)
    return mean(accs[t] for t in tasks)


@dataclass
class AdditionResult:
    lam: float
    dev: dict[str, float]
    test: dict[str, float]
    normalized_test: dict[str, float] = field(default_factory=dict)
    curve: dict[float, float] = field(default_factory=dict)  # λ -> selection score on dev
    criterion: str = "accuracy"

    @property
    def mean_test(self) -> float:
        return mean(self.test.values())

    @property
    def mean_normalized_test(self) -> float:
        return mean(self.normalized_test.values())

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["curve"] = {str(k): v for k, v in self.curve.items()}
        d["mean_test"] = self.mean_test
        d["mean_normalized_test"] = self.mean_normalized_test
        return d


@dataclass
class NegationResult:
    target: str
    control: str
    lam: float
    target_dev: float
    control_dev: float
    target_test: float
    control_test: float
    pretrained_target_test: float
    pretrained_control_test: float
    pretrained_control_dev: float
    feasible: bool
    curve: dict[float, tuple[float, float]] = field(default_factory=dict)  # λ -> (target dev, control dev)

    @property
    def control_retained(self) -> float:
        """control test accuracy / pretrained control test accuracy."""
        return normalized_accuracy(self.control_test, self.pretrained_control_test)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["curve"] = {str(k): list(v) for k, v in self.curve.items()}
        d["control_retained"] = self.control_retained
        return d


class Evaluator:
    """Evaluate the live state of ``encoder`` on tasks, with cached tokenisation, heads and θ₀ embeddings."""

    def __init__(self, encoder: Encoder, tasks: Mapping[str, Task], splits: Sequence[str] = ("dev", "test"),
                 progress: bool = False) -> None:
        if encoder.edited:
            encoder.reset()
        self.encoder = encoder
        self.tasks = dict(tasks)
        self.splits = tuple(splits)
        self.progress = progress
        self.heads: dict[str, Head] = {name: build_head(encoder, t) for name, t in self.tasks.items()}
        self._batches = {(name, s): encoder.batches(encoder.tokenize(t[s].texts))
                         for name, t in self.tasks.items() for s in self.splits}
        self._pretrained_emb: dict[tuple[str, str], torch.Tensor] = {}
        self.cache = encoder.eval_cache
        self._context = "" if self.cache is None else self._context_digest()

    def _context_digest(self) -> str:
        """What an accuracy depends on besides the edit: θ₀, the max length, the inference precision, each task
        split and head."""
        parts: dict[str, object] = {"max_length": self.encoder.max_length, "splits": {
            f"{n}/{s}": [t[s].texts, t[s].labels] for n, t in self.tasks.items() for s in self.splits}}
        if self.encoder.eval_dtype != torch.float32:  # float32 keeps the digest of caches written before
            parts["eval_dtype"] = str(self.encoder.eval_dtype)
        tensors = [*sorted(self.encoder.pretrained_state.items()),
                   *((f"head/{n}", h.weight) for n, h in sorted(self.heads.items()))]
        return context_digest(parts, tensors)

    def _check(self, task: str, split: str) -> None:
        if task not in self.tasks:
            raise UnknownTaskError(f"task {task!r} is not loaded in this evaluator; loaded: {', '.join(self.tasks)}")
        if split not in self.splits:
            raise ConfigError(f"split {split!r} is not prepared; prepared: {', '.join(self.splits)}")

    # ----------------------------------------------------------------- raw evaluation
    def embed(self, task: str, split: str) -> torch.Tensor:
        """Embeddings of (task, split) under the encoder's current weights (θ₀ embeddings are cached)."""
        self._check(task, split)
        key = (task, split)
        if not self.encoder.edited and key in self._pretrained_emb:
            return self._pretrained_emb[key]
        desc = f"{task}/{split}" if self.progress else False
        emb = self.encoder.encode_batches(self._batches[key], len(self.tasks[task][split]), progress=desc)
        if not self.encoder.edited:
            self._pretrained_emb[key] = emb
        return emb

    def accuracy(self, task: str, split: str = "test") -> float:
        """Accuracy of the encoder's current weights on one task split (with the task's frozen head); read back
        from the encoder's ``eval_cache`` when it holds this edit's score."""
        cache, key = self.cache, ""
        if cache is not None:
            self._check(task, split)
            key = cache.key(self._context, self.encoder.weights_digest(), task, split)
            hit = cache.get(key)
            if hit is not None:
                return hit
        emb = self.embed(task, split)
        acc = accuracy(self.heads[task].predict(emb), self.tasks[task][split].labels)
        if cache is not None:
            cache.put(key, acc)
        return acc

    def accuracies(self, split: str = "test", tasks: Iterable[str] | None = None) -> dict[str, float]:
        return {t: self.accuracy(t, split) for t in (tasks or self.tasks)}

    def with_delta(self, delta: Mapping[str, torch.Tensor] | None, scale: float, split: str = "test",
                   tasks: Iterable[str] | None = None) -> dict[str, float]:
        """Accuracies of θ₀ + scale·delta; the encoder is left at θ₀ afterwards."""
        try:
            self.encoder.set_delta(delta, scale)
            return self.accuracies(split, tasks)
        finally:
            self.encoder.reset()

    def _at(self, delta: Mapping[str, torch.Tensor] | None, scale: float, split: str,
            tasks: Iterable[str]) -> dict[str, float]:
        """Accuracies of θ₀ + scale·delta, leaving the edit in place (searches reset once at the end: each
        reset/set costs a full pass over the weights)."""
        self.encoder.set_delta(delta, scale)
        return self.accuracies(split, tasks)

    def at(self, delta: Mapping[str, torch.Tensor] | None, scale: float, split: str,
           tasks: Iterable[str] | None = None) -> dict[str, float]:
        """Accuracies of θ₀ + scale·delta with the edit left in place, for searches of their own (such as
        ``tune``'s per-task λ); call ``encoder.reset()`` when done."""
        return self._at(delta, scale, split, list(tasks or self.tasks))

    def zero_shot(self, split: str = "test", tasks: Iterable[str] | None = None) -> dict[str, float]:
        self.encoder.reset()
        return self.accuracies(split, tasks)

    # ----------------------------------------------------------------- λ searches
    def search_addition(self, delta: Mapping[str, torch.Tensor], grid: Sequence[float] = DEFAULT_GRID,
                        tasks: Iterable[str] | None = None,
                        finetuned_dev: Mapping[str, float] | None = None,
                        finetuned_test: Mapping[str, float] | None = None,
                        search: str = "grid", report: str | None = "test") -> AdditionResult:
        """Choose λ for θ₀ + λ·delta on dev (mean over ``tasks``), report ``report`` (test) at that λ.

        With ``finetuned_dev`` the criterion is the mean normalized dev accuracy, else mean absolute accuracy.
        ``finetuned_test`` adds per-task normalized test accuracy to the result. ``search="grid"`` evaluates
        every λ; ``"refine"`` evaluates every 4th grid point, then halves the step around the best one
        (9 of 20 points for the default grid; exact when the dev curve is unimodal, as it is in practice).
        ``report=None``: no held-out split (``test`` stays empty), as when tuning on the user's dev files only.
        """
        names = list(tasks or self.tasks)
        criterion = "normalized" if finetuned_dev else "accuracy"
        devs: dict[float, dict[str, float]] = {}

        def score(lam: float) -> float:
            accs = devs[lam] = self._at(delta, lam, "dev", names)
            return dev_score(accs, names, finetuned_dev)

        try:
            best, curve = choose_lambda(grid, score, search, lambda g: self._iter(g, "λ addition"))
            test = self._at(delta, best, report, names) if report else {}
        finally:
            self.encoder.reset()
        norm = ({t: normalized_accuracy(test[t], finetuned_test[t]) for t in names} if finetuned_test and test
                else {})
        return AdditionResult(lam=best, dev=devs[best], test=test, normalized_test=norm, curve=curve,
                              criterion=criterion)

    def search_negation(self, delta: Mapping[str, torch.Tensor], target: str, control: str,
                        grid: Sequence[float] = DEFAULT_GRID, threshold: float = CONTROL_THRESHOLD,
                        early_stop: bool = False, report: str | None = "test",
                        cache: dict[float, tuple[float, float]] | None = None) -> NegationResult:
        """Negate ``delta`` (the target's task vector): evaluate θ₀ − λ·delta; λ minimises target dev accuracy
        with control dev accuracy ≥ threshold · pretrained control dev accuracy.

        ``early_stop``: walk λ upwards, evaluate the control first and stop at the first λ that breaks the
        constraint (control accuracy falls with λ in practice; saves the evaluations past that point).
        ``report=None``: no held-out split (the ``*_test`` fields are NaN).
        ``cache``: λ -> (target dev, control dev) of this same delta, target and control, read and filled by the
        search without early stopping (two searches over overlapping grids, such as the benchmark's grid and its
        extended grid up to λ = 3, then evaluate each λ once).
        """
        if target == control:
            raise ConfigError(f"negation control must differ from the target ({target})")
        pre_dev = self.zero_shot("dev", [target, control])
        nan = float("nan")
        pre_test = self.zero_shot(report, [target, control]) if report else {target: nan, control: nan}
        floor = threshold * pre_dev[control]
        curve: dict[float, tuple[float, float]] = {}
        try:
            for lam in self._iter(sorted(set(grid)), f"λ negation {target}"):
                if early_stop:
                    c = self._at(delta, -lam, "dev", [control])[control]
                    if c < floor:
                        curve[lam] = (float("nan"), c)
                        break
                    curve[lam] = (self.accuracy(target, "dev"), c)  # the edit at this λ is still in place
                elif cache is not None and lam in cache:
                    curve[lam] = cache[lam]
                else:
                    accs = self._at(delta, -lam, "dev", [target, control])
                    curve[lam] = (accs[target], accs[control])
                    if cache is not None:
                        cache[lam] = curve[lam]
            ok = [lam for lam, (_, c) in curve.items() if c >= floor]
            if ok:
                best = min(ok, key=lambda lam: (curve[lam][0], lam))
                test = self._at(delta, -best, report, [target, control]) if report else pre_test
                t_dev, c_dev = curve[best]
            else:
                best, test = 0.0, pre_test
                t_dev, c_dev = pre_dev[target], pre_dev[control]
        finally:
            self.encoder.reset()
        return NegationResult(target=target, control=control, lam=best, target_dev=t_dev, control_dev=c_dev,
                              target_test=test[target], control_test=test[control],
                              pretrained_target_test=pre_test[target], pretrained_control_test=pre_test[control],
                              pretrained_control_dev=pre_dev[control], feasible=bool(ok), curve=curve)

    def _iter(self, grid: Sequence[float], desc: str) -> Iterable[float]:
        if not self.progress:
            return list(grid)
        from tqdm.auto import tqdm
        return tqdm(list(grid), desc=desc, unit="λ", leave=False)
