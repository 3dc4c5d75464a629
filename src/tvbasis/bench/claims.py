"""The README table "Does the paper's claim hold here?" from benchmark results (``tvbasis bench --claims``).

Every claim is read from the rows of a ``bench.json`` (single- or multi-seed); all addition numbers are mean
normalized test accuracy (``addition.mean_normalized_test``). Verdicts use the spread rule of
``spread.separated`` (|mean_a − mean_b| > std_a + std_b, sample stds over seeds): a ≥ b "holds" when a is above
b and separated, "does not hold" when below and separated, "within noise" otherwise. With one seed the spread is
0 and every difference counts — the seeds column says so. A claim whose rows a result lacks is "not measured";
no number is ever filled in.

The claims, per benchmark (and per M where a row is per M):

i.   bases ≥ heuristic baselines, addition: the best of the paper's bases (autoencoder, pca-paper, cluster-mean,
     cluster-ties) against the best of random and random-sample, at each M. (``pca``'s default addition is task
     arithmetic itself, so it is not counted as a basis here.)
ii.  autoencoder ≥ PCA, addition, at each M: against ``pca-paper`` (the paper's Σ_m s_m) and against ``pca``
     (the sum of the reconstructions, which is task arithmetic); and, where the bench measured both additions
     (``extra.addition_modes``), the autoencoder's sum of reconstructions S·W·1 against ``pca``.
iii. some store ≥ full task arithmetic, addition: the best store row of any basis method and M against
     ``task arithmetic (sum)`` (``pca`` left out: its addition is task arithmetic by construction).
iv.  spectral clusters ≥ random clusters, addition, at each k (M; "eigengap": the rule's k): ``cluster-<inner>``
     against ``cluster-random-<inner>`` (the spectral clusters' sizes with members drawn at random,
     ``assignment=random`` in bases/cluster.py), with λ searched and, a second line, at coefficient 1
     (``extra.addition_at_1``).
v.   negation error grows with reconstruction error: Spearman's ρ, per seed, between each store's negation gap
     (target accuracy through the store minus through the true vector) and the target's relative
     reconstruction error, over every store and pair (``bench/theory.py``); "holds" when ρ > 0 separated from 0,
     "does not hold" when ρ < 0 separated, else within noise; fewer than 3 points: not measured. A second line
     for the extended negation grid (up to λ = 3) when the run has one.
vi.  continual add-task ≈ rebuild: from ``result["continual"]["steps"]``, a list of
     ``{"T": n, "add_task": {"mean_normalized_test": x}, "rebuild": {"mean_normalized_test": y}}`` (numbers or
     stats) — the last step compared; "holds" unless add-task is below the rebuild and separated ("does not
     hold"). ``tvbasis bench --continual`` writes it (bench/continual.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tvbasis.bench.spread import compare, mean_std, values_of
from tvbasis.bench.theory import negation_points, spearman_per_seed
from tvbasis.eval.tasks import source_of

BASES = ("autoencoder", "pca-paper", "cluster-mean", "cluster-ties")
HEURISTICS = ("random", "random-sample")
TASK_ARITHMETIC = "task arithmetic (sum)"
RANDOM_CLUSTERS = "cluster-random-"
#: pca's default addition is Σ_t v̂_t = T·μ = task arithmetic by construction, not a store beating it
EXCLUDED_FROM_III = ("pca",)
NOT_MEASURED = "not measured"
VERDICT = {"above": "holds", "below": "does not hold", "within noise": "within noise", NOT_MEASURED: NOT_MEASURED}


@dataclass
class Line:
    claim: str
    benchmark: str
    numbers: str
    seeds: int
    verdict: str

    def cells(self) -> list[str]:
        return [self.claim, self.benchmark, self.numbers, str(self.seeds) if self.seeds else "–", self.verdict]


def benchmark_name(result: Mapping[str, Any]) -> str:
    """'8 tasks, --full' / '36 sub-tasks (--tasks many), default' from a result's config."""
    cfg = result.get("config") or {}
    tasks = list(cfg.get("tasks") or (result.get("tasks") or {}))
    subs = sum(1 for t in tasks if source_of(t) != t)
    kind = f"{len(tasks)} sub-tasks (--tasks many)" if tasks and subs == len(tasks) else f"{len(tasks)} tasks"
    return f"{kind}, {'--full' if cfg.get('full') else 'default'}"


def n_seeds(result: Mapping[str, Any]) -> int:
    return len(result.get("seeds") or [0])


def _addition(row: Mapping[str, Any] | None) -> list[float]:
    if not row or not row.get("addition"):
        return []
    return values_of(row["addition"].get("mean_normalized_test"))


