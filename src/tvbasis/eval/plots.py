"""The pictures of ``tvbasis inspect --plot`` (matplotlib, Agg); the benchmark's own pictures (``bench/plots.py``)
reuse its cosine heatmap and its ``_pyplot`` and ``_save``.

* ``plot_cosine``: the task-vector cosine heatmap, ordered by cluster when there are labels, colour scale of
  the off-diagonal entries (the diagonal's 1.0 would squash the ~0.01–0.1 rest).
* ``plot_spectrum``: the eigenvalues of the Gram matrix G = VᵀV in decreasing order, the cut after the M-th
  and the Eckart–Young bound Σ_{k>M} λ_k / T² (no rank-M reconstruction has a smaller mean squared error),
  next to the store's own reconstruction loss when it records one.
* ``plot_rel_errors``: each task's relative reconstruction error ‖v − v̂‖ / ‖v‖ (hatched where estimated).
* ``store_plots``: a store's cosine.png, spectrum.png and rel_errors.png.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.bases import eckart_young_bound
from tvbasis.errors import ConfigError, OutputExistsError
from tvbasis.io.outputs import check_not_input, check_output
from tvbasis.methods import get_store_method
from tvbasis.store import BasisStore


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib, part of the eval extra: pip install 'tvbasis[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def cluster_order(names: Sequence[str], labels: Sequence[int] | None) -> list[int]:
    """Task indices grouped by cluster (then by name); the given order without labels."""
    if not labels:
        return list(range(len(names)))
    return sorted(range(len(names)), key=lambda i: (labels[i], names[i]))


def plot_cosine(C: np.ndarray, names: Sequence[str], labels: Sequence[int] | None, path: Path,
                note: str = "") -> Path:
    """The cosine heatmap (ordered by cluster [label]) written to ``path``."""
    plt = _pyplot()
    names = list(names)
    order = cluster_order(names, labels)
    C = np.asarray(C, dtype=float)[np.ix_(order, order)]
    side = max(4.5, 1.6 + 0.75 * len(names))
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    off = C.copy()
    np.fill_diagonal(off, np.nan)
    lim = float(np.nanmax(np.abs(off))) if len(names) > 1 else 1.0
    lim = lim if lim > 0 else 1.0
    im = ax.imshow(np.ma.masked_invalid(off), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ticks = [names[i] + (f" [{labels[i]}]" if labels else "") for i in order]
    ax.set_xticks(range(len(order)), ticks, rotation=45, ha="right")
    ax.set_yticks(range(len(order)), ticks)
    for i in range(len(order)):
        for j in range(len(order)):
            dark = i != j and abs(C[i, j]) > 0.6 * lim
            ax.text(j, i, f"{C[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_title("task vector cosine similarity, off-diagonal colour scale"
                 + ("\n(ordered by cluster [label])" if labels else "") + (f"\n{note}" if note else ""), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def spectrum_limits(shown: np.ndarray) -> tuple[float, float]:
    """Log-scale y limits that hold every (positive) eigenvalue shown, with a third of a decade to spare at each
    end."""
    lo, hi = float(np.min(shown)), float(np.max(shown))
    return lo / 2.0, hi * 2.0


def plot_spectrum(G: np.ndarray, M: int, path: Path, loss: float | None = None, note: str = "") -> Path:
    """Eigenvalues of G (decreasing, log scale), the cut after the M-th, and the Eckart–Young bound."""
    plt = _pyplot()
    G = np.asarray(G, dtype=float)
    T = G.shape[0]
    ev = np.sort(np.clip(np.linalg.eigvalsh((G + G.T) / 2), 0.0, None))[::-1]
    bound = eckart_young_bound(G, M)
    floor = max(float(ev.max()) * 1e-9, 1e-300) if ev.max() > 0 else 1.0
    shown = np.maximum(ev, floor)
    k = np.arange(1, T + 1)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * T + 3), 4.6))
    ax.bar(k[:M], shown[:M], color="tab:blue", label=f"kept by a rank-{M} basis (k ≤ M)")
    ax.bar(k[M:], shown[M:], color="tab:gray", alpha=0.6,
           label=f"beyond the cut (k > M): Σ = {ev[M:].sum():.3g}")
    ax.axvline(M + 0.5, color="red", ls="--", lw=1.2, label=f"M = {M}")
    ax.set_yscale("log")
    ax.set_xticks(k)
    ax.set_xlabel("k (eigenvalue index of G = VᵀV)")
    ax.set_ylabel("λ_k (log scale)")
    for i in np.flatnonzero(ev <= floor):  # numerically zero: drawn at the floor, said so
        ax.text(k[i], floor, "≈0", ha="center", va="bottom", fontsize=7)
    text = f"Eckart–Young bound (Σ over k > M of λ_k) / T² = {bound:.4g}"
    if loss is not None:
        text += f"\nthis store's loss tr(EᵀGE) / T² = {loss:.4g}"
    lo, hi = spectrum_limits(shown)
    ax.set_ylim(lo, hi)  # every eigenvalue inside, those beyond the cut included; the text sits outside the axes
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.set_title("Gram spectrum and the M cut" + (f"\n{note}" if note else "") + f"\n{text}", fontsize=9)
    return _save(fig, path)


def plot_rel_errors(names: Sequence[str], errors: Sequence[float], exact: Sequence[bool], path: Path,
                    labels: Sequence[int] | None = None, note: str = "") -> Path:
    """One bar per task: ‖v − v̂‖ / ‖v‖ (hatched and marked 'est.' where the error is an estimate)."""
    plt = _pyplot()
    names = list(names)
    fig, ax = plt.subplots(figsize=(7.0, max(2.6, 0.45 * len(names) + 1.4)))
    cmap = plt.get_cmap("tab10")
    y = np.arange(len(names))[::-1]
    for i, (yi, e, ok) in enumerate(zip(y, errors, exact)):
        color = cmap(labels[i] % 10) if labels else "tab:blue"
        ax.barh(yi, e, color=color, alpha=0.9 if ok else 0.45, hatch=None if ok else "//", edgecolor="black",
                linewidth=0.4)
        label = f" {e:.3f}" if ok else (" unknown (no task vectors)" if e == 0 else f" {e:.3f} (est.)")
        ax.text(e, yi, label, va="center", fontsize=8)
    ax.set_yticks(y, [n + (f" [{labels[i]}]" if labels else "") for i, n in enumerate(names)])
    top = max([float(e) for e in errors] + [0.0])
    ax.set_xlim(0, top * 1.3 if top > 0 else 1.0)
    ax.set_xlabel("relative reconstruction error ‖v − v̂‖ / ‖v‖")
    ax.set_title("per-task reconstruction error" + (" (colour = cluster)" if labels else "")
                 + (f"\n{note}" if note else ""), fontsize=10)
    return _save(fig, path)


def store_plots(store: BasisStore | str | Path, out: str | Path) -> list[Path]:
    """cosine.png, spectrum.png and rel_errors.png of a store into the folder ``out`` (created)."""
    if not isinstance(store, BasisStore):
        store = BasisStore.open(store)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a directory")
    check_not_input(out, [store.root])  # the pictures never go into the store they describe
    for name in ("cosine.png", "spectrum.png", "rel_errors.png"):
        if os.path.lexists(out / name):  # never overwrites a picture (inspect has no --force)
            raise OutputExistsError(f"{out / name}: already exists; inspect --plot does not overwrite pictures "
                                    "(choose a new or empty folder)")
    check_output(out / "cosine.png", False)  # the folder can be created and written
    out.mkdir(parents=True, exist_ok=True)
    s = store.summary()
    names, labels = list(s["tasks"]), s.get("labels")
    estimated = store.manifest.gram_estimated_rows
    if estimated and len(estimated) == store.T:
        note = "\nGram of the reconstructions (the store holds no task vectors)"
    elif estimated:
        note = f"\nGram rows of {len(estimated)} task(s) estimated from reconstructions"
    else:
        note = ""
    head = f"{store.method} store, M = {store.M}, T = {store.T}"
    return [
        plot_cosine(np.asarray(s["cosine"]), names, labels, out / "cosine.png", note=head + note),
        plot_spectrum(store.gram, store.M, out / "spectrum.png", s.get("loss"),
                      note=head + note + ("\nPCA also keeps the mean (M + 1 directions): its loss can be below the "
                                          "rank-M bound" if get_store_method(store.method).stores_mean else "")),
        plot_rel_errors(names, [s["rel_errors"][t] for t in names], [s["errors_exact"][t] for t in names],
                        out / "rel_errors.png", labels, note=head),
    ]
