"""LoRA collections in factor space (tvbasis.lora and LoraCheckpoint.factors), each against a dense reference
written here: PEFT's own merge for the factors, ΔW expanded in float64 for the Gram, dense SVDs and the
stored U, Σ_i, V multiplied out for the joint compression."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tvbasis.errors import ConfigError, UnknownTaskError
from tvbasis.io import LoraCheckpoint, open_checkpoint
from tvbasis.lora import AdapterFactors, factor_gram, joint_compress, open_adapters, subspace_kernel

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

f64 = torch.float64


# ------------------------------------------------------------------------------------------------ helpers
def _peft():
    return pytest.importorskip("peft"), pytest.importorskip("transformers")


def _bert(transformers) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _save_adapter(peft, base: torch.nn.Module, out: Path, seed: int, set_ab=None, **kw) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter of ``base`` with random trained values (or A/B set by ``set_ab(module_name, A, B)``);
    returns PEFT's merge_and_unload state (the dense reference)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        if set_ab is not None:
            for name, mod in model.named_modules():
                if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                    set_ab(name, mod.lora_A["default"].weight, mod.lora_B["default"].weight)
    model.save_pretrained(str(out))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _dense_ref(merged: dict[str, torch.Tensor], pre: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: merged[k].to(f64) - pre[k].to(f64) for k in pre if not torch.equal(merged[k], pre[k])}


def _random_adapters(T: int, shapes: dict[str, tuple[int, int]], r: int, seed: int = 0) -> dict[str, AdapterFactors]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{t}": AdapterFactors({n: (torch.randn(m, r, generator=g, dtype=f64),
                                         torch.randn(r, c, generator=g, dtype=f64)) for n, (m, c) in shapes.items()})
            for t in range(T)}


def _expand(a: AdapterFactors) -> dict[str, torch.Tensor]:
    out = {n: (B.to(f64) @ A.to(f64)).reshape(a.shapes[n]) for n, (B, A) in a.factors.items()}
    out.update({n: d.to(f64) for n, d in a.dense.items()})
    return out


def _flat(d: dict[str, torch.Tensor], names: list[str], shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) if n in d else torch.zeros(int(np.prod(shapes[n])), dtype=f64)
                      for n in names])


def _manual_delta(jc, i: int, tensor: str) -> torch.Tensor:
    """U Σ_i Vᵀ from the stored fit, multiplied out here (not through JointCompression.delta)."""
    f = next(f for f in jc.fits[tensor] if i in f.members)
    c = f.cores[f.members.index(i)].to(f64)
    core = torch.diag(c) if c.dim() == 1 else c
    return f.U.to(f64) @ core @ f.V.to(f64).T


# ------------------------------------------------------------------------------------------------ factors accessor
def test_factors_accessor_matches_peft_merge(tmp_path):
    peft, transformers = _peft()
    base = _bert(transformers)
    base.save_pretrained(str(tmp_path / "pre"))
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    pre_ck = open_checkpoint(tmp_path / "pre")
    variants = {
        "plain": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "full": dict(r=4, lora_alpha=16, target_modules=["query", "value", "word_embeddings", "dense"],
                     modules_to_save=["classifier"], bias="lora_only", alpha_pattern={"value": 4},
                     rank_pattern={"query": 2}),
        "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["key"], lora_bias=True),
    }
    for seed, (name, kw) in enumerate(variants.items()):
        ref = _dense_ref(_save_adapter(peft, base, tmp_path / name, seed, **kw), pre)
        ck = LoraCheckpoint(tmp_path / name, pre_ck)
        factored = ck.factored()
        assert factored and factored <= ck.changed_tensors()
        for k in ck.changed_tensors():
            f = ck.factors(k)
            if k in factored:
                B, A = f
                assert B.dtype == A.dtype == torch.float32 and B.shape[1] == A.shape[0]
                torch.testing.assert_close((B.to(f64) @ A.to(f64)).reshape(ref[k].shape), ref[k], rtol=0,
                                           atol=2e-6, msg=k)
            else:  # replaced whole or shifted by a bias: no factors
                assert f is None and (k.endswith(".bias") or "classifier" in k), k
        assert ck.factors("bert.embeddings.LayerNorm.weight") is None  # untouched
        if name == "full":  # the embedding (ΔW = (B·A)ᵀ) and rank_pattern's r = 2
            B, A = ck.factors("bert.embeddings.word_embeddings.weight")
            assert B.shape == (64, 4) and A.shape == (4, 32)
            assert ck.factors("bert.encoder.layer.0.attention.self.query.weight")[0].shape[1] == 2


def test_factors_accessor_fan_in_fan_out_and_conv(tmp_path):
    peft, transformers = _peft()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    gpt.save_pretrained(str(tmp_path / "gpt"))
    pre = {k: v.detach().clone() for k, v in gpt.state_dict().items()}
    ref = _dense_ref(_save_adapter(peft, gpt, tmp_path / "gad", 1, r=2, lora_alpha=4,
                                   target_modules=["c_attn"], fan_in_fan_out=True), pre)
    ck = LoraCheckpoint(tmp_path / "gad", open_checkpoint(tmp_path / "gpt"))
    (k,) = ck.factored()
    B, A = ck.factors(k)
    assert B.shape == (32, 2) and A.shape == (2, 96)  # Conv1D stores (in, out)
    torch.testing.assert_close(B.to(f64) @ A.to(f64), ref[k], rtol=0, atol=2e-6)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

    net = Net()
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_file(pre, str(tmp_path / "net.safetensors"))
    ref = _dense_ref(_save_adapter(peft, net, tmp_path / "cad", 2, r=2, lora_alpha=6, target_modules=["conv"]), pre)
    ck = LoraCheckpoint(tmp_path / "cad", open_checkpoint(tmp_path / "net.safetensors"))
    B, A = ck.factors("conv.weight")
    assert B.shape == (8, 2) and A.shape == (2, 27)
    torch.testing.assert_close((B.to(f64) @ A.to(f64)).reshape(8, 3, 3, 3), ref["conv.weight"], rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------ factor_gram
def test_factor_gram_equals_dense_gram_mixed_sources():
    """Factors × factors, factors × dense (an adapter replacing the tensor whole), dense × dense, absent."""
    g = torch.Generator().manual_seed(1)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=f64)

    ads = {
        "a": AdapterFactors({"w": (rn(6, 2), rn(2, 5)), "conv": (rn(4, 3), rn(3, 18))}, {"b": rn(6)},
                            shapes={"conv": (4, 2, 3, 3)}),
        "b": AdapterFactors({"conv": (rn(4, 1), rn(1, 18))}, {"w": rn(6, 5), "b": rn(6)}, shapes={"conv": (4, 2, 3, 3)}),
        "c": AdapterFactors({"w": (rn(6, 4), rn(4, 5))}),
        "d": AdapterFactors({}, {"b": rn(6)}),
    }
    fg = factor_gram(ads, per_tensor=True)
    shapes = {"w": (6, 5), "conv": (4, 2, 3, 3), "b": (6,)}
    names = list(shapes)
    X = torch.stack([_flat(_expand(a), names, shapes) for a in ads.values()])
    np.testing.assert_allclose(fg.G, (X @ X.T).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum(fg.per_tensor.values()), fg.G, rtol=1e-12, atol=1e-12)
    Xw = torch.stack([_expand(a).get("w", torch.zeros(6, 5, dtype=f64)).reshape(-1) for a in ads.values()])
    np.testing.assert_allclose(fg.per_tensor["w"], (Xw @ Xw.T).numpy(), rtol=1e-12, atol=1e-12)
    assert fg.names == list(ads)
    np.testing.assert_allclose(np.diag(fg.cosine), 1.0)


def test_factor_gram_of_peft_adapters_equals_gram_of_merged_deltas(tmp_path):
    peft, transformers = _peft()
    base = _bert(transformers)
    base.save_pretrained(str(tmp_path / "pre"))
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    kws = [dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
           dict(r=2, lora_alpha=4, target_modules=["query", "key", "word_embeddings"], modules_to_save=["classifier"]),
           dict(r=3, lora_alpha=3, target_modules=["value"], lora_bias=True)]
    refs = {f"a{i}": _dense_ref(_save_adapter(peft, base, tmp_path / f"a{i}", 10 + i, **kw), pre)
            for i, kw in enumerate(kws)}
    adapters = open_adapters(tmp_path / "pre", {n: tmp_path / n for n in refs})
    fg = factor_gram(adapters)
    names = sorted(set().union(*refs.values()))
    shapes = {n: tuple(pre[n].shape) for n in names}
    X = torch.stack([_flat(r, names, shapes) for r in refs.values()])
    G = (X @ X.T).numpy()
    np.testing.assert_allclose(fg.G, G, rtol=2e-5, atol=1e-9 * np.abs(G).max())
    with pytest.raises(ConfigError, match="not a PEFT LoRA adapter"):
        open_adapters(tmp_path / "pre", {"x": tmp_path / "pre"})


# ------------------------------------------------------------------------------------------------ joint_compress
def _shared_adapters(T: int, rows: int, cols: int, k: int, r: int, seed: int = 0) -> dict[str, AdapterFactors]:
    """B_i = U_s X_i, A_i = Y_i V_sᵀ: every adapter in one k-dimensional column and row space."""
    g = torch.Generator().manual_seed(seed)
    Us = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=f64))[0]
    Vs = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=f64))[0]
    return {f"s{t}": AdapterFactors({"w": (Us @ torch.randn(k, r, generator=g, dtype=f64),
                                           torch.randn(r, k, generator=g, dtype=f64) @ Vs.T)}) for t in range(T)}


def test_joint_compress_is_exact_when_adapters_share_their_subspace():
    ads = _shared_adapters(T=6, rows=40, cols=30, k=6, r=3)
    jc = joint_compress(ads, k=6, cores="full", dtype=f64)
    assert jc.rel_errors.max() < 1e-12
    for i, (n, a) in enumerate(ads.items()):
        ref = _expand(a)["w"]
        torch.testing.assert_close(_manual_delta(jc, i, "w"), ref, rtol=0, atol=1e-12 * ref.abs().max())
        torch.testing.assert_close(jc.delta(n, "w").to(f64), ref, rtol=0, atol=1e-6 * ref.abs().max())
    (fit,) = jc.fits["w"]
    torch.testing.assert_close(fit.U.T @ fit.U, torch.eye(6, dtype=f64), rtol=0, atol=1e-12)  # orthonormal
    assert jc.nbytes == 8 * ((40 + 30) * 6 + 6 * 6 * 6) < jc.input_nbytes  # U, V + six 6×6 cores (float64)
    # rectangular cores: adapters sharing a 2-dim row space and a 6-dim column space
    g = torch.Generator().manual_seed(2)
    Us = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=f64))[0]
    a_shared = torch.randn(2, 30, generator=g, dtype=f64)
    rect = {f"r{t}": AdapterFactors({"w": (Us @ torch.randn(6, 2, generator=g, dtype=f64),
                                           torch.randn(2, 2, generator=g, dtype=f64) @ a_shared)}) for t in range(5)}
    jr = joint_compress(rect, k=(6, 2), dtype=f64)
    assert jr.rel_errors.max() < 1e-12 and jr.nbytes == 8 * (40 * 6 + 30 * 2 + 5 * 12)
    assert joint_compress(rect, k=(2, 2), dtype=f64).rel_errors.max() > 0.1
    with pytest.raises(ConfigError):
        joint_compress(rect, k=(6, 2), cores="diag")
    # float32 storage: the reported errors are those of the stored values
    jc32 = joint_compress(ads, k=6, cores="full")
    assert 1e-9 < jc32.rel_errors.max() < 1e-6
    for i, a in enumerate(ads.values()):
        ref = _expand(a)["w"]
        err = float((_manual_delta(jc32, i, "w") - ref).norm() / ref.norm())
        assert err == pytest.approx(jc32.rel_errors[i], rel=1e-3)
    # diagonal cores are exact when ΔW_i = U D_i Vᵀ (U, V not orthogonal: CP-ALS finds them)
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(30, 5, generator=g, dtype=f64), torch.randn(20, 5, generator=g, dtype=f64)
    diag = {f"d{t}": AdapterFactors({"w": (U * torch.randn(5, generator=g, dtype=f64), V.T.clone())})
            for t in range(8)}
    jd = joint_compress(diag, k=5, cores="diag", dtype=f64)
    assert jd.rel_errors.max() < 1e-6
    assert jd.nbytes == 8 * ((30 + 20) * 5 + 8 * 5)
    for i, a in enumerate(diag.values()):
        torch.testing.assert_close(_manual_delta(jd, i, "w"), _expand(a)["w"], rtol=0, atol=1e-5)


def test_single_adapter_is_its_truncated_svd():
    """T = 1: the joint compression with k is the rank-k truncation; its error is the Eckart–Young tail of the
    dense ΔW's singular values."""
    (a,) = _random_adapters(1, {"w": (30, 25)}, r=8, seed=4).values()
    ref = _expand(a)["w"]
    s = torch.linalg.svdvals(ref)
    for k in (1, 3, 6):
        for cores in ("full", "diag"):
            jc = joint_compress({"a": a}, k=k, cores=cores, dtype=f64)
            want = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
            assert jc.rel_errors[0] == pytest.approx(want, rel=1e-6, abs=1e-9), (k, cores)


