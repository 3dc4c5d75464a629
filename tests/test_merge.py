"""Merge methods against plain dense references written independently here (numpy, loops over coordinates)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tvbasis.merge.dare as dare_mod
from tvbasis.errors import ConfigError
from tvbasis.merge import (
    MERGE_METHODS,
    MergeContext,
    MergeSpec,
    available_methods,
    get_merger,
    global_thresholds,
    parse_merge_params,
)

W4 = np.array([1.0, 0.5, 2.0, 1.5])


def merge(method, x, w=None, ctx=None, **params):
    w = torch.ones(x.shape[0]) if w is None else torch.as_tensor(np.asarray(w), dtype=torch.float32)
    return get_merger(MergeSpec(method, params)).merge(x, w, ctx or MergeContext(name="t"))


# ---------------------------------------------------------------- references (numpy, coordinate loops)

def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    """Keep each row's ceil(density·n) largest |x|; ties go to the lowest index (stable sort)."""
    out = np.zeros_like(x)
    k = max(1, math.ceil(density * x.shape[1]))
    for i in range(x.shape[0]):
        idx = np.argsort(-np.abs(x[i]), kind="stable")[:k]
        out[i, idx] = x[i, idx]
    return out


def ref_disjoint(t: np.ndarray, w: np.ndarray, sign: str, normalize: bool = True) -> np.ndarray:
    """mergekit's TIES consensus on the weighted entries w_i·t_i."""
    out = np.zeros(t.shape[1])
    for j in range(t.shape[1]):
        v = [w[i] * t[i, j] for i in range(t.shape[0])]
        s = sum(np.sign(v)) if sign == "frequency" else sum(v)
        elected = 1.0 if s >= 0 else -1.0
        num = den = 0.0
        for i, vi in enumerate(v):
            if vi != 0 and np.sign(vi) == elected:
                num += vi
                den += w[i]
        out[j] = num if not normalize else (num / den if den else num)
    return out


def ref_ties(x, w, density, sign="total", normalize=True):
    return ref_disjoint(ref_trim(x, density), w, sign, normalize)


def ref_dare_dropped(x: np.ndarray, density: float, seed: int, name: str) -> np.ndarray:
    """Drop with the library's documented mask stream, drawn here row block by row block from scratch."""
    out = np.zeros_like(x)
    rows = max(1, dare_mod.BLOCK_ELEMENTS // int(np.prod(x.shape[2:], dtype=int)))
    for t in range(x.shape[0]):
        for b in range(-(-x.shape[1] // rows)):
            g = torch.Generator().manual_seed(dare_mod._seed(seed, name, t, b))
            keep = (torch.rand((rows, *x.shape[2:]), generator=g) < density).numpy()
            sl = slice(b * rows, min((b + 1) * rows, x.shape[1]))
            out[t, sl] = np.where(keep[: sl.stop - sl.start], x[t, sl] / density, 0.0)
    return out


@pytest.fixture()
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 200, generator=g)


# ---------------------------------------------------------------- linear

def test_task_arithmetic_and_mean(x):
    w = [1.0, 0.5, 2.0, -1.0]
    ref = sum(wi * x[i] for i, wi in enumerate(w))
    assert torch.allclose(merge("task_arithmetic", x, w), ref, atol=1e-5)
    assert torch.allclose(merge("task_arithmetic", x, w, normalize=True), ref / sum(w), atol=1e-5)
    assert torch.allclose(merge("mean", x), x.mean(0), atol=1e-6)
    assert torch.allclose(merge("mean", x, w), ref / sum(w), atol=1e-5)
    # weights summing to zero: mergekit leaves the sum undivided instead of producing inf
    z = merge("mean", x[:2], [1.0, -1.0])
    assert torch.allclose(z, x[0] - x[1], atol=1e-6)


def test_any_shape_and_dtype_gives_float32_of_the_slice_shape():
    x = torch.randn(3, 4, 5, 2).to(torch.bfloat16)
    for method in available_methods():
        ctx = MergeContext(name="t", fisher=torch.rand(3, 4, 5, 2), base=torch.rand(4, 5, 2))
        out = merge(method, x[:2] if "slerp" in method else x[:1] if method in ("arcee_fusion", "nearswap") else x, ctx=ctx)
        assert out.shape == (4, 5, 2) and out.dtype == torch.float32, method
    scalar = merge("ties", torch.tensor([1.0, -2.0, 3.0]), density=1.0)
    assert scalar.shape == () and float(scalar) == 2.0  # + elected (mass 2): mean of 1 and 3


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.floats(-3, 3), st.integers(0, 10**6))
def test_task_arithmetic_is_linear(T, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(T, n, generator=g), torch.randn(T, n, generator=g)
    lhs = merge("task_arithmetic", x + c * y)
    assert torch.allclose(lhs, merge("task_arithmetic", x) + c * merge("task_arithmetic", y), atol=1e-4)


# ---------------------------------------------------------------- ties / topk

@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.7, 1.0])
def test_ties_matches_reference(x, sign, density):
    got = merge("ties", x, W4, density=density, sign=sign).numpy()
    np.testing.assert_allclose(got, ref_ties(x.numpy(), W4, density, sign), atol=1e-5)


