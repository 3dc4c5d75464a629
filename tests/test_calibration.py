"""``build --budget --calibration``: the ``colscale`` codec (activation-aware coding), calibration statistics
from a real encoder (against its hidden states), the calibrated candidates' weighted errors, and a whole
calibrated store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_budget import _family
from tvbasis.codecs import parse_codec
from tvbasis.codecs.colscale import FLOOR, ColScale, stored_scale
from tvbasis.compress.budget import TaskCalibration, measure
from tvbasis.errors import ConfigError
from tvbasis.store import BasisStore
from tvbasis.store.budget import build_budget_store, store_size


def _scale(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cols, generator=g) * 3 + 0.05


def test_stored_scale_is_normalised_floored_fp16() -> None:
    s = torch.tensor([4.0, 2.0, 0.0, 1e-6])
    out = stored_scale(s, 4)
    rms = (s.pow(2).mean()).sqrt()
    ref = torch.clamp(s / rms, min=FLOOR).half()
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    with pytest.raises(ValueError, match="3 scales"):
        stored_scale(torch.ones(3), 4)
    with pytest.raises(ValueError, match="finite"):
        stored_scale(torch.tensor([1.0, -1.0]), 2)


def test_colscale_lowrank_is_the_best_rank_in_the_weighted_norm() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 24, generator=g)
    s16 = stored_scale(_scale(24), 24)
    codec = parse_codec("colscale+lowrank:rank=4")
    assert isinstance(codec, ColScale)
    enc = codec.encode_scaled(x, _scale(24))
    xhat = codec.decode(enc)
    # reference: the truncated SVD of X·diag(s), unscaled again
    s = s16.float()
    u, sv, vh = torch.linalg.svd(x * s, full_matrices=False)
    ref = ((u[:, :4] * sv[:4]) @ vh[:4]) / s
    assert torch.allclose(xhat, ref, atol=1e-4)
    # and its weighted error is the optimum: the tail of the weighted spectrum
    werr = float(((x - xhat) * s).pow(2).sum())
    assert werr == pytest.approx(float(sv[4:].pow(2).sum()), rel=1e-3)
    assert enc.nbytes == 2 * 24 + 4 * 4 * (40 + 24)
    # decoding with the codec from the recorded spec alone (no scale argument)
    assert torch.allclose(parse_codec(enc.codec).decode(enc), xhat)


def test_colscale_without_calibration_is_the_plain_codec() -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    enc = parse_codec("colscale+float16").encode(x)
    assert torch.equal(enc.tensors["scale"], torch.ones(16, dtype=torch.float16))
    assert torch.allclose(parse_codec("colscale+float16").decode(enc), x, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="NEXT"):
        parse_codec("colscale")


@pytest.mark.parametrize("spec", ["int4:group=32,scheme=affine", "lowrank:rank=8+int2:group=32,scheme=affine",
                                  "float16"])
def test_weighted_candidates_measure_the_output_error(spec: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 8, generator=g) @ torch.randn(8, 48, generator=g)) * 0.01
    s16 = stored_scale(_scale(48, 4), 48)
    cands = measure("encoder.layer.0.output.dense.weight", x, "k", specs=[spec], scale=s16)
    from tvbasis.compress.budget import encode_chosen
    # low rank only scaled; dense codecs scaled and unscaled (a quantiser's steps follow the largest values)
    assert [c.spec for c in cands] == ([] if "lowrank" in spec else [parse_codec(spec).spec]) + \
        [f"colscale+{parse_codec(spec).spec}"]
    for cand in cands:
        enc = encode_chosen(cand.spec, x, s16)
        xhat = parse_codec(enc.codec).decode(enc)
        ref = float(((x - xhat) * s16.float()).pow(2).sum())
        # quantised low rank is predicted from the factors' rounding (cross terms dropped): close, not exact
        rel = 0.15 if "lowrank" in spec else 1e-6
        assert cand.sqerr == pytest.approx(ref, rel=rel, abs=1e-12)
        assert cand.nbytes > enc.nbytes


def test_weigh_embedding_by_lookup_frequency_and_matrix_by_input_energy() -> None:
    rms = torch.tensor([1.0, 2.0, 2.0, 1.0])
    freq = torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0])
    cal = TaskCalibration({"m.weight": rms}, {"e.weight": freq}, tokens=100, texts=3)
    scale, w = cal.weigh("encoder.m.weight", torch.ones(3, 4))  # not matched yet: weight 1, no scale
    assert scale is None and w == 1.0
    named = cal.matched(["encoder.m.weight", "embeddings.e.weight", "encoder.m.bias"])
    scale, w = named.weigh("encoder.m.weight", torch.ones(3, 4))
    assert w == pytest.approx(float(rms.pow(2).mean())) and torch.equal(scale, stored_scale(rms, 4))
    x = torch.zeros(5, 4)
    x[[0, 3]] = 1.0  # rows 0 (half the lookups) and 3 (never looked up) changed
    _, w = named.weigh("embeddings.e.weight", x)
    p = (freq.double() * 100 + 0.5) / (100 + 0.5 * 5)
    assert w == pytest.approx(float(p[0] + p[3]) / 2)
    assert named.weigh("encoder.m.bias", torch.ones(4)) == (None, 1.0)


def test_statistics_of_a_real_encoder_match_its_hidden_states() -> None:
    from tvbasis.eval.calibration import collect
    from tvbasis.eval.encoder import Encoder

    enc = Encoder(num_layers=1, max_length=16)
    texts = ["how do I activate my new card", "play some jazz", "what is the weather in paris tomorrow", "hi"]
    cal = collect(enc, texts, batch_size=2)
    toks = enc.tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = enc.model(**toks, output_hidden_states=True)
    mask = toks["attention_mask"].bool()
    h0 = out.hidden_states[0][mask]  # the first layer's query input: the embeddings' output, padding dropped
    ref = h0.pow(2).mean(0).sqrt()
    got = cal.col_rms["encoder.layer.0.attention.self.query.weight"]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    ids = toks["input_ids"][mask]
    vocab = enc.model.config.vocab_size
    ref_f = torch.bincount(ids, minlength=vocab).double() / ids.numel()
    assert torch.allclose(cal.row_freq["embeddings.word_embeddings.weight"].double(), ref_f, atol=1e-7)
    assert cal.tokens == int(mask.sum()) and cal.texts == 4


def _weighted_errors(store: BasisStore, deltas: dict, cal: dict[str, TaskCalibration]) -> dict[str, float]:
    out = {}
    for t, d in deltas.items():
        rec = store.reconstruct(t).to_state_dict()
        num = den = 0.0
        for k, v in d.items():
            scale, w = cal[t].matched(list(d)).weigh(k, v)
            e = v - rec[k].float()
            if scale is not None:
                e, v = e * scale.float(), v * scale.float()
            num += w * float(e.pow(2).sum())
            den += w * float(v.pow(2).sum())
        out[t] = (num / den) ** 0.5
    return out


def test_calibrated_store_fits_the_budget_and_lowers_the_output_error(tmp_path: Path) -> None:
    pre, fts, deltas = _family(tmp_path)
    g = torch.Generator().manual_seed(7)
    cal = {}
    for t, d in deltas.items():
        # inputs whose energy sits on a few features: an allocation blind to them wastes bytes on the rest
        col = {k: (torch.rand(v.shape[1], generator=g) ** 6) * 4 + 0.01 for k, v in d.items() if v.ndim == 2
               and "word" not in k}
        freq = torch.zeros(300)
        freq[:50] = 1 / 50
        cal[t] = TaskCalibration(col, {"embeddings.word_embeddings.weight": freq}, tokens=1000, texts=10)
    fp32 = sum(v.numel() for d in deltas.values() for v in d.values()) * 4
    budget = fp32 // 10
    store, rep = build_budget_store(pre, fts, tmp_path / "cal", budget=f"{budget}B", calibration=cal)
    plain, _ = build_budget_store(pre, fts, tmp_path / "plain", budget=f"{budget}B")
    size = store_size(tmp_path / "cal")
    assert 0.9 * budget <= size <= budget  # tiny tensors: one hull step is a few % of this budget
    specs = [e for t in rep.allocation.specs.values() for e in t.values()]
    assert any(s.startswith("colscale+") for s in specs)
    reopened = BasisStore.open(tmp_path / "cal")
    reopened.verify()
    got, base = _weighted_errors(reopened, deltas, cal), _weighted_errors(plain, deltas, cal)
    assert max(got.values()) < max(base.values())
    with pytest.raises(ConfigError, match="one file per task"):
        build_budget_store(pre, fts, tmp_path / "bad", budget="10x", calibration={"t0": cal["t0"]})
    assert not (tmp_path / "bad").exists()
