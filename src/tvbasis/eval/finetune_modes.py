"""Fine-tuning modes that shape the task vector: tangent-space (linearised) training, sparse diffs, a chosen
subset of trained tensors.

- Linearised (Ortiz-Jiménez et al., arXiv 2305.12827, "tangent task arithmetic"): the model trained is the
  first-order Taylor expansion of the encoder around θ₀, f_lin(x; θ) = f(x; θ₀) + J_θ f(x; θ₀)·(θ − θ₀), computed
  with one ``torch.func.jvp`` per batch (as the paper's ``LinearizedModel``, whose ``func0`` runs in eval mode:
  no dropout). The task vector τ = θ − θ₀ is stored like any other and applies to the linearised model:
  ``linearized(encoder)`` makes the encoder compute f_lin at its current weights θ₀ + Σ λ_t·τ_t. What is
  linearised here is the whole embedding map (transformer, mean pooling and L2 normalisation), the analogue of
  the paper's linearised image encoder; the frozen zero-shot head stays outside.
- Sparse diff (after diff pruning, Guo et al., arXiv 2012.07463, and its magnitude projection): train densely,
  keep the top ``density`` fraction of |θ − θ₀| over all trained tensors (one global cut), then train again
  with that mask fixed (gradients outside it zeroed) and project once more, so the task vector has at most
  ceil(density·N) non-zeros (more only where magnitudes tie at the cut). Diff pruning chooses the support with a
  relaxed-L0 penalty during training; tvbasis chooses it by the dense diff's magnitudes (cheaper, no extra
  hyper-parameters), then re-trains on it as diff pruning's fixed-mask stage does.
- Trained tensors (``train_layers``, a regular expression; after TAPS, Wallingford et al., arXiv 2203.16708,
  which learns which layers to adapt): only the parameters whose names match are trained; the task vector is
  exactly zero elsewhere. TAPS learns the subset; here the user names it.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from tvbasis.errors import ConfigError


class Functional:
    """Calls ``module`` with the parameters ``params`` (torch.func.functional_call), like ``module(**inputs)``."""

    def __init__(self, module: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> None:
        self.module, self.params = module, params

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(self.module, dict(self.params), args=(), kwargs=inputs)


def linear_forward(encoder: Any) -> Callable[..., torch.Tensor]:
    """A drop-in for ``encoder.forward(inputs, model=None)`` computing the linearised embedding
    f(θ₀) + J(θ₀)·(θ − θ₀), where θ are the parameters of ``model`` (default: the encoder's live model, so
    ``set_delta`` edits apply to the linearised model) and θ₀ the encoder's pretrained weights."""
    base_forward = type(encoder).forward  # the class's (non-linear) forward, never an override

    def forward(inputs: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        m = model or encoder.model
        params = dict(m.named_parameters())
        primals = {n: encoder.pretrained_state[n].to(p.device, p.dtype) for n, p in params.items()}
        tangents = {n: p - primals[n] for n, p in params.items()}
        was = m.training
        m.eval()  # as the paper's func0: the expansion point is the deterministic (no-dropout) model
        try:
            # the math attention kernel: the fused CPU/GPU kernels have no forward-mode derivative
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
                out, jv = torch.func.jvp(lambda ps: base_forward(encoder, inputs, model=Functional(m, ps)),
                                         (primals,), (tangents,))
        finally:
            m.train(was)
        return out + jv

    return forward


@contextlib.contextmanager
def linearized(encoder: Any) -> Iterator[Any]:
    """Within the block, ``encoder`` computes the linearised model (``linear_forward``) for every encode and
    evaluation: set_delta(τ) then evaluates f_lin(θ₀ + τ), as tangent task arithmetic defines it."""
    encoder.forward = linear_forward(encoder)
    try:
        yield encoder
    finally:
        del encoder.forward


def trained_names(model: torch.nn.Module, pattern: str, frozen: set[str]) -> set[str]:
    """Names of the parameters to train: all not ``frozen`` whose name matches the regular expression
    ``pattern`` (re.search; empty: all). ConfigError for a bad expression or one that matches nothing."""
    names = [n for n, _ in model.named_parameters() if n not in frozen]
    if not pattern:
        return set(names)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--train-layers {pattern!r} is not a regular expression: {e}") from None
    keep = {n for n in names if rx.search(n)}
    if not keep:
        raise ConfigError(f"--train-layers {pattern!r} matches no trainable parameter (names look like "
                          f"{names[0] if names else '?'!r})")
    return keep


def sparse_mask(model: torch.nn.Module, theta0: Mapping[str, torch.Tensor], names: set[str],
                density: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the ceil(density·N) largest |θ − θ₀| over all N entries of the parameters
    ``names`` (one global cut; entries tied with the cut are kept too)."""
    if not 0 < density <= 1:
        raise ConfigError(f"--sparse-diff must be a density in (0, 1], got {density!r}")
    params = dict(model.named_parameters())
    diffs = {n: (params[n].detach() - theta0[n].to(params[n].dtype)).abs().float() for n in sorted(names)}
    flat = torch.cat([d.reshape(-1) for d in diffs.values()])
    k = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
    cut = flat.kthvalue(flat.numel() - k + 1).values
    return {n: (d >= cut) & (d > 0) for n, d in diffs.items()}


@torch.no_grad()
def project(model: torch.nn.Module, theta0: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """θ ← θ₀ + mask ⊙ (θ − θ₀) for the masked parameters (in place)."""
    params = dict(model.named_parameters())
    for n, m in masks.items():
        p = params[n]
        base = theta0[n].to(p.dtype)
        p.copy_(torch.where(m, p, base))


@contextlib.contextmanager
def masked_gradients(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the gradient of each masked parameter is zero outside its mask."""
    params = dict(model.named_parameters())
    hooks = [params[n].register_hook(lambda g, m=m: g * m.to(g.dtype)) for n, m in masks.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
