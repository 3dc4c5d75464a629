"""The paper's baselines: a seeded random basis (regenerated per tensor, only coefficients stored) and a
random sample of M task vectors kept as they are. Both reconstruct with least-squares coefficients."""

from __future__ import annotations

from typing import Any

import numpy as np

from tvbasis.bases.base import BasisFit, BasisMethod, check_M, eckart_young_bound, least_squares_W, reconstruction_loss


class RandomBasis(BasisMethod):
    name = "random"
    task_like = False
    options: dict[str, Any] = {"seed": 0}

    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        T = G.shape[0]
        M = check_M(M, T, self.name)
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
