"""Evaluation harness: real bundled data, real MiniLM (cut to 2 layers), real fine-tunes — offline, < 60 s."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tvbasis.errors import ConfigError, UnknownTaskError
from tvbasis.eval import Encoder, Evaluator, label_text, lambda_grid, load_task, parse_grid
from tvbasis.eval.evalcache import EvalCache
from tvbasis.eval.finetune import (
    FINETUNE_META,
    WEIGHTS,
    FinetuneSettings,
    cache_problem,
    ensure_writable,
    finetune,
    load_state,
    pretrained_encoder,
    task_vector_state,
)
from tvbasis.eval.tasks import SPLITS, TASK_NAMES

# ----------------------------------------------------------------------------- tasks and cleaning


def test_20ng_header_and_label_names_are_stripped_everywhere() -> None:
    task = load_task("20NG", max_train=None, max_dev=None, max_test=None)
    assert task.num_classes == 20
    assert [len(task[s]) for s in SPLITS] == [7000, 1000, 2000]
    names = [n.lower() for n in task.label_names]
    for s in SPLITS:
        for text in task[s].texts:
            low = text.lower()
            assert not low.startswith("newsgroup") and "document_id" not in low
            assert not any(n in low for n in names), text[:200]
            assert not low.startswith("from:")


def test_20ng_cleaning_on_a_known_row() -> None:
    from tvbasis.eval.tasks import clean_20ng

    raw = ("Newsgroup:comp.sys.mac.hardwareDocument_id: 52335From: truemner@mac-truemner.rd.hydro.on.ca "
           "(Gary Truemner)Subject: Re: Syquest 150 ???In article <93759@hydra> wrote: see comp.sys.mac.hardware")
    out = clean_20ng(raw)
    assert out.startswith("Subject: Re: Syquest 150 ???")
    assert "Truemner" not in out and "comp.sys" not in out and "Newsgroup" not in out


def test_dbpedia_keeps_40_most_frequent_classes() -> None:
    task = load_task("dbpedia", max_train=None, max_dev=None, max_test=None)
    assert task.num_classes == 40
    for s in SPLITS:
        assert len(task[s]) > 0
        assert set(task[s].labels) <= set(range(40))
    assert "American Football Player" in task.label_texts


@pytest.mark.parametrize("raw, task, text", [
    ("exchange_charge", "banking", "exchange charge"),
    ("Refund_not_showing_up", "banking", "refund not showing up"),
    ("reverted_card_payment?", "banking", "reverted card payment"),
    ("AmericanFootballPlayer", "dbpedia", "American Football Player"),
    ("NCAATeamSeason", "dbpedia", "NCAA Team Season"),
    ("visual-studio", "stackoverflow", "visual studio"),
    ("iot_hue_lightchange", "hwu", "iot hue light change"),
    ("comp.sys.ibm.pc.hardware", "20NG", "computer system ibm pc hardware"),
    ("alt.atheism", "20NG", "atheism"),
    ("Business & Finance", "yahoo", "Business & Finance"),
    ("what is corona", "mcid", "what is corona"),
])
def test_label_text(raw: str, task: str, text: str) -> None:
    assert label_text(raw, task) == text


def test_every_task_loads_with_clean_labels() -> None:
    for name in TASK_NAMES:
        task = load_task(name, max_train=50, max_dev=20, max_test=20)
        assert task.name == name and len(task["train"]) == 50 and len(task["test"]) == 20
        assert len(set(task.label_texts)) == task.num_classes  # no two labels collapse to one text
        assert all(t and "_" not in t for t in task.label_texts)
        assert all(0 <= y < task.num_classes for s in SPLITS for y in task[s].labels)


def test_subsampling_is_seeded() -> None:
    a = load_task("banking", max_train=64, seed=1)
    b = load_task("banking", max_train=64, seed=1)
    c = load_task("banking", max_train=64, seed=2)
    assert a["train"].texts == b["train"].texts and a["train"].labels == b["train"].labels
    assert a["train"].texts != c["train"].texts


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(UnknownTaskError, match="stackoverflow"):
        load_task("trec")


def test_lambda_grids() -> None:
    assert lambda_grid()[0] == 0.05 and lambda_grid()[-1] == 1.0 and len(lambda_grid()) == 20
    assert parse_grid("0.25:1") == (0.25, 0.5, 0.75, 1.0)
    assert parse_grid("0.1,0.3") == (0.1, 0.3)
    with pytest.raises(ConfigError):
        parse_grid("a,b")


@pytest.mark.parametrize("peak", [0.05, 0.3, 0.55, 0.85, 1.0])
def test_refine_search_finds_the_peak_of_a_unimodal_curve(peak: float) -> None:
    from tvbasis.eval.metrics import DEFAULT_GRID, refine_search

    calls: list[float] = []

    def score(lam: float) -> float:
        calls.append(lam)
        return -abs(lam - peak)

    assert refine_search(list(DEFAULT_GRID), score) == peak
    assert len(calls) <= 9 and len(set(calls)) == len(calls)


# ----------------------------------------------------------------------------- bad model / work dirs


def test_non_encoder_directories_are_rejected(tmp_path: Path) -> None:
    from transformers import BertConfig, GPT2Config

    with pytest.raises(ConfigError, match="does not exist"):
        Encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        Encoder(tmp_path / "empty")
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="garbage"):
        Encoder(bad)
    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(gpt)
    with pytest.raises(ConfigError, match="gpt2.*not an encoder"):
        Encoder(gpt)
    with pytest.raises(ConfigError, match="gpt2.*not an encoder"):  # fine-tuning checks before any work
        finetune("mcid", tmp_path / "work", FinetuneSettings(model_dir=str(gpt)))
    dec = tmp_path / "bert-decoder"
    BertConfig(is_decoder=True, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
               intermediate_size=64).save_pretrained(dec)
    with pytest.raises(ConfigError, match="is_decoder"):
        Encoder(dec)
    noweights = tmp_path / "bert-noweights"
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64
               ).save_pretrained(noweights)
    with pytest.raises(ConfigError, match="bert-noweights"):
        Encoder(noweights)


def test_unwritable_work_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        ensure_writable(blocker / "work")


# ----------------------------------------------------------------------------- the CI-size real run

TASKS = ("mcid", "DBPedia", "stackoverflow")  # large fine-tuning gains even with 4 steps on 2 layers
SETTINGS = FinetuneSettings(num_layers=2, max_train=128, max_length=32, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("evalwork")
    encoder = pretrained_encoder(work, SETTINGS)
    tasks = {t.name: t for t in (load_task(n, max_train=128, max_dev=128, max_test=160) for n in TASKS)}
    results = {n: finetune(t, work, SETTINGS, encoder=encoder, progress=False) for n, t in tasks.items()}
    return {"work": work, "encoder": encoder, "tasks": tasks, "results": results,
            "evaluator": Evaluator(encoder, tasks)}


def test_pretrained_and_finetuned_share_tensor_names(run: dict) -> None:
    work = run["work"]
    pre = load_state(work / "pretrained")
    assert len(pre) == len(run["encoder"].param_names)
    assert json.loads((work / "pretrained" / "config.json").read_text())["num_hidden_layers"] == 2
    for r in run["results"].values():
        ft = load_state(r.path)
        assert ft.keys() == pre.keys()
        meta = json.loads((r.path / FINETUNE_META).read_text())
        assert meta["n_train"] == 128 and meta["max_length"] == 32 and meta["layers_kept"] == 2
        assert meta["lr"] == 2e-4 and meta["batch_size"] == 32 and meta["train"]["steps"] == 4


def test_in_memory_edit_and_reset(run: dict) -> None:
    enc: Encoder = run["encoder"]
    r = run["results"]["mcid"]
    tv = task_vector_state(run["work"] / "pretrained", r.path)
    texts = run["tasks"]["mcid"]["test"].texts[:16]
    base = enc.encode(texts)
    enc.set_state(load_state(r.path))
    tuned = enc.encode(texts)
    enc.set_delta(tv, 1.0)
    assert torch.allclose(enc.encode(texts), tuned, atol=1e-5)
    with enc.at_pretrained():
        assert torch.equal(enc.encode(texts), base)
    assert torch.allclose(enc.encode(texts), tuned, atol=1e-5)  # edit restored after the context
    enc.reset()
    assert not enc.edited and torch.equal(enc.encode(texts), base)
    assert all(torch.equal(v, enc.pretrained_state[k]) for k, v in enc.model.state_dict().items())


def test_finetune_beats_zero_shot_and_arithmetic_works(run: dict) -> None:
    ev: Evaluator = run["evaluator"]
    work = run["work"]
    zs = ev.zero_shot("test")
    tvs = {n: task_vector_state(work / "pretrained", r.path) for n, r in run["results"].items()}
    ft_test = {n: ev.with_delta(tv, 1.0, "test", [n])[n] for n, tv in tvs.items()}
    ft_dev = {n: ev.with_delta(tv, 1.0, "dev", [n])[n] for n, tv in tvs.items()}
    for n in TASKS:
        assert ft_test[n] > zs[n] + 0.05, (n, ft_test[n], zs[n])

    total = {k: sum(tv[k] for tv in tvs.values()) for k in tvs[TASKS[0]]}
    add = ev.search_addition(total, grid=(0.3, 0.6, 1.0), finetuned_dev=ft_dev, finetuned_test=ft_test)
    assert add.lam in (0.3, 0.6, 1.0) and add.criterion == "normalized"
    assert add.mean_test > sum(zs.values()) / len(zs) + 0.05, (add.test, zs)
    assert add.mean_normalized_test > 0.8

    neg = ev.search_negation(tvs["DBPedia"], "DBPedia", "stackoverflow", grid=(0.25, 0.5, 1.0))
    assert neg.feasible and neg.lam > 0
    assert neg.target_test < zs["DBPedia"] - 0.05, neg
    assert neg.control_dev >= 0.95 * neg.pretrained_control_dev


def test_cached_finetune_reused_and_corrupt_one_rebuilt(run: dict, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    work = run["work"]
    task = run["tasks"]["mcid"]
    again = finetune(task, work, SETTINGS, encoder=run["encoder"], progress=False)
    assert again.reused

    copy = tmp_path / "work"
    shutil.copytree(work / "pretrained", copy / "pretrained")
    shutil.copytree(work / "finetuned" / "mcid", copy / "finetuned" / "mcid")
    weights = copy / "finetuned" / "mcid" / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    h = json.loads((copy / "finetuned" / "mcid" / FINETUNE_META).read_text())["config_hash"]
    assert "truncated" in (cache_problem(copy / "finetuned" / "mcid", FINETUNE_META, h) or "")
    assert "settings changed" in (cache_problem(copy / "finetuned" / "mcid", FINETUNE_META, "other") or "")
    with caplog.at_level(logging.INFO, logger="tvbasis.eval.finetune"):
        rebuilt = finetune(task, copy, SETTINGS, progress=False)
    assert not rebuilt.reused
    assert any("rebuilding fine-tune of mcid" in r.getMessage() for r in caplog.records)
    assert any("reusing pretrained" in r.getMessage() for r in caplog.records)
    assert weights.stat().st_size == len(data)
    # same seed, same data: the rebuilt fine-tune is the same model
    orig, new = load_state(run["results"]["mcid"].path), load_state(rebuilt.path)
    assert all(torch.allclose(orig[k], new[k], atol=1e-5) for k in orig)


def test_eval_cache_reads_back_only_the_same_weights_and_question(run: dict, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """bench --resume: a score is read back (no encoder pass) for the same edit, task and split; any other edit,
    split or task data runs the pass; a torn line is skipped."""
    enc: Encoder = run["encoder"]
    plain: Evaluator = run["evaluator"]
    tv = task_vector_state(run["work"] / "pretrained", run["results"]["mcid"].path)
    want = {"zs": plain.zero_shot("test"), "one": plain.with_delta(tv, 1.0, "test"),
            "half": plain.with_delta(tv, 0.5, "dev")}
    passes = []
    real = enc.encode_batches

    def counted(*a, **k):
        passes.append(1)
        return real(*a, **k)

    path = tmp_path / "eval-cache.jsonl"
    try:
        enc.encode_batches = counted  # type: ignore[method-assign]
        enc.eval_cache = EvalCache(path)
        ev = Evaluator(enc, run["tasks"])
        got = {"zs": ev.zero_shot("test"), "one": ev.with_delta(tv, 1.0, "test"), "half": ev.with_delta(tv, 0.5, "dev")}
        assert got == want
        assert len(passes) >= 3 * len(TASKS) and len(path.read_text().splitlines()) == 3 * len(TASKS)
        enc.eval_cache.close()
        with open(path, "a") as f:
            f.write('{"k": "torn line, a run killed mid-wr')
        enc.eval_cache = EvalCache(path)  # a resumed run: a new cache object on the same file, a new evaluator
        ev = Evaluator(enc, run["tasks"])
        assert "skipped 1 unreadable line" in caplog.text
        first = len(passes)  # building the heads encodes the label texts
        again = {"zs": ev.zero_shot("test"), "one": ev.with_delta(tv, 1.0, "test"),
                 "half": ev.with_delta(tv, 0.5, "dev")}
        assert again == want and len(passes) == first  # every score read back, no encoder pass
        # another λ, another vector, another split: passes run
        ev.with_delta(tv, 0.51, "dev", ["mcid"])
        assert len(passes) == first + 1
        bumped = {k: v.clone() for k, v in tv.items()}
        name = next(iter(bumped))
        bumped[name].view(-1)[0] += 1e-3
        assert ev.with_delta(bumped, 1.0, "test", ["mcid"])["mcid"] == pytest.approx(want["one"]["mcid"], abs=0.02)
        assert len(passes) == first + 2
        ev.with_delta(tv, 1.0, "dev", ["mcid"])
        assert len(passes) == first + 3
        # the same edit on other task data (fewer test examples): another context, a pass
        fewer = {n: load_task(n, max_train=128, max_dev=128, max_test=80) for n in ("mcid",)}
        small = Evaluator(enc, fewer)
        n = len(passes)
        small.with_delta(tv, 1.0, "test")
        assert len(passes) == n + 1
    finally:
        enc.encode_batches = real  # type: ignore[method-assign]
        if enc.eval_cache is not None:
            enc.eval_cache.close()
        enc.eval_cache = None


def test_bfloat16_inference_matches_an_autocast_reference_and_keeps_its_own_cache(run: dict, tmp_path: Path) -> None:
    """--eval-dtype bfloat16: the embeddings are the model's last hidden state under torch.autocast(bfloat16),
    mean-pooled and normalised as the test writes it; a float32 score is never read back for a bfloat16 pass."""
    enc: Encoder = run["encoder"]
    texts = ["how do I transfer money abroad", "my card was declined", "what is the weather like in Paris today"]
    toks = enc.tokenize(texts)
    inputs = enc.collate(toks, range(len(texts)))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = enc.model(**inputs).last_hidden_state.float()
    m = inputs["attention_mask"].unsqueeze(-1).float()
    ref = (hidden * m).sum(1) / m.sum(1)
    ref = ref / ref.norm(dim=1, keepdim=True)
    f32 = enc.encode(texts)
    try:
        enc.eval_dtype = torch.bfloat16
        got = enc.encode(texts)
        assert torch.allclose(got, ref, atol=1e-5)
        assert not torch.equal(got, f32)  # bfloat16 really ran
        assert (got * f32).sum(1).min() > 0.999  # and stays near float32
        assert enc.describe()["eval_dtype"] == "bfloat16"
        path = tmp_path / "eval-cache.jsonl"
        enc.eval_cache = EvalCache(path)
        enc.eval_dtype = torch.float32
        Evaluator(enc, run["tasks"]).zero_shot("test", ["mcid"])
        enc.eval_dtype = torch.bfloat16
        ev16 = Evaluator(enc, run["tasks"])
        before = enc.eval_cache.misses
        ev16.zero_shot("test", ["mcid"])
        assert enc.eval_cache.misses == before + 1  # computed again, not the float32 score read back
        keys = [json.loads(line)["k"].split("|") for line in path.read_text().splitlines()]
        assert len(keys) == 2 and keys[0][0] != keys[1][0] and keys[0][1:] == keys[1][1:]
    finally:
        enc.eval_dtype = torch.float32
        if enc.eval_cache is not None:
            enc.eval_cache.close()
        enc.eval_cache = None
