"""Karcher mean (mergekit's ``karcher``): the Riemannian mean of whole weight tensors on the hypersphere, scaled
by their mean norm.

The points are the whole weights θ₀ + τ_t of the T fine-tunes, plus θ₀ itself when ``include_base`` (mergekit
averages every input model, the base model included), each with weight 1/N. Per tensor, flattened: unit vectors
u_i = v_i/‖v_i‖ of the points with ‖v_i‖ > ``tol`` (weights renormalised over them); start at the normalised
weighted mean (the first unit vector if that is shorter than ``tol``); then at most ``max_iter`` times: the
tangent step T = Σ a_i·θ_i/sin θ_i·(u_i − cos θ_i·u) over the points with θ_i = arccos(u·u_i) ≥ ``tol``, stop
when ‖T‖ < ``tol``, else u ← cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised. The result is (Σ_i a_i·‖v_i‖)·u, and the
merged task vector that minus θ₀. Computed in float32 as mergekit does; the per-task weights are not used.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext


def karcher_mean(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's Karcher mean of ``points`` (equal weights), float32, shape of one point."""
    alphas = [1.0 / len(points)] * len(points)
    norms = [float(torch.linalg.norm(p)) for p in points]
    units = [p / n if n != 0.0 else torch.zeros_like(p) for p, n in zip(points, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(points[0])
    total = sum(alphas[i] for i in valid)
    a_valid = [alphas[i] / total for i in valid]
    u_valid = [units[i] for i in valid]
    u = torch.zeros_like(u_valid[0])
    for a, ui in zip(a_valid, u_valid, strict=True):
        u += a * ui
    nu = float(torch.linalg.norm(u))
    u = u_valid[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for a, ui in zip(a_valid, u_valid, strict=True):
            dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (ui - dot * u)
        n_step = torch.linalg.norm(step)
        if float(n_step) < tol:
            break
        u = torch.cos(n_step) * u + torch.sin(n_step) * (step / n_step)
        nu_t = torch.linalg.norm(u)
        if float(nu_t) > tol:
            u = u / nu_t
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * u


class Karcher(BaseMerger):
    """The Karcher mean of the whole weights θ₀ + τ_t (and θ₀ with ``include_base``), minus θ₀."""

    name = "karcher"
    whole_tensor = True
    needs_base = True
    defaults: ClassVar[dict[str, Any]] = {"max_iter": 10, "tol": 1e-5, "include_base": False}

    def _check(self) -> None:
        if self.params["max_iter"] < 0 or self.params["tol"] < 0:
            raise ConfigError("merge method 'karcher': max_iter and tol must be >= 0")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if bool((w != 1).any()):
            raise ConfigError(f"merge method 'karcher' takes no per-task weights (got {w.tolist()})")
        if ctx.base is None:
            raise ConfigError("merge method 'karcher' averages whole weights and needs the pretrained tensor "
                              "(MergeContext.base); it cannot serve as a store's inner or outer merge")
        base = ctx.base.to(torch.float32)
        points = ([base] if self.params["include_base"] else []) + [base + x[t] for t in range(x.shape[0])]
        if len(points) == 1:
            return x[0].clone() if not self.params["include_base"] else torch.zeros_like(base)
        return karcher_mean(points, self.params["max_iter"], self.params["tol"]).sub_(base)
