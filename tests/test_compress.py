"""tvbasis.compress: each per-task compressor against a dense re-implementation written here (numpy, float64,
whole model flattened where the method is elementwise), and every byte count against its closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tinymodels import SHAPES, finetune_states, pretrained_state
from tvbasis.codecs import parse_codec
from tvbasis.compress import (
    TALL_LAMBDAS,
    CodecPlan,
    SVDCache,
    bitdelta_tensor,
    code_bases,
    combine_bases,
    is_block_linear,
    lowrank_encode,
    plan_roundtrip,
    residual_roundtrip,
    rtvq_tensor,
    tall_masks,
    tall_nbytes,
    tall_reconstruct,
    tensor_kind,
    truncated_svd,
    tsvc_compress,
    tsvc_rank,
    tvq_quantize,
    tvq_tensor,
)
from tvbasis.errors import ConfigError

T = 4


@pytest.fixture(scope="module")
def tvs() -> list[dict[str, torch.Tensor]]:
    """T task vectors of the tiny model; the word embeddings changed on a few rows only (as in a real fine-tune),
    and one exactly-zero tensor (an untouched pooler)."""
    pre = pretrained_state(0)
    out = []
    for t, ft in enumerate(finetune_states(pre, T, seed=3)):
        v = {k: (ft[k] - pre[k]).float() for k in pre if pre[k].is_floating_point()}
        emb = v["embeddings.word_embeddings.weight"]
        keep = torch.zeros(emb.shape[0], dtype=torch.bool)
        keep[[1, 7 + t, 20 + 2 * t, 33]] = True
        v["embeddings.word_embeddings.weight"] = torch.where(keep[:, None], emb, torch.zeros(()))
        v["pooler.dense.weight"] = torch.zeros_like(v["pooler.dense.weight"])
        out.append(v)
    return out


def _flat(v: dict[str, torch.Tensor], keys: list[str]) -> np.ndarray:
    return np.concatenate([v[k].double().numpy().reshape(-1) for k in keys])


# ----------------------------------------------------------------------------------------------------- TALL
def test_tall_masks_match_a_dense_reimplementation(tvs) -> None:
    keys = sorted(tvs[0])
    V = np.stack([_flat(v, keys) for v in tvs])           # (T, D)
    mtl = V.sum(0)
    lambdas = [0.2, 0.3, 0.5, 0.6]
    want = np.zeros_like(V, dtype=bool)                    # the paper's rule, element by element
    for t in range(T):
        for i in range(V.shape[1]):
            want[t, i] = abs(V[t, i]) >= lambdas[t] * abs(mtl[i] - V[t, i])
    got, recon = [], []
    for k in keys:
        tau = torch.stack([v[k] for v in tvs])
        m = tall_masks(tau, None, lambdas)
        got.append(m.reshape(T, -1).numpy())
        mtl_k = tau.sum(0)
        recon.append(torch.stack([tall_reconstruct(m[t], mtl_k) for t in range(T)]).reshape(T, -1).double().numpy())
    got_m, got_r = np.concatenate(got, 1), np.concatenate(recon, 1)
    # float32 sums vs float64: compare away from the decision boundary only
    margin = np.abs(np.abs(V) - np.array(lambdas)[:, None] * np.abs(mtl - V)) > 1e-5
    margin |= (V == 0) & (mtl - V == 0)                    # 0 ≥ 0 exactly (untouched rows, the zero pooler)
    assert (got_m == want)[margin].all() and margin.mean() > 0.99
    np.testing.assert_allclose(got_r, np.where(got_m, mtl, 0.0), rtol=1e-5, atol=1e-7)
    # an untouched element of task t (its embedding rows) is never kept while another task moved it
    emb = tvs[0]["embeddings.word_embeddings.weight"]
    row_untouched = int(np.where(~(emb != 0).any(1).numpy())[0][0])
    m = tall_masks(torch.stack([v["embeddings.word_embeddings.weight"] for v in tvs]), None, 0.4)
    moved_by_other = torch.stack([v["embeddings.word_embeddings.weight"] for v in tvs]).sum(0) != 0
    assert not (m[0] & moved_by_other & (emb == 0)).any() and m.shape == (T, *emb.shape)
    assert row_untouched >= 0


def test_tall_masks_against_the_reference_code_rule(tvs) -> None:
    """The reference code's |θ₀ − θ_t| > λ|θ_mt − θ_t| (θ_mt = θ₀ + τ_MTL) differs from the paper's ≥ only where
    both sides are equal; there τ_MTL = 0 in these vectors, so the reconstructions agree exactly."""
    pre = pretrained_state(0)
    for k in tvs[0]:
        tau = torch.stack([v[k] for v in tvs]).double()
        theta0 = pre[k].double()
        mtl = tau.sum(0)
        code = (theta0 - (theta0 + tau)).abs() > (theta0 + mtl - (theta0 + tau)).abs() * 0.4
        ours = tall_masks(tau, mtl, 0.4)
        differ = ours != code
        assert (tau.abs()[differ] == (0.4 * (mtl - tau).abs())[differ]).all()
        assert (torch.where(ours, mtl, 0) == torch.where(code, mtl, 0)).all()


def test_tall_bytes_and_grid() -> None:
    assert TALL_LAMBDAS == (0.2, 0.3, 0.4, 0.5, 0.6)
    assert tall_nbytes(16, 8) == 64 + 8 * 2 and tall_nbytes(17, 8) == 68 + 8 * 3
    n = 8 * 1000
    assert tall_nbytes(n, 8) / (8 * 4 * n) == pytest.approx((1 + 8 / 32) / 8)  # the paper's (1 + T/32)/T
    with pytest.raises(ValueError, match="one per task"):
        tall_masks(torch.zeros(3, 2), None, [0.2, 0.3])


# ----------------------------------------------------------------------------------------------------- TSV-C
def test_tsvc_against_numpy_svd(tvs) -> None:
    for v in tvs[:2]:
        for x in v.values():
            xhat, nbytes = tsvc_compress(x, T)
            if x.ndim != 2:
                assert torch.equal(xhat, x) and nbytes == 4 * x.numel()
                continue
            m, n = x.shape
            r = int(min(m, n) * (1 / T))                        # the reference code's rank
            assert tsvc_rank(x.shape, T) == r
            assert nbytes == 4 * r * (m + n + 1)                 # U, s and V in float32
            A = x.double().numpy()
            U, s, Vt = np.linalg.svd(A, full_matrices=False)
            want = (U[:, :r] * s[:r]) @ Vt[:r]
            np.testing.assert_allclose(xhat.double().numpy(), want, atol=1e-5 * max(1.0, s[0]))
            err2 = float(((A - xhat.double().numpy()) ** 2).sum())
            assert err2 == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-3, abs=1e-10)  # Eckart–Young
    assert tsvc_rank((3, 50), 4) == 0
    assert torch.equal(tsvc_compress(torch.randn(3, 50), 4)[0], torch.zeros(3, 50))
    with pytest.raises(ValueError, match="2-D"):
        tsvc_rank((4,), 2)


# ----------------------------------------------------------------------------------------------------- TVQ
def _ref_asym(x: np.ndarray, bits: int) -> np.ndarray:
    """TVQ's min–max quantizer, written out in float32 as in the reference code."""
    x = x.astype(np.float32)
    lo, hi = np.float32(x.min()), np.float32(x.max())
    s = np.float32(2 ** bits - 1) / (hi - lo)
    z = -np.round(s * lo)
    q = np.clip(np.round(s * x + z), 0, 2 ** bits - 1)
    return (q - z) / s


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tvq_against_reference_quantizer(tvs, bits: int) -> None:
    for x in tvs[1].values():
        xhat, nbytes = tvq_tensor(x, bits)
        assert nbytes == math.ceil(x.numel() * bits / 8) + 8
        if float(x.max()) == float(x.min()):
            assert torch.equal(xhat, x)  # constant (the zero pooler): its value, exactly
            continue
        np.testing.assert_allclose(xhat.numpy(), _ref_asym(x.numpy(), bits), rtol=1e-6, atol=1e-8)
        _, s, _ = tvq_quantize(x, bits)
        assert float((xhat - x).abs().max()) <= 0.5 / s * (1 + 1e-4)
        if float(x.min()) <= 0 <= float(x.max()):
            assert (xhat[x == 0] == 0).all()  # the integer zero point keeps zeros (untouched rows) at zero