def test_joint_errors_bytes_and_optimality_against_dense_references():
    shapes = {"q": (24, 20), "v": (24, 16)}
    ads = _random_adapters(5, shapes, r=3, seed=5)
    k = 6
    jc = joint_compress(ads, k=k, cores="full", dtype=f64)
    dense = [_expand(a) for a in ads.values()]
    for n in shapes:
        D = [d[n] for d in dense]
        # HOSVD from the dense matrices; HOOI starts there and never gets worse
        U0 = torch.linalg.eigh(sum(x @ x.T for x in D))[1][:, -k:]
        V0 = torch.linalg.eigh(sum(x.T @ x for x in D))[1][:, -k:]
        hosvd = sum(float((x - U0 @ U0.T @ x @ V0 @ V0.T).square().sum()) for x in D)
        lower = sum(float(torch.linalg.svdvals(x)[k:].square().sum()) for x in D)  # each adapter's own best
        errs = [float((_manual_delta(jc, i, n) - x).square().sum()) for i, x in enumerate(D)]
        np.testing.assert_allclose(jc.sq_errors[n], errs, rtol=1e-8)
        assert lower - 1e-9 <= sum(errs) <= hosvd + 1e-9
        obj = jc.fits[n][0].objective
        assert all(b <= a + 1e-9 * a for a, b in zip(obj, obj[1:]))  # monotone
        np.testing.assert_allclose(obj[-1], sum(errs), rtol=1e-8)
    num = sum(float((_manual_delta(jc, i, n) - d[n]).square().sum()) for i, d in enumerate(dense) for n in shapes)
    den = [sum(float(d[n].square().sum()) for n in shapes) for d in dense]
    want = [np.sqrt(sum(float((_manual_delta(jc, i, n) - d[n]).square().sum()) for n in shapes) / den[i])
            for i, d in enumerate(dense)]
    np.testing.assert_allclose(jc.rel_errors, want, rtol=1e-8)
    assert jc.rel_error == pytest.approx(np.sqrt(num / sum(den)), rel=1e-8)
    assert jc.nbytes == 8 * sum((m + c) * k + 5 * k * k for m, c in shapes.values())
    assert jc.input_nbytes == 8 * 5 * sum(3 * (m + c) for m, c in shapes.values())
    assert jc.expanded_nbytes == 4 * 5 * sum(m * c for m, c in shapes.values())
    # reconstruction as factors and the residual in factor form
    P, Vt = jc.factors("t2", "q")
    assert P.shape == (24, k) and Vt.shape == (k, 20)
    B, A = ads["t2"].factors["q"]
    X, Y = jc.residual_factors("t2", "q", B, A)
    assert X.shape[1] == 3 + k
    torch.testing.assert_close((X @ Y).to(f64), dense[2]["q"] - _manual_delta(jc, 2, "q"), rtol=0, atol=1e-5)
    assert set(jc.reconstruct("t2")) == set(shapes)
    # task arithmetic in factor space (one U (Σ w_i Σ_i) Vᵀ per tensor) = the sum of the reconstructions
    w = {"t0": 1.0, "t3": -0.5}
    for n, v in jc.combine(w).items():
        want = _manual_delta(jc, 0, n) - 0.5 * _manual_delta(jc, 3, n)
        torch.testing.assert_close(v.to(f64), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # float16 storage: the errors and bytes are those of the stored values
    j16 = joint_compress(ads, k=k, dtype=torch.float16)
    assert j16.nbytes * 4 == jc.nbytes
    for i, d in enumerate(dense):
        e = np.sqrt(sum(float((_manual_delta(j16, i, n) - d[n]).square().sum()) for n in shapes) / den[i])
        assert j16.rel_errors[i] == pytest.approx(e, rel=1e-6)
    with pytest.raises(UnknownTaskError):
        jc.delta("nope", "q")
    with pytest.raises(ConfigError):
        joint_compress(ads, k=0)
    with pytest.raises(ConfigError):
        joint_compress(ads, k=2, cores="tucker")


def test_clusters_recover_groups_that_share_subspaces():
    g1 = _shared_adapters(T=4, rows=30, cols=24, k=4, r=2, seed=7)
    g2 = _shared_adapters(T=4, rows=30, cols=24, k=4, r=2, seed=8)
    order = ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]  # interleaved
    ads = {n: (g1 if n[0] == "a" else g2)[f"s{n[1]}"] for n in order}
    one = joint_compress(ads, k=4, cores="full", dtype=f64)
    two = joint_compress(ads, k=4, cores="full", clusters=2, affinity="subspace", dtype=f64)
    assert one.rel_errors.min() > 0.01
    K = subspace_kernel(ads)  # against dense second moments
    D = [_expand(a)["w"] for a in ads.values()]
    for i in range(8):
        for j in range(8):
            kc = float((D[i].T @ D[j]).square().sum()) / float((D[i].T @ D[i]).norm() * (D[j].T @ D[j]).norm())
            kr = float((D[i] @ D[j].T).square().sum()) / float((D[i] @ D[i].T).norm() * (D[j] @ D[j].T).norm())
            assert K[i, j] == pytest.approx((kc + kr) / 2, rel=1e-9, abs=1e-12)
    assert two.rel_errors.max() < 1e-10
    assert two.labels == [0, 1, 0, 1, 0, 1, 0, 1]
    assert len(two.fits["w"]) == 2 and two.nbytes == 2 * 8 * ((30 + 24) * 4 + 4 * 16)
    for i, n in enumerate(order):
        torch.testing.assert_close(_manual_delta(two, i, "w"), _expand(ads[n])["w"], rtol=0, atol=1e-10)
    # the paper's reassignment repairs a bad start: begin from a wrong assignment
    fixed = joint_compress(ads, k=4, labels=[0, 0, 0, 0, 1, 1, 1, 1], refine=3, dtype=f64)
    assert fixed.rel_errors.max() < 1e-10 and fixed.labels == [0, 1, 0, 1, 0, 1, 0, 1]
    assert fixed.history[0]["rel_error"] > 0.1


