"""Merge methods against plain dense references written independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvbasis.errors import ConfigError
from tvbasis.merge import MergeContext, MergeSpec, available_methods, get_merger, global_thresholds, parse_merge_params


def merge(method, x, w=None, ctx=None, **params):
    w = torch.ones(x.shape[0]) if w is None else torch.as_tensor(w, dtype=torch.float32)
    return get_merger(MergeSpec(method, params)).merge(x, w, ctx or MergeContext(name="t"))


def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    out = np.zeros_like(x)
    k = max(1, math.ceil(density * x.shape[1]))
    for i in range(x.shape[0]):
        idx = np.argsort(-np.abs(x[i]), kind="stable")[:k]
        out[i, idx] = x[i, idx]
    return out


def ref_ties(x: np.ndarray, w: np.ndarray, density: float, sign: str) -> np.ndarray:
    t = ref_trim(x, density)
    out = np.zeros(x.shape[1])
    for j in range(x.shape[1]):
        s = np.sign(t[:, j]).sum() if sign == "frequency" else (w * t[:, j]).sum()
        elected = 1.0 if s >= 0 else -1.0
        num = den = 0.0
        for i in range(x.shape[0]):
            if t[i, j] != 0 and np.sign(t[i, j]) == elected:
                num += w[i] * t[i, j]
                den += w[i]
        out[j] = num / den if den else 0.0
    return out


@pytest.fixture()
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 200, generator=g)


def test_task_arithmetic_and_mean(x):
    w = [1.0, 0.5, 2.0, -1.0]
    ref = sum(wi * x[i] for i, wi in enumerate(w))
    assert torch.allclose(merge("task_arithmetic", x, w), ref, atol=1e-5)
    assert torch.allclose(merge("task_arithmetic", x, w, normalize=True), ref / sum(w), atol=1e-5)
    assert torch.allclose(merge("mean", x), x.mean(0), atol=1e-6)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.7])
def test_ties_matches_reference(x, sign, density):
    w = np.array([1.0, 0.5, 2.0, 1.5])
    got = merge("ties", x, w, density=density, sign=sign).numpy()
    np.testing.assert_allclose(got, ref_ties(x.numpy(), w, density, sign), atol=1e-5)


def test_topk_matches_reference(x):
    got = merge("topk", x, density=0.3).numpy()
    np.testing.assert_allclose(got, ref_trim(x.numpy(), 0.3).mean(0), atol=1e-6)


def test_dare_is_seeded_unbiased_and_chunk_invariant():
    x = torch.ones(3, 512, 64)
    a = merge("dare_linear", x, density=0.25, seed=1)
    b = merge("dare_linear", x, density=0.25, seed=1)
    c = merge("dare_linear", x, density=0.25, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (merge("dare_linear", x[:1], density=0.25, seed=1) != 0).float().mean()
    assert abs(float(kept) - 0.25) < 0.01
    assert abs(float(a.mean()) - 3.0) < 0.05  # rescaling keeps the expectation
    part = get_merger(MergeSpec("dare_linear", {"density": 0.25, "seed": 1})).merge(
        x[:, 300:450], torch.ones(3), MergeContext(name="t", offset=300))
    assert torch.equal(part, a[300:450])
    y = torch.randn(3, 100)
    d = merge("dare_ties", y, density=1.0)
    np.testing.assert_allclose(d.numpy(), ref_ties(y.numpy(), np.ones(3), 1.0, "total"), atol=1e-5)


def test_fisher_weighting():
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    f = torch.tensor([[1.0, 0.0, 0.0], [3.0, 1.0, 0.0]])
    got = merge("fisher", x, ctx=MergeContext(name="t", fisher=f))
    assert torch.allclose(got, torch.tensor([(1 * 1 + 3 * 3) / 4, 4.0, 4.0]))  # last: ΣF = 0 → mean
    with pytest.raises(ConfigError, match="Fisher"):
        merge("fisher", x)


def test_consensus_keeps_coordinates_selected_by_k_tasks():
    x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 5.0]])
    tau = x.sum(0)
    got = merge("consensus", x, k=2, mask_lambda=0.4)
    masks = x.abs() >= 0.4 * (tau - x).abs()
    ref = torch.where(masks.sum(0) >= 2, tau, 0.0)
    assert torch.equal(got, ref) and got[0] == 3.0 and got[1] == 0.0


def test_global_thresholds_exact_with_ties_and_zeros():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5000, generator=g)
    x[:, :500] = 0.0
    x[1, 1000:1100] = 0.5  # ties
    for density in (0.01, 0.2, 0.5, 0.95, 1.0):
        chunks = [x[:, :1234], x[:, 1234:4000], x[:, 4000:]]
        th = global_thresholds(lambda: iter(chunks), 3, density)
        k = math.ceil(density * 5000)
        ref = x.abs().sort(dim=1, descending=True).values[:, k - 1]
        assert torch.equal(th, ref), density


def test_global_trim_scope_uses_thresholds(x):
    th = global_thresholds(lambda: iter([x]), 4, 0.2)
    got = merge("topk", x, ctx=MergeContext(name="t", thresholds=th), density=0.2, trim_scope="global")
    assert torch.allclose(got, merge("topk", x, density=0.2), atol=1e-6)  # one tensor: global == per tensor
    with pytest.raises(ConfigError, match="thresholds"):
        merge("ties", x, density=0.2, trim_scope="global")


def test_bad_parameters():
    with pytest.raises(ConfigError, match="density"):
        get_merger(MergeSpec("ties", {"density": 0}))
    with pytest.raises(ConfigError, match="unknown parameter.*bogus"):
        get_merger(MergeSpec("ties", {"bogus": 1}))
    with pytest.raises(ConfigError, match="unknown merge method"):
        get_merger(MergeSpec("slerp9", {}))
    with pytest.raises(ConfigError, match="sign"):
        get_merger(MergeSpec("ties", {"sign": "median"}))
    assert parse_merge_params(["density=0.2", "sign=frequency", "normalize=false", "k=3"]) == {
        "density": 0.2, "sign": "frequency", "normalize": False, "k": 3}
    assert {"task_arithmetic", "ties", "topk", "dare_linear", "dare_ties", "fisher", "consensus"} <= set(
        available_methods())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 10**6))
def test_ties_density_one_same_sign_is_weighted_mean(T, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, n, generator=g) + 0.1
    w = torch.rand(T, generator=g) + 0.1
    got = merge("ties", x, w, density=1.0)
    ref = (w[:, None] * x).sum(0) / w.sum()
    assert torch.allclose(got, ref, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.floats(-3, 3), st.integers(0, 10**6))
def test_task_arithmetic_is_linear(T, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(T, n, generator=g), torch.randn(T, n, generator=g)
    lhs = merge("task_arithmetic", x + c * y)
    assert torch.allclose(lhs, merge("task_arithmetic", x) + c * merge("task_arithmetic", y), atol=1e-4)


def test_streaming_global_ties_equals_dense_over_whole_vector(tmp_path):
    from tinymodels import dense_vector, flat, make_family
    from tvbasis.merging import merge_task_vectors

    pre_p, fts, pre, sds = make_family(tmp_path, T=3)
    tv = merge_task_vectors(pre_p, fts, MergeSpec("ties", {"density": 0.2, "trim_scope": "global"}),
                            chunk_elements=50)
    keys = sorted(tv.keys())
    V = np.stack([flat(dense_vector(pre, sd), keys).numpy() for sd in sds])
    ref = ref_ties_global(V, 0.2)
    np.testing.assert_allclose(flat(tv.to_state_dict(), keys).numpy(), ref, atol=1e-5)


def ref_ties_global(V: np.ndarray, density: float) -> np.ndarray:
    return ref_ties(V, np.ones(V.shape[0]), density, "total")
