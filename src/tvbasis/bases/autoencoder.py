"""Autoencoder bases (the paper's main form): B = softmax(A/τ) over tasks, linear decoder W.

Loss tr(EᵀGE)/T² with E = B·W − I depends only on G, so fitting is a T×T problem. Defaults follow the paper's
code: Adam, lr 1e-2, τ = 5, 6000 steps, A ~ N(0, 1), W = 0, seed 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tvbasis.bases.base import BasisFit, BasisMethod, check_M, eckart_young_bound
from tvbasis.errors import ConfigError


class AutoencoderBasis(BasisMethod):
    name = "autoencoder"
    options: dict[str, Any] = {
        "lr": 1e-2, "temperature": 5.0, "steps": 6000, "seed": 0,
        "encoder": "softmax",        # softmax (convex combinations, the paper) | linear
        "decoder": "linear",         # linear (the paper) | softmax
        "anneal_to": None,           # final τ for geometric annealing from `temperature` (None: fixed τ)
        "normalize_gram": True,      # scale G by its trace/T before training (same optimum, better conditioned Adam)
    }

    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        T = G.shape[0]
        M = check_M(M, T, self.name)
        p = self.params
        if p["encoder"] not in ("softmax", "linear") or p["decoder"] not in ("linear", "softmax"):
            raise ConfigError("autoencoder: encoder must be softmax|linear and decoder linear|softmax")
        steps, lr, tau0 = int(p["steps"]), float(p["lr"]), float(p["temperature"])
        if steps < 1 or lr <= 0 or tau0 <= 0:
            raise ConfigError("autoencoder: steps, lr and temperature must be positive")
        scale = float(np.trace(G)) / T if p["normalize_gram"] and np.trace(G) > 0 else 1.0
        g = torch.as_tensor(G / scale, dtype=torch.float64)
        gen = torch.Generator().manual_seed(int(p["seed"]))
        A = torch.randn(T, M, generator=gen, dtype=torch.float64).requires_grad_(True)
        Wp = torch.zeros(M, T, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([A, Wp], lr=lr)
        eye = torch.eye(T, dtype=torch.float64)
        tau_end = float(p["anneal_to"]) if p["anneal_to"] is not None else tau0

        def encode(tau: float) -> torch.Tensor:
            return torch.softmax(A / tau, dim=0) if p["encoder"] == "softmax" else A

        def decode() -> torch.Tensor:
            return torch.softmax(Wp, dim=0) if p["decoder"] == "softmax" else Wp

        history: list[float] = []
        tau = tau0
        for step in range(steps):
            tau = tau0 * (tau_end / tau0) ** (step / max(1, steps - 1))
            E = encode(tau) @ decode() - eye
            loss = torch.einsum("it,ij,jt->", E, g, E) / T**2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % max(1, steps // 50) == 0:
                history.append(float(loss.detach()) * scale)
        with torch.no_grad():
            B = encode(tau).numpy().copy()
            W = decode().numpy().copy()
        E = B @ W - np.eye(T)
        final = float(np.trace(E.T @ G @ E)) / T**2
        history.append(final)
        stats = {"loss": final, "lower_bound": eckart_young_bound(G, M), "loss_history": history,
                 "initial_loss": float(np.trace(G)) / T**2}
        return BasisFit(M=M, B=B, W=W, stats=stats)