def test_ties_unnormalized_negative_weights_and_sign_aliases(x):
    w = np.array([1.0, -0.5, 2.0, 1.5])
    got = merge("ties", x, w, density=0.3, normalize=False).numpy()
    np.testing.assert_allclose(got, ref_ties(x.numpy(), w, 0.3, "total", normalize=False), atol=1e-5)
    got = merge("ties", x, w, density=0.3, sign="count").numpy()  # mergekit's name for frequency
    np.testing.assert_allclose(got, ref_ties(x.numpy(), w, 0.3, "frequency"), atol=1e-5)
    assert torch.equal(merge("ties", x, density=0.3, sign="sum"), merge("ties", x, density=0.3, sign="total"))


def test_per_tensor_trim_keeps_exactly_k_lowest_index_on_ties():
    x = torch.tensor([[3.0, 1.0, -1.0, 1.0, 0.0, -1.0, 2.0, 1.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    got = merge("topk", x, density=0.5, normalize=False)  # k = 4 per task
    np.testing.assert_array_equal(got.numpy(), ref_trim(x.numpy(), 0.5).sum(0))
    assert torch.equal(got, torch.tensor([3.0, 1.0, -1.0, 0.0, 0.0, 0.0, 2.0, 5.0]))
    assert merge("topk", x, density=0.01, normalize=False).count_nonzero() == 2  # k = ceil(0.08) = 1 each


@pytest.mark.parametrize("small", [True, False])
def test_per_tensor_trim_radix_and_kthvalue_paths_agree_with_reference(small, monkeypatch):
    import tvbasis.merge.trim as trim_mod
    monkeypatch.setattr(trim_mod, "RADIX_MIN", 10**9 if small else 0)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-40, 41, (3, 3000), generator=g).float() / 8  # heavy ties at every cut
    for density in (0.001, 0.1, 0.5, 0.99):
        got = merge("topk", x, density=density, normalize=False).numpy()
        np.testing.assert_array_equal(got, ref_trim(x.numpy(), density).sum(0))


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_topk_matches_reference(x, density):
    got = merge("topk", x, W4, density=density).numpy()
    ref = (W4[:, None] * ref_trim(x.numpy(), density)).sum(0) / W4.sum()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    got = merge("topk", x, W4, density=density, normalize=False).numpy()
    np.testing.assert_allclose(got, ref * W4.sum(), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 10**6))
def test_ties_density_one_same_sign_is_weighted_mean_and_topk_density_one_is_mean(T, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, n, generator=g) + 0.1) * (1 if seed % 2 else -1)
    w = torch.rand(T, generator=g) + 0.1
    ref = (w[:, None] * x).sum(0) / w.sum()
    assert torch.allclose(merge("ties", x, w, density=1.0), ref, atol=1e-5)
    y = torch.randn(T, n, generator=g)
    assert torch.allclose(merge("topk", y, w, density=1.0), merge("mean", y, w), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.sampled_from([0.1, 0.25, 0.5, 0.9]), st.integers(0, 10**6))