def _rows(result: Mapping[str, Any]) -> dict[tuple[str, Any], Mapping[str, Any]]:
    """Rows by (method, M). Where a run has no ``pca-paper`` row but measured the ``pca`` store's addition both
    ways (``extra.addition_modes``), the paper's Σ_m s_m of that same store stands in as ``pca-paper``."""
    rows: dict[tuple[str, Any], Mapping[str, Any]] = {(r["method"], r.get("M")): r for r in result.get("rows") or []}
    for (m, M), r in list(rows.items()):
        paper = ((r.get("extra") or {}).get("addition_modes") or {}).get("paper")
        if m == "pca" and paper and ("pca-paper", M) not in rows:
            rows[("pca-paper", M)] = {"method": "pca-paper", "M": M, "addition": paper,
                                      "extra": {"from": "pca addition_modes.paper"}}
    return rows


def _Ms(result: Mapping[str, Any]) -> list[Any]:
    """The rows' basis sizes: integers ascending, then rule names ("eigengap": the rule chose k)."""
    Ms = {r["M"] for r in result.get("rows") or [] if r.get("M") is not None}
    return sorted(m for m in Ms if not isinstance(m, str)) + sorted(m for m in Ms if isinstance(m, str))


def _mode_addition(row: Mapping[str, Any] | None, mode: str) -> list[float]:
    """The row's addition in ``mode`` (paper: Σ_m s_m, reconstructions: Σ_t v̂_t = S·W·1) where the bench
    measured both (``extra.addition_modes``)."""
    modes = ((row or {}).get("extra") or {}).get("addition_modes") or {}
    return values_of((modes.get(mode) or {}).get("mean_normalized_test"))


def _at_one(row: Mapping[str, Any] | None) -> list[float]:
    return values_of((((row or {}).get("extra") or {}).get("addition_at_1") or {}).get("mean_normalized_test"))


def _named(name: str, values: list[float]) -> tuple[str, list[float]] | None:
    return (name, values) if values else None


def _best(rows: Mapping[tuple[str, Any], Mapping[str, Any]], methods: Sequence[str], M: Any
          ) -> tuple[str, list[float]] | None:
    found = [(m, _addition(rows.get((m, M)))) for m in methods]
    found = [(m, v) for m, v in found if v]
    return max(found, key=lambda mv: mean_std(mv[1])[0]) if found else None


def _anchored(rows: Mapping[tuple[str, Any], Mapping[str, Any]], anchor: Sequence[str], Ms: list[Any]) -> list[Any]:
    """The Ms at which a claim is read: those where an ``anchor`` row exists (cluster rows at other k are not
    compared with absent baselines); the first M alone when no anchor row exists (one 'not measured' line)."""
    have = [M for M in Ms if any((m, M) in rows for m in anchor)]
    return have or Ms[:1]


def _pm(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}" if len(values) > 1 else f"{100 * m:.1f}"


def _pair_line(claim: str, bench: str, seeds: int, a: tuple[str, list[float]] | None,
               b: tuple[str, list[float]] | None) -> Line:
    if a is None or b is None:
        return Line(claim, bench, "–", seeds, NOT_MEASURED)
    numbers = f"{a[0]} {_pm(a[1])} vs {b[0]} {_pm(b[1])}"
    return Line(claim, bench, numbers, seeds, VERDICT[compare(a[1], b[1])])


