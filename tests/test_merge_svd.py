"""TSV-M, Iso-C and Iso-CTS against dense numpy references written here (float64; polar factors and Iso-C's flat
spectrum through eigendecompositions of Gram matrices, not through the SVD the library uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvbasis.errors import ConfigError
from tvbasis.merge import (
    MERGE_METHODS,
    MergeContext,
    MergeSpec,
    available_methods,
    get_merger,
)

SVD_METHODS = ("tsv_merge", "iso_c", "iso_cts")
W3 = np.array([1.0, -0.5, 2.0])


def merge(method, x, w=None, **params):
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    w = torch.ones(x.shape[0]) if w is None else torch.as_tensor(np.asarray(w), dtype=torch.float32)
    return get_merger(MergeSpec(method, params)).merge(x, w, MergeContext(name="t")).numpy()


def rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- references (numpy, float64)

def inv_sqrt(g: np.ndarray) -> np.ndarray:
    """G^(-1/2) of a symmetric positive definite matrix, by eigendecomposition."""
    lam, q = np.linalg.eigh(g)
    return (q / np.sqrt(lam)) @ q.T


def polar(a: np.ndarray) -> np.ndarray:
    """Nearest matrix with orthonormal columns (tall a) or rows (wide a): a·(aᵀa)^(-1/2) or (aaᵀ)^(-1/2)·a."""
    return a @ inv_sqrt(a.T @ a) if a.shape[0] >= a.shape[1] else inv_sqrt(a @ a.T) @ a


def scaled(x, w):
    return np.asarray(x, np.float64) * np.asarray(w, np.float64)[:, None, None]


def ref_tsv(x, w, k):
    """Each task's top-k singular triplets, concatenated, U and V replaced by their polar factors."""
    us, ss, vs = [], [], []
    for xt in scaled(x, w):
        u, s, vt = np.linalg.svd(xt, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k])
    return polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.vstack(vs))


def ref_iso_c(x, w):
    """mean(σ(M))·polar(M) for the full-rank sum M; σ(M) as square roots of the Gram matrix's eigenvalues."""
    m = scaled(x, w).sum(0)
    g = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return np.sqrt(np.linalg.eigvalsh(g)).mean() * polar(m)


def ref_cts_sizes(r, t, cf):
    """(common, per task): k = ⌊r·cf⌋, per task round((r − k)/t) capped at ⌊r/t⌋, common = r − t·per task."""
    per = min(round((r - int(np.floor(r * cf))) / t), r // t)
    return r - t * per, per


def ref_iso_cts(x, w, cf):
    xs = scaled(x, w)
    t, m, n = xs.shape
    kc, per = ref_cts_sizes(min(m, n), t, cf)
    u, s, vt = np.linalg.svd(xs.sum(0), full_matrices=False)
    us, ss, vs = [u[:, :kc]], [s[:kc]], [vt[:kc]]
    proj = np.eye(m) - u[:, :kc] @ u[:, :kc].T
    for xt in xs:
        ut, st, vtt = np.linalg.svd(proj @ xt, full_matrices=False)
        us.append(ut[:, :per])
        ss.append(st[:per])
        vs.append(vtt[:per])
    return np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.vstack(vs))


def orthogonal_low_rank_tasks(t=3, m=12, n=8, rank=2, seed=0):
    """t rank-`rank` matrices whose column spaces are mutually orthogonal, and likewise their row spaces."""
    rng = np.random.default_rng(seed)
    qu = np.linalg.qr(rng.standard_normal((m, t * rank)))[0]
    qv = np.linalg.qr(rng.standard_normal((n, t * rank)))[0]
    out = []
    for i in range(t):
        b = slice(i * rank, (i + 1) * rank)
        out.append(qu[:, b] @ np.diag(rng.uniform(1.0, 4.0, rank)) @ qv[:, b].T)
    return np.stack(out).astype(np.float32)


# ---------------------------------------------------------------- against the references