def test_ties_property_against_reference_with_duplicates(T, n, density, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (T, n), generator=g).float()  # many ties and zeros
    w = np.ones(T)
    got = merge("ties", x, w, density=density, sign="frequency").numpy()
    np.testing.assert_allclose(got, ref_ties(x.numpy(), w, density, "frequency"), atol=1e-6)


# ---------------------------------------------------------------- global scope

def test_global_thresholds_exact_with_ties_zeros_and_uneven_chunks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5000, generator=g)
    x[:, :500] = 0.0
    x[1, 1000:1100] = 0.5  # ties
    x[2] = 0.0             # an all-zero task
    chunks = [x[:, :1234], x[:, 1234:1235], x[:, 1235:4000], x[:, 4000:]]
    for density in (1e-4, 0.2, 0.95, 1.0):
        th = global_thresholds(lambda: iter(chunks), 3, density)
        k = math.ceil(density * 5000)
        ref = x.abs().sort(dim=1, descending=True).values[:, k - 1]
        assert torch.equal(th, ref), density


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 300), st.floats(0.001, 1.0), st.integers(0, 10**6))
def test_global_thresholds_property(T, n, density, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g) * torch.rand(T, 1, generator=g) * 100
    x[:, ::3] = x[:, ::3].round()  # ties
    cut = n // 3
    th = global_thresholds(lambda: iter([x[:, :cut], x[:, cut:]]), T, density)
    k = min(n, max(1, math.ceil(density * n)))
    assert torch.equal(th, torch.kthvalue(x.abs(), n - k + 1, dim=1).values)


def test_global_trim_scope_over_two_tensors_equals_dense_over_the_concatenation():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 40, 6, generator=g), torch.randn(3, 25, generator=g) * 3
    th = global_thresholds(lambda: iter([a.reshape(3, -1), b]), 3, 0.2)
    dense = np.concatenate([a.reshape(3, -1).numpy(), b.numpy()], 1)
    for method, ref in (("ties", ref_ties(dense, np.ones(3), 0.2)), ("topk", ref_trim(dense, 0.2).mean(0))):
        m = get_merger(MergeSpec(method, {"density": 0.2, "trim_scope": "global"}))
        assert m.needs_global_thresholds
        ones = torch.ones(3)
        parts = [m.merge(a[:, lo:hi], ones, MergeContext(name="a", offset=lo, thresholds=th))  # chunked rows
                 for lo, hi in ((0, 13), (13, 40))]
        got = torch.cat([torch.cat(parts).reshape(-1), m.merge(b, ones, MergeContext(name="b", thresholds=th))])
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_streaming_global_ties_equals_dense_over_whole_vector(tmp_path):
    from tests.tinymodels import dense_vector, flat, make_family
    from tvbasis.passes import merge_task_vectors

    pre_p, fts, pre, sds = make_family(tmp_path, T=3)
    tv = merge_task_vectors(pre_p, fts, MergeSpec("ties", {"density": 0.2, "trim_scope": "global"}),
                            chunk_elements=50)
    keys = sorted(tv.keys())
    V = np.stack([flat(dense_vector(pre, sd), keys).numpy() for sd in sds])
    np.testing.assert_allclose(flat(tv.to_state_dict(), keys).numpy(), ref_ties(V, np.ones(3), 0.2), atol=1e-5)


# ---------------------------------------------------------------- dare