def test_rtvq_against_reference(tvs) -> None:
    for k in tvs[0]:
        tau = torch.stack([v[k] for v in tvs])
        got, nbytes = rtvq_tensor(tau, 3, 2)
        base = tau.mean(0)
        base_hat = torch.tensor(_ref_asym(base.numpy(), 3)) if float(base.max()) > float(base.min()) else base
        want = []
        for t in range(T):
            off = (tau[t] - base_hat).numpy()
            want.append(base_hat.numpy() + (_ref_asym(off, 2) if off.max() > off.min() else off))
        np.testing.assert_allclose(got.numpy(), np.stack(want), rtol=1e-5, atol=1e-7)
        n = tau[0].numel()
        assert nbytes == (math.ceil(3 * n / 8) + 8) + T * (math.ceil(2 * n / 8) + 8)


# ----------------------------------------------------------------------------------------------------- BitDelta
def test_bitdelta_signs_and_scale(tvs) -> None:
    linear = {k for k, s in SHAPES.items() if is_block_linear(k, s)}
    assert linear == {"encoder.layer.0.attention.query.weight", "encoder.layer.0.output.dense.weight",
                      "encoder.layer.1.attention.query.weight", "encoder.layer.1.output.dense.weight"}
    for k, x in tvs[2].items():
        xhat, nbytes = bitdelta_tensor(k, x)
        if k in linear:
            alpha = torch.tensor(float(x.abs().double().mean())).half().float()   # fp16 scale
            assert torch.equal(xhat, torch.where(x >= 0, alpha, -alpha))
            assert nbytes == math.ceil(x.numel() / 8) + 2
        else:
            assert torch.equal(xhat, x.half().float()) and nbytes == 2 * x.numel()


