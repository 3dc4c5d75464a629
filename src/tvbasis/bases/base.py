"""One interface for every basis method.

A method *fits* from the Gram matrix alone (a T×T problem, whatever the model size) and returns a
``BasisFit``: how each basis vector is formed from the task vectors (a linear map B, a per-cluster inner
merge, or a seeded random generator) and how each task is reconstructed from the bases (W, plus the mean for
PCA). A second streaming pass (``tvbasis.passes.materialise``) then materialises the bases tensor by tensor,
asking the fit — not a list of method names — how each stored row is made (``stored_rows``), how tasks are
reconstructed (``coef_matrix``) and whether the coefficients are refit from the pass's cross-Grams (``refit_from``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tvbasis.bases.random_rows import random_rows
from tvbasis.errors import ConfigError
from tvbasis.merge import MergeSpec, get_merger


@dataclass
class BasisFit:
    """Result of fitting a basis method on one Gram matrix (one layer group, or the whole model)."""

    M: int
    #: (T, M): basis m = Σ_t B[t, m]·v_t for linear bases; None when bases are not linear in V
    B: np.ndarray | None
    #: (M, T): v̂_t = Σ_m W[m, t]·s_m (+ mean_coef[t]·μ)
    W: np.ndarray
    #: (T,) weights forming the mean vector μ = Σ_t mean_weights[t]·v_t (PCA); None otherwise
    mean_weights: np.ndarray | None = None
    #: (T,) coefficient of μ in each reconstruction (PCA: ones)
    mean_coef: np.ndarray | None = None
    #: cluster label per task (cluster bases), or None
    labels: list[int] | None = None
    #: the inner merge of a cluster basis. With B set it is linear (mean, task_arithmetic) and B holds it; with
    #: B None it is non-linear (ties/topk/dare/...) and produces each cluster's basis per tensor in the pass
    inner: MergeSpec | None = None
    #: seed of a random basis regenerated per tensor (random): the bases are not stored
    random_seed: int | None = None
    #: after materialisation, recompute W by least squares from the exact cross-Grams
    refit: str | None = None  # None | "full" | "cluster_scale"
    stats: dict[str, Any] = field(default_factory=dict)

    # -- what the stored vectors are ---------------------------------------------------------------------
    @property
    def has_mean(self) -> bool:
        """True when a mean vector μ is stored after the M bases (PCA)."""
        return self.mean_weights is not None

    @property
    def stores_bases(self) -> bool:
        """False for a random basis, which is regenerated from its seed instead of stored."""
        return self.random_seed is None

    @property
    def is_merged(self) -> bool:
        """True when each basis is made per tensor by a non-linear inner merge of its cluster's members."""
        return self.inner is not None and self.B is None

    @property
    def n_stored(self) -> int:
        """Rows of U, the stored vectors: the M bases, then μ when there is one."""
        return self.M + (1 if self.has_mean else 0)

    def stored_rows(self, x: torch.Tensor | None, name: str, shape: tuple[int, ...], a: int, b: int,
                    total_params: int) -> torch.Tensor:
        """Rows [a, b) of the stored vectors U of one tensor, (n_stored, b − a, *shape[1:]) float32, from the
        task-vector slices ``x`` (T, b − a, ...) — linear bases: U = [Bᵀ; mean weights]·X in one product —
        or from the seed (random bases; ``x`` unused). Merged bases are made by the merge pass instead."""
        if self.random_seed is not None:
            s = random_rows(self.random_seed, name, shape, self.M, total_params, a, b)
            return s if x is None else s.to(x.device)
        if self.B is None or x is None:
            raise ValueError("stored_rows: bases made by a non-linear inner merge come from the merge pass")
        coef = self.B.T if self.mean_weights is None else np.vstack([self.B.T, np.asarray(self.mean_weights)[None]])
        Ct = torch.as_tensor(coef, dtype=torch.float32, device=x.device)
        return (Ct @ x.reshape(x.shape[0], -1)).reshape(Ct.shape[0], *x.shape[1:])

    # -- how tasks are reconstructed ---------------------------------------------------------------------
    def coef_matrix(self) -> np.ndarray:
        """(n_stored, T) coefficients of each task on the stored vectors U = [bases; μ]."""
        if self.mean_coef is None:
            return self.W
        return np.vstack([self.W, self.mean_coef[None, :]])

    @property
    def residuals_known_in_pass(self) -> bool:
        """True when W does not depend on the materialised bases, so each task's residual can be measured
        directly in the pass: fixed W (autoencoder, PCA) or cluster scales that G already gives exactly."""
        return self.refit is None or (self.refit == "cluster_scale" and self.B is not None)

    def refit_from(self, C: np.ndarray, K: np.ndarray) -> None:
        """Least-squares coefficients from the exact cross-Grams C = UᵀV and K = UᵀU (in place)."""
        M = self.M
        if self.refit == "full":
            self.W = ridge_solve(K[:M, :M], C[:M])
        elif self.refit == "cluster_scale":
            assert self.labels is not None
            W = np.zeros((M, len(self.labels)))
            for t, m in enumerate(self.labels):
                W[m, t] = C[m, t] / K[m, m] if K[m, m] > 0 else 0.0
            self.W = W

    def squared_errors(self, G: np.ndarray, C: np.ndarray, K: np.ndarray) -> np.ndarray:
        """‖v_t − v̂_t‖² of every task: G_tt − 2·w_tᵀC_t + w_tᵀKw_t (exact, float64)."""
        Wf = self.coef_matrix()
        return np.diag(G) - 2 * np.einsum("mt,mt->t", Wf, C) + np.einsum("mt,mn,nt->t", Wf, K, Wf)

    def cluster_sizes(self) -> list[int]:
        """Members per cluster (recorded at fit time and kept up to date by add-task)."""
        assert self.labels is not None
        sizes = self.stats.get("cluster_sizes")
        if isinstance(sizes, list) and len(sizes) == self.M:
            return [int(n) for n in sizes]
        return np.bincount(self.labels, minlength=self.M).tolist()

    def inner_is_mean(self) -> bool:
        """Whether the cluster's inner merge averages its members (else it sums them)."""
        if self.inner is not None:
            return get_merger(self.inner).normalizes
        # stores written before the inner merge of linear clusters was recorded: a mean has unit column sums
        return self.B is None or bool(np.allclose(self.B.sum(0), 1.0))

    def inner_for(self, m: int) -> MergeSpec:
        """The merge that makes basis m of a merged cluster basis from its members: the inner merge, except for a
        one-member cluster kept as it is (option ``singletons=keep``, the paper), made by the identity merge."""
        assert self.inner is not None
        if self.stats.get("singletons") == "keep" and self.cluster_sizes()[m] == 1:
            return MergeSpec("task_arithmetic", {})
        return self.inner

    def sum_weights(self) -> np.ndarray | None:
        """(T,) r_t = Σ_m B[t, m]: the weight of v_t in the paper's addition Σ_m s_m = Σ_t r_t·v_t; None when the
        bases are not linear in V (random bases, non-linear inner merges)."""
        return None if self.B is None else np.asarray(self.B, dtype=np.float64).sum(axis=1)

    def to_json(self) -> dict[str, Any]:
        """The fit as JSON (matrices as nested lists of float64), as stored in the manifest."""
        def arr(x: np.ndarray | None) -> list[Any] | None:
            return None if x is None else np.asarray(x, dtype=np.float64).tolist()
        return {"M": self.M, "B": arr(self.B), "W": arr(self.W), "mean_weights": arr(self.mean_weights),
                "mean_coef": arr(self.mean_coef), "labels": self.labels,
                "inner": None if self.inner is None else {"method": self.inner.method, "params": self.inner.params},
                "random_seed": self.random_seed, "refit": self.refit, "stats": self.stats}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BasisFit:
        """The fit back from ``to_json``'s form."""
        def arr(x: Any) -> np.ndarray | None:
            return None if x is None else np.asarray(x, dtype=np.float64)
        inner = d.get("inner")
        W = arr(d["W"])
        assert W is not None
        return cls(M=int(d["M"]), B=arr(d.get("B")), W=W, mean_weights=arr(d.get("mean_weights")),
                   mean_coef=arr(d.get("mean_coef")), labels=d.get("labels"),
                   inner=None if inner is None else MergeSpec(inner["method"], dict(inner.get("params", {}))),
                   random_seed=d.get("random_seed"), refit=d.get("refit"), stats=dict(d.get("stats", {})))