@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_reference(method, monkeypatch):
    monkeypatch.setattr(dare_mod, "BLOCK_ELEMENTS", 24)  # 4 rows of 6 per block: several blocks
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 30, 6, generator=g)
    d = ref_dare_dropped(x.numpy(), 0.4, 7, "layer.w").reshape(4, -1)
    got = merge(method, x, W4, ctx=MergeContext(name="layer.w"), density=0.4, seed=7).numpy().reshape(-1)
    if method == "dare_linear":
        ref = (W4[:, None] * d).sum(0)
    else:
        ref = ref_disjoint(d, W4, "total")
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert 0.25 < (d != 0).mean() < 0.55


def test_dare_is_seeded_unbiased_and_independent_of_order():
    x = torch.ones(3, 512, 64)
    a = merge("dare_linear", x, ctx=MergeContext(name="a"), density=0.25, seed=1)
    merge("dare_linear", x, ctx=MergeContext(name="b"), density=0.25, seed=1)  # another tensor in between
    assert torch.equal(a, merge("dare_linear", x, ctx=MergeContext(name="a"), density=0.25, seed=1))
    assert not torch.equal(a, merge("dare_linear", x, ctx=MergeContext(name="a"), density=0.25, seed=2))
    assert not torch.equal(a, merge("dare_linear", x, ctx=MergeContext(name="b"), density=0.25, seed=1))
    one = merge("dare_linear", x[:1], ctx=MergeContext(name="a"), density=0.25, seed=1)
    assert abs(float((one != 0).float().mean()) - 0.25) < 0.01
    assert abs(float(a.mean()) - 3.0) < 0.05  # rescaling by 1/density keeps the expectation
    no_rescale = merge("dare_linear", x[:1], ctx=MergeContext(name="a"), density=0.25, seed=1, rescale=False)
    assert torch.equal(no_rescale * 4, one)
    assert torch.allclose(merge("dare_linear", x, density=1.0), x.sum(0))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("shape", [(70, 5), (70,), (9, 2, 3)])
