"""TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging and Compression").

Stored: the multi-task vector τ_MTL = Σ_t τ_t (float32) and one bit mask per task,

    m_t = 1[ |τ_t| ≥ λ_t · |τ_MTL − τ_t| ]        (elementwise),

and task t comes back as θ₀ + m_t ∘ τ_MTL (applied at coefficient 1). λ_t is chosen per task from
``TALL_LAMBDAS`` = {0.2, 0.3, 0.4, 0.5, 0.6} by the task's validation accuracy (the benchmark does it on dev;
ties go to the smallest λ, as ``max`` over the paper's λ-ordered dict). Bytes: 4·n for τ_MTL plus ⌈n/8⌉ per
task and tensor, i.e. (1 + T/32)/T of the T float32 task vectors.

Following the paper, not the code, in one place: the reference code (``tallmask_utils.generate_task_masks``)
compares with a strict ``>``; the paper writes ``≥``. They differ only where both sides are equal, in practice
where τ_t = τ_MTL = 0, where the reconstruction m_t ∘ τ_MTL is 0 either way. The code also forms τ_MTL from the
task vectors after an optional top-k filter (``k: 100``, i.e. none, in its TALL config); we use the plain sum.

Everything here is elementwise, so a caller may pass any slice of rows of a tensor (streaming).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvbasis.codecs import packed_size

TALL_LAMBDAS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)


def multi_task_vector(tau: torch.Tensor) -> torch.Tensor:
    """τ_MTL = Σ_t τ_t of stacked task-vector slices ``tau`` (T, ...)."""
    return tau.sum(0)


def _per_task(lambdas: float | Sequence[float] | torch.Tensor, T: int, ndim: int) -> torch.Tensor:
    lam = torch.as_tensor(lambdas, dtype=torch.float32)
    if lam.ndim == 0:
        lam = lam.expand(T)
    if lam.shape != (T,):
        raise ValueError(f"tall_masks: need one λ or one per task ({T}), got shape {tuple(lam.shape)}")
    return lam.reshape(T, *([1] * (ndim - 1)))


def tall_masks(tau: torch.Tensor, tau_mtl: torch.Tensor | None = None,
               lambdas: float | Sequence[float] | torch.Tensor = 0.4) -> torch.Tensor:
    """Boolean masks (T, ...): m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| for stacked slices ``tau`` (T, ...).

    ``tau_mtl`` defaults to Σ_t τ_t; ``lambdas`` is one λ for all tasks or one per task."""
    if tau_mtl is None:
        tau_mtl = multi_task_vector(tau)
    lam = _per_task(lambdas, tau.shape[0], tau.ndim)
    return tau.abs() >= lam * (tau_mtl.unsqueeze(0) - tau).abs()


def tall_mask(tau_t: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """One task's mask from its own slice (no stacking): |τ_t| ≥ λ·|τ_MTL − τ_t|."""
    return tau_t.abs() >= lam * (tau_mtl - tau_t).abs()


def tall_reconstruct(mask: torch.Tensor, tau_mtl: torch.Tensor) -> torch.Tensor:
    """v̂_t = m_t ∘ τ_MTL."""
    return torch.where(mask, tau_mtl, torch.zeros((), dtype=tau_mtl.dtype))


def tall_nbytes(numel: int, T: int) -> int:
    """Stored bytes of one tensor: τ_MTL in float32 plus T bit-packed masks."""
    return 4 * numel + T * packed_size(numel, 1)
