"""Data-free SVD merges of 2-D task matrices: TSV-M, Iso-C and Iso-CTS.

- ``tsv_merge`` (rank_fraction=0.0): Task Singular Vectors merge (Gargiulo et al., CVPR 2025; authors' code
  AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``).
- ``iso_c``: Isotropic merging in the common subspace (Marczak et al., ICML 2025; danielm1405/iso-merging,
  ``src/utils/iso.py``).
- ``iso_cts`` (common_fraction=0.8): Iso-CTS, common plus task-specific subspaces (same paper and file).

What is followed from the authors' code (read at the commits fetched for this module):

- Task matrices. Each task matrix is X_t = w_t·δ_t: the weights scale the task matrices before any SVD (with
  the default unit weights this is the authors' plain δ_t). All SVDs are float32 ``torch.linalg.svd`` with
  full_matrices=False; r = min(m, n).
- TSV-M. Each X_t = U_t S_t V_tᵀ is cut to its top k singular triplets, k = ⌊r·rank_fraction⌋; the authors fix
  rank_fraction = 1/T (``sv_reduction = 1 / len(DATASETS)``), which is what ``rank_fraction=0`` (the default)
  means here, computed exactly as r // T (their float ``int(r * (1/T))`` gives 0 for e.g. r = T = 49). The
  kept columns are concatenated, U = [U_1,k … U_T,k] (m×Tk), likewise S and V, and U and V are
  orthogonalised by their polar factors (orthogonal Procrustes): U_⊥ = P·Qᵀ from U = P Σ Qᵀ, same for V. The
  merge is U_⊥ diag(S) V_⊥ᵀ, the original singular values kept. A rank_fraction above 1/T makes Tk exceed r;
  the polar factor is then only a co-isometry (orthonormal rows) — allowed, but outside the paper.
- Iso-C. M = Σ_t X_t = U S Vᵀ; every singular value is replaced by their mean σ̄ (the isotropic, flat
  spectrum): σ̄·U Vᵀ. The authors' code averages over all r singular values.
- Iso-CTS. Common subspace: the top k_c left/right singular vectors of M with their singular values. Sizes as
  in the authors' code: k = ⌊r·common_fraction⌋ (their config's common_space_fraction = 0.8, also the
  README's example), then per-task size n = round((r − k)/T) (Python rounding) and k_c = r − T·n, so the
  task-specific part divides evenly by T. Task-specific: each task's residual R_t = X_t − U_c U_cᵀ X_t (only the
  left/column space is projected out, as in their code), its top n singular triplets. All k_c + T·n left
  vectors are concatenated and orthogonalised by their polar factor, likewise the right ones; all singular
  values (common and task-specific) are replaced by their mean: σ̄·U_⊥ V_⊥ᵀ. With common_fraction = 1 there
  is no task-specific part and Iso-CTS is Iso-C.
- Non-2-D tensors (biases, norms, conv kernels, scalars): the authors average them (running mean). Here:
  (1/T)·Σ_t w_t·δ_t, the mean of the scaled task vectors (their mean for unit weights; like the 2-D path it is
  homogeneous in w). Their name-based exception (CLIP's 2-D ``text_projection`` is averaged too) is not
  reproduced: every 2-D tensor gets the SVD merge.
- Scaling. Both codebases apply one α to the whole merged vector (2-D and averaged tensors alike) and pick it
  on validation from linspace(0, 3, 31)[1:] (0.1 … 3.0) for these three methods (0.1 … 1.0 for the others).
  These merges return the un-scaled merged vector; the caller's ``scaling_coef`` (θ₀ + scaling_coef·merge) is
  α, and its default 1.0 is not a tuned value.

Where this departs from the code: singular triplets whose singular value is numerically zero (≤ max(m, n)·
eps·‖A‖_F, A the decomposed task matrix or the sum, before any projection) are dropped before concatenation
and averaging. Their singular vectors are arbitrary (LAPACK-dependent), so keeping them would make a rank-
deficient input's result implementation-defined: Iso-C would blow null directions up to σ̄, and TSV-M's polar
factor would rotate real directions towards them. For generic (full-rank) task matrices nothing is dropped and
the result is the authors'. The mean σ̄ is then over the kept values (the paper's σ̄ over the rank, as we read
it). TSV-M also keeps k ≥ 1 when r < T (the code would keep nothing and return zeros), and Iso-CTS caps n at
r // T (the code's rounding can make k_c negative for small common fractions).

Whole tensors: the SVD needs the full matrix, so these classes set ``whole_tensor = True``; a streaming pass
must hand them whole tensors and never row chunks (a chunk's SVD is not the tensor's).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.ops import bcast

_EPS = torch.finfo(torch.float32).eps


def _tol(a: torch.Tensor) -> torch.Tensor:
    """Per-matrix threshold below which a singular value counts as zero: max(m, n)·eps·‖a‖_F (a: (..., m, n))."""
    return max(a.shape[-2:]) * _EPS * torch.linalg.matrix_norm(a)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The polar factor P·Qᵀ of a = P Σ Qᵀ: the nearest matrix with orthonormal columns (or rows, if wide)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _compose(u: list[torch.Tensor], s: list[torch.Tensor], vh: list[torch.Tensor], like: torch.Tensor,
             isotropic: bool) -> torch.Tensor:
    """U_⊥ diag(s) V_⊥ᵀ from the concatenated singular triplets, or σ̄·U_⊥ V_⊥ᵀ when ``isotropic``; zeros
    shaped like ``like`` (m, n) when nothing is kept."""
    su = torch.cat(s)
    if su.numel() == 0:
        return torch.zeros_like(like)
    uo, vo = _polar(torch.cat(u, dim=1)), _polar(torch.cat(vh, dim=0))
    return uo @ vo * su.mean() if isotropic else (uo * su) @ vo


class _SVDMerger(BaseMerger):
    #: the merge needs the whole 2-D tensor (an SVD); never pass it row chunks (BaseMerger's trait)
    whole_tensor: ClassVar[bool] = True

    def _check_fraction(self, key: str) -> None:
        f = self.params[key]
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"merge method {self.name!r}: {key} must be in [0, 1], got {f!r}")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if x.dim() != 3:  # not a matrix: the mean of the scaled task vectors
            return torch.tensordot(w, x, dims=1) / x.shape[0]
        return self._merge2d(x * bcast(w, x))

    def _merge2d(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TSVMerge(_SVDMerger):
    """TSV-M: each task's top ⌊r·rank_fraction⌋ singular triplets (0 = the authors' 1/T), concatenated, U and V
    orthogonalised by their polar factors, singular values kept."""

    name = "tsv_merge"
    defaults: ClassVar[dict[str, Any]] = {"rank_fraction": 0.0}

    def _check(self) -> None:
        self._check_fraction("rank_fraction")

    def _merge2d(self, x: torch.Tensor) -> torch.Tensor:
        t, m, n = x.shape
        r = min(m, n)
        f = self.params["rank_fraction"]
        k = max(1, r // t if f == 0 else math.floor(r * f + 1e-9))
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        keep = s[:, :k] > _tol(x)[:, None]
        return _compose([u[i, :, :k][:, keep[i]] for i in range(t)], [s[i, :k][keep[i]] for i in range(t)],
                        [vh[i, :k][keep[i]] for i in range(t)], x[0], isotropic=False)


class IsoC(_SVDMerger):
    """Iso-C: the SVD of Σ_t w_t·δ_t with every singular value replaced by their mean (a flat spectrum)."""

    name = "iso_c"
    defaults: ClassVar[dict[str, Any]] = {}

    def _merge2d(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(0)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = s > _tol(total)
        return _compose([u[:, keep]], [s[keep]], [vh[keep]], total, isotropic=True)


class IsoCTS(_SVDMerger):
    """Iso-CTS: the sum's top singular directions (≈ common_fraction of the rank) plus each task's top
    directions outside that common space, orthogonalised, with a flat spectrum."""

    name = "iso_cts"
    defaults: ClassVar[dict[str, Any]] = {"common_fraction": 0.8}

    def _check(self) -> None:
        self._check_fraction("common_fraction")

    def sizes(self, r: int, t: int) -> tuple[int, int]:
        """(k_c, n): the common space's size and each task's, k_c + t·n = r."""
        n = round((r - int(r * self.params["common_fraction"])) / t)
        n = min(n, r // t)
        return r - t * n, n

    def _merge2d(self, x: torch.Tensor) -> torch.Tensor:
        t, m, n_cols = x.shape
        kc, n = self.sizes(min(m, n_cols), t)
        total = x.sum(0)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = s[:kc] > _tol(total)
        uc = u[:, :kc][:, keep]
        us, ss, vhs = [uc], [s[:kc][keep]], [vh[:kc][keep]]
        if n > 0:
            res = x - uc @ (uc.T @ x)
            ut, st, vht = torch.linalg.svd(res, full_matrices=False)
            kt = st[:, :n] > _tol(x)[:, None]
            us += [ut[i, :, :n][:, kt[i]] for i in range(t)]
            ss += [st[i, :n][kt[i]] for i in range(t)]
            vhs += [vht[i, :n][kt[i]] for i in range(t)]
        return _compose(us, ss, vhs, total, isotropic=True)