def test_joint_compress_of_peft_adapters_keeps_dense_tensors_exact(tmp_path):
    """Real adapter files: query/value factors in a shared 3-dim coordinate subspace (exact in float32),
    plus a classifier replaced whole; the reconstruction equals PEFT's merge."""
    peft, transformers = _peft()
    base = _bert(transformers)
    base.save_pretrained(str(tmp_path / "pre"))
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    rows_in = torch.tensor([1, 5, 9])  # B nonzero only in these rows, A only in these columns

    def shared(seed):
        g = torch.Generator().manual_seed(seed)

        def set_ab(name, A, B):
            A.zero_()
            B.zero_()
            A[:, rows_in] = torch.randn(A.shape[0], 3, generator=g)
            B[rows_in, :] = torch.randn(3, B.shape[1], generator=g)
        return set_ab

    refs = {f"a{i}": _dense_ref(_save_adapter(peft, base, tmp_path / f"a{i}", i, set_ab=shared(100 + i), r=2,
                                              lora_alpha=4, target_modules=["query", "value"],
                                              modules_to_save=["classifier"]), pre) for i in range(3)}
    adapters = open_adapters(tmp_path / "pre", {n: tmp_path / n for n in refs})
    jc = joint_compress(adapters, k=3)
    assert jc.rel_errors.max() < 1e-6
    for n, ref in refs.items():
        rec = jc.reconstruct(n)
        assert set(rec) == set(ref)
        for k, v in ref.items():
            torch.testing.assert_close(rec[k].to(f64), v, rtol=0, atol=1e-6 * float(v.abs().max()), msg=k)
            if "classifier" in k:
                assert jc.factors(n, k) is None and k in jc.dense
    cls_bytes = sum(4 * pre[k].numel() for k in pre if k.startswith("classifier"))
    assert jc.dense_nbytes == 3 * cls_bytes
    assert jc.nbytes == jc.dense_nbytes + 4 * sum((32 + 32) * 3 + 3 * 9 for _ in range(4))  # 4 q/v tensors