class BasisMethod(ABC):
    """Fits a BasisFit from G. Options are validated by each method; unknown ones raise ConfigError."""

    name: str = ""
    #: True when the bases are themselves task-vector-like (addition may sum them, as in the paper)
    task_like: bool = True
    options: dict[str, Any] = {}
    #: string options and their accepted values
    choices: dict[str, tuple[str, ...]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            raise ConfigError(f"basis method {self.name!r}: unknown option(s) {sorted(unknown)}; "
                              f"accepted: {sorted(self.options)}")
        self.params = {**self.options, **options}
        for key, accepted in self.choices.items():
            if self.params[key] not in accepted:
                raise ConfigError(f"basis method {self.name!r}: {key} must be one of {list(accepted)}, "
                                  f"got {self.params[key]!r}")

    @abstractmethod
    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        """Fit M bases from the T×T Gram matrix ``G`` alone (M None: the method chooses, e.g. the eigengap);
        the fit holds the coefficients that map task vectors to bases and back (``BasisFit``)."""


def check_M(M: int | None, T: int, method: str) -> int:
    """M itself, when 1 <= M < T; ConfigError otherwise (the one range check of every method and of a build)."""
    if M is None:
        raise ConfigError(f"basis method {method!r} needs -M (number of bases)")
    if M < 1 or M >= T:
        raise ConfigError(f"-M must satisfy 1 <= M < T = {T} (got M = {M}): a basis is only a compression when M < T")
    return int(M)


def eckart_young_bound(G: np.ndarray, M: int) -> float:
    """Σ_{k>M} λ_k(G) / T²: no rank-M reconstruction of V has a smaller mean squared error."""
    ev = np.sort(np.clip(np.linalg.eigvalsh(G), 0.0, None))[::-1]
    return float(ev[M:].sum()) / G.shape[0] ** 2


def addition_weights(fits: Mapping[str, BasisFit],
                     group_grams: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Each task's weight r_t = Σ_m B[t, m] in the paper's addition Σ_m s_m (None unless every fit's bases are
    linear in V), and its (min, max) over the fits, (T, 2). One fit: its r_t. Several (a layer-wise store): r_t of
    each group averaged with weights ‖v_t‖² in that group (``group_grams`` diagonals; plain mean without them)."""
    rs = [f.sum_weights() for f in fits.values()]
    if not rs or any(r is None for r in rs):
        return None
    R = np.stack([r for r in rs if r is not None])  # (groups, T)
    if len(fits) == 1:
        return R[0], np.stack([R[0], R[0]], axis=1)
    if set(group_grams) >= set(fits):
        wt = np.stack([np.clip(np.diag(np.asarray(group_grams[g], dtype=np.float64)), 0.0, None) for g in fits])
    else:
        wt = np.ones_like(R)
    total = wt.sum(axis=0)
    mean = np.where(total > 0, (R * wt).sum(axis=0) / np.where(total > 0, total, 1.0), R.mean(axis=0))
    return mean, np.stack([R.min(axis=0), R.max(axis=0)], axis=1)


def reconstruction_loss(G: np.ndarray, R: np.ndarray) -> float:
    """tr(EᵀGE)/T² with E = R − I, where V̂ = V·R."""
    E = R - np.eye(G.shape[0])
    return float(np.trace(E.T @ G @ E)) / G.shape[0] ** 2


def ridge_solve(K: np.ndarray, rhs: np.ndarray, ridge: float = 1e-12) -> np.ndarray:
    """Least-squares coefficients K⁻¹·rhs for a Gram K of stored vectors, with a tiny ridge relative to K's mean
    diagonal (so a rank-deficient K — e.g. two identical bases — still gives the minimum-norm-like answer)."""
    n = max(1, K.shape[0])
    return np.linalg.solve(K + ridge * max(float(np.trace(K)), 1e-300) / n * np.eye(K.shape[0]), rhs)


def least_squares_W(G: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The W minimising ‖V − V·B·W‖ given B: (BᵀGB)⁻¹·BᵀG."""
    return ridge_solve(B.T @ G @ B, B.T @ G)


def cosine_from_gram(G: np.ndarray) -> np.ndarray:
    """C_ij = G_ij / sqrt(G_ii·G_jj) (0 where a norm is 0)."""
    n = np.sqrt(np.clip(np.diag(G), 0.0, None))
    denom = np.outer(n, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, G / denom, 0.0)
