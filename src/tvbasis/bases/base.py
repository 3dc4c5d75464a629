"""One interface for every basis method.

A method *fits* from the Gram matrix alone (a T×T problem, whatever the model size) and returns a
``BasisFit``: how each basis vector is formed from the task vectors (a linear map B, a per-cluster inner
merge, or a seeded random generator) and how each task is reconstructed from the bases (W, plus the mean for
PCA). A second streaming pass (``tvbasis.store.build_store``) then materialises the bases tensor by tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tvbasis.errors import ConfigError
from tvbasis.merge import MergeSpec


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
    #: non-linear inner merge producing each cluster's basis per tensor (cluster with ties/topk/dare/...)
    inner: MergeSpec | None = None
    #: seed of a random basis regenerated per tensor (random): the bases are not stored
    random_seed: int | None = None
    #: after materialisation, recompute W by least squares from the exact cross-Grams
    refit: str | None = None  # None | "full" | "cluster_scale"
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def arr(x: np.ndarray | None) -> list[Any] | None:
            return None if x is None else np.asarray(x, dtype=np.float64).tolist()
        return {"M": self.M, "B": arr(self.B), "W": arr(self.W), "mean_weights": arr(self.mean_weights),
                "mean_coef": arr(self.mean_coef), "labels": self.labels,
                "inner": None if self.inner is None else {"method": self.inner.method, "params": self.inner.params},
                "random_seed": self.random_seed, "refit": self.refit, "stats": self.stats}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BasisFit:
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

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            raise ConfigError(f"basis method {self.name!r}: unknown option(s) {sorted(unknown)}; "
                              f"accepted: {sorted(self.options)}")
        self.params = {**self.options, **options}

    @abstractmethod
    def fit(self, G: np.ndarray, M: int | None) -> BasisFit: ...


def check_M(M: int | None, T: int, method: str) -> int:
    if M is None:
        raise ConfigError(f"basis method {method!r} needs -M (number of bases)")
    if M < 1 or M >= T:
        raise ConfigError(f"-M must satisfy 1 <= M < T = {T} (got M = {M}): a basis is only a compression when M < T")
    return int(M)


def eckart_young_bound(G: np.ndarray, M: int) -> float:
    """Σ_{k>M} λ_k(G) / T²: no rank-M reconstruction of V has a smaller mean squared error."""
    ev = np.sort(np.clip(np.linalg.eigvalsh(G), 0.0, None))[::-1]
    return float(ev[M:].sum()) / G.shape[0] ** 2


def reconstruction_loss(G: np.ndarray, R: np.ndarray) -> float:
    """tr(EᵀGE)/T² with E = R − I, where V̂ = V·R."""
    E = R - np.eye(G.shape[0])
    return float(np.trace(E.T @ G @ E)) / G.shape[0] ** 2


def least_squares_W(G: np.ndarray, B: np.ndarray, ridge: float = 1e-12) -> np.ndarray:
    """The W minimising ‖V − V·B·W‖ given B: (BᵀGB)⁻¹·BᵀG."""
    K = B.T @ G @ B
    K = K + ridge * np.trace(K) / max(1, K.shape[0]) * np.eye(K.shape[0])
    return np.linalg.solve(K, B.T @ G)
