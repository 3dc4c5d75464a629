"""The Gram pass: streaming G = VᵀV against a dense float64 reference; the block products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tinymodels import dense_V
from tvbasis.passes import compute_gram
from tvbasis.taskset import TaskSet, layer_group


def test_streaming_gram_equals_dense(fam):
    pre_p, fts, pre, sds = fam
    ts = TaskSet.open(pre_p, fts)
    g = compute_gram(ts, chunk_elements=37, groups=layer_group)  # tiny chunks: exercises row chunking
    V, _ = dense_V(pre, sds)
    np.testing.assert_allclose(g.G, (V.T @ V).numpy(), rtol=1e-6)
    assert np.allclose(sum(g.group_grams.values()), g.G)
    assert set(g.group_grams) >= {"encoder.layer.0", "encoder.layer.1", "embeddings", "pooler"}
    np.testing.assert_allclose(np.diag(g.cosine), 1.0)
    again = compute_gram(ts, chunk_elements=10**9)  # whole tensors: same G up to float summation order
    np.testing.assert_allclose(again.G, g.G, rtol=1e-6)


@pytest.mark.parametrize("n", [100, 1024 * 70 + 333])  # tail only; 70 blocks (> one batch of 32) + tail
def test_block_products_match_float64(n):
    from tvbasis.passes import cross_of, gram_of, row_sq_norms
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, n, generator=gen) * torch.logspace(-4, 0, 7).unsqueeze(1)  # rows of very different norms
    u = torch.randn(3, n, generator=gen)
    X, U = x.double(), u.double()
    scale = np.sqrt(np.outer((U * U).sum(1).numpy(), (X * X).sum(1).numpy()))
    np.testing.assert_allclose(np.abs(cross_of(u, x).numpy() - (U @ X.T).numpy()) / scale, 0, atol=1e-6)
    G = (X @ X.T).numpy()
    d = np.sqrt(np.diag(G))
    np.testing.assert_allclose((gram_of(x).numpy() - G) / np.outer(d, d), 0, atol=1e-6)
    np.testing.assert_allclose(row_sq_norms(x).numpy(), (X * X).sum(1).numpy(), rtol=1e-6)
