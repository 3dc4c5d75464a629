"""Folding one new task into a fitted basis, from its inner products with the stored vectors alone.

Given, for one layer group, c = U·v (the new task vector v against the stored vectors U = [bases; μ]) and
‖v‖², ``extend_fit`` returns the fit for T + 1 tasks and the updated cross-Grams:

* cluster bases: v joins the basis with the highest cosine; that basis becomes s ← a·s + b·v, with
  (a, b) = (n/(n+1), 1/(n+1)) for an averaging inner merge over the cluster's n members and (1, 1) for a summing
  one — the bases then have to be rewritten (``Extension.update``); the new task's coefficient is its
  least-squares scale onto its basis (or 1 without rescaling). A non-linear inner merge (TIES, top-k) counts as
  averaging here and is not re-run: v enters untrimmed, without sign election, so the basis after add-task is
  not the one a rebuild with the same members makes (an approximation; a rebuild needs the old fine-tunes).
* every other basis: the bases stay; the new task gets least-squares coefficients on their span (PCA: on the span
  after subtracting the stored mean, whose coefficient is 1 — so a new task far from the old tasks' span can
  reconstruct worse than no vector at all, relative error above 1; the store records that exact error).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from tvbasis.bases.base import BasisFit, ridge_solve


@dataclass
class Extension:
    fit: BasisFit
    C: np.ndarray  # (n_stored, T + 1)
    K: np.ndarray  # (n_stored, n_stored)
    #: (m, a, b): basis m becomes a·s_m + b·v; None when the stored vectors do not change
    update: tuple[int, float, float] | None
    #: ⟨v, v̂_t⟩ for the T old tasks, from their reconstructions (the old checkpoints are not available)
    inner_estimate: np.ndarray


def join_weights(fit: BasisFit, m: int) -> tuple[float, float]:
    """(a, b) of the update s_m ← a·s_m + b·v when v joins cluster m."""
    if not fit.inner_is_mean():
        return 1.0, 1.0
    n = fit.cluster_sizes()[m]
    return n / (n + 1.0), 1.0 / (n + 1.0)


def extend_fit(fit: BasisFit, c: np.ndarray, vv: float, C: np.ndarray, K: np.ndarray,
               fixed_bases: bool = False) -> Extension:
    """``fixed_bases``: the stored vectors never change (stores with per-task residuals, whose old residuals are
    relative to them): a cluster store puts v in its nearest cluster with its least-squares scale on that basis."""
    fit = copy.deepcopy(fit)
    T = fit.W.shape[1]
    old_coef = fit.coef_matrix()
    estimate = old_coef.T @ c
    if fit.M == 0:
        fit.W = np.zeros((0, T + 1))
        if fit.B is not None:
            fit.B = np.zeros((T + 1, 0))
        return Extension(fit, np.zeros((0, T + 1)), K, None, estimate)
    if fit.labels is not None and fixed_bases:
        cos = [c[m] / np.sqrt(K[m, m] * vv) if K[m, m] > 0 and vv > 0 else -np.inf for m in range(fit.M)]
        m = int(np.argmax(cos))
        sizes = fit.cluster_sizes()
        sizes[m] += 1
        fit.stats = {**fit.stats, "cluster_sizes": sizes}
        fit.labels = [*fit.labels, m]
        w = np.zeros((fit.M, 1))
        w[m, 0] = c[m] / K[m, m] if K[m, m] > 0 else 0.0
        fit.W = np.hstack([fit.W, w])
        if fit.B is not None:
            fit.B = np.vstack([fit.B, np.zeros((1, fit.M))])
        return Extension(fit, np.hstack([C, c[:, None]]), K, None, estimate)
    if fit.labels is None:
        M = fit.M
        rhs = c[:M] - (K[:M, M] if fit.has_mean else 0.0)
        w = ridge_solve(K[:M, :M], rhs)
        fit.W = np.hstack([fit.W, w[:, None]])
        if fit.B is not None:
            fit.B = np.vstack([fit.B, np.zeros((1, M))])
        if fit.mean_coef is not None:
            fit.mean_coef = np.append(fit.mean_coef, 1.0)
        if fit.mean_weights is not None:
            fit.mean_weights = np.append(fit.mean_weights, 0.0)
        return Extension(fit, np.hstack([C, c[:, None]]), K, None, estimate)
    cos = [c[m] / np.sqrt(K[m, m] * vv) if K[m, m] > 0 and vv > 0 else -np.inf for m in range(fit.M)]
    m = int(np.argmax(cos))
    a, b = join_weights(fit, m)
    K2 = K.copy()
    K2[m, :] = a * K[m, :] + b * c
    K2[:, m] = K2[m, :]
    K2[m, m] = a * a * K[m, m] + 2 * a * b * c[m] + b * b * vv
    C2 = np.hstack([C, c[:, None]])
    C2[m, :T] = a * C[m, :] + b * estimate
    C2[m, T] = a * c[m] + b * vv
    sizes = fit.cluster_sizes()
    sizes[m] += 1
    fit.stats = {**fit.stats, "cluster_sizes": sizes}
    fit.labels = [*fit.labels, m]
    fit.W = np.hstack([fit.W, np.zeros((fit.M, 1))])
    if fit.B is not None:
        B = fit.B.copy()
        B[:, m] *= a
        fit.B = np.vstack([B, np.eye(fit.M)[m] * b])
    if fit.refit == "cluster_scale":
        fit.refit_from(C2, K2)
    else:
        fit.W[m, T] = 1.0
    return Extension(fit, C2, K2, (m, a, b), estimate)
