"""Task arithmetic as one-shot federated learning (Tao et al., arXiv 2411.18607): federated aggregation rules
applied once to the task vectors, data-free. Names and definitions follow the paper's released code
(github.com/SilviaTao/one_shot_fl_task_arithmetic, ``src/ta_algorithms.py``):

- ``fednova``: FedNova's normalisation by local steps, Σ_t c_t·τ_t with c_t = (mean(s)/s_t)/T, where s_t is the
  number of fine-tuning steps of task t (``steps``; equal steps give the plain mean).
- ``fedgma``: gradient-masked averaging, m ⊙ Σ_t τ_t with the sign agreement A = |Σ_t sign(τ_t)|/T and
  m = 1 where A ≥ ``rho``, m = A elsewhere (the released code's soft mask).
- ``median``: the coordinate-wise median of the T task vectors (torch.median: the lower of the two middle
  values when T is even).
- ``cclip``: centred clipping around 0 in one step, Σ_t τ_t·min(1, ρ/‖τ_t‖).

Each works on the weighted vectors w_t·τ_t (unit weights by default), like the other merges here. The paper
then scales the result by a λ searched on validation data, as tvbasis does for every merge.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import BaseMerger, MergeContext
from tvbasis.merge.ops import bcast


def parse_floats(text: str, what: str) -> list[float]:
    """'1,2.5,3' -> [1.0, 2.5, 3.0]; ConfigError naming ``what`` on anything else."""
    try:
        return [float(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def per_task(text: str, T: int, what: str, bound: str = "positive") -> torch.Tensor | None:
    """The T comma-separated values of ``text`` as a (T,) float32 tensor (None when empty); ConfigError unless
    there are exactly T finite values, each > 0 (``bound`` "positive"), >= 0 ("nonnegative") or any ("any")."""
    vals = parse_floats(text, what)
    if not vals:
        return None
    if len(vals) != T:
        raise ConfigError(f"{what}: {len(vals)} values for {T} tasks")
    t = torch.tensor(vals, dtype=torch.float32)
    ok = {"positive": bool((t > 0).all()), "nonnegative": bool((t >= 0).all()), "any": True}[bound]
    if not torch.isfinite(t).all() or not ok:
        raise ConfigError(f"{what} must be finite{'' if bound == 'any' else ' and ' + bound}, got {text!r}")
    return t


class FedNova(BaseMerger):
    """Σ_t w_t·c_t·τ_t with c_t = (mean(s)/s_t)/T (FedNova's normalised averaging; ``steps``: s_1,…,s_T, the
    fine-tuning steps of each task, comma-separated; empty: equal steps, i.e. the mean)."""

    name = "fednova"
    defaults: ClassVar[dict[str, Any]] = {"steps": ""}

    def _check(self) -> None:
        parse_floats(self.params["steps"], "fednova steps")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        T = x.shape[0]
        s = per_task(self.params["steps"], T, "fednova steps")
        c = torch.full((T,), 1.0 / T) if s is None else (s.mean() / s) / T
        return torch.tensordot(w * c.to(w.device), x, dims=1)


class FedGMA(BaseMerger):
    """m ⊙ Σ_t w_t·τ_t, A = |Σ_t sign(w_t·τ_t)|/T, m = 1 where A ≥ ``rho`` else A (FedGMA's sign-agreement mask
    as in the paper's code; the paper searches rho over 0.1 … 0.9)."""

    name = "fedgma"
    defaults: ClassVar[dict[str, Any]] = {"rho": 0.5}

    def _check(self) -> None:
        if not 0.0 <= self.params["rho"] <= 1.0:
            raise ConfigError(f"merge method 'fedgma': rho must be in [0, 1], got {self.params['rho']!r}")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        wx = x * bcast(w, x)
        agree = torch.sign(wx).sum(0).abs_().div_(x.shape[0])
        mask = torch.where(agree >= self.params["rho"], torch.ones_like(agree), agree)
        return wx.sum(0).mul_(mask)


class Median(BaseMerger):
    """The coordinate-wise median of w_t·τ_t over the T tasks (the lower middle value when T is even)."""

    name = "median"
    defaults: ClassVar[dict[str, Any]] = {}

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        return torch.median(x * bcast(w, x), dim=0).values


class CClip(BaseMerger):
    """Σ_t w_t·τ_t·min(1, ρ/‖τ_t‖): each task vector clipped to norm ρ, then summed (centred clipping from 0).

    ``norms``: the T global norms ‖τ_t‖ over the whole vectors, comma-separated (the paper's definition; compute
    them once, e.g. from the Gram matrix's diagonal); empty: each tensor's own norms (per-tensor clipping, which
    needs no pre-pass). ``rho`` > 0 is the clip norm itself; ``rho`` = 0 places it at ``rho_frac`` along
    [min_t ‖τ_t‖, max_t ‖τ_t‖], the paper's search grid (0: every task scaled to the smallest norm)."""

    name = "cclip"
    whole_tensor = True  # per-tensor norms need the whole tensor
    defaults: ClassVar[dict[str, Any]] = {"rho": 0.0, "rho_frac": 0.0, "norms": ""}

    def _check(self) -> None:
        if self.params["rho"] < 0 or not 0.0 <= self.params["rho_frac"] <= 1.0:
            raise ConfigError(f"merge method 'cclip': rho must be >= 0 and rho_frac in [0, 1], got "
                              f"rho={self.params['rho']!r}, rho_frac={self.params['rho_frac']!r}")
        parse_floats(self.params["norms"], "cclip norms")

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        T = x.shape[0]
        norms = per_task(self.params["norms"], T, "cclip norms", "nonnegative")
        if norms is None:
            norms = x.reshape(T, -1).to(torch.float64).norm(dim=1).to(torch.float32)
        norms = norms.to(x.device)
        rho = self.params["rho"] or float(norms.min() + self.params["rho_frac"] * (norms.max() - norms.min()))
        scale = torch.where(norms > rho, rho / norms.clamp_min(1e-30), torch.ones_like(norms))
        return torch.tensordot(w * scale, x, dims=1)