# ----------------------------------------------------------------------------------------------------- plans
def test_tensor_kinds_and_plan_parsing() -> None:
    assert tensor_kind("embeddings.word_embeddings.weight", (50, 8)) == "embedding"
    assert tensor_kind("model.embed_tokens.weight", (50, 8)) == "embedding"
    assert tensor_kind("encoder.layer.0.attention.query.weight", (8, 8)) == "matrix"
    assert tensor_kind("conv.weight", (4, 3, 3, 3)) == "matrix"
    assert tensor_kind("embeddings.LayerNorm.weight", (8,)) == "vector"
    plan = CodecPlan.parse("matrix=lowrank:rank=2+int8 ; embedding=none")
    assert plan.spec == ("embedding=none;matrix=lowrank:rank=2,energy=none,fraction=none+int8:group=128,scheme=symmetric;"
                         "vector=float16")
    assert CodecPlan.parse(plan.spec) == CodecPlan.parse(plan.spec)
    for bad, match in [("weights=int8", "KIND=SPEC"), ("matrix=int9", "matrix"), ("matrix=int8;matrix=int4", "twice"),
                       ("vector=", "vector")]:
        with pytest.raises(ConfigError, match=match):
            CodecPlan.parse(bad)


def test_plan_bytes_by_closed_form(tvs) -> None:
    plan = CodecPlan.parse("embedding=sparse-rows;matrix=float16;vector=float32")
    dec, nbytes = plan_roundtrip(plan, tvs[0])
    want = 0
    for k, x in tvs[0].items():
        kind = tensor_kind(k, tuple(x.shape))
        if kind == "embedding":
            rows = int((x != 0).any(1).sum())
            want += 4 * rows + 4 * rows * x.shape[1]            # int32 indices + float32 rows
            assert torch.equal(dec[k], x)
        elif kind == "matrix":
            want += 2 * x.numel()
            assert torch.equal(dec[k], x.half().float())
        else:
            want += 4 * x.numel()
    assert nbytes == want
    none = CodecPlan.parse("embedding=none")
    xhat, nb = none.roundtrip("embeddings.word_embeddings.weight", tvs[0]["embeddings.word_embeddings.weight"])
    assert nb == 0 and not xhat.any()


