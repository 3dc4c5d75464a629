"""Spherical interpolation merges, with mergekit's definitions: ``slerp`` and ``nuslerp``.

slerp (t=0.5): the spherical interpolation of two whole weight tensors, each flattened to one vector.
    With u0 = v0/‖v0‖, u1 = v1/‖v1‖ (a vector of norm ≤ 1e-8 is left as is), d = u0·u1 and θ = arccos d:
    slerp(t; v0, v1) = sin((1 − t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, the RAW (not normalised) vectors
    weighted; where |d| > 0.9995 (nearly colinear) it is the lerp (1 − t)·v0 + t·v1. The endpoints are the
    pretrained model and the one fine-tune (T = 1: v0 = θ₀, v1 = θ₀ + τ, as mergekit's ``base_model`` is v0),
    or the two fine-tunes (T = 2: v0 = θ₀ + τ₁, v1 = θ₀ + τ₂). The merged task vector is slerp − θ₀. The
    per-task weights are not used (t is the parameter).
nuslerp (nuslerp_flatten=True, nuslerp_row_wise=False, on_weights=False): mergekit's NuSLERP of exactly two
    task vectors, t = w₂/(w₁ + w₂) from the per-task weights (0.5 when |w₁ + w₂| < 1e-6). With
    ``on_weights`` it interpolates the whole weights θ₀ + τ_t instead (mergekit's form without base_model)
    and returns the result − θ₀. Vectors: the whole flattened tensor (``nuslerp_flatten``), else each row
    along the last dim, or (``nuslerp_row_wise``) each slice along dim 0. Per vector: u = v/max(‖v‖, 1e-7),
    θ = arccos(clamp(u0·u1, −1, 1)); (sin((1 − t)θ)·v0 + sin(tθ)·v1)/sin θ, the lerp where |sin θ| < 1e-8.

Both need the whole tensor (norms over it) and are never merged in row chunks. Coefficients are computed in
float64 from float64 dot products; the combination is float32.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext

#: |cos| above which slerp's two vectors count as colinear and are lerped (mergekit's DOT_THRESHOLD)
DOT_THRESHOLD = 0.9995


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp of two tensors (see the module doc), float32."""
    a, b = v0.reshape(-1).to(torch.float64), v1.reshape(-1).to(torch.float64)
    na, nb = float(a.norm()), float(b.norm())
    dot = float(a @ b) / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        c0, c1 = math.sin(theta - t * theta) / s, math.sin(t * theta) / s
    return v0 * c0 + v1 * c1


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool,
                 eps: float = 1e-8) -> torch.Tensor:
    """mergekit's nuslerp of two tensors (see the module doc), float32."""
    shape = v0.shape
    if flatten or v0.dim() < 1:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    ua = a64 / a64.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b64 / b64.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    s = torch.sin(theta)
    colinear = s.abs() < eps
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / torch.where(colinear, 1.0, s))
    c1 = torch.where(colinear, t, torch.sin(t * theta) / torch.where(colinear, 1.0, s))
    out = a * c0.to(torch.float32) + b * c1.to(torch.float32)
    if row_wise and not flatten and v0.dim() >= 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _no_weights(name: str, w: torch.Tensor) -> None:
    if bool((w != 1).any()):
        raise ConfigError(f"merge method {name!r} takes no per-task weights (got {w.tolist()}); use its "
                          f"parameter t")


def _base(name: str, ctx: MergeContext) -> torch.Tensor:
    if ctx.base is None:
        raise ConfigError(f"merge method {name!r} interpolates whole weights and needs the pretrained tensor "
                          f"(MergeContext.base); it cannot serve as a store's inner or outer merge")
    return ctx.base.to(torch.float32)


class Slerp(BaseMerger):
    """Spherical interpolation at ``t`` of θ₀ and θ₀ + τ (one task) or of θ₀ + τ₁ and θ₀ + τ₂ (two)."""

    name = "slerp"
    whole_tensor = True
    needs_base = True
    defaults: ClassVar[dict[str, Any]] = {"t": 0.5}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        _no_weights(self.name, w)
        base = _base(self.name, ctx)
        if x.shape[0] == 1:
            v0, v1 = base, base + x[0]
        elif x.shape[0] == 2:
            v0, v1 = base + x[0], base + x[1]
        else:
            raise ConfigError(f"merge method 'slerp' interpolates two models: give one fine-tune (with the "
                              f"pretrained model as the other end) or two, got {x.shape[0]}")
        return slerp_pair(self.params["t"], v0, v1).sub_(base)


class NuSlerp(BaseMerger):
    """NuSLERP of two task vectors (or, ``on_weights``, of the two whole models), t = w₂/(w₁ + w₂)."""

    name = "nuslerp"
    whole_tensor = True
    needs_base = True
    defaults: ClassVar[dict[str, Any]] = {"nuslerp_flatten": True, "nuslerp_row_wise": False, "on_weights": False}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        if x.shape[0] != 2:
            raise ConfigError(f"merge method 'nuslerp' interpolates exactly two models, got {x.shape[0]}")
        total = float(w.sum())
        t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
        flat, rows = self.params["nuslerp_flatten"], self.params["nuslerp_row_wise"]
        if not self.params["on_weights"]:
            return nuslerp_pair(t, x[0], x[1], flat, rows)
        base = _base(self.name, ctx)
        return nuslerp_pair(t, base + x[0], base + x[1], flat, rows).sub_(base)


class MultiSlerp(BaseMerger):
    """mergekit's Multi-SLERP: barycentric interpolation of T ≥ 2 task vectors (or, ``on_weights``, whole
    weights) on the hypersphere.

    Per tensor, flattened, with weights w (÷ Σw when ``normalize_weights``): u_t = v_t/(‖v_t‖ + 1e-8); the
    weighted mean m = Σ w_t·u_t, normalised; the tangent vectors u_t − (u_t·m)·m averaged with the weights to g;
    back to the sphere by the exponential map: m·cos‖g‖ + g·sin‖g‖/‖g‖ (‖g‖ + 1e-8); scaled by Σ w_t·‖v_t‖. When
    ‖m‖ < 1e-8: two vectors are lerped with the weights, more are refused (they cancel)."""

    name = "multislerp"
    whole_tensor = True
    needs_base = True
    defaults: ClassVar[dict[str, Any]] = {"normalize_weights": True, "on_weights": False}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        T = x.shape[0]
        base = _base(self.name, ctx) if self.params["on_weights"] else None
        v = x if base is None else x + base
        if T == 1:
            return x[0].clone()
        eps = 1e-8
        flat = v.reshape(T, -1).to(torch.float64)
        ww = w.to(torch.float64)
        if self.params["normalize_weights"]:
            ww = ww / ww.sum()
        norms = flat.norm(dim=-1, keepdim=True)
        unit = flat / (norms + eps)
        mean = (unit * ww.view(-1, 1)).sum(0)
        mn = float(mean.norm())
        if mn < eps:
            if T != 2:
                raise ConfigError(f"multislerp of {ctx.name!r}: the weighted mean direction of the {T} vectors is "
                                  f"zero (antipodal vectors with balancing weights); change the weights")
            res = flat[0] * ww[0] + flat[1] * ww[1]
        else:
            mean = mean / mn
            tangent = unit - (unit * mean).sum(-1, keepdim=True) * mean
            g = (tangent * ww.view(-1, 1)).sum(0)
            gn = g.norm() + eps
            res = (mean * torch.cos(gn) + g * (torch.sin(gn) / gn)) * (norms.squeeze(-1) * ww).sum()
        out = res.to(torch.float32).view(x.shape[1:])
        return out if base is None else out.sub_(base)
