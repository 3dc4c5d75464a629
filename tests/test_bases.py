"""Basis methods fit from G: the autoencoder against autograd and its Eckart–Young bound, planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tinymodels import dense_V
from tvbasis.bases import get_basis_method


def test_autoencoder_loss_above_bound_and_falls(fam):
    pre_p, fts, pre, sds = fam
    V, _ = dense_V(pre, sds)
    G = (V.T @ V).numpy()
    fit = get_basis_method("autoencoder", steps=1500).fit(G, 2)
    hist = fit.stats["loss_history"]
    assert fit.stats["loss"] >= fit.stats["lower_bound"] - 1e-12
    assert hist[-1] < 0.5 * fit.stats["initial_loss"]
    assert hist[-1] <= hist[1]
    assert np.allclose(fit.B.sum(0), 1.0) and (fit.B >= 0).all()  # convex combinations


def test_cluster_recovers_planted_clusters_and_eigengap(fam):
    pre_p, fts, pre, sds = fam
    V, _ = dense_V(pre, sds)
    G = (V.T @ V).numpy()
    fit = get_basis_method("cluster").fit(G, None)
    assert fit.M == 3
    truth = [t % 3 for t in range(6)]
    assert all((fit.labels[i] == fit.labels[j]) == (truth[i] == truth[j]) for i in range(6) for j in range(6))


@pytest.mark.parametrize("encoder,decoder", [("softmax", "linear"), ("linear", "softmax")])
def test_autoencoder_gradients_match_autograd(encoder, decoder):
    from tvbasis.bases.autoencoder import loss_and_grads
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 5))
    G = X.T @ X
    A, Wp = rng.standard_normal((5, 2)), rng.standard_normal((2, 5))
    loss, dA, dW, _, _ = loss_and_grads(A, Wp, G, 5.0, encoder, decoder)
    a = torch.tensor(A, requires_grad=True)
    w = torch.tensor(Wp, requires_grad=True)
    B = torch.softmax(a / 5.0, 0) if encoder == "softmax" else a
    W = torch.softmax(w, 0) if decoder == "softmax" else w
    E = B @ W - torch.eye(5, dtype=torch.float64)
    ref = torch.trace(E.T @ torch.tensor(G) @ E) / 25
    ref.backward()
    assert abs(loss - float(ref.detach())) < 1e-10
    np.testing.assert_allclose(dA, a.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(dW, w.grad.numpy(), rtol=1e-8, atol=1e-12)