# ----------------------------------------------------------------------------------------------------- residuals
def test_bases_and_residuals(tvs) -> None:
    k = "encoder.layer.0.output.dense.weight"
    S = torch.stack([tvs[0][k] + tvs[1][k], tvs[2][k] - tvs[3][k]])      # M = 2 "bases"
    mu = torch.stack([v[k] for v in tvs]).mean(0)
    w = [0.25, -0.5]
    vhat = combine_bases(S, w, mu, 1.0)
    assert torch.allclose(vhat, 0.25 * S[0] - 0.5 * S[1] + mu, atol=1e-7)
    lossy = CodecPlan.parse("matrix=int4:group=16")
    Sq, muq, nb = code_bases(lossy, k, S, mu)
    n = S[0].numel()
    assert nb == 3 * (math.ceil(n / 2) + 2 * math.ceil(n / 16))          # 3 tensors through int4, group 16
    assert not torch.equal(Sq, S)
    assert code_bases(None, k, S, mu)[2] == 4 * 3 * n
    # the residual is taken against the coded bases' reconstruction: a lossless residual gives v back exactly
    vhat_q = combine_bases(Sq, w, muq, 1.0)
    exact, nb = residual_roundtrip(CodecPlan.parse("matrix=float32"), k, tvs[0][k], vhat_q)
    assert torch.allclose(exact, tvs[0][k], atol=1e-7) and nb == 4 * n
    same, nb = residual_roundtrip(None, k, tvs[0][k], vhat_q)
    assert torch.equal(same, vhat_q) and nb == 0


# ----------------------------------------------------------------------------------------------------- SVDs
def test_truncated_svd_against_numpy() -> None:
    g = torch.Generator().manual_seed(5)
    for shape in [(8, 20), (20, 8), (12, 12)]:
        x = torch.randn(shape, generator=g) @ torch.diag(torch.linspace(3, 0.1, shape[1]))
        u, s, vh, s_all = truncated_svd(x, 5)
        sv = np.linalg.svd(x.double().numpy(), compute_uv=False)
        np.testing.assert_allclose(s_all.numpy(), sv, rtol=1e-5)
        U, S, Vt = np.linalg.svd(x.double().numpy(), full_matrices=False)
        np.testing.assert_allclose(((u * s) @ vh).double().numpy(), (U[:, :5] * S[:5]) @ Vt[:5], atol=1e-5)
        np.testing.assert_allclose((u.T @ u).numpy(), np.eye(5), atol=1e-5)
    zero_u, zero_s, zero_vh, _ = truncated_svd(torch.zeros(4, 6), 2)
    assert not zero_s.any() and not ((zero_u * zero_s) @ zero_vh).any()
    cache = SVDCache(min_rank=3)
    x = torch.randn(10, 7, generator=g)
    a = cache.get("k", x, 2)
    b = cache.get("k", x, 3)
    assert torch.equal(a[0], b[0][:, :2]) and cache.get("k", x, 6)[1].numel() == 6


@pytest.mark.parametrize("spec", ["lowrank:rank=3", "lowrank:rank=4+int8", "lowrank:rank=50+float16"])
def test_lowrank_encode_is_the_codecs_encoding(tvs, spec: str) -> None:
    codec = parse_codec(spec)
    for x in tvs[0].values():
        ours, theirs = lowrank_encode(codec, x), codec.encode(x)
        assert ours.nbytes == theirs.nbytes and ours.meta.get("rank") == theirs.meta.get("rank")
        a, b = codec.decode(ours), codec.decode(theirs)
        scale = max(float(x.abs().max()), 1e-12)
        assert float((a - b).abs().max()) <= 2e-2 * scale if "int8" in spec else float((a - b).abs().max()) <= 1e-3 * scale
        if x.ndim >= 2:
            assert ours.meta["energy_kept"] == pytest.approx(theirs.meta["energy_kept"], rel=1e-4, abs=1e-9)
    plan = CodecPlan.parse(f"matrix={spec}")
    x = tvs[0]["encoder.layer.0.output.dense.weight"]
    xhat, nb = plan.roundtrip("encoder.layer.0.output.dense.weight", x, truncated_svd)
    assert nb == codec.encode(x).nbytes and xhat.shape == x.shape
