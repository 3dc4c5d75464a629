"""mergekit's methods slerp, nuslerp, model_stock, della, della_linear, breadcrumbs, breadcrumbs_ties, and
per-task densities: each against a dense float64 reference written here from the method's definition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tvbasis.errors import ConfigError
from tvbasis.merge import MergeContext, MergeSpec, get_merger
from tvbasis.merge.dare import uniforms


def run(method: str, x: torch.Tensor, w: list[float] | None = None, ctx: MergeContext | None = None,
        **params: object) -> np.ndarray:
    m = get_merger(MergeSpec(method, dict(params)))
    wt = torch.ones(x.shape[0]) if w is None else torch.tensor(w, dtype=torch.float32)
    return m.merge(x, wt, ctx or MergeContext(name="t")).double().numpy()


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- slerp
def ref_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Slerp of the raw vectors along the great arc of their directions; lerp when nearly colinear."""
    a, b = v0.ravel(), v1.ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    om = np.arccos(cos)
    return (np.sin((1 - t) * om) * v0 + np.sin(t * om) * v1) / np.sin(om)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_one_task_interpolates_base_and_finetune(t: float) -> None:
    base, d = rand(6, 5, seed=1), rand(1, 6, 5, seed=2)
    got = run("slerp", d, ctx=MergeContext(name="w", base=base), t=t)
    b = base.double().numpy()
    ref = ref_slerp(t, b, b + d[0].double().numpy()) - b
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if t == 0.0:
        np.testing.assert_allclose(got, 0.0, atol=1e-6)
    if t == 1.0:
        np.testing.assert_allclose(got, d[0].numpy(), atol=1e-5)


def test_slerp_two_tasks_keeps_unit_norm_on_the_sphere() -> None:
    # two orthogonal unit vectors: the slerp stays on the unit circle at angle t·90°
    base = torch.zeros(4)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    got = run("slerp", x, ctx=MergeContext(name="w", base=base), t=1 / 3)
    np.testing.assert_allclose(got, [math.cos(math.pi / 6), math.sin(math.pi / 6), 0, 0], atol=1e-6)
    assert abs(np.linalg.norm(got) - 1) < 1e-6


def test_slerp_colinear_is_lerp() -> None:
    base = rand(10, seed=3)
    d = (0.5 * base).unsqueeze(0)  # θ₀ + τ = 1.5·θ₀: colinear
    got = run("slerp", d, ctx=MergeContext(name="w", base=base), t=0.4)
    np.testing.assert_allclose(got, 0.4 * 0.5 * base.double().numpy(), atol=1e-6)
    anti = (-2.0 * base).unsqueeze(0)  # θ₀ + τ = −θ₀: colinear the other way, lerp too (|cos| > 0.9995)
    np.testing.assert_allclose(run("slerp", anti, ctx=MergeContext(name="w", base=base), t=0.25),
                               0.25 * anti[0].double().numpy(), atol=1e-6)


def test_slerp_refusals() -> None:
    base = torch.zeros(3)
    with pytest.raises(ConfigError, match="one fine-tune .* or two, got 3"):
        run("slerp", rand(3, 3), ctx=MergeContext(name="w", base=base))
    with pytest.raises(ConfigError, match="takes no per-task weights"):
        run("slerp", rand(1, 3), [2.0], ctx=MergeContext(name="w", base=base))
    with pytest.raises(ConfigError, match="needs the pretrained tensor"):
        run("slerp", rand(1, 3))
    with pytest.raises(ConfigError, match="t must be float"):
        get_merger(MergeSpec("slerp", {"t": "half"}))


