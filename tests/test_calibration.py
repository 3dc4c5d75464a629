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


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def real_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-layer cut of the real MiniLM and two 'fine-tunes' of it: low-rank deltas on its layer's matrices
    and 20 changed word-embedding rows."""
    from tvbasis.eval.encoder import Encoder

    root = tmp_path_factory.mktemp("calfam")
    enc = Encoder(num_layers=1, max_length=16)
    enc.save_pretrained(root / "pre")
    g = torch.Generator().manual_seed(0)
    out = {"pre": root / "pre"}
    for t in ("a", "b"):
        delta = {}
        for name in enc.param_names:
            p = enc.pretrained_state[name]
            if name.startswith("encoder.") and p.ndim == 2:
                r = 4
                delta[name] = (torch.randn(p.shape[0], r, generator=g) @ torch.randn(r, p.shape[1], generator=g)) * 2e-3
            elif "word_embeddings" in name:
                d = torch.zeros_like(p)
                d[torch.randint(1000, 3000, (20,), generator=g)] = 1e-2 * torch.randn(20, p.shape[1], generator=g)
                delta[name] = d
        enc.set_delta(delta)
        enc.save_pretrained(root / t)
        enc.reset()
        out[t] = root / t
    (root / "a.txt").write_text("how do I activate my card\n\nmy transfer has not arrived\nwhat is my balance\n")
    (root / "b.csv").write_text('text,label\n"play some jazz",music\n"set an alarm for 7",alarm\n')
    out["a.txt"], out["b.csv"] = root / "a.txt", root / "b.csv"
    return out


def test_cli_build_budget_with_calibration(real_family: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tvbasis.cli import main
    f = real_family
    base = ["build", "--pretrained", str(f["pre"]), "--finetuned", f"a={f['a']}", "--finetuned", f"b={f['b']}",
            "--budget", "64x", "--json", "--include", "encoder.*"]  # the layer (the embedding table is slow)
    rc = main([*base, "--out", str(tmp_path / "s"), "--calibration", f"a={f['a.txt']}",
               "--calibration", f"b={f['b.csv']}"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loss"] == "calibrated output error"
    specs = [s for per in report["plan"].values() for s in per.values()]
    assert any(s.startswith("colscale+") for s in specs)
    store = BasisStore.open(tmp_path / "s")
    store.verify()
    # every task reads back close to its task vector on the layer the deltas live in
    from tvbasis.vectors import TaskVector
    for t in ("a", "b"):
        true = TaskVector.from_checkpoints(f["pre"], f[t]).to_state_dict()
        rec = store.reconstruct(t).to_state_dict()
        k = "encoder.layer.0.attention.self.query.weight"
        assert float((rec[k] - true[k]).norm() / true[k].norm()) < 0.5
    assert store_size(tmp_path / "s") <= report["budget_bytes"]


@pytest.mark.parametrize("extra, message", [
    (["--calibration", "a=A"], "one file per task"),
    (["--calibration", "a", "--calibration", "b=B"], "expected NAME=FILE"),
    (["--calibration", "a=A", "--calibration", "b=B", "--calibration-texts", "0"], "calibration-texts"),
    (["--calibration", "a=MISSING", "--calibration", "b=B"], "no such file"),
])
def test_cli_calibration_refusals_write_nothing(real_family: dict[str, Path], tmp_path: Path, extra: list[str],
                                                message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tvbasis.cli import main
    f = real_family
    subst = {"A": str(f["a.txt"]), "B": str(f["b.csv"]), "MISSING": str(tmp_path / "nope.txt")}
    extra = [x.replace("=A", "=" + subst["A"]).replace("=B", "=" + subst["B"]).replace("=MISSING", "=" + subst["MISSING"])
             for x in extra]
    rc = main(["build", "--pretrained", str(f["pre"]), "--finetuned", f"a={f['a']}", "--finetuned", f"b={f['b']}",
               "--budget", "64x", "--out", str(tmp_path / "s"), *extra])
    assert rc != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_cli_calibration_needs_a_budget(real_family: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from tvbasis.cli import main
    f = real_family
    rc = main(["build", "--pretrained", str(f["pre"]), "--finetuned", f"a={f['a']}", "--finetuned", f"b={f['b']}",
               "--method", "pca", "-M", "1", "--out", str(tmp_path / "s"), "--calibration", f"a={f['a.txt']}",
               "--calibration", f"b={f['b.csv']}"])
    assert rc != 0 and "--budget" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_read_texts_formats(tmp_path: Path) -> None:
    from tvbasis.eval.calibration import read_texts
    (tmp_path / "x.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "label": 3}\n')
    assert read_texts(tmp_path / "x.jsonl") == ["one", "two"]
    (tmp_path / "x.tsv").write_text("label\ttext\n1\talpha\n2\tbeta\n")
    assert read_texts(tmp_path / "x.tsv", limit=1) == ["alpha"]
    (tmp_path / "bad.csv").write_text("sentence\nfoo\n")
    with pytest.raises(ConfigError, match="no column 'text'"):
        read_texts(tmp_path / "bad.csv")
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(ConfigError, match=".txt"):
        read_texts(tmp_path / "x.md")


# ------------------------------------------------------------------------------------------ the prediction probe
def test_prediction_probe_against_the_models_themselves(real_family: dict[str, Path]) -> None:
    """TV between the fine-tune's and θ₀ + delta's head probabilities, recomputed here from the saved models
    (each loaded on its own, a mean-pooled embedding, the head from the pretrained model's label embeddings)."""
    from tvbasis.eval.encoder import Encoder
    from tvbasis.eval.probe import PredictionProbe
    from tvbasis.vectors import TaskVector

    f = real_family
    texts = ["play some jazz", "set an alarm for 7", "wake me up at six", "turn the music up", "next song please"]
    labels = ["music", "alarm", "weather"]
    probe = PredictionProbe(f["pre"], {"b": f["b"]}, {"b": texts}, {"b": labels}, max_length=16)

    def probs(model_dir: Path, head: torch.Tensor) -> torch.Tensor:
        enc = Encoder(model_dir, max_length=16)
        toks = enc.tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = enc.model(**toks).last_hidden_state
        m = toks["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        return (20.0 * e.double() @ head.double().T).softmax(-1)

    pre = Encoder(f["pre"], max_length=16)
    toks = pre.tokenizer(labels, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = pre.model(**toks).last_hidden_state
    m = toks["attention_mask"].unsqueeze(-1).float()
    head = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    p_ft, p_pre = probs(f["b"], head), probs(f["pre"], head)
    ref = float(0.5 * (p_ft - p_pre).abs().sum(-1).mean())
    assert ref > 1e-4  # the fine-tune moves its predictions
    zero = {k: torch.zeros_like(v) for k, v in TaskVector.from_checkpoints(f["pre"], f["b"]).items()}
    assert probe("b", zero) == pytest.approx(ref, rel=1e-3)
    true = dict(TaskVector.from_checkpoints(f["pre"], f["b"]).items())
    assert probe("b", true) < 1e-5
    half = {k: 0.5 * v for k, v in true.items()}
    assert 0 < probe("b", half) < ref


def test_cli_build_budget_with_probe(real_family: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tvbasis.cli import main
    f = real_family
    (tmp_path / "a.csv").write_text("text,label\nhow do I activate my card,card\nmy transfer has not arrived,"
                                    "transfer\nwhat is my balance,balance\nfreeze my card,card\n")
    base = ["build", "--pretrained", str(f["pre"]), "--finetuned", f"a={f['a']}", "--finetuned", f"b={f['b']}",
            "--budget", "64x", "--json", "--include", "encoder.*"]
    rc = main([*base, "--out", str(tmp_path / "s"), "--probe", f"a={tmp_path / 'a.csv'}",
               "--probe", f"b={f['b.csv']}", "--probe-rounds", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    rounds = report["probe_rounds"]
    assert 1 <= len(rounds) <= 2 and sum(bool(r.get("kept")) for r in rounds) == 1
    assert set(rounds[0]["damage"]) == {"a", "b"} and all(v >= 0 for v in rounds[0]["damage"].values())
    assert store_size(tmp_path / "s") <= report["budget_bytes"]
    BasisStore.open(tmp_path / "s").verify()
    # refused: without --budget, a file of one class, a method build; nothing written
    for extra, message in ((["--quality", "0.9"], "--budget"), ([], "2 classes")):
        one = tmp_path / "one.csv"
        one.write_text("text,label\nplay jazz,music\nplay rock,music\n")
        args = ["build", "--pretrained", str(f["pre"]), "--finetuned", f"a={f['a']}", "--finetuned", f"b={f['b']}",
                "--out", str(tmp_path / "r"), "--probe", f"a={tmp_path / 'a.csv'}",
                "--probe", f"b={one if not extra else f['b.csv']}", *(extra or ["--budget", "64x"])]
        assert main(args) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not (tmp_path / "r").exists()