def test_dare_chunked_equals_unchunked(method, shape, monkeypatch):
    monkeypatch.setattr(dare_mod, "BLOCK_ELEMENTS", 16)  # chunks straddle mask blocks
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    m = get_merger(MergeSpec(method, {"density": 0.5, "seed": 3}))
    w = torch.tensor([1.0, 2.0, 0.5])
    whole = m.merge(x, w, MergeContext(name="t"))
    cuts = [0, 1, 4, shape[0] // 2, shape[0] - 1, shape[0]]
    parts = [m.merge(x[:, lo:hi], w, MergeContext(name="t", offset=lo)) for lo, hi in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)


# ---------------------------------------------------------------- fisher / consensus

def test_fisher_matches_reference():
    g = torch.Generator().manual_seed(4)
    x, f = torch.randn(3, 50, generator=g), torch.rand(3, 50, generator=g)
    f[:, :5] = 0.0  # no task has information: weighted mean
    f[0, 5:10] = 0.0
    w = np.array([1.0, 2.0, 0.5])
    got = merge("fisher", x, w, ctx=MergeContext(name="t", fisher=f)).numpy()
    xn, fn = x.numpy(), f.numpy()
    ref = np.array([(w * fn[:, j] * xn[:, j]).sum() / (w * fn[:, j]).sum() if (w * fn[:, j]).sum() else
                    (w * xn[:, j]).sum() / w.sum() for j in range(50)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    floored = merge("fisher", x, w, ctx=MergeContext(name="t", fisher=f), fisher_floor=0.3).numpy()
    fl = np.maximum(fn, 0.3)
    np.testing.assert_allclose(floored, (w[:, None] * fl * xn).sum(0) / (w[:, None] * fl).sum(0), rtol=1e-5)
    with pytest.raises(ConfigError, match="Fisher"):
        merge("fisher", x)
    with pytest.raises(ConfigError, match="shape"):
        merge("fisher", x, ctx=MergeContext(name="t", fisher=f[:, :10]))
    assert get_merger(MergeSpec("fisher")).needs_fisher


def test_consensus_matches_reference():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 300, generator=g)
    for k, lam in ((2, 0.4), (1, 0.2), (3, 0.6)):
        got = merge("consensus", x, W4, k=k, mask_lambda=lam).numpy()
        xn = x.numpy()
        ref = np.zeros(300)
        for j in range(300):
            contrib = W4 * xn[:, j]
            tau = contrib.sum()
            votes = sum(abs(c) >= lam * abs(tau - c) for c in contrib)
            ref[j] = tau if votes >= k else 0.0
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert merge("consensus", x, k=5).count_nonzero() == 0  # more votes than tasks: nothing kept


# ---------------------------------------------------------------- parameters

def test_bad_parameters_raise_config_errors(x):
    bad = [("ties", {"density": 0}, "density"), ("ties", {"density": 1.5}, "density"),
           ("topk", {"density": "0.2"}, "density"), ("dare_ties", {"density": True}, "density"),
           ("ties", {"bogus": 1}, r"unknown parameter.*bogus.*accepted: density=0\.2"),
           ("ties", {"sign": "median"}, "sign"), ("ties", {"trim_scope": "layer"}, "trim_scope"),
           ("task_arithmetic", {"normalize": "yes"}, "normalize"), ("dare_linear", {"seed": 1.5}, "seed"),
           ("consensus", {"k": 0}, "k must"), ("consensus", {"mask_lambda": -1}, "mask_lambda"),
           ("fisher", {"fisher_floor": -1.0}, "fisher_floor"), ("mean", {"density": 0.5}, "unknown parameter")]
    for method, params, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            get_merger(MergeSpec(method, params))
    with pytest.raises(ConfigError, match="unknown merge method 'slerp9'.*ties"):
        get_merger(MergeSpec("slerp9", {}))
    with pytest.raises(ConfigError, match="thresholds"):
        merge("ties", x, density=0.2, trim_scope="global")
    with pytest.raises(ConfigError, match="weight"):
        merge("task_arithmetic", x, [1.0, 2.0])
    with pytest.raises(ConfigError, match="density"):
        global_thresholds(lambda: iter([x]), 4, 0.0)
    with pytest.raises(ConfigError, match="chunk"):
        global_thresholds(lambda: iter([x]), 3, 0.5)


def test_registry_and_parsing():
    assert set(available_methods()) == set(MERGE_METHODS) == {
        "task_arithmetic", "mean", "ties", "topk", "dare_linear", "dare_ties", "fisher", "consensus",
        "tsv_merge", "iso_c", "iso_cts"} | {"awd", "fednova", "fedgma", "median", "cclip"} | {
        "slerp", "nuslerp", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "arcee_fusion",
        "sce", "multislerp", "nearswap", "karcher"}
    m = get_merger(MergeSpec("ties", {"density": 1}))
    assert m.density == 1.0 and not m.needs_global_thresholds and not m.needs_fisher
    assert get_merger(MergeSpec("task_arithmetic")).density is None
    assert parse_merge_params(["density=0.2", "sign=frequency", "normalize=false", "k=3", "trim-scope=global",
                               "fisher_floor=1e-6"]) == {
        "density": 0.2, "sign": "frequency", "normalize": False, "k": 3, "trim_scope": "global",
        "fisher_floor": 1e-6}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_merge_params(["density"])


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("topk", {"density": 0.2}),
                                           ("dare_ties", {"density": 0.5, "seed": 3}), ("consensus", {}),
                                           ("task_arithmetic", {})])
def test_big_tensors_merged_in_chunks_match_whole_tensor_merge(method, params):
    from tvbasis.io import TensorSpec
    from tvbasis.passes import merge_tensor

    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 300, 20, generator=g)
    spec = TensorSpec("w", (300, 20), torch.float32)
    w = torch.ones(4)
    whole = merge_tensor(MergeSpec(method, params), lambda a, b: x[:, a:b], spec, 4, w, chunk_elements=10**9)
    chunked = merge_tensor(MergeSpec(method, params), lambda a, b: x[:, a:b], spec, 4, w, chunk_elements=700)
    assert torch.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5, "seed": 3}),
                                           ("task_arithmetic", {})])
