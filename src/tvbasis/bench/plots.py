"""The benchmark's pictures from its result dict (matplotlib, Agg), beside the store plots of ``eval/plots.py``
whose cosine heatmap they reuse.

* ``make_plots``: the benchmark's cosine.png, accuracy_vs_bytes.png and negation.png from its result dict (a
  multi-seed result is drawn at its means), and the theory check (``bench/theory.py``): theory_negation.png
  (negation gap against the target's relative reconstruction error, every store and pair a point; a second
  panel for the extended λ grid when the run has one) and theory_addition.png (addition gap against the store's
  mean relative reconstruction error), with ± std error bars over seeds and Spearman's ρ in the title.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.bench.spread import mean_std, means_view
from tvbasis.bench.theory import Point, addition_points, negation_points, spearman_per_seed
from tvbasis.eval.plots import _pyplot, _save, plot_cosine


def make_plots(result: Mapping[str, Any], out: Path) -> list[Path]:
    """The benchmark's plots from its result dict: cosine.png (ordered by cluster), accuracy_vs_bytes.png,
    negation.png, theory_negation.png and theory_addition.png (the last two when the run has stores)."""
    plt = _pyplot()
    raw, result = result, means_view(result)
    paths = []
    cos = result["cosine"]
    if cos.get("matrix") is not None:
        paths.append(plot_cosine(np.array(cos["matrix"], dtype=float), list(cos["tasks"]), cos.get("cluster_labels"),
                                 out / "cosine.png"))

    rows = [r for r in result["rows"] if not r["method"].startswith("fine")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    sizes = list(dict.fromkeys(r["M"] for r in rows if r["M"] is not None))
    shapes = ["v", "s", "D", "^", "P", "X", "<", ">", "*", "h"]
    m_marker = {None: "o", **{M: shapes[i % len(shapes)] for i, M in enumerate(sizes)}}

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for r in rows:
        add = r["addition"]
        if not add or r["bytes_stored"] <= 0 or "shots_per_class" in r.get("extra", {}):
            continue  # aTLAS few-shot rows adapt one task: not an addition (they are in the table)
        ax.scatter([r["bytes_stored"] / 1e6], [add["mean_normalized_test"]], color=color[r["method"]],
                   marker=m_marker[r["M"]], s=45,
                   label=r["method"] + ("" if r["M"] is None else f" M={r['M']}"))
    zs = next(r for r in result["rows"] if r["method"] == "zero-shot")["addition"]["mean_normalized_test"]
    ax.axhline(zs, color="grey", ls="--", lw=1, label="zero-shot")
    ax.axhline(1.0, color="black", ls=":", lw=1, label="fine-tuned")
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored (MB, log scale)")
    ax.set_ylabel("addition: mean normalized accuracy")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("task addition vs storage (test)", fontsize=10)
    paths.append(_save(fig, out / "accuracy_vs_bytes.png"))

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    pair_markers = "os^vD<>"
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    drawn_true = False
    for r in rows:
        true_vector = (r.get("extra") or {}).get("negation_vector") == "true task vector"
        if true_vector and drawn_true:
            continue  # TIES and the merges negate the same true task vector as the first such row
        drawn_true = drawn_true or true_vector
        label = ("true task vector" if true_vector else r["method"] if r["M"] is None
                 else f"{r['method']} M={r['M']}")
        for n in r["negation"]:
            key = (n["target"], n["control"])
            if key not in pairs:
                pairs.append(key)
            true = r["M"] is None  # drawn big and underneath: a store that matches it exactly stays visible
            ax.scatter([n["control_retained"]], [n["target_test"]], color=color[r["method"]],
                       marker=pair_markers[pairs.index(key) % len(pair_markers)],
                       s=150 if true else (28 if r["M"] != 4 else 48), alpha=0.85,
                       edgecolors="black" if true else "none", zorder=1 if true else 2,
                       label=None if label in seen else label)
            seen.add(label)
    for k, (t, c) in enumerate(pairs):
        ax.scatter([1.0], [result["zero_shot"]["test"][t]], marker=pair_markers[k % len(pair_markers)], s=90,
                   facecolors="none", edgecolors="black", label=f"pretrained: {t} (control {c})")
    ax.axvline(0.95, color="red", ls="--", lw=1, label="control at 95 %")
    ax.set_xlabel("control accuracy / pretrained control accuracy (test)")
    ax.set_ylabel("target accuracy after negation (lower is better)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("negation: target vs control; marker = pair, colour = method", fontsize=10)
    paths.append(_save(fig, out / "negation.png"))
    return paths + theory_plots(raw, out)


def _rho_text(points: Sequence[Point]) -> str:
    rhos = spearman_per_seed(points)
    if not rhos:
        return "Spearman ρ: fewer than 3 points"
    m, s = mean_std(rhos)
    return f"Spearman ρ = {m:.2f}" + (f" ± {s:.2f} over {len(rhos)} seeds" if len(rhos) > 1 else " (1 seed)")


def _theory_panel(ax: Any, points: Sequence[Point], color: Mapping[str, Any], xlabel: str, ylabel: str,
                  title: str, by_pair: bool) -> None:
    """One scatter: colour = method, marker = negation pair (``by_pair``) or M; each point labelled with its M;
    ± std error bars over seeds; a compact legend (methods, then markers) outside on the right."""
    from matplotlib.lines import Line2D

    markers = "os^vD<>P"
    kinds = list(dict.fromkeys(p.what if by_pair else p.M for p in points))
    for p in points:
        (xm, xs), (ym, ys) = mean_std(p.x), mean_std(p.y)
        if np.isnan(xm) or np.isnan(ym):
            continue
        marker = markers[kinds.index(p.what if by_pair else p.M) % len(markers)]
        ax.errorbar([xm], [ym], xerr=[xs or 0.0], yerr=[ys or 0.0], fmt=marker, color=color[p.method], ms=6,
                    capsize=2, alpha=0.85)
        if by_pair:
            ax.annotate(f"{p.M}", (xm, ym), xytext=(4, 3), textcoords="offset points", fontsize=6, color="0.3")
    ax.axhline(0.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{_rho_text(points)}", fontsize=9)
    methods = list(dict.fromkeys(p.method for p in points))
    handles = [Line2D([], [], color=color[m], marker="s", ls="", label=m) for m in methods]
    handles += [Line2D([], [], color="0.3", marker=markers[i % len(markers)], ls="",
                       label=(f"pair {k}" if by_pair else f"M = {k}")) for i, k in enumerate(kinds)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def theory_plots(result: Mapping[str, Any], out: Path) -> list[Path]:
    """theory_negation.png and theory_addition.png from a (single- or multi-seed) result; none without stores."""
    plt = _pyplot()
    neg = negation_points(result, "negation")
    ext = negation_points(result, "negation_extended")
    add = addition_points(result)
    methods = list(dict.fromkeys(p.method for p in neg + ext + add))
    cmap = plt.get_cmap("tab10")
    color = {m: cmap(i % 10) for i, m in enumerate(methods)}
    paths = []
    if neg:
        panels = [("negation, λ grid of the run", neg)] + ([("negation, extended λ grid (up to 3)", ext)] if ext else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(8.0 * len(panels), 4.8), squeeze=False)
        for ax, (title, pts) in zip(axes[0], panels):
            _theory_panel(ax, pts, color, "relative reconstruction error of the target ‖v − v̂‖ / ‖v‖",
                          "negation gap: target acc. through store − through true vector", title, by_pair=True)
        fig.suptitle("theory check: negation error vs reconstruction error (every store and pair a point; "
                     "the number by a point is M)", fontsize=10)
        paths.append(_save(fig, out / "theory_negation.png"))
    if add:
        fig, ax = plt.subplots(figsize=(8.4, 4.8))
        _theory_panel(ax, add, color, "store's mean relative reconstruction error",
                      "addition gap: store − task arithmetic (mean normalized acc.)",
                      "theory check: addition gap vs reconstruction error (every store a point)", by_pair=False)
        paths.append(_save(fig, out / "theory_addition.png"))
    return paths