@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("w", [None, W3])
def test_tsv_merge_matches_reference(shape, w):
    x = rand(1, 3, *shape)
    wt = np.ones(3) if w is None else w
    np.testing.assert_allclose(merge("tsv_merge", x, w), ref_tsv(x, wt, 8 // 3), rtol=1e-4, atol=1e-4)
    # an explicit fraction: floor(8 · 0.25) = 2 as well; 0.125 keeps 1 triplet per task
    np.testing.assert_allclose(merge("tsv_merge", x, w, rank_fraction=0.25), ref_tsv(x, wt, 2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(merge("tsv_merge", x, w, rank_fraction=0.125), ref_tsv(x, wt, 1),
                               rtol=1e-4, atol=1e-4)


def test_tsv_merge_default_fraction_is_one_over_t():
    x = rand(2, 4, 12, 8)  # T = 4, r = 8: 2 triplets per task, the concatenation is square in rank
    np.testing.assert_allclose(merge("tsv_merge", x), ref_tsv(x, np.ones(4), 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank_fraction", [0.0, 1.0])
def test_tsv_merge_of_orthogonal_subspaces_is_the_plain_sum(rank_fraction):
    x = orthogonal_low_rank_tasks()
    np.testing.assert_allclose(merge("tsv_merge", x, W3, rank_fraction=rank_fraction),
                               scaled(x, W3).sum(0), atol=1e-5)
    np.testing.assert_allclose(merge("tsv_merge", x.transpose(0, 2, 1)), x.sum(0).T, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("w", [None, W3])
def test_iso_c_matches_reference(shape, w):
    x = rand(3, 3, *shape)
    np.testing.assert_allclose(merge("iso_c", x, w), ref_iso_c(x, np.ones(3) if w is None else w),
                               rtol=1e-4, atol=1e-4)


def test_iso_c_spectrum_is_flat_and_spans_the_sum():
    x = rand(4, 3, 12, 8)
    got = merge("iso_c", x).astype(np.float64)
    s_sum = np.linalg.svd(x.astype(np.float64).sum(0), compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(got, compute_uv=False), np.full(8, s_sum.mean()), rtol=1e-4)
    # rank-deficient sum (three rank-1 tasks): flat over the sum's 3 directions, the same column and row spaces
    rng = np.random.default_rng(5)
    low = np.stack([np.outer(rng.standard_normal(12), rng.standard_normal(8)) for _ in range(3)]).astype(np.float32)
    total = low.astype(np.float64).sum(0)
    got = merge("iso_c", low).astype(np.float64)
    u, s, vt = np.linalg.svd(total)
    ug, sg, vtg = np.linalg.svd(got)
    np.testing.assert_allclose(sg[:3], np.full(3, s[:3].mean()), rtol=1e-4)
    assert sg[3:].max() < 1e-5 * sg[0]
    np.testing.assert_allclose(ug[:, :3] @ ug[:, :3].T, u[:, :3] @ u[:, :3].T, atol=1e-4)
    np.testing.assert_allclose(vtg[:3].T @ vtg[:3], vt[:3].T @ vt[:3], atol=1e-4)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("cf", [0.8, 0.5, 0.0])
def test_iso_cts_matches_reference(shape, cf):
    x = rand(6, 3, *shape)
    np.testing.assert_allclose(merge("iso_cts", x, W3, common_fraction=cf), ref_iso_cts(x, W3, cf),
                               rtol=1e-4, atol=1e-4)
    if cf == 0.8:
        np.testing.assert_allclose(merge("iso_cts", x), ref_iso_cts(x, np.ones(3), 0.8), rtol=1e-4, atol=1e-4)


def test_iso_cts_sizes():
    # r = 8, T = 3: ⌊6.4⌋ = 6 → round(2/3) = 1 per task, common 5; cf = 0 would give round(8/3) = 3 > 8 // 3
    assert ref_cts_sizes(8, 3, 0.8) == (5, 1) and ref_cts_sizes(8, 3, 0.0) == (2, 2)
    m = get_merger(MergeSpec("iso_cts"))
    for r, t, cf in [(8, 3, 0.8), (8, 3, 0.0), (768, 8, 0.8), (768, 20, 0.8), (5, 8, 0.5), (10, 4, 0.5)]:
        m.params["common_fraction"] = cf
        assert m.sizes(r, t) == ref_cts_sizes(r, t, cf), (r, t, cf)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_iso_cts_with_common_fraction_one_is_iso_c(shape):
    x = rand(7, 3, *shape)
    np.testing.assert_allclose(merge("iso_cts", x, W3, common_fraction=1.0), ref_iso_c(x, W3), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- fallbacks, edge cases, parameters

@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", [(7,), (), (4, 5, 2)])
def test_non_matrices_fall_back_to_the_mean_of_the_scaled_task_vectors(method, shape):
    x = rand(8, 3, *shape)
    got = merge(method, x, W3)
    assert got.shape == shape
    np.testing.assert_allclose(got, (np.asarray(W3).reshape(-1, *[1] * len(shape)) * x).sum(0) / 3, atol=1e-6)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_zero_tensors_deterministic_and_registered(method):
    assert np.array_equal(merge(method, np.zeros((3, 12, 8))), np.zeros((12, 8)))
    x = rand(9, 3, 12, 8)
    assert np.array_equal(merge(method, x, W3), merge(method, x, W3))
    assert method in available_methods() and MERGE_METHODS[method].whole_tensor
    out = merge(method, rand(9, 3, 1, 8))  # r = 1 < T
    assert out.shape == (1, 8) and np.isfinite(out).all()


def test_parameter_validation():
    for method, params, match in [("tsv_merge", {"rank_fraction": -0.1}, "rank_fraction"),
                                  ("tsv_merge", {"rank_fraction": 1.5}, "rank_fraction"),
                                  ("tsv_merge", {"rank_fraction": "half"}, "rank_fraction"),
                                  ("iso_cts", {"common_fraction": 1.2}, "common_fraction"),
                                  ("iso_cts", {"common_fraction": True}, "common_fraction"),
                                  ("iso_c", {"common_fraction": 0.5}, "unknown"),
                                  ("tsv_merge", {"density": 0.5}, "unknown")]:
        with pytest.raises(ConfigError, match=match):
            get_merger(MergeSpec(method, params))
    with pytest.raises(ConfigError, match="weight"):
        merge("iso_c", rand(0, 3, 4, 4), [1.0, 2.0])
