"""The trained localizer of Localize-and-Stitch, for any torch module: learn a binary mask m over τ such that
θ₀ + m ⊙ τ keeps the task loss low.

Mask logits S start at +σ_b on the dataless top-s coordinates and −σ_b elsewhere (σ_b = 3). Each epoch sets the
weights to θ₀ + sigmoid(S) ⊙ τ, accumulates over the few-shot batches the gradient of the task loss with respect to
the (soft) mask, G = ∂ℓ/∂θ ⊙ τ, and steps S ← S − lr · sigmoid'(S) · (G / g₀ + l1), where g₀ is the ceil(s·n)-th
largest |G| of the first epoch (the gradient at the edge of the top s): ``lr`` is thereby in logits per epoch for a
coordinate whose gradient is that edge value, the same on every model (L&S's raw learning rate is lr / g₀, recorded
as ``raw_lr``), and ``l1`` weighs the L1 term Σ sigmoid(S) in the same units. The final mask is round(sigmoid(S))
(``budget="round"``, L&S) or exactly the ceil(s·n) coordinates of largest S (``budget="topk"``: the sparsity of the
dataless mask, held exactly).

The model is edited in place and restored to θ₀ (and its requires_grad flags) afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tvbasis.errors import ConfigError

BUDGETS = ("round", "topk")


@dataclass(frozen=True)
class MaskTraining:
    """Settings of the trained localizer (recorded in the masks file)."""

    sigmoid_bias: float = 3.0
    epochs: int = 10
    lr: float = 10.0
    l1: float = 0.0
    budget: str = "round"

    def check(self) -> MaskTraining:
        """These settings, validated (ConfigError for a non-positive bias, negative epochs, rates or L1, an unknown
        budget)."""
        if self.sigmoid_bias <= 0 or self.epochs < 0 or self.lr < 0 or self.l1 < 0:
            raise ConfigError(f"invalid mask training settings: {self}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"mask budget {self.budget!r}: expected one of {', '.join(BUDGETS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (recorded in the masks file)."""
        return asdict(self)


def _kth_largest(values: Sequence[torch.Tensor], k: int) -> float:
    flat = torch.cat([v.reshape(-1) for v in values])
    k = max(1, min(k, flat.numel()))
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


@torch.no_grad()
def _set(params: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor],
         mask: Mapping[str, torch.Tensor] | None) -> None:
    for n, p in params.items():
        if mask is None:
            p.copy_(theta0[n])
        else:
            p.copy_(theta0[n] + mask[n].to(theta0[n].dtype) * tau[n])


def task_loss(model: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]
              ) -> float:
    """Σ over batches of loss_fn (no gradient)."""
    with torch.no_grad():
        return float(sum(float(loss_fn(model, b)) for b in batches))


def train_mask(model: torch.nn.Module, tau: Mapping[str, torch.Tensor], init: Mapping[str, torch.Tensor],
               batches: Sequence[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
               settings: MaskTraining | None = None, progress: Callable[[int, float], None] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Learn the masks of the parameters named in ``tau`` (τ per parameter name of ``model``, float32; ``init``
    the dataless bool masks). ``loss_fn(model, batch)`` is the batch's share of the task loss: summed over the
    batches it is the loss the mask minimises (e.g. summed cross-entropy / number of examples).

    Returns ({name: bool mask}, stats: the loss per epoch at the soft mask, the loss at the initial and at the
    final binary mask, g₀ and the raw learning rate, the final size)."""
    cfg = (settings or MaskTraining()).check()
    named = dict(model.named_parameters())
    names = list(tau)
    missing = [n for n in names if n not in named]
    if missing:
        raise ConfigError(f"the model has no parameter(s) {missing[:3]} to localize")
    params = {n: named[n] for n in names}
    for n in names:
        if tuple(tau[n].shape) != tuple(params[n].shape) or tuple(init[n].shape) != tuple(params[n].shape):
            raise ConfigError(f"parameter {n!r}: τ / initial mask shape differs from {tuple(params[n].shape)}")
    device = next(iter(params.values())).device
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    tau = {n: tau[n].to(device=device, dtype=torch.float32) for n in names}
    k = int(sum(int(init[n].sum()) for n in names))
    S = {n: torch.where(init[n].to(device), cfg.sigmoid_bias, -cfg.sigmoid_bias).to(torch.float32) for n in names}
    flags = {n: p.requires_grad for n, p in named.items()}
    was_training = model.training
    stats: dict[str, Any] = {"epoch_loss": [], "initial_size": k}
    t0 = time.time()
    try:
        model.eval()
        for n, p in named.items():
            p.requires_grad_(n in params)
        _set(params, theta0, tau, {n: init[n] for n in names})
        stats["loss_initial_mask"] = task_loss(model, batches, loss_fn)
        g0: float | None = None
        for epoch in range(cfg.epochs):
            soft = {n: torch.sigmoid(S[n]) for n in names}
            _set(params, theta0, tau, soft)
            for p in params.values():
                p.grad = None
            total = 0.0
            for b in batches:
                loss = loss_fn(model, b)
                loss.backward()
                total += float(loss.detach())
            stats["epoch_loss"].append(total)
            G = {}  # ∂ℓ/∂m = ∂ℓ/∂θ ⊙ τ, in the gradient's own memory
            for n in names:
                g = params[n].grad
                G[n] = torch.zeros_like(tau[n]) if g is None else g.float().mul_(tau[n])
                params[n].grad = None
            if g0 is None:
                g0 = _kth_largest([g.abs() for g in G.values()], k)
                stats["g0"] = g0
                stats["raw_lr"] = cfg.lr / g0 if g0 > 0 else math.inf
            if not g0:
                break  # a zero gradient: nothing to learn
            with torch.no_grad():
                for n in names:
                    sg = soft[n]
                    S[n] -= cfg.lr * sg * (1 - sg) * (G[n] / g0 + cfg.l1)
            del G, soft
            if progress is not None:
                progress(epoch, total)
        if cfg.budget == "topk":
            cut = _kth_largest(list(S.values()), k)
            final = {n: S[n] >= cut for n in names}
            over = sum(int(m.sum()) for m in final.values()) - k
            if over > 0:  # ties at the cut: drop the last ones in parameter order, flat index order
                for n in reversed(names):
                    tie = (final[n] & (S[n] == cut)).reshape(-1)
                    idx = tie.nonzero().view(-1)
                    drop = idx[max(0, len(idx) - over):]
                    flat = final[n].reshape(-1)
                    flat[drop] = False
                    over -= len(drop)
                    if over <= 0:
                        break
        else:
            final = {n: S[n] > 0 for n in names}  # round(sigmoid(S))
        _set(params, theta0, tau, final)
        stats["loss_final_mask"] = task_loss(model, batches, loss_fn)
        stats["final_size"] = int(sum(int(m.sum()) for m in final.values()))
        stats["changed"] = int(sum(int((final[n] != init[n].to(device)).sum()) for n in names))
        stats["seconds"] = round(time.time() - t0, 2)
    finally:
        _set(params, theta0, tau, None)
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {n: m.cpu() for n, m in final.items()}, stats