# ------------------------------------------------------------------------------------------------ LoRA fine-tunes
def test_lora_finetune_is_cached_like_the_full_fine_tunes(tmp_path, caplog):
    pytest.importorskip("peft")
    import json
    import logging

    from tvbasis.eval.finetune import FinetuneSettings
    from tvbasis.eval.lora_finetune import LORA_META, LoraSettings, lora_cache_problem, lora_finetune
    from tvbasis.eval.tasks import load_task

    settings = FinetuneSettings(num_layers=2, max_train=48, max_length=24, seed=0)
    task = load_task("mcid", max_train=48, max_dev=8, max_test=8)
    lora = LoraSettings(r=4)
    r = lora_finetune(task, tmp_path / "work", settings, lora, progress=False)
    assert not r.reused and r.path == tmp_path / "work" / "lora" / "mcid"
    meta = json.loads((r.path / LORA_META).read_text())
    assert meta["kind"] == "tvbasis-lora" and meta["lr"] == 1e-3 and meta["lora"]["r"] == 4
    assert meta["train"]["steps"] == 2 and meta["n_train"] == 48
    ck = LoraCheckpoint(r.path, open_checkpoint(tmp_path / "work" / "pretrained"))
    # every linear layer of the 2 kept blocks, nothing else (no pooler, no embeddings)
    assert len(ck.factored()) == 12 and ck.changed_tensors() == ck.factored()
    assert all(".layer." in n and ck.factors(n)[0].shape[1] == 4 for n in ck.factored())
    assert any(float(ck.factors(n)[0].abs().max()) > 0 for n in ck.factored())  # B moved from its zero init
    again = lora_finetune(task, tmp_path / "work", settings, lora, progress=False)
    assert again.reused
    assert "settings changed" in lora_cache_problem(r.path, "other")
    weights = r.path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.INFO, logger="tvbasis.eval.lora_finetune"):
        rebuilt = lora_finetune(task, tmp_path / "work", settings, lora, progress=False)
    assert not rebuilt.reused and any("retraining LoRA adapter of mcid" in m.getMessage() for m in caplog.records)
    assert weights.read_bytes() == data  # same seed, same data, same adapter
