"""Joint compression of T LoRA adapters into shared per-tensor bases and small per-adapter cores, in factor space.

The form of "Compress then Serve" (Brüel-Gabrielsson et al., ICML 2025): per adapted tensor (and per cluster
of adapters), ΔW_i ≈ U Σ_i Vᵀ with U (rows × k) and V (cols × k) shared and Σ_i per adapter, minimising
Σ_i ‖B_iA_i − U Σ_i Vᵀ‖²_F. Cores are full (k × k; the paper's "full" joint diagonalisation) or diagonal (k; its
"diagonal" form, where ΔW_i ≈ Σ_j σ_ij u_j v_jᵀ is a rank-k CP decomposition of the rows × cols × T tensor).

The authors' code read for this module: their ``compression.py`` (``full_lora_pca``, ``diagonal_lora_pca``,
``diagonal_lora_pca_sparse``) and ``lola_loras``, as found in the code search index (repository not named
there); the sparse variant (soft-thresholded σ) is not reproduced.

Algorithm (per tensor and cluster; nothing of size rows × cols is ever formed):

1. Reduction. QR of the stacked factors: [B_1 … B_n] = Q_B R_B (Q_B rows × m₁, m₁ = min(rows, Σr_i)) and
   [A_1; …; A_n]ᵀ = Q_A R_A. Then B_i = Q_B P_i and A_i = Q̃_iᵀ Q_Aᵀ with P_i, Q̃_i the adapter's columns of R_B,
   R_A, so ΔW_i = Q_B C_i Q_Aᵀ with C_i = P_i Q̃_iᵀ (m₁ × m₂). Both optimal bases lie in span(Q_B) × span(Q_A)
   (the objective only sees U and V through their projections there), so the whole problem is solved exactly
   on the small C_i — in their factored form P_i Q̃_iᵀ — and U = Q_B Ũ, V = Q_A Ṽ. Cost: O((rows + cols)(Σr)²)
   for the QRs, then independent of rows and cols.
2. Full cores: HOOI (higher-order orthogonal iteration), the paper's alternating method (authors' code
   ``full_lora_pca``): with U, V orthonormal the best core is Σ_i = Uᵀ ΔW_i V, and the objective becomes
   max Σ_i ‖Uᵀ ΔW_i V‖²; alternately U ← the top-k left singular vectors of [ΔW_1 V … ΔW_n V] and
   V ← those of [ΔW_1ᵀ U … ΔW_nᵀ U]. Monotone in the objective.
3. Diagonal cores: the paper's alternating least squares (authors' code ``diagonal_lora_pca``): per round
   σ_i ← ((UᵀU) ∘ (VᵀV))⁻¹ diag(Uᵀ ΔW_i V); U ← (Σ_i ΔW_i V D_i)(Σ_i D_i VᵀV D_i)⁻¹; V likewise; then rescale.
   U and V are not orthonormal.

Where this follows the authors' code and where it departs:

- Same objective, same two alternating schemes (full: HOOI; diagonal: ALS in the order σ, U, V, rescale) and
  the authors' round counts (``DEFAULT_ITERS``: 10 for full cores as ``lola_loras``; 100 for diagonal ones,
  ``diagonal_lora_pca``'s default).
- Initialisation: the authors start from random orthonormal (full) or random Gaussian U, V and random
  diagonal Σ_i (diagonal). Here, deterministically, full cores start from the HOSVD — U₀, V₀ the top-k
  eigenvectors of Σ_i ΔW_iΔW_iᵀ and Σ_i ΔW_iᵀΔW_i — already exact when the adapters share a k-dimensional
  column and row space. Diagonal cores run ``_PROBE`` ALS rounds from two starts, the HOSVD (Tensor Toolbox's
  ``nvecs`` start for CP-ALS; exact for adapters sharing orthonormal directions) and the k strongest singular
  triplets pooled over the adapters' own SVDs (exact for k ≥ Σr_i), and continue the better one.
- The authors' U step of the full method uses ``torch.svd_lowrank`` (randomised, q = k + 2, 2 power
  iterations); here an exact eigendecomposition of the reduced m₁ × m₁ matrix (float64). Rounds stop early
  when the objective changes by less than ``tol`` of itself.
- Rescaling (diagonal): the authors normalise Σ_i jointly and balance ‖U‖, ‖V‖; here every column of U and V
  is scaled to unit norm and the scale moved into σ (the same model, better conditioned for storage).
- Clustering: the paper learns clusters of adapters that compress well together by alternating a joint
  compression per cluster with reassigning each adapter to the cluster whose bases reconstruct it best.
  Here the start is kernel k-means (deterministic seed) on the factor-space cosine (k-means of the normalised
  task vectors) or on ``subspace_kernel`` (the cosine of the adapters' second moments ΔWΔWᵀ and ΔWᵀΔW: what a
  shared basis exploits; cosine misses adapters sharing a subspace with unrelated cores), and ``refine``
  rounds of the paper's reassignment follow (default 0).
- Additions: rectangular full cores, ``k=(k_out, k_in)`` (a Tucker-2 form; adapters trained from one A
  init share their row space far more than their column space), and ``JointCompression.combine`` (task
  arithmetic as U (Σ_i w_i Σ_i) Vᵀ per tensor).
- Numerics: factors in float64 throughout; the stored U, V, cores are cast to ``dtype`` and every reported
  error is computed from the stored (cast) values against the original factors: ‖B_iA_i − U Σ_i Vᵀ‖ =
  ‖R_X R_Yᵀ‖ with X = [B_i, −UΣ_i] = Q_X R_X and Yᵀ = [A_i; Vᵀ]ᵀ = Q_Y R_Y (no rows × cols product, and no
  cancellation of squared norms).

Tensors an adapter replaces whole (``modules_to_save``, trained biases, ``lora_bias``) are kept as dense ΔW
per adapter (``dense_dtype``, exact in float32) and counted in the bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tvbasis.bases.cluster import canonical_labels, kmeans
from tvbasis.errors import ConfigError, UnknownTaskError
from tvbasis.lora.factors import AdapterLike, TensorDeltas, as_source, factor_gram, iter_tensors, tensor_names

CORES = ("full", "diag")
#: ALS rounds run from each of the two starts of the diagonal form before the better one continues
_PROBE = 10
#: default rounds of the alternating method: full cores 10 (the authors' lola_loras: niter=10); diagonal cores 100
#: (their diagonal_lora_pca default; lola_loras passes 10, too few for ALS from a non-orthogonal optimum here)
DEFAULT_ITERS = {"full": 10, "diag": 100}


@dataclass
class JointFit:
    """One tensor, one cluster: shared U (rows × k), V (cols × k) and the members' cores, at the stored dtype.

    ``cores[j]`` (k × k — k_out × k_in when rectangular — or k for diagonal cores) belongs to adapter
    ``members[j]``;
    ΔW_i ≈ U Σ_i Vᵀ (diagonal: U diag(σ_i) Vᵀ)."""

    tensor: str
    cluster: int
    members: list[int]
    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    iterations: int = 0
    objective: list[float] = field(default_factory=list)  # Σ_i ‖ΔW_i − UΣ_iVᵀ‖² after each round (float64)

    @property
    def k(self) -> int:
        """Size of the shared bases (columns of U and V)."""
        return self.U.shape[1]

    @property
    def diagonal(self) -> bool:
        """Whether the per-adapter cores are diagonal (k values) rather than k × k."""
        return self.cores.dim() == 2

    @property
    def nbytes(self) -> int:
        """Bytes of U, V and the cores."""
        return sum(t.numel() * t.element_size() for t in (self.U, self.V, self.cores))

    def core(self, i: int) -> torch.Tensor:
        """Adapter i's core as a (k × k) float64 matrix."""
        c = self.cores[self.members.index(i)].to(torch.float64)
        return torch.diag(c) if self.diagonal else c

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U Σ_i, Vᵀ) in float32: the reconstructed ΔW_i as a rank-k product."""
        c = self.cores[self.members.index(i)].to(torch.float32)
        U, V = self.U.to(torch.float32), self.V.to(torch.float32)
        return (U * c if self.diagonal else U @ c), V.T.contiguous()


@dataclass
class JointCompression:
    """T adapters as shared bases + per-adapter cores (``fits``) + dense deltas of tensors replaced whole."""

    names: list[str]
    cores: str
    k: int | tuple[int, int]
    dtype: torch.dtype
    labels: list[int]
    fits: dict[str, list[JointFit]]
    dense: dict[str, dict[int, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    sq_norms: dict[str, np.ndarray]  # per tensor: ‖ΔW_i‖² (float64, T)
    sq_errors: dict[str, np.ndarray]  # per tensor: ‖ΔW_i − U Σ_i Vᵀ‖² from the stored values
    input_nbytes: int  # the adapters as they are (their saved tensors)
    seconds: float = 0.0
    history: list[dict[str, object]] = field(default_factory=list)  # per clustering round: labels, rel error

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Number of adapters compressed."""
        return len(self.names)

    @property
    def bases_nbytes(self) -> int:
        """Bytes of the shared bases U, V over every tensor and cluster."""
        return sum(f.U.numel() * f.U.element_size() + f.V.numel() * f.V.element_size()
                   for fs in self.fits.values() for f in fs)

    @property
    def cores_nbytes(self) -> int:
        """Bytes of the per-adapter cores."""
        return sum(f.cores.numel() * f.cores.element_size() for fs in self.fits.values() for f in fs)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the tensors kept dense (not low-rank in the adapters)."""
        return sum(d.numel() * d.element_size() for ds in self.dense.values() for d in ds.values())

    @property
    def nbytes(self) -> int:
        """Exact bytes of everything needed to give every adapter back: U, V and cores of every fit, dense
        deltas (tensor payloads only; names, shapes and labels are metadata)."""
        return self.bases_nbytes + self.cores_nbytes + self.dense_nbytes

    @property
    def expanded_nbytes(self) -> int:
        """Bytes of the T task vectors expanded to dense float32 ΔW over the tensors each adapter changes."""
        return sum(4 * math.prod(self.shapes[n]) * (len(self.dense.get(n, {}))
                                                    + sum(len(f.members) for f in self.fits.get(n, [])))
                   for n in self.shapes)

    # -- errors -------------------------------------------------------------------------------------------------
    @property
    def rel_errors(self) -> np.ndarray:
        """Per adapter ‖ΔW_i − ΔŴ_i‖ / ‖ΔW_i‖ over all its tensors (dense ones are exact)."""
        num = sum(self.sq_errors.values(), np.zeros(self.T))
        den = sum(self.sq_norms.values(), np.zeros(self.T))
        return np.sqrt(num / np.where(den > 0, den, 1.0))

    @property
    def rel_error(self) -> float:
        """‖all errors‖ / ‖all task vectors‖ (energy-weighted over adapters)."""
        num = float(sum(e.sum() for e in self.sq_errors.values()))
        den = float(sum(n.sum() for n in self.sq_norms.values()))
        return math.sqrt(num / den) if den > 0 else 0.0

    # -- reconstruction ----------------------------------------------------------------------------------------
    def _index(self, adapter: str | int) -> int:
        if isinstance(adapter, int):
            if not 0 <= adapter < self.T:
                raise UnknownTaskError(f"adapter index {adapter} out of range (T = {self.T})")
            return adapter
        try:
            return self.names.index(adapter)
        except ValueError:
            raise UnknownTaskError(f"unknown adapter {adapter!r}; known: {', '.join(self.names)}") from None

    def fit_of(self, adapter: str | int, tensor: str) -> JointFit | None:
        """The joint fit that holds ``adapter`` (name or index) for ``tensor``; None if the tensor is not factored."""
        i = self._index(adapter)
        return next((f for f in self.fits.get(tensor, []) if i in f.members), None)

    def factors(self, adapter: str | int, tensor: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adapter's reconstructed ΔW of ``tensor`` as (U Σ_i (rows × k), Vᵀ (k × cols)) float32; None where it is
        kept dense or not changed."""
        f = self.fit_of(adapter, tensor)
        return None if f is None else f.factors(self._index(adapter))

    def delta(self, adapter: str | int, tensor: str) -> torch.Tensor:
        """Reconstructed ΔW of one tensor (float32, the tensor's shape; zeros where the adapter does not change it)."""
        i = self._index(adapter)
        if i in self.dense.get(tensor, {}):
            return self.dense[tensor][i].to(torch.float32).reshape(self.shapes[tensor])
        f = self.fit_of(i, tensor)
        if f is None:
            return torch.zeros(self.shapes[tensor])
        P, Vt = f.factors(i)
        return (P @ Vt).reshape(self.shapes[tensor])

    def reconstruct(self, adapter: str | int) -> dict[str, torch.Tensor]:
        """The adapter's reconstructed task vector: {tensor: ΔW} over the tensors it changes (float32)."""
        i = self._index(adapter)
        names = [n for n in self.shapes if self.fit_of(i, n) is not None or i in self.dense.get(n, {})]
        return {n: self.delta(i, n) for n in names}

    def combine(self, weights: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Σ_i w_i ΔŴ_i (task arithmetic; all weights 1 by default) per tensor, float32, formed in factor space:
        per fit U (Σ_i w_i Σ_i) Vᵀ — one product per tensor and cluster, whatever T — plus the dense deltas."""
        w = np.ones(self.T) if weights is None else np.array([float(weights.get(n, 0.0)) for n in self.names])
        if weights is not None and set(weights) - set(self.names):
            raise UnknownTaskError(f"unknown adapter(s) {sorted(set(weights) - set(self.names))}")
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            acc = torch.zeros(shape, dtype=torch.float64)
            for f in self.fits.get(name, []):
                c = sum(w[i] * f.core(i) for i in f.members)
                acc += (f.U.to(torch.float64) @ c @ f.V.to(torch.float64).T).reshape(shape)
            for i, d in self.dense.get(name, {}).items():
                acc += w[i] * d.to(torch.float64).reshape(shape)
            out[name] = acc.to(torch.float32)
        return out

    def residual_factors(self, adapter: str | int, tensor: str, B: torch.Tensor, A: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual B·A − U Σ_i Vᵀ in factor form (X, Y) with X·Y equal to it: rank r + k, float32."""
        f = self.fit_of(adapter, tensor)
        if f is None:
            return B.to(torch.float32), A.to(torch.float32)
        P, Vt = f.factors(self._index(adapter))
        return torch.cat([B.to(torch.float32), -P], dim=1), torch.cat([A.to(torch.float32), Vt], dim=0)

    def summary(self) -> dict[str, object]:
        """A JSON-ready description: cores, k, clusters, sizes of each part and the relative errors."""
        return {"cores": self.cores, "k": self.k, "dtype": str(self.dtype).replace("torch.", ""),
                "clusters": len(set(self.labels)), "labels": list(self.labels), "nbytes": self.nbytes,
                "bases_nbytes": self.bases_nbytes, "cores_nbytes": self.cores_nbytes,
                "dense_nbytes": self.dense_nbytes, "input_nbytes": self.input_nbytes,
                "rel_error": self.rel_error, "rel_errors": dict(zip(self.names, self.rel_errors.tolist())),
                "seconds": round(self.seconds, 3)}


# ------------------------------------------------------------------------------------------------ one tensor
def _top_eigvecs(M: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k eigenvectors of a symmetric PSD matrix (float64), as columns."""
    M = (M + M.T) / 2
    _, vecs = torch.linalg.eigh(M)
    return vecs[:, -k:].flip(1) if k else vecs[:, :0]


def _solve(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """M⁻¹·rhs for a symmetric PSD M (k × k) with a tiny ridge (columns that carry nothing get 0)."""
    ridge = 1e-12 * max(float(torch.diagonal(M).abs().max()), 1e-300)
    return torch.linalg.solve(M + ridge * torch.eye(M.shape[0], dtype=M.dtype), rhs)


def _pad(Q: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Q (m × j) with k − j more (seeded Gaussian) columns when k > j (CP may need more components than m)."""
    if Q.shape[1] >= k:
        return Q
    g = torch.Generator().manual_seed(seed)
    return torch.cat([Q, torch.randn(Q.shape[0], k - Q.shape[1], generator=g, dtype=Q.dtype) / Q.shape[0] ** 0.5],
                     dim=1)


def _svd_start(P: torch.Tensor, Q: torch.Tensor, seg: torch.Tensor, n: int, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k strongest singular triplets pooled over the adapters' own SVDs (exact when k >= Σr_i: each adapter
    keeps its own components, as the adapters themselves), as the columns of U₀, V₀."""
    us, vs, ss = [], [], []
    for i in range(n):
        qp, rp = torch.linalg.qr(P[:, seg == i])
        qq, rq = torch.linalg.qr(Q[:, seg == i])
        u, sv, vh = torch.linalg.svd(rp @ rq.T)
        us.append(qp @ u)
        vs.append(qq @ vh.T)
        ss.append(sv)
    order = torch.argsort(torch.cat(ss), descending=True, stable=True)[:k]
    return torch.cat(us, dim=1)[:, order], torch.cat(vs, dim=1)[:, order]


def fit_reduced(P: torch.Tensor, Q: torch.Tensor, ranks: Sequence[int], k: int | tuple[int, int], cores: str,
                iters: int, tol: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[float]]:
    """Solve min Σ_i ‖C_i − Ũ Σ_i Ṽᵀ‖² on the reduced problem, C_i = P_i Q_iᵀ with P = [P_1 … P_n] (m₁ × Σr_i)
    and Q = [Q_1 … Q_n] (m₂ × Σr_i) in float64 (the R factors of the stacked adapter factors).

    Returns Ũ (m₁ × k), Ṽ (m₂ × k), the n cores (k × k, or k for ``diag``) and the objective before the first
    and after every round. Full cores may be rectangular: k = (k_out, k_in) gives Ũ (m₁ × k_out), Ṽ (m₂ × k_in)
    and cores k_out × k_in. Every product is one of the stacked matrices: with L = ŨᵀP and M = ṼᵀQ (k × Σr_i),
    Ũᵀ C_i Ṽ = L_i M_iᵀ; block sums over an adapter's columns use the same-adapter mask."""
    n = len(ranks)
    seg = torch.repeat_interleave(torch.arange(n), torch.tensor(list(ranks)))
    same = (seg[:, None] == seg[None, :]).to(torch.float64)  # Σr × Σr block-diagonal mask
    S = torch.nn.functional.one_hot(seg, n).to(torch.float64).T  # n × Σr
    m1, m2 = P.shape[0], Q.shape[0]
    PP, QQ = (P.T @ P) * same, (Q.T @ Q) * same
    total = float((PP * QQ).sum())  # Σ‖C_i‖²
    # HOSVD start: top eigenvectors of Σ C_iC_iᵀ = P (QᵀQ ∘ same) Pᵀ and of Σ C_iᵀC_i
    k_out, k_in = (k, k) if isinstance(k, int) else k
    U = _top_eigvecs(P @ QQ @ P.T, min(k_out, m1))
    V = _top_eigvecs(Q @ PP @ Q.T, min(k_in, m2))
    objective: list[float] = []
    if cores == "full":
        def obj(U: torch.Tensor, V: torch.Tensor) -> float:
            L, M = U.T @ P, V.T @ Q
            return max(total - float(((L.T @ L) * (M.T @ M) * same).sum()), 0.0)

        objective.append(obj(U, V))
        for _ in range(iters):
            M = V.T @ Q
            U = _top_eigvecs(P @ ((M.T @ M) * same) @ P.T, U.shape[1])  # [C_iV][C_iV]ᵀ
            L = U.T @ P
            V = _top_eigvecs(Q @ ((L.T @ L) * same) @ Q.T, V.shape[1])  # [C_iᵀU][C_iᵀU]ᵀ
            objective.append(obj(U, V))
            if objective[-2] - objective[-1] <= tol * objective[-2]:
                break
        L, M = U.T @ P, V.T @ Q
        return U, V, [L[:, seg == i] @ M[:, seg == i].T for i in range(n)], objective

    def sigma_step(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, float]:
        """σ_i = ((UᵀU) ∘ (VᵀV))⁻¹ diag(Uᵀ C_i V) for all i (k × n), and the objective at those σ."""
        g = ((U.T @ P) * (V.T @ Q)) @ S.T  # column i: diag(Uᵀ C_i V)
        sig = _solve((U.T @ U) * (V.T @ V), g)
        return sig, max(total - float((g * sig).sum()), 0.0)

    def als(U: torch.Tensor, V: torch.Tensor, rounds: int, objective: list[float]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sig, o = sigma_step(U, V)
        if not objective:
            objective.append(o)
        for _ in range(rounds):
            W = sig @ sig.T  # Σ_i σ_iσ_iᵀ
            U = _solve((V.T @ V) * W, (P @ ((V.T @ Q) * sig[:, seg]).T).T).T  # (Σ C_iVD_i)(Σ D_iVᵀVD_i)⁻¹
            V = _solve((U.T @ U) * W, (Q @ ((U.T @ P) * sig[:, seg]).T).T).T
            nu, nv = U.norm(dim=0), V.norm(dim=0)  # unit columns; the scale goes into σ at the σ step
            U, V = U / torch.where(nu > 0, nu, 1.0), V / torch.where(nv > 0, nv, 1.0)
            sig, o = sigma_step(U, V)
            objective.append(o)
            if abs(objective[-2] - objective[-1]) <= tol * objective[-2]:
                break
        return U, V, sig

    if k_out != k_in:
        raise ConfigError(f"diagonal cores need one k, got (k_out, k_in) = {k}")
    # diagonal cores: CP-ALS from two starts — the HOSVD one (exact for adapters sharing their directions)
    # and the pooled per-adapter SVDs (exact for k >= Σr_i) — PROBE rounds each, then the better one continues
    starts = [(_pad(U, k, seed), _pad(V, k, seed + 1)), _svd_start(P, Q, seg, n, k)]
    if starts[1][0].shape[1] < k:
        starts[1] = (_pad(starts[1][0], k, seed), _pad(starts[1][1], k, seed + 1))
    runs = []
    for st in starts:
        obj_st: list[float] = []
        runs.append((als(*st, min(iters, _PROBE), obj_st), obj_st))
    (U, V, sig), objective = min(runs, key=lambda r: r[1][-1])
    if iters > _PROBE and len(objective) == _PROBE + 1:  # not converged yet
        U, V, sig = als(U, V, iters - _PROBE, objective)
    return U, V, list(sig.T), objective


def _error(B: torch.Tensor, A: torch.Tensor, P: torch.Tensor, Vt: torch.Tensor) -> float:
    """‖B·A − P·Vt‖²_F from the factors (float64): QR of X = [B, −P] and of Yᵀ = [A; Vt]ᵀ, ‖R_X R_Yᵀ‖²."""
    X = torch.cat([B, -P], dim=1)
    Y = torch.cat([A, Vt], dim=0)
    rx = torch.linalg.qr(X, mode="r")[1]
    ry = torch.linalg.qr(Y.T, mode="r")[1]
    return float((rx @ ry.T).square().sum())


def fit_tensor(td: TensorDeltas, members: list[int], k: int | tuple[int, int], cores: str, iters: int, tol: float,
               dtype: torch.dtype, cluster: int = 0, seed: int = 0) -> tuple[JointFit, dict[int, float]]:
    """Joint fit of the ``members`` (adapter indices with factors for ``td``); returns the fit (cast to
    ``dtype``) and each member's squared error measured with the cast values."""
    facs = [td.factors[i] for i in members]
    Bs = torch.cat([B for B, _ in facs], dim=1)
    As = torch.cat([A for _, A in facs], dim=0)
    QB, RB = torch.linalg.qr(Bs)
    QA, RA = torch.linalg.qr(As.T)
    ranks = [B.shape[1] for B, _ in facs]
    if cores == "full":
        ko, ki = (k, k) if isinstance(k, int) else k
        kk: int | tuple[int, int] = (max(1, min(ko, QB.shape[1])), max(1, min(ki, QA.shape[1])))
    else:
        kk = max(1, min(int(k), Bs.shape[1]))
    Ur, Vr, S, objective = fit_reduced(RB, RA, ranks, kk, cores, iters, tol, seed)
    U = (QB @ Ur).to(dtype)
    V = (QA @ Vr).to(dtype)
    C = torch.stack(S).to(dtype)
    fit = JointFit(td.name, cluster, list(members), U, V, C, iterations=len(objective) - 1, objective=objective)
    errs = {}
    for i, (B, A) in zip(members, facs):
        c = fit.core(i)
        errs[i] = _error(B, A, U.to(torch.float64) @ c, V.to(torch.float64).T)
    return fit, errs


# ------------------------------------------------------------------------------------------------ clustering
def kernel_clusters(K: np.ndarray, clusters: int, seed: int = 0) -> list[int]:
    """k-means in the feature space of a normalised kernel (unit diagonal; the cosine matrix, or
    ``subspace_kernel``): K = EEᵀ (eigen-embedding) places each adapter at a point of Rᵀ with the feature space's
    pairwise distances, so k-means on the rows of E is k-means on the normalised feature vectors."""
    K = np.asarray(K, dtype=np.float64)
    w, Q = np.linalg.eigh((K + K.T) / 2)
    E = Q * np.sqrt(np.clip(w, 0.0, None))
    return canonical_labels(kmeans(E, clusters, seed))


def cosine_clusters(cosine: np.ndarray, clusters: int, seed: int = 0) -> list[int]:
    """k-means of the unit-normalised task vectors from their cosine matrix (``kernel_clusters``)."""
    return kernel_clusters(cosine, clusters, seed)


def subspace_kernel(adapters: Mapping[str, AdapterLike] | Sequence) -> np.ndarray:
    """(T, T) affinity of the adapters' column and row spaces, from the factors: the mean of the cosines of
    their second moments, ⟨ΔW_iΔW_iᵀ, ΔW_jΔW_jᵀ⟩ = ‖ΔW_iᵀΔW_j‖² (column spaces) and ‖ΔW_iΔW_jᵀ‖² (row spaces),
    summed over the factored tensors (each r × r: ‖A_iᵀ(B_iᵀB_j)A_j‖² = Σ (MᵀG^A_iM) ∘ G^A_j with M = B_iᵀB_j).
    1 for adapters whose ΔW share their second moments (up to scale); 0 for orthogonal subspaces. Cosine
    similarity sees directions, not subspaces: adapters in one subspace with unrelated cores have cosine ≈ 0.
    This is the structure a shared basis exploits (its HOSVD start is Σ ΔW_iΔW_iᵀ)."""
    sources = [as_source(a) for a in (adapters.values() if isinstance(adapters, Mapping) else adapters)]
    T = len(sources)
    Kc, Kr = np.zeros((T, T)), np.zeros((T, T))
    for td in iter_tensors(sources):
        idx = sorted(td.factors)
        gb = {i: td.factors[i][0].T @ td.factors[i][0] for i in idx}
        ga = {i: td.factors[i][1] @ td.factors[i][1].T for i in idx}
        for a, i in enumerate(idx):
            Bi, Ai = td.factors[i]
            for j in idx[a:]:
                Bj, Aj = td.factors[j]
                M, N = Bi.T @ Bj, Ai @ Aj.T
                Kc[i, j] += float(((M.T @ ga[i] @ M) * ga[j]).sum())
                Kr[i, j] += float(((N.T @ gb[i] @ N) * gb[j]).sum())
                Kc[j, i], Kr[j, i] = Kc[i, j], Kr[i, j]

    def normalise(K: np.ndarray) -> np.ndarray:
        d = np.sqrt(np.clip(np.diag(K), 0.0, None))
        d = np.where(d > 0, d, 1.0)
        return K / d[:, None] / d[None, :]

    return (normalise(Kc) + normalise(Kr)) / 2


AFFINITIES = ("cosine", "subspace")


def _scores(sources: list, fits: dict[str, list[JointFit]], T: int, n_clusters: int, cores: str) -> np.ndarray:
    """(T, clusters) Σ over tensors of the squared error of projecting each adapter onto each cluster's bases
    with its best core (the paper's reassignment criterion); dense tensors are exact everywhere."""
    out = np.zeros((T, n_clusters))
    for td in iter_tensors(sources, list(fits)):
        by_cluster = {f.cluster: f for f in fits[td.name]}
        for i, (B, A) in td.factors.items():
            nrm = float(((B.T @ B) * (A @ A.T)).sum())
            for c in range(n_clusters):
                f = by_cluster.get(c)
                if f is None:
                    out[i, c] += nrm
                    continue
                U, V = f.U.to(torch.float64), f.V.to(torch.float64)
                L, R = U.T @ B, A @ V  # Uᵀ ΔW V = L R
                if cores == "full":  # orthonormal U, V: best core UᵀΔWV, error ‖ΔW‖² − ‖UᵀΔWV‖²
                    out[i, c] += max(nrm - float((L @ R).square().sum()), 0.0)
                else:
                    H = (U.T @ U) * (V.T @ V)
                    rhs = (L * R.T).sum(1)
                    s = _solve(H, rhs[:, None])[:, 0]
                    out[i, c] += max(nrm - float(s @ rhs), 0.0)
    return out


# ------------------------------------------------------------------------------------------------ the method
def _fit_all(sources: list, labels: list[int], k: int | tuple[int, int], cores: str, iters: int, tol: float, dtype: torch.dtype,
             dense_dtype: torch.dtype, seed: int
             ) -> tuple[dict[str, list[JointFit]], dict[str, dict[int, torch.Tensor]], dict[str, tuple[int, ...]],
                        dict[str, np.ndarray], dict[str, np.ndarray]]:
    T = len(sources)
    fits: dict[str, list[JointFit]] = {}
    dense: dict[str, dict[int, torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    sq_norms: dict[str, np.ndarray] = {}
    sq_errors: dict[str, np.ndarray] = {}
    for td in iter_tensors(sources, tensor_names(sources)):
        shapes[td.name] = td.shape
        norms, errs = np.zeros(T), np.zeros(T)
        for i, (B, A) in td.factors.items():
            norms[i] = float(((B.T @ B) * (A @ A.T)).sum())
        for i, D in td.dense.items():
            norms[i] = float(D.square().sum())
            dense.setdefault(td.name, {})[i] = D.reshape(td.shape).to(dense_dtype)
            errs[i] = float((dense[td.name][i].to(torch.float64).reshape(D.shape) - D).square().sum())
        for c in sorted(set(labels)):
            members = [i for i in sorted(td.factors) if labels[i] == c]
            if not members:
                continue
            fit, e = fit_tensor(td, members, k, cores, iters, tol, dtype, cluster=c, seed=seed)
            fits.setdefault(td.name, []).append(fit)
            for i, v in e.items():
                errs[i] = v
        sq_norms[td.name], sq_errors[td.name] = norms, errs
    return fits, dense, shapes, sq_norms, sq_errors


def joint_compress(adapters: Mapping[str, AdapterLike], k: int | tuple[int, int], cores: str = "full", clusters: int = 1,
                   labels: Sequence[int] | None = None, affinity: str = "cosine", refine: int = 0, iters: int | None = None,
                   tol: float = 1e-6, dtype: torch.dtype = torch.float32,
                   dense_dtype: torch.dtype = torch.float32, seed: int = 0) -> JointCompression:
    """Compress T LoRA adapters into per-tensor shared bases U (rows × k), V (cols × k) and per-adapter cores
    (``cores="full"``: k × k; ``"diag"``: k), per cluster of adapters (see the module docstring).

    ``k`` is capped per tensor at what the stacked factors span (full cores: min(rows, Σr_i) for U and
    min(cols, Σr_i) for V; diagonal: Σr_i). Full cores may be rectangular, ``k=(k_out, k_in)``: U rows × k_out,
    V cols × k_in, cores k_out × k_in — e.g. adapters trained from one A init share their row space (small
    k_in) more than their column space. ``clusters`` > 1: kernel k-means on ``affinity`` — the factor-space cosine (default) or
    ``subspace_kernel`` (shared column/row spaces) — or the assignment ``labels``; then ``refine`` rounds of
    reassigning each adapter to the cluster whose bases reconstruct it best and refitting (the best round is
    kept; ``history`` has them all).
    ``iters``/``tol``: rounds of the alternating method (default ``DEFAULT_ITERS[cores]``) and its stopping
    tolerance (relative change of the objective). ``dtype``: the
    stored U, V and cores (errors and bytes are those of the stored values)."""
    if affinity not in AFFINITIES:
        raise ConfigError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    if cores not in CORES:
        raise ConfigError(f"cores must be one of {CORES}, got {cores!r}")
    iters = DEFAULT_ITERS[cores] if iters is None else iters
    ks = (k, k) if isinstance(k, int) else tuple(k)
    if len(ks) != 2 or min(ks) < 1 or iters < 0 or tol < 0 or (cores == "diag" and ks[0] != ks[1]):
        raise ConfigError(f"joint_compress needs k >= 1 (one k, or (k_out, k_in) for full cores), iters >= 0, "
                          f"tol >= 0; got k={k}, iters={iters}, tol={tol}")
    names = list(adapters)
    T = len(names)
    if T < 1:
        raise ConfigError("joint_compress needs at least one adapter")
    t0 = time.time()
    sources = [as_source(a) for a in adapters.values()]
    if labels is not None:
        if len(labels) != T:
            raise ConfigError(f"labels has {len(labels)} entries for {T} adapters")
        labs = canonical_labels(np.asarray(labels))
    elif clusters > 1:
        if clusters > T:
            raise ConfigError(f"clusters must be <= T = {T}, got {clusters}")
        K = (factor_gram(dict(zip(names, sources))).cosine if affinity == "cosine" else subspace_kernel(sources))
        labs = kernel_clusters(K, clusters, seed)
    elif clusters == 1:
        labs = [0] * T
    else:
        raise ConfigError(f"clusters must be >= 1, got {clusters}")
    history: list[dict[str, object]] = []
    best: JointCompression | None = None
    nbytes = sum(s.nbytes() for s in sources)
    while True:
        fits, dense, shapes, sq_norms, sq_errors = _fit_all(sources, labs, k, cores, iters, tol, dtype,
                                                            dense_dtype, seed)
        out = JointCompression(names, cores, k, dtype, list(labs), fits, dense, shapes, sq_norms, sq_errors,
                               nbytes, 0.0, history)
        history.append({"labels": list(labs), "rel_error": out.rel_error, "nbytes": out.nbytes})
        if best is None or out.rel_error < best.rel_error:
            best = out  # the paper's reassignment lowers the objective in practice; keep the best round anyway
        if len(history) > refine or len(set(labs)) < 2:
            break
        new = canonical_labels(_scores(sources, fits, T, max(labs) + 1, cores).argmin(1))
        if new == labs:
            break
        labs = new
    best.seconds = time.time() - t0
    return best


__all__ = ["AFFINITIES", "CORES", "DEFAULT_ITERS", "JointCompression", "JointFit", "cosine_clusters", "fit_reduced",
           "fit_tensor", "joint_compress", "kernel_clusters", "subspace_kernel"]