def test_row_ranges_of_a_chunked_merge_are_those_rows_of_the_whole_merge(method, params):
    from tvbasis.io import TensorSpec
    from tvbasis.passes import merge_tensor

    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 300, 20, generator=g)
    spec = TensorSpec("w", (300, 20), torch.float32)
    w = torch.ones(4)
    if method == "ties":  # the independent reference: trim each task over the whole tensor, then elect
        whole = torch.as_tensor(ref_ties(x.reshape(4, -1).numpy(), np.ones(4), 0.3), dtype=torch.float32)
        whole = whole.reshape(300, 20)
    else:
        whole = merge_tensor(MergeSpec(method, params), lambda a, b: x[:, a:b], spec, 4, w, chunk_elements=10**9)
    reads: list[tuple[int, int]] = []

    def read(a, b):
        reads.append((a, b))
        return x[:, a:b]
    cuts: dict[str, torch.Tensor] = {}
    for lo, hi in ((0, 7), (7, 151), (151, 300), (42, 43)):  # ranges that do not follow the 35-row chunks
        got = merge_tensor(MergeSpec(method, params), read, spec, 4, w, chunk_elements=700, rows=(lo, hi), cuts=cuts)
        assert got.shape == (hi - lo, 20)
        torch.testing.assert_close(got, whole[lo:hi], atol=1e-5, rtol=0)
    read_rows = sum(b - a for a, b in reads)
    # the per-tensor cuts are found once (two passes over the 300 rows), then only the asked rows are read
    assert read_rows == (2 * 300 if method == "ties" else 0) + 7 + 144 + 149 + 1
    assert list(cuts) == (["w"] if method == "ties" else [])


def test_apply_of_a_big_merged_tensor_streams_rows_into_the_output_dtype(tmp_path, monkeypatch):
    """A bf16 model: θ₀ + TIES(τ) written in row chunks equals the reference computed whole in float32 and cast."""
    import json

    from safetensors.torch import load_file, save_file

    import tvbasis.vectors as vec_mod
    from tvbasis.passes import merge_task_vectors

    g = torch.Generator().manual_seed(3)
    shapes = {"emb.weight": (96, 16), "lin.weight": (16, 16), "lin.bias": (16,)}
    pre = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    paths = {}
    for name, sd in [("pre", pre)] + [(f"t{i}", {n: (v.float() + 0.05 * torch.randn(v.shape, generator=g))
                                                  .to(torch.bfloat16) for n, v in pre.items()}) for i in range(3)]:
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "bert"}))
        paths[name] = tmp_path / name
    fts = {n: paths[n] for n in ("t0", "t1", "t2")}
    monkeypatch.setattr(vec_mod, "APPLY_CHUNK_ELEMENTS", 400)  # emb.weight (1536 elements) goes in 25-row chunks
    asked: list[object] = []
    tv = merge_task_vectors(paths["pre"], fts, MergeSpec("ties", {"density": 0.25}), chunk_elements=300)
    real_get = tv.get
    monkeypatch.setattr(tv, "get", lambda name, rows=None: asked.append((name, rows)) or real_get(name, rows))
    tv.apply_to(paths["pre"], 0.7, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    fine = {n: {k: v.float() for k, v in load_file(str(p / "model.safetensors")).items()} for n, p in fts.items()}
    for n, shape in shapes.items():
        deltas = np.stack([(fine[t][n] - pre[n].float()).reshape(-1).numpy() for t in fts])
        ref = (pre[n].float() + 0.7 * torch.as_tensor(ref_ties(deltas, np.ones(3), 0.25),
                                                      dtype=torch.float32).reshape(shape)).to(torch.bfloat16)
        assert out[n].dtype == torch.bfloat16
        torch.testing.assert_close(out[n].float(), ref.float(), atol=0, rtol=0, msg=n)
    assert ("emb.weight", (0, 25)) in asked and ("emb.weight", None) not in asked  # the big tensor went by rows
    assert ("lin.weight", None) in asked
