"""Adaptive Weight Disentanglement (AWD; Xiong et al., arXiv 2411.18729), data-free.

AWD finds a redundant vector δ and merges the disentangled vectors τ_t − δ instead of τ_t. δ minimises

    L(δ) = L_O + α·L_R,   L_O = mean_{i<j} |cos(τ_i − δ, τ_j − δ)|,   L_R = ‖δ‖² / mean_t ‖τ_t‖²

(orthogonality of the remainders, and a norm penalty so each remainder keeps its task; the paper's objective,
with L_R made scale-free here). Its code was not released (github.com/FarisXiong/AWD holds a README only), so
the optimiser and the defaults below are tvbasis's.

Memory. L depends on the vectors only through inner products, and its gradient in δ is a combination of the
τ_t and δ, so gradient descent started in span{τ_t} never leaves it: δ = Σ_t b_t·τ_t and L is a function of
b ∈ R^T and the Gram matrix G = VᵀV alone (``awd_coefficients``; Adam on b, a T-dimensional problem).
The objective is over whole vectors and does NOT decompose over tensors, so there are two forms:

- global (the paper's): ``coefs`` = b found once from G (one Gram pass, T×T float64); the merge then streams
  like task arithmetic (δ's slice is Σ_t b_t·x_t).
- per tensor (``coefs`` empty, the default of ``tvbasis merge --method awd``): b is found for each tensor from
  that tensor's own Gram matrix, so the merge holds the T slices of one tensor (never row-chunked) and no
  pre-pass is needed; it disentangles each tensor separately, which is not the paper's objective.

The disentangled slices are merged by ``inner``: task_arithmetic (Σ_t w_t·(x_t − δ)) or ties (``density``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.federated import parse_floats, per_task
from tvbasis.merge.ties import Ties

#: defaults of the redundant-vector optimisation (tvbasis's choice; the paper's code is not public)
AWD_DEFAULTS: dict[str, Any] = {"alpha": 1.0, "steps": 300, "lr": 0.01}


def awd_loss(b: torch.Tensor, G: torch.Tensor, alpha: float) -> torch.Tensor:
    """L(b) for δ = V·b from G = VᵀV (float64): mean |cos| over the pairs of τ_t − δ, plus α‖δ‖²/mean ‖τ_t‖²."""
    T = G.shape[0]
    A = torch.eye(T, dtype=G.dtype) - b.view(T, 1) @ torch.ones(1, T, dtype=G.dtype)  # columns e_t − b
    H = A.T @ G @ A  # ⟨τ_i − δ, τ_j − δ⟩
    d = H.diagonal().clamp_min(1e-300).sqrt()
    cos = H / (d.view(-1, 1) * d.view(1, -1))
    iu = torch.triu_indices(T, T, 1)
    lo = cos[iu[0], iu[1]].abs().mean() if T > 1 else torch.zeros((), dtype=G.dtype)
    scale = G.diagonal().mean().clamp_min(1e-300)
    return lo + alpha * (b @ G @ b) / scale


def awd_coefficients(G: torch.Tensor, alpha: float = AWD_DEFAULTS["alpha"], steps: int = AWD_DEFAULTS["steps"],
                     lr: float = AWD_DEFAULTS["lr"]) -> torch.Tensor:
    """(T,) float64 b of the redundant vector δ = Σ_t b_t·τ_t minimising ``awd_loss`` from the Gram matrix G
    (Adam from b = 0, ``steps`` steps; deterministic). A G of zeros (nothing changed) gives b = 0."""
    G = torch.as_tensor(G, dtype=torch.float64).detach()
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ConfigError(f"awd: the Gram matrix must be square (T, T), got shape {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise ConfigError("awd: the Gram matrix has non-finite entries")
    T = G.shape[0]
    b = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    if T < 2 or float(G.diagonal().max()) <= 0:
        return b.detach()
    opt = torch.optim.Adam([b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        awd_loss(b, G, alpha).backward()
        opt.step()
    return b.detach()


class AWD(BaseMerger):
    """τ_t − δ merged by ``inner``, δ = Σ_t b_t·τ_t the AWD redundant vector (module docstring): ``coefs`` b
    given (global, the paper's form: ``awd_coefficients`` of the whole vectors' Gram matrix) or found per tensor
    (``coefs`` empty); ``alpha``, ``steps``, ``lr``: the optimisation (per-tensor form)."""

    name = "awd"
    whole_tensor = True  # the per-tensor form optimises over the whole tensor's Gram matrix
    defaults: ClassVar[dict[str, Any]] = {**AWD_DEFAULTS, "coefs": "", "inner": "task_arithmetic",
                                          "density": 0.2}
    choices: ClassVar[dict[str, tuple[str, ...]]] = {**BaseMerger.choices, "inner": ("task_arithmetic", "ties")}

    def _check(self) -> None:
        p = self.params
        if p["alpha"] < 0 or p["steps"] < 0 or p["lr"] <= 0 or not 0 < p["density"] <= 1:
            raise ConfigError(f"merge method 'awd': need alpha >= 0, steps >= 0, lr > 0 and density in (0, 1]; "
                              f"got alpha={p['alpha']!r}, steps={p['steps']!r}, lr={p['lr']!r}, "
                              f"density={p['density']!r}")
        parse_floats(p["coefs"], "awd coefs")

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """(T,) float32 b: the given ``coefs``, or the per-tensor optimum for the slices ``x`` (T, *shape)."""
        T = x.shape[0]
        given = per_task(self.params["coefs"], T, "awd coefs", "any")
        if given is not None:
            return given
        flat = x.reshape(T, -1).to(torch.float64)
        p = self.params
        return awd_coefficients(flat @ flat.T, p["alpha"], p["steps"], p["lr"]).to(torch.float32)

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        b = self.coefficients(x).to(x.device)
        disentangled = x - torch.tensordot(b, x, dims=1).unsqueeze(0)
        if self.params["inner"] == "ties":
            return Ties({"density": self.params["density"]}).merge(disentangled, w, ctx)
        return torch.tensordot(w, disentangled, dims=1)
