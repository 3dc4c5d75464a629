"""The paper's baselines: a seeded random basis (regenerated per tensor, only coefficients stored) and a
random sample of M task vectors kept as they are. Both reconstruct with least-squares coefficients.

A random basis's stored rows are M seeded Gaussian directions R (entries N(0, 1/D), so ‖r_m‖ ≈ 1 and the
directions are orthogonal only up to O(1/√D)). The paper's code orthonormalises them (``torch.linalg.qr`` of the
D×M Gaussian matrix, src/basis_vectors.py ``RandomBasisMethod._generate_random_basis``). Reconstructions do not
depend on it — least squares on the same span — so tvbasis never rewrites the rows: the orthonormal basis is the
linear map Q = R·L⁻ᵀ of them, with K = RᵀR = L·Lᵀ (Cholesky) measured exactly by the materialisation pass and
kept in the manifest (``cross.K``). That is Gram–Schmidt on r_1, …, r_M, the QR factorisation the paper takes,
with the signs of Q's columns fixed (diag of the triangular factor positive; LAPACK's Householder QR leaves them
data-dependent, which for Gaussian directions gives the same distribution). It matters only where the bases
themselves are used: the paper's addition Σ_m q_m = R·(L⁻ᵀ·1) (``addition=paper`` with ``orthonormal=true``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvbasis.bases.base import BasisFit, BasisMethod, check_M, eckart_young_bound, least_squares_W, reconstruction_loss
from tvbasis.errors import ConfigError


def orthonormal_sum_coefficients(K: np.ndarray) -> np.ndarray:
    """c with R·c = Σ_m q_m, the sum of the Gram–Schmidt orthonormalisation Q = R·L⁻ᵀ of vectors R whose Gram is
    K = RᵀR = L·Lᵀ: c = L⁻ᵀ·1."""
    K = np.asarray(K, dtype=np.float64)
    try:
        L = np.linalg.cholesky((K + K.T) / 2)
    except np.linalg.LinAlgError:
        raise ConfigError("random basis: the random directions are linearly dependent (their Gram matrix is not "
                          "positive definite); they cannot be orthonormalised") from None
    return np.linalg.solve(L.T, np.ones(K.shape[0]))


class RandomBasis(BasisMethod):
    name = "random"
    task_like = False
    options: dict[str, Any] = {
        "seed": 0,
        "addition": "reconstructions",  # what addition() sums: reconstructions (Σ_t v̂_t) | paper (Σ_m q_m)
        "orthonormal": True,            # the paper's Σ_m q_m over the orthonormalised directions (else the raw ones)
    }
    choices = {"addition": ("reconstructions", "paper")}

    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        T = G.shape[0]
        M = check_M(M, T, self.name)
        if not isinstance(self.params["orthonormal"], bool):
            raise ConfigError(f"random: orthonormal must be true or false, got {self.params['orthonormal']!r}")
        return BasisFit(M=M, B=None, W=np.zeros((M, T)), random_seed=int(self.params["seed"]), refit="full",
                        stats={"lower_bound": eckart_young_bound(G, M)})


class RandomSampleBasis(BasisMethod):
    name = "random-sample"
    options: dict[str, Any] = {"seed": 0}

    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        T = G.shape[0]
        M = check_M(M, T, self.name)
        rng = np.random.default_rng(int(self.params["seed"]))
        picked = sorted(rng.choice(T, size=M, replace=False).tolist())
        B = np.zeros((T, M))
        B[picked, np.arange(M)] = 1.0
        W = least_squares_W(G, B)
        return BasisFit(M=M, B=B, W=W,  # W is already the least-squares fit from G
                        stats={"kept_tasks": picked, "loss": reconstruction_loss(G, B @ W),
                               "lower_bound": eckart_young_bound(G, M)})