def _claims_of(result: Mapping[str, Any], bench: str) -> list[Line]:
    rows, k = _rows(result), n_seeds(result)
    Ms = _Ms(result) or [None]
    out: list[Line] = []
    for M in _anchored(rows, HEURISTICS, Ms):
        out.append(_pair_line(f"(i) bases ≥ heuristic baselines, addition, M = {M}", bench, k,
                              _best(rows, BASES, M), _best(rows, HEURISTICS, M)))
    for M in _anchored(rows, ("autoencoder",), Ms):
        for other, what in (("pca-paper", "PCA Σ_m s_m (paper)"), ("pca", "PCA reconstructions (= task arithmetic)")):
            out.append(_pair_line(f"(ii) autoencoder ≥ {what}, addition, M = {M}", bench, k,
                                  _best(rows, ("autoencoder",), M), _best(rows, (other,), M)))
    for M in Ms:  # the same store's addition as S·W·1 (every task weighted by its decoder), against PCA's
        ae = _named("autoencoder Σ_t v̂_t", _mode_addition(rows.get(("autoencoder", M)), "reconstructions"))
        if ae is not None:
            out.append(_pair_line(f"(ii) autoencoder S·W·1 ≥ PCA reconstructions, addition, M = {M}", bench, k, ae,
                                  _best(rows, ("pca",), M)))
    stores = sorted({m for (m, M) in rows if M is not None and m not in EXCLUDED_FROM_III})
    best = max(((f"{m} M={M}", _addition(rows[(m, M)])) for (m, M) in rows if M is not None and m in stores
                and _addition(rows[(m, M)])), key=lambda mv: mean_std(mv[1])[0], default=None)
    ta = _addition(rows.get((TASK_ARITHMETIC, None)))
    out.append(_pair_line("(iii) some store ≥ full task arithmetic, addition", bench, k, best,
                          (TASK_ARITHMETIC, ta) if ta else None))
    inners = sorted({m[len(RANDOM_CLUSTERS):] for (m, _) in rows if m.startswith(RANDOM_CLUSTERS)})
    if not inners:
        out.append(Line("(iv) spectral clusters ≥ random clusters, addition", bench, "–", k, NOT_MEASURED))
    for inner in inners:
        for M in Ms:
            spectral, random = rows.get((f"cluster-{inner}", M)), rows.get((RANDOM_CLUSTERS + inner, M))
            if spectral is None or random is None:
                continue
            out.append(_pair_line(f"(iv) spectral clusters ≥ random clusters ({inner}), addition, M = {M}", bench,
                                  k, _best(rows, (f"cluster-{inner}",), M), _best(rows, (RANDOM_CLUSTERS + inner,), M)))
            a1, b1 = _at_one(spectral), _at_one(random)
            if a1 and b1:
                out.append(_pair_line(f"(iv) spectral ≥ random clusters ({inner}), coefficient 1, M = {M}", bench,
                                      k, ("spectral", a1), ("random", b1)))
    for key, what in (("negation", ""), ("negation_extended", " (extended λ ≤ 3)")):
        if key == "negation_extended" and not any(r.get(key) for r in rows.values()):
            continue
        out.append(_spearman_line(f"(v) negation error grows with reconstruction error{what}", bench, k,
                                  negation_points(result, key)))
    out.append(_continual_line(result, bench, k))
    return out


def _spearman_line(claim: str, bench: str, seeds: int, points: Sequence[Any]) -> Line:
    rhos = spearman_per_seed(points)
    if not rhos:
        return Line(claim, bench, "–", seeds, NOT_MEASURED)
    m, s = mean_std(rhos)
    numbers = f"Spearman ρ = {m:.2f}" + (f" ± {s:.2f}" if len(rhos) > 1 else "") + f" over {len(points)} points"
    return Line(claim, bench, numbers, seeds, VERDICT[compare(rhos, [0.0])])


def _continual_line(result: Mapping[str, Any], bench: str, seeds: int) -> Line:
    claim = "(vi) continual add-task ≈ rebuild, addition"
    steps = (result.get("continual") or {}).get("steps") or []
    if not steps:
        return Line(claim, bench, "–", seeds, NOT_MEASURED)
    last = steps[-1]
    a = values_of((last.get("add_task") or {}).get("mean_normalized_test"))
    b = values_of((last.get("rebuild") or {}).get("mean_normalized_test"))
    if not a or not b:
        return Line(claim, bench, "–", seeds, NOT_MEASURED)
    call = compare(a, b)
    verdict = "does not hold" if call == "below" else "holds"
    return Line(claim, bench, f"T = {last.get('T', '?')}: add-task {_pm(a)} vs rebuild {_pm(b)}", seeds, verdict)


def claims_lines(results: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> list[Line]:
    names = list(names) if names is not None else [benchmark_name(r) for r in results]
    return [line for r, n in zip(results, names) for line in _claims_of(r, n)]


def claims_table(results: list[dict], names: Sequence[str] | None = None) -> str:
    """The Markdown table "Does the paper's claim hold here?" over the given results (one block per result;
    ``names`` label the benchmarks, default from each result's config)."""
    head = ["claim", "benchmark", "our numbers (add norm %, mean ± std)", "seeds", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(line.cells()) + " |" for line in claims_lines(results, names)]
    lines += ["", "Verdicts: a ≥ b holds when mean_a − mean_b > std_a + std_b (sample std over seeds), does not hold "
              "when mean_b − mean_a > std_a + std_b, else within noise; with 1 seed there is no spread and every "
              "difference counts. (vi) ≈ holds unless add-task is below the rebuild by more than the spread. "
              "not measured: the result has no rows for the claim. Definitions: src/tvbasis/bench/claims.py."]
    return "\n".join(lines)


__all__ = ["Line", "benchmark_name", "claims_lines", "claims_table"]
