"""The theory check's points, read from a benchmark result (single- or multi-seed).

* Negation: one point per store row and negation pair: x = the target task's relative reconstruction error
  ‖v − v̂‖ / ‖v‖ in that store, y = the negation gap = target test accuracy after negating the store's
  reconstruction minus after negating the true task vector (same pair, same grid; > 0: the store negates less).
* Addition: one point per store row: x = the store's mean relative reconstruction error over its tasks,
  y = the addition gap = the store's mean normalized addition accuracy minus task arithmetic's.

Each point keeps its per-seed values (aligned by seed; NaN where a seed lacks the number), so a correlation can
be computed per seed and its spread reported (``spearman_per_seed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tvbasis.bench.spread import is_stat, spearman

TRUE_VECTOR = "true task vector"


@dataclass
class Point:
    method: str
    M: int | str  # an int, or "eigengap" where the rule chose it
    what: str  # the pair "target/control" (negation) or "" (addition)
    x: list[float]  # per seed
    y: list[float]  # per seed

    @property
    def label(self) -> str:
        return f"{self.method} M={self.M}"


def per_seed(x: Any) -> list[float]:
    """The per-seed values of a number or stat, NaN for missing ones (kept aligned by seed)."""
    raw = x["per_seed"] if is_stat(x) else [x]
    return [float("nan") if v is None else float(v) for v in raw]


def _align(a: list[float], b: list[float]) -> tuple[list[float], list[float]]:
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    n = min(len(a), len(b))
    return a[:n], b[:n]


def _minus(a: Any, b: Any) -> list[float]:
    x, y = _align(per_seed(a), per_seed(b))
    return [u - v for u, v in zip(x, y)]


def _m(M: Any) -> int | str:
    """A row's M: an int, or a rule's name ("eigengap") where the rule chose the size."""
    return M if isinstance(M, str) else int(M)


def _stores(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in result["rows"] if r.get("M") is not None and (r.get("extra") or {}).get("rel_errors")]


def true_vector_row(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    rows = result["rows"]
    return next((r for r in rows if r["method"].startswith("task arithmetic")), None) or next(
        (r for r in rows if (r.get("extra") or {}).get("negation_vector") == TRUE_VECTOR), None)


def negation_points(result: Mapping[str, Any], key: str = "negation") -> list[Point]:
    """Negation gap against the target's relative reconstruction error (``key``: negation / negation_extended)."""
    true = true_vector_row(result)
    if true is None:
        return []
    ref = {(n["target"], n["control"]): n for n in true.get(key) or []}
    out = []
    for r in _stores(result):
        errors = r["extra"]["rel_errors"]
        for n in r.get(key) or []:
            pair = (n["target"], n["control"])
            if pair not in ref or n["target"] not in errors:
                continue
            gap = _minus(n["target_test"], ref[pair]["target_test"])
            x, y = _align(per_seed(errors[n["target"]]), gap)
            out.append(Point(r["method"], _m(r["M"]), "/".join(pair), x, y))
    return out


def _mean_error(errors: Mapping[str, Any]) -> list[float]:
    cols = [per_seed(v) for v in errors.values()]
    k = max(len(c) for c in cols)
    cols = [c * k if len(c) == 1 else c for c in cols]
    out = []
    for i in range(k):
        vals = [c[i] for c in cols if i < len(c) and not math.isnan(c[i])]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def addition_points(result: Mapping[str, Any]) -> list[Point]:
    """Addition gap (store − task arithmetic, mean normalized test accuracy) against the store's mean relative
    reconstruction error."""
    ta = next((r for r in result["rows"] if r["method"].startswith("task arithmetic") and r.get("addition")), None)
    if ta is None:
        return []
    out = []
    for r in _stores(result):
        if not r.get("addition"):
            continue
        gap = _minus(r["addition"]["mean_normalized_test"], ta["addition"]["mean_normalized_test"])
        x, y = _align(_mean_error(r["extra"]["rel_errors"]), gap)
        out.append(Point(r["method"], _m(r["M"]), "", x, y))
    return out


def spearman_per_seed(points: Sequence[Point]) -> list[float]:
    """Spearman's ρ of (x, y) over the points, once per seed (NaN-free points only); [] for < 3 points."""
    if not points:
        return []
    k = max(len(p.x) for p in points)
    rhos = []
    for i in range(k):
        xy = [(p.x[i], p.y[i]) for p in points if i < len(p.x) and not (math.isnan(p.x[i]) or math.isnan(p.y[i]))]
        if len(xy) >= 3:
            rho = spearman([a for a, _ in xy], [b for _, b in xy])
            if not math.isnan(rho):
                rhos.append(rho)
    return rhos