# ---------------------------------------------------------------------------------------------- nuslerp
def ref_nuslerp_vec(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    om = np.arccos(cos)
    if abs(np.sin(om)) < 1e-8:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_reference(flatten: bool, row_wise: bool) -> None:
    x = rand(2, 5, 7, seed=4)
    w = [1.0, 3.0]  # t = 3/4
    got = run("nuslerp", x, w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    a, b = x[0].double().numpy(), x[1].double().numpy()
    if flatten:
        ref = ref_nuslerp_vec(0.75, a.ravel(), b.ravel()).reshape(5, 7)
    elif row_wise:  # each column (a slice along dim 0) is one vector
        ref = np.stack([ref_nuslerp_vec(0.75, a[:, j], b[:, j]) for j in range(7)], 1)
    else:  # each row is one vector
        ref = np.stack([ref_nuslerp_vec(0.75, a[i], b[i]) for i in range(5)])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_nuslerp_colinear_rows_lerp_zero_weights_half_and_on_weights() -> None:
    a = rand(3, 4, seed=5)
    x = torch.stack([a, a.clone()])
    x[1, 0] = 2 * a[0]  # row 0 colinear, the others identical (colinear too)
    got = run("nuslerp", x, [1.0, 1.0], nuslerp_flatten=False)
    np.testing.assert_allclose(got, 0.5 * (x[0] + x[1]).double().numpy(), atol=1e-6)
    y = rand(2, 6, seed=6)
    np.testing.assert_allclose(run("nuslerp", y, [1.0, -1.0]), run("nuslerp", y, [2.0, 2.0]), atol=1e-7)
    base = rand(6, seed=7)
    got = run("nuslerp", y, [1.0, 1.0], ctx=MergeContext(name="w", base=base), on_weights=True)
    b = base.double().numpy()
    ref = ref_nuslerp_vec(0.5, b + y[0].double().numpy(), b + y[1].double().numpy()) - b
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(ConfigError, match="exactly two models, got 3"):
        run("nuslerp", rand(3, 4))


# ---------------------------------------------------------------------------------------------- model stock
def ref_model_stock(V: np.ndarray) -> np.ndarray:
    """V (T, n): the task vectors; t·mean with t = T·c/(1 + (T − 1)·c), c the mean pairwise cosine."""
    T = V.shape[0]
    cs = [V[i] @ V[j] / (np.linalg.norm(V[i]) * np.linalg.norm(V[j])) for i in range(T) for j in range(i + 1, T)]
    c = float(np.mean(cs))
    return T * c / (1 + (T - 1) * c) * V.mean(0)


def test_model_stock_matches_reference_whole_and_filter_wise() -> None:
    base_dir = rand(1, 40, seed=8)
    x = base_dir + 0.8 * rand(3, 40, seed=9)  # correlated task vectors (positive cosines)
    got = run("model_stock", x.reshape(3, 8, 5))
    np.testing.assert_allclose(got.ravel(), ref_model_stock(x.double().numpy()), atol=1e-5)
    rows = run("model_stock", x.reshape(3, 8, 5), filter_wise=True)
    X = x.double().numpy().reshape(3, 8, 5)
    ref = np.stack([ref_model_stock(X[:, i, :]) for i in range(8)])
    np.testing.assert_allclose(rows, ref, atol=1e-5)
    vec = run("model_stock", x[:, :5], filter_wise=True)  # 1-D tensors: one row
    np.testing.assert_allclose(vec, ref_model_stock(x[:, :5].double().numpy()), atol=1e-5)


def test_model_stock_two_tasks_paper_ratio() -> None:
    # two task vectors at 60°: t = 2·cos/(1 + cos) = 2/3 (the paper's two-model ratio)
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    np.testing.assert_allclose(run("model_stock", x), (2 / 3) * x.double().numpy().mean(0), atol=1e-6)
    with pytest.raises(ConfigError, match="at least two"):
        run("model_stock", x[:1])
    with pytest.raises(ConfigError, match="undefined"):
        run("model_stock", torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


# ---------------------------------------------------------------------------------------------- della
def ref_magprune(d: np.ndarray, u: np.ndarray, density: float, eps: float, rescale: str) -> np.ndarray:
    """One task: per row, ascending magnitude ranks (ties by index) → p = density − ε + 2ε·r/(n − 1)."""
    rows = d.reshape(1, -1) if d.ndim < 2 else d
    uu = u.reshape(rows.shape)
    out = np.zeros_like(rows)
    n = rows.shape[1]
    for i in range(rows.shape[0]):
        order = np.argsort(np.abs(rows[i]), kind="stable")
        r = np.empty(n)
        r[order] = np.arange(n)
        p = density - eps + 2 * eps * r / (n - 1)
        keep = uu[i] < p
        out[i] = np.where(keep, rows[i], 0.0)
        if rescale == "inverse":
            out[i] = out[i] / p
    if rescale == "l1" and np.abs(out).sum() > 1e-7:
        out = out * (np.abs(rows).sum() / np.abs(out).sum())
    return out.reshape(d.shape)


def ref_disjoint(wx: np.ndarray, w: np.ndarray, normalize: bool) -> np.ndarray:
    """TIES: elect the sign of the summed weighted deltas (0 → +), keep the agreeing entries."""
    sign = np.where(wx.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wx) == sign
    total = np.where(agree, wx, 0).sum(0)
    if not normalize:
        return total
    den = (w.reshape(-1, *[1] * (wx.ndim - 1)) * agree).sum(0)
    return total / np.where(den == 0, 1, den)


@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_reference(method: str, rescale: str) -> None:
    x = rand(3, 6, 9, seed=10)
    w = np.array([1.0, 0.5, 2.0])
    got = run(method, x, list(w), MergeContext(name="layer.w"), density=0.4, epsilon=0.1, seed=5, rescale=rescale,
              normalize=method == "della")
    X = x.double().numpy()
    sp = np.stack([ref_magprune(X[t], uniforms((6, 9), 5, "layer.w", t).double().numpy(), 0.4, 0.1, rescale)
                   for t in range(3)])
    if method == "della_linear":
        ref = (w[:, None, None] * sp).sum(0)
    else:
        ref = ref_disjoint(w[:, None, None] * sp, w, True)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_della_keeps_big_magnitudes_more_often_and_density_on_average() -> None:
    x = torch.arange(1, 2001, dtype=torch.float32).reshape(1, 1, 2000)  # one row, magnitudes increasing
    kept = run("della_linear", x, density=0.5, epsilon=0.3, rescale="none") != 0
    assert abs(kept.mean() - 0.5) < 0.04
    assert kept[0, :500].mean() < 0.35 < 0.65 < kept[0, 1500:].mean()  # p from 0.2 up to 0.8
    one = run("della_linear", torch.tensor([[[3.0]]]), density=0.5, rescale="none")  # a lone entry: p = density
    assert one.shape == (1, 1)
    np.testing.assert_allclose(run("della_linear", x, density=1.0), x[0].numpy())
    with pytest.raises(ConfigError, match="density ± epsilon must lie inside"):
        run("della", x, density=0.9, epsilon=0.15)
    with pytest.raises(ConfigError, match=r"rescale must be str in \('l1', 'inverse', 'none'\)"):
        get_merger(MergeSpec("della", {"rescale": "l2"}))


# ---------------------------------------------------------------------------------------------- breadcrumbs
def test_breadcrumbs_hand_example() -> None:
    # n = 10, density 0.5 → keep 5, gamma 0.1 → drop the 1 largest, and so the 4 smallest
    x = torch.tensor([[3.0, -10.0, 1.0, 7.0, -2.0, 9.0, 5.0, -4.0, 8.0, -6.0]])
    got = run("breadcrumbs", x, density=0.5, gamma=0.1)
    np.testing.assert_allclose(got, [0, 0, 0, 7, 0, 9, 5, 0, 8, -6])
    # gamma·n < 1: nothing of the top is dropped (mergekit's slice would keep nothing here)
    np.testing.assert_allclose(run("breadcrumbs", x, density=0.3, gamma=0.05), [0, -10, 0, 0, 0, 9, 0, 0, 8, 0])
    # density + gamma > 1: fewer of the largest dropped to keep k = 9 (only the largest, -10, goes)
    np.testing.assert_allclose(run("breadcrumbs", x, density=0.9, gamma=0.3), [3, 0, 1, 7, -2, 9, 5, -4, 8, -6])


def ref_breadcrumbs(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = d.ravel()
    n = flat.size
    k, g = int(density * n), int(gamma * n)
    bot = n - k - g
    if bot < 0:
        g, bot = g + bot, 0
    r = np.empty(n)
    r[np.argsort(np.abs(flat), kind="stable")] = np.arange(n)
    return np.where((r >= bot) & (r < n - g), flat, 0.0).reshape(d.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_reference_with_per_task_values(method: str) -> None:
    x = rand(3, 7, 11, seed=11)
    x[1, 0, :4] = 0.5  # ties in magnitude
    w = np.array([1.0, -0.5, 2.0])
    dens, gams = (0.6, 0.3, 0.9), (0.02, 0.1, 0.0)
    ctx = MergeContext(name="w", per_task={"density": dens, "gamma": gams})
    got = run(method, x, list(w), ctx, density=0.5, rescale="l1")
    X = x.double().numpy()
    sp = []
    for t in range(3):
        s = ref_breadcrumbs(X[t], dens[t], gams[t])
        sp.append(s * np.abs(X[t]).sum() / np.abs(s).sum())
    wx = w[:, None, None] * np.stack(sp)
    ref = wx.sum(0) if method == "breadcrumbs" else ref_disjoint(wx, w, False)
    np.testing.assert_allclose(got, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- per-task densities
def ref_topk(d: np.ndarray, density: float) -> np.ndarray:
    flat = d.ravel()
    k = max(1, math.ceil(density * flat.size))
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))  # largest first, lowest index on ties
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(d.shape)


def test_ties_per_task_densities_match_reference() -> None:
    x = rand(3, 9, 4, seed=12)
    w = np.array([1.0, 0.7, 1.5])
    dens = (0.2, 0.5, 1.0)
    got = run("ties", x, list(w), MergeContext(name="w", per_task={"density": dens}), density=0.2)
    X = x.double().numpy()
    wx = w[:, None, None] * np.stack([ref_topk(X[t], dens[t]) for t in range(3)])
    np.testing.assert_allclose(got, ref_disjoint(wx, w, True), atol=1e-5)


def test_dare_per_task_densities_drop_and_rescale_each_task_by_its_own() -> None:
    x = torch.ones(2, 400, 50)
    ctx = MergeContext(name="d", per_task={"density": (0.25, 1.0)})
    one = run("dare_linear", x[:1], ctx=MergeContext(name="d"), density=0.25)
    both = run("dare_linear", x, ctx=ctx, density=0.25)
    np.testing.assert_allclose(both, one + 1.0)  # task 1 keeps everything, unscaled
    with pytest.raises(ConfigError, match="cannot differ between tasks"):
        run("dare_linear", x, ctx=MergeContext(name="d", per_task={"seed": (1.0, 2.0)}))
    with pytest.raises(ConfigError, match="2 per-task values of density for 3"):
        run("ties", rand(3, 4), ctx=MergeContext(name="d", per_task={"density": (0.5, 0.5)}))


def test_chunked_ties_with_per_task_densities_equals_whole(tmp_path) -> None:
    from tvbasis.io import TensorSpec
    from tvbasis.passes.merge import merge_tensor

    x = rand(3, 64, 8, seed=13)
    spec = TensorSpec("w", (64, 8), torch.float32)
    w = torch.tensor([1.0, 2.0, 0.5])
    ms = MergeSpec("ties", {"density": 0.3})
    per = {"density": (0.3, 0.6, 0.1)}
    whole = merge_tensor(ms, lambda a, b: x[:, a:b], spec, 3, w, chunk_elements=10_000, per_task=per)
    chunked = merge_tensor(ms, lambda a, b: x[:, a:b], spec, 3, w, chunk_elements=64, per_task=per)
    torch.testing.assert_close(chunked, whole)  # continuous values: no ties at the cut


# ---------------------------------------------------------------------------------------------- streamed
def test_streamed_slerp_and_model_stock_through_merge_task_vectors(tmp_path) -> None:
    from tests.tinymodels import dense_vector, make_family
    from tvbasis.passes import merge_task_vectors

    pre_p, fts, pre, sds = make_family(tmp_path, T=3)
    tv = merge_task_vectors(pre_p, {"task0": fts["task0"]}, MergeSpec("slerp", {"t": 0.3}))
    got = tv.to_state_dict()
    for k, v in dense_vector(pre, sds[0]).items():
        b = pre[k].double().numpy()
        np.testing.assert_allclose(got[k].double().numpy(), ref_slerp(0.3, b, b + v.numpy()) - b, atol=1e-5)
    ms = merge_task_vectors(pre_p, fts, MergeSpec("model_stock")).to_state_dict()
    vs = [dense_vector(pre, sd) for sd in sds]
    for k in vs[0]:
        V = np.stack([v[k].numpy().ravel() for v in vs])
        np.testing.assert_allclose(ms[k].double().numpy().ravel(), ref_model_stock(V), atol=1e-5)


# ---------------------------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(("method", "params"), [
    ("slerp", {"t": 0.3}), ("nuslerp", {"nuslerp_flatten": False}), ("model_stock", {}),
    ("della", {"density": 0.5, "epsilon": 0.1}), ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
])
def test_new_methods_on_cuda_match_cpu(method: str, params: dict) -> None:
    x = rand(2, 16, 9, seed=20)
    base = rand(16, 9, seed=21)
    m = get_merger(MergeSpec(method, params))
    w = torch.ones(2)
    cpu = m.merge(x, w, MergeContext(name="w", base=base))
    gpu = m.merge(x.cuda(), w.cuda(), MergeContext(name="w", base=base.cuda())).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)


def test_ties_rounding_floor_keeps_mergekits_count() -> None:
    # n = 10, density 0.35: ceil keeps 4 entries per task, floor (mergekit's int(density·n)) keeps 3
    x = torch.tensor([[1.0, -9.0, 3.0, 7.0, -2.0, 5.0, 0.5, 8.0, -4.0, 6.0]])
    ceil = run("topk", x, density=0.35)
    floor = run("topk", x, density=0.35, rounding="floor")
    np.testing.assert_allclose(ceil, [0, -9, 0, 7, 0, 0, 0, 8, 0, 6])
    np.testing.assert_allclose(floor, [0, -9, 0, 7, 0, 0, 0, 8, 0, 0])
    from tvbasis.io import TensorSpec
    from tvbasis.passes.merge import merge_tensor
    y = rand(2, 40, 5, seed=30)
    spec = MergeSpec("ties", {"density": 0.33, "rounding": "floor"})
    ts = TensorSpec("w", (40, 5), torch.float32)
    whole = merge_tensor(spec, lambda a, b: y[:, a:b], ts, 2, torch.ones(2), chunk_elements=10_000)
    chunked = merge_tensor(spec, lambda a, b: y[:, a:b], ts, 2, torch.ones(2), chunk_elements=40)
    torch.testing.assert_close(chunked, whole)
    assert int((run("topk", y[:1], density=0.33, rounding="floor") != 0).sum()) == 66  # ⌊0.33·200⌋
    with pytest.raises(ConfigError, match="rounding=floor"):
        import tempfile

        from tests.tinymodels import make_family
        from tvbasis.passes import merge_task_vectors
        with tempfile.TemporaryDirectory() as d:
            pre_p, fts, _, _ = make_family(Path(d), T=2)
            merge_task_vectors(pre_p, fts, MergeSpec("ties", {"rounding": "floor", "trim_scope": "global"}))


def test_arcee_fusion_keeps_the_outlying_importances() -> None:
    # one row of 9: importance = |τ|·KL(row), so the kept entries are those with |τ| ≥ median + 1.5·IQR of |τ|
    base = torch.zeros(1, 9)
    tau = torch.tensor([[0.1, -0.2, 0.15, 3.0, 0.05, -0.12, 0.18, -2.5, 0.11]])
    got = run("arcee_fusion", tau.unsqueeze(0), ctx=MergeContext(name="w", base=base))
    s = np.sort(np.abs(tau.numpy().ravel()))
    th = s[4] + 1.5 * (s[6] - s[2])  # ⌊q·8⌋ = 4, 6, 2
    np.testing.assert_allclose(got, np.where(np.abs(tau.numpy()) >= th, tau.numpy(), 0.0), atol=1e-7)
    np.testing.assert_allclose(got, [[0, 0, 0, 3.0, 0, 0, 0, -2.5, 0]], atol=1e-7)
    with pytest.raises(ConfigError, match="ONE fine-tune"):
        run("arcee_fusion", rand(2, 4), ctx=MergeContext(name="w", base=torch.zeros(4)))


def ref_sce(X: np.ndarray, select: float) -> np.ndarray:
    T = X.shape[0]
    tv = X.copy()
    if select < 1:
        var = tv.var(0).ravel()
        k = int(np.count_nonzero(var) * select)
        keep = np.zeros(var.size, dtype=bool)
        keep[np.argsort(-np.abs(var), kind="stable")[:k]] = True
        tv = tv * keep.reshape(X.shape[1:])
    ms = (tv.reshape(T, -1) ** 2).mean(1)
    w = ms / ms.sum()
    sign = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    ew = w.reshape(T, *[1] * (X.ndim - 1)) * (np.sign(tv) == sign)
    return (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


@pytest.mark.parametrize("select", [1.0, 0.3])
def test_sce_matches_reference(select: float) -> None:
    x = rand(3, 7, 5, seed=40) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1)
    np.testing.assert_allclose(run("sce", x, select_topk=select), ref_sce(x.double().numpy(), select), atol=1e-5)
    with pytest.raises(ConfigError, match="select_topk must be in"):
        get_merger(MergeSpec("sce", {"select_topk": 1.5}))


def ref_multislerp(V: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Barycentric interpolation on the sphere: tangent-space mean at the weighted mean direction, exp map back,
    scaled by the weighted mean norm."""
    w = w / w.sum()
    norms = np.linalg.norm(V, axis=1)
    U = V / norms[:, None]
    m = (w[:, None] * U).sum(0)
    m /= np.linalg.norm(m)
    tang = U - (U @ m)[:, None] * m
    g = (w[:, None] * tang).sum(0)
    gn = np.linalg.norm(g)
    return (m * np.cos(gn) + g * np.sin(gn) / gn) * (w * norms).sum()


def test_multislerp_and_nearswap_match_references() -> None:
    x = rand(3, 6, 4, seed=50)
    w = np.array([1.0, 2.0, 0.5])
    got = run("multislerp", x, list(w), MergeContext(name="w", base=torch.zeros(6, 4)))
    np.testing.assert_allclose(got.ravel(), ref_multislerp(x.double().numpy().reshape(3, -1), w), atol=1e-5)
    # two orthogonal unit vectors, equal weights: the midpoint of the arc, norm 1
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(run("multislerp", two, ctx=MergeContext(name="w", base=torch.zeros(2))),
                               [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    base = rand(6, 4, seed=51)
    on_w = run("multislerp", x, list(w), MergeContext(name="w", base=base), on_weights=True)
    B = base.double().numpy().ravel()
    np.testing.assert_allclose(on_w.ravel(), ref_multislerp(x.double().numpy().reshape(3, -1) + B, w) - B, atol=1e-5)
    with pytest.raises(ConfigError, match="weighted mean direction"):
        run("multislerp", torch.tensor([[1.0, 0], [-1.0, 0], [0, 0.0]]), [1.0, 1.0, 0.0],
            MergeContext(name="w", base=torch.zeros(2)))
    tau = torch.tensor([[0.0005, -0.002, 0.01, -0.0001]])
    np.testing.assert_allclose(run("nearswap", tau.unsqueeze(0), t=0.001), [[0.0005, -0.001, 0.001, -0.0001]],
                               atol=1e-9)


def ref_karcher(P: np.ndarray, iters: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Riemannian mean on the unit sphere by gradient steps in the tangent space, scaled by the mean norm."""
    norms = np.linalg.norm(P, axis=1)
    U = P / norms[:, None]
    u = U.mean(0)
    u /= np.linalg.norm(u)
    for _ in range(iters):
        th = np.arccos(np.clip(U @ u, -1, 1))
        step = sum(th[i] / np.sin(th[i]) * (U[i] - np.cos(th[i]) * u) for i in range(len(P)) if th[i] >= tol) / len(P)
        n = np.linalg.norm(step)
        if n < tol:
            break
        u = np.cos(n) * u + np.sin(n) * step / n
        u /= np.linalg.norm(u)
    return norms.mean() * u


def test_karcher_matches_reference() -> None:
    base = rand(5, 3, seed=60)
    x = 0.8 * rand(2, 5, 3, seed=61)
    got = run("karcher", x, ctx=MergeContext(name="w", base=base), include_base=True)
    B = base.double().numpy().ravel()
    P = np.stack([B, *(B + x.double().numpy().reshape(2, -1))])
    np.testing.assert_allclose(got.ravel(), ref_karcher(P) - B, atol=1e-5)
    # two orthogonal unit vectors: the arc's midpoint, norm 1
    two = run("karcher", torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ctx=MergeContext(name="w", base=torch.zeros(2)))
    np.testing.assert_allclose(two, [2 ** -0.5, 2 ** -0.5], atol=1e-6)
