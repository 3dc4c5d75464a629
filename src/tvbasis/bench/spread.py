"""Mean ± spread over seeds, and the one rule for calling a difference.

A multi-seed benchmark result (``tvbasis bench --seeds K``) holds every number as a *stat*:
``{"mean": m, "std": s, "per_seed": [x_1, …, x_K]}``, where ``std`` is the **sample** standard deviation
(divisor K − 1; 0 for a single seed, whose spread is unknown rather than zero — the claims table says how many
seeds each number has). A single-seed result holds plain numbers; every accessor here takes both.

``separated(a, b)``: a difference is called only when |mean_a − mean_b| > std_a + std_b, i.e. the two
one-standard-deviation intervals do not overlap. It is a deliberately simple, conservative rule (no test
statistic), the one the summary line and the claims table use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: how the spread is computed, recorded in multi-seed results
STD_KIND = "sample standard deviation over seeds (divisor K - 1; 0 with one seed)"
#: keys whose values are not measurements (kept as one list per seed, never averaged)
NOT_AVERAGED = frozenset({"M", "bytes_stored", "labels", "cluster_labels", "store", "clusters", "settings", "config", "feasible",
                          "negation_vector", "merge", "kind", "rule", "criterion", "target", "control",
                          "T", "first", "checkpoints", "addition_mode"})


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """(mean, sample std) of the finite values; std is 0 for one value; (nan, nan) for none."""
    vals = _finite(values)
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def is_stat(x: Any) -> bool:
    return isinstance(x, Mapping) and "per_seed" in x and "mean" in x


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "per_seed": list(values)}


def values_of(x: Any) -> list[float]:
    """The per-seed values of a stat, [x] for a plain number, [] for None / NaN."""
    if is_stat(x):
        return _finite(x["per_seed"])
    if x is None:
        return []
    return _finite([float(x)])


def mean_of(x: Any) -> float:
    return mean_std(values_of(x))[0]


def separated(a_values: Iterable[float | None], b_values: Iterable[float | None]) -> bool:
    """True when |mean_a − mean_b| > std_a + std_b (sample stds; see the module docstring). False when either
    side has no finite value."""
    ma, sa = mean_std(a_values)
    mb, sb = mean_std(b_values)
    if math.isnan(ma) or math.isnan(mb):
        return False
    return abs(ma - mb) > sa + sb


def compare(a_values: Iterable[float | None], b_values: Iterable[float | None]) -> str:
    """'above' / 'below' when a and b are separated, else 'within noise' ('not measured' when one is empty)."""
    a, b = list(a_values), list(b_values)
    if not _finite(a) or not _finite(b):
        return "not measured"
    if not separated(a, b):
        return "within noise"
    return "above" if mean_std(a)[0] > mean_std(b)[0] else "below"


def fmt(x: Any, scale: float = 100.0, digits: int = 1) -> str:
    """'70.3 ± 1.2' for a stat (scaled), '70.3' for a plain number, '–' for nothing."""
    vals = values_of(x)
    if not vals:
        return "–"
    m, s = mean_std(vals)
    if is_stat(x):
        return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"
    return f"{scale * m:.{digits}f}"


def aggregate(values: Sequence[Any], key: str = "") -> Any:
    """Combine one structure per seed into one: numbers -> stat, dicts key by key, equal-length lists element by
    element, anything else (strings, keys in NOT_AVERAGED) the common value or, where the seeds differ, the list
    of per-seed values under ``{"per_seed": [...]}``."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if key not in NOT_AVERAGED:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            return stat(list(values))
        if all(isinstance(v, Mapping) for v in present):
            keys = list(dict.fromkeys(k for v in present for k in v))
            return {k: aggregate([v.get(k) if isinstance(v, Mapping) else None for v in values], str(k))
                    for k in keys}
        if all(isinstance(v, list) for v in present) and len({len(v) for v in present}) == 1 \
                and len(present) == len(values):
            return [aggregate([v[i] for v in values], key) for i in range(len(present[0]))]
    if all(v == present[0] for v in present) and len(present) == len(values):
        return present[0]
    return {"per_seed": list(values)}


def means_view(x: Any) -> Any:
    """The same structure with every stat replaced by its mean (for code that draws or formats plain numbers)."""
    if is_stat(x):
        return mean_of(x)
    if isinstance(x, Mapping):
        if set(x) == {"per_seed"}:
            seeds = [v for v in x["per_seed"] if v is not None]
            if seeds and all(isinstance(v, bool) for v in seeds):
                return all(seeds)
            return seeds[0] if seeds else None
        return {k: means_view(v) for k, v in x.items()}
    if isinstance(x, list):
        return [means_view(v) for v in x]
    return x


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant side."""
    if len(x) != len(y) or len(x) < 3:
        return float("nan")

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)
