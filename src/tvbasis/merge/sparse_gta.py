"""DELLA (Deep et al. 2024, arXiv:2406.11617) and Model Breadcrumbs (Davari & Belilovsky 2023,
arXiv:2312.06795): sparsify each task vector, then merge as TIES (``della``, ``breadcrumbs_ties``: sign
election and disjoint sum, mean with ``normalize``) or linearly (``della_linear``, ``breadcrumbs``: Σ w_t·δ_t,
/ Σ w_t with ``normalize``), with mergekit's definitions and defaults.

DELLA's MAGPRUNE, per task: ranks r = 1..n of |δ| along dim 1 (a 1-D tensor is one row; equal magnitudes
ranked by index), keep probability p = (density − ε) + 2ε·(r − 1)/(n − 1) (a lone entry: density), so the
largest magnitudes are kept most often; kept where u < p for u uniform from the same seeded per-block
generators as DARE (``seed``; chunk- and order-independent). Needs density ± ε inside (0, 1) unless
density ≥ 1 (then nothing is dropped).

Breadcrumbs, per task over the whole tensor (n entries): with k = ⌊density·n⌋ to keep and g = ⌊gamma·n⌋ of the
largest to drop, the ⌊n − k − g⌋ smallest |δ| are dropped too (when that is negative, fewer of the largest are
dropped instead): the entries ranked [n − k − g, n − g) in ascending |δ| order survive (ties ranked by index).
mergekit slices ``[n_bot:-n_top]``, which is empty when g = 0; tvbasis keeps the intended range.

Rescaling (``rescale``): ``l1`` (mergekit's: the kept entries scaled so the task's L1 norm in this tensor is
the original one; unchanged when either norm is below 1e-7), ``inverse`` (DELLA's paper: each kept entry
divided by its keep probability; for breadcrumbs by density) or ``none``.

Per-task values of ``density``, ``epsilon`` and ``gamma`` (mergekit's per-model parameters) come in
``MergeContext.per_task``. Both need the whole tensor (ranks and L1 norms over it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.dare import uniforms
from tvbasis.merge.ops import bcast, weighted_sum
from tvbasis.merge.sign import disjoint_merge, elect_sign

RESCALES = ("l1", "inverse", "none")


def _ranks(a: torch.Tensor, dim: int) -> torch.Tensor:
    """0-based ascending ranks of ``a`` along ``dim``, equal values ranked by index (stable)."""
    order = torch.sort(a, dim=dim, stable=True).indices
    return torch.empty_like(order).scatter_(dim, order, torch.arange(a.shape[dim], device=a.device).view(
        [-1 if d == dim % a.dim() else 1 for d in range(a.dim())]).expand_as(order))


def _l1_rescale(orig: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before, after = float(orig.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64))
    return kept if before < eps or after < eps else kept * (before / after)


class _SparseGTA(BaseMerger):
    trims = True
    whole_tensor = True
    per_task_params: ClassVar[tuple[str, ...]] = ("density",)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {**BaseMerger.choices, "rescale": RESCALES}
    #: True: TIES sign election and disjoint merge; False: the weighted sum
    consensus: ClassVar[bool] = False

    def _check(self) -> None:
        for key in self.per_task_params:
            if key != "density" and self.params[key] < 0:
                raise ConfigError(f"merge method {self.name!r}: {key} must be >= 0, got {self.params[key]!r}")

    def _sparsify(self, delta: torch.Tensor, t: int, vals: dict[str, float], ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        T = x.shape[0]
        vals = {k: self.task_values(k, ctx, T) for k in self.per_task_params}
        for t, d in enumerate(vals["density"]):
            if not 0 < d <= 1:
                raise ConfigError(f"merge method {self.name!r}: density of task {t} must be in (0, 1], got {d!r}")
        sparse = torch.stack([self._sparsify(x[t], t, {k: v[t] for k, v in vals.items()}, ctx) for t in range(T)])
        if not self.consensus:
            return weighted_sum(sparse, w, self.params["normalize"])
        wx = sparse.mul_(bcast(w, sparse))
        return disjoint_merge(wx, w, elect_sign(wx, "total"), self.params["normalize"])


class DellaLinear(_SparseGTA):
    """MAGPRUNE each task (``density``, ``epsilon``, ``seed``, ``rescale``), then Σ w_t·δ_t (``normalize``)."""

    name = "della_linear"
    per_task_params = ("density", "epsilon")
    defaults: ClassVar[dict[str, Any]] = {"density": 0.5, "epsilon": 0.15, "seed": 0, "rescale": "l1",
                                          "normalize": False}

    def _sparsify(self, delta: torch.Tensor, t: int, vals: dict[str, float], ctx: MergeContext) -> torch.Tensor:
        d, eps = vals["density"], vals["epsilon"]
        if d >= 1:
            return delta
        if not (0 < d - eps and d + eps < 1):
            raise ConfigError(f"merge method {self.name!r}: density ± epsilon must lie inside (0, 1), got density "
                              f"{d:g} and epsilon {eps:g} (task {t})")
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        n = rows.shape[1]
        r = _ranks(rows.abs(), 1).to(torch.float32)
        norm = r / (n - 1) if n > 1 else torch.full_like(r, 0.5)
        p = (d - eps) + norm * (2 * eps)
        keep = uniforms(tuple(rows.shape), self.params["seed"], ctx.name, t, ctx.offset).to(rows.device) < p
        kept = torch.where(keep, rows, 0.0)
        if self.params["rescale"] == "inverse":
            kept = kept / p
        elif self.params["rescale"] == "l1":
            kept = _l1_rescale(rows, kept)
        return kept.reshape(delta.shape)


class Della(DellaLinear):
    """MAGPRUNE each task, then TIES sign election and disjoint merge (``normalize``: mean)."""

    name = "della"
    consensus = True
    defaults: ClassVar[dict[str, Any]] = {"density": 0.5, "epsilon": 0.15, "seed": 0, "rescale": "l1",
                                          "normalize": True}


class Breadcrumbs(_SparseGTA):
    """Drop each task's largest ``gamma`` and smallest entries to keep ``density``, then Σ w_t·δ_t."""

    name = "breadcrumbs"
    per_task_params = ("density", "gamma")
    defaults: ClassVar[dict[str, Any]] = {"density": 0.9, "gamma": 0.01, "rescale": "none", "normalize": False}

    def _sparsify(self, delta: torch.Tensor, t: int, vals: dict[str, float], ctx: MergeContext) -> torch.Tensor:
        d, g = vals["density"], vals["gamma"]
        if d >= 1:
            return delta
        flat = delta.reshape(-1)
        n = flat.numel()
        keep_n, top = int(d * n), int(g * n)
        bot = n - keep_n - top
        if bot < 0:
            top, bot = top + bot, 0
        r = _ranks(flat.abs(), 0)
        kept = torch.where((r >= bot) & (r < n - top), flat, 0.0)
        if self.params["rescale"] == "inverse":
            kept = kept / d
        elif self.params["rescale"] == "l1":
            kept = _l1_rescale(flat, kept)
        return kept.reshape(delta.shape)


class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs sparsification, then TIES sign election and disjoint merge (``normalize``: mean)."""

    name = "breadcrumbs_ties"
    consensus = True
