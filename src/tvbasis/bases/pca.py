"""PCA bases: centre the task vectors (mean μ stored), take the top-M eigenvectors of the centred Gram.

s_m = V_c·r_m, v̂_t = μ + Σ_m r_m[t]·s_m. Exact when M ≥ T − 1 (the centred vectors span at most T − 1 dims).

Option ``addition`` — what ``BasisStore.addition()`` of the store sums. tvbasis default ``reconstructions``:
Σ_t v̂_t = T·μ + Σ_m (Σ_t r_m[t])·s_m = T·μ (the eigenvectors of the centred Gram sum to zero), i.e. exactly task
arithmetic Σ_t v_t. ``paper``: the sum of the M components Σ_m s_m without μ, as the paper's code (it saves
basis_m = U[:, m]·S[m] of the centred SVD, which is s_m, and its addition sums the saved bases). Σ_m s_m depends
on each component's sign: tvbasis fixes it (largest-magnitude entry of r_m positive); the paper's is whatever
its eigensolver returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvbasis.bases.base import BasisFit, BasisMethod, check_M, eckart_young_bound, reconstruction_loss


class PCABasis(BasisMethod):
    name = "pca"
    task_like = False
    options: dict[str, Any] = {"addition": "reconstructions"}  # reconstructions (Σ_t v̂_t) | paper (Σ_m s_m)
    choices = {"addition": ("reconstructions", "paper")}

    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        T = G.shape[0]
        M = check_M(M, T, self.name)
        H = np.eye(T) - np.full((T, T), 1.0 / T)
        Gc = H @ G @ H
        ev, R = np.linalg.eigh((Gc + Gc.T) / 2)
        order = np.argsort(ev)[::-1][:M]
        R = R[:, order]
        # deterministic sign: largest-magnitude entry of each eigenvector positive
        signs = np.sign(R[np.abs(R).argmax(axis=0), np.arange(M)])
        R = R * np.where(signs == 0, 1.0, signs)
        B = H @ R                       # s_m = V·H·r_m
        W = R.T                         # v̂_t − μ = Σ_m r_m[t]·s_m
        mean_w = np.full(T, 1.0 / T)
        Rfull = B @ W + np.outer(mean_w, np.ones(T))
        stats = {"loss": reconstruction_loss(G, Rfull), "lower_bound": eckart_young_bound(G, M),
                 "explained_variance": (ev[order] / max(ev.clip(0).sum(), 1e-300)).tolist()}
        return BasisFit(M=M, B=B, W=W, mean_weights=mean_w, mean_coef=np.ones(T), stats=stats)
