"""``tvbasis eval`` on the user's own labelled files: reading CSV / TSV / JSONL, label names, clear errors, and the
accuracy of a model directory (encoder adapter or its own head) against an independent scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.userfiles import MAX_LENGTH, Scorer, minilm_family, task_vector, write_csv
from tvbasis.cli import main
from tvbasis.errors import ConfigError
from tvbasis.eval.tasks import label_text
from tvbasis.eval.userdata import load_user_task, read_label_names, read_rows, score_tasks

BANK = [
    ("I am still waiting on my card?", "card_arrival"),
    ("What can I do if my card still hasn't arrived after 2 weeks?", "card_arrival"),
    ("How do I know if I will get my card, or if it is lost?", "card_arrival"),
    ("I'm still waiting for my refund, it doesn't show up.", "Refund_not_showing_up"),
    ("The refund I requested has not appeared in my account", "Refund_not_showing_up"),
    ("Where is the money you refunded me? It isn't in my account", "Refund_not_showing_up"),
    ("Why was I charged an extra fee for exchanging currency?", "exchange_charge"),
    ("What are the fees for currency exchange?", "exchange_charge"),
    ("How much does it cost to exchange money with this card?", "exchange_charge"),
    ("My card payment was reverted, why?", "reverted_card_payment?"),
    ("A payment I made with my card got reversed", "reverted_card_payment?"),
]
#: the head texts of these labels, cleaned as the benchmark cleans banking's labels (sorted raw labels)
BANK_CLASSES = ["Refund_not_showing_up", "card_arrival", "exchange_charge", "reverted_card_payment?"]
BANK_TEXTS = ["refund not showing up", "card arrival", "exchange charge", "reverted card payment"]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return minilm_family(tmp_path_factory)


# ------------------------------------------------------------------------------------------------ reading
def test_csv_tsv_jsonl_read_the_same_rows(tmp_path):
    rows = [("hello, world", "a"), ('say "hi"\nplease', "b"), ("third", "a")]
    write_csv(tmp_path / "x.csv", rows)
    write_csv(tmp_path / "x.tsv", [("hello, world", "a"), ("say hi please", "b"), ("third", "a")], delimiter="\t")
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y, "id": i})
                                                 for i, (t, y) in enumerate(rows)) + "\n\n")
    a, b, c = (read_rows(tmp_path / f"x.{s}") for s in ("csv", "tsv", "jsonl"))
    assert a.texts == ["hello, world", 'say "hi" please', "third"] and a.labels == ["a", "b", "a"]
    assert b.labels == c.labels == ["a", "b", "a"] and c.texts == a.texts
    assert a.lines == [2, 4, 5] and c.lines == [1, 2, 3]
    # other column names; integer JSON labels are labels too
    write_csv(tmp_path / "y.csv", [("t1", "x")], header=("sentence", "intent"))
    assert read_rows(tmp_path / "y.csv", "sentence", "intent").labels == ["x"]
    (tmp_path / "z.jsonl").write_text('{"text": "t", "label": 3}\n')
    assert read_rows(tmp_path / "z.jsonl").labels == ["3"]


def test_labels_from_the_data_are_sorted_and_cleaned_as_the_benchmark(tmp_path):
    task = load_user_task("bank", {"test": write_csv(tmp_path / "bank.csv", BANK)})
    assert list(task.label_names) == BANK_CLASSES and list(task.label_texts) == BANK_TEXTS
    assert task["test"].labels == [BANK_CLASSES.index(y) for _, y in BANK]


def test_label_names_files(tmp_path):
    data = write_csv(tmp_path / "d.csv", [("a text", "pos"), ("b text", "0"), ("c text", "neg")])
    (tmp_path / "names.txt").write_text("neg\tvery negative\npos\n\n")
    task = load_user_task("s", {"test": data}, labels=tmp_path / "names.txt")
    assert task.label_names == ("neg", "pos") and task.label_texts == ("very negative", "pos")
    assert task["test"].labels == [1, 0, 0]  # "0" is a class index: no name looks like a number
    (tmp_path / "names.json").write_text(json.dumps({"neg": "bad", "pos": "good", "neu": "neutral"}))
    assert load_user_task("s", {"test": data}, labels=tmp_path / "names.json").label_texts == ("bad", "good",
                                                                                               "neutral")
    assert read_label_names(tmp_path / "names.txt").names == ("neg", "pos")


@pytest.mark.parametrize("content, kwargs, match", [
    ("", {}, "empty file"),
    ("text,label\n", {}, "no labelled rows"),
    ("sentence,label\nhi,a\n", {}, r"no column 'text' in the header \(columns: sentence, label\); pick one with "
                                   r"--text-column"),
    ("text,label\nhi,a\nho,b\n", {"label_column": "intent"}, "no column 'intent'.*--label-column"),
    ("text,label\nhi,a\n,b\n", {}, "line 3: empty text"),
    ("text,label\nhi,a\nho,\n", {}, "line 3: empty label"),
    ("text,label\nhi,a\nho\n", {}, "line 3: no value in column 'label'"),
])
def test_reading_errors_name_file_line_and_column(tmp_path, content, kwargs, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_rows(p, **kwargs)


def test_more_reading_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_rows(tmp_path / "missing.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="cannot tell the format.*--format"):
        read_rows(tmp_path / "x.xlsx")
    (tmp_path / "x.jsonl").write_text('{"text": "a", "label": "b"}\n{"text": "a"\n')
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        read_rows(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text('{"text": "a", "label": "b"}\n{"sentence": "a", "label": "b"}\n')
    with pytest.raises(ConfigError, match="line 2: no field 'text' \\(fields: sentence, label\\)"):
        read_rows(tmp_path / "y.jsonl")
    data = write_csv(tmp_path / "d.csv", [("a", "pos"), ("b", "meh")])
    (tmp_path / "names.txt").write_text("neg\npos\n")
    with pytest.raises(ConfigError, match=r"d.csv line 3: label 'meh' is not one of the 2 labels of .*names.txt"):
        load_user_task("s", {"test": data}, labels=tmp_path / "names.txt")
    with pytest.raises(ConfigError, match="only the label 'pos'"):
        load_user_task("s", {"test": write_csv(tmp_path / "one.csv", [("a", "pos")])})
    with pytest.raises(ConfigError, match="both read 'a b' as head text"):
        load_user_task("s", {"test": write_csv(tmp_path / "dup.csv", [("x", "a_b"), ("y", "a-b")])})


# ------------------------------------------------------------------------------------------------ scoring
def test_eval_exact_form_model_dir_csv_json(minilm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "bank.csv", BANK)
    model = minilm["pre"]
    assert main(["-q", "eval", str(model), "--task", "bank=bank.csv", "--json", "out.json"]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert "bank" in capsys.readouterr().out
    s = Scorer(model)
    heads = s.encode(BANK_TEXTS)
    want = s.accuracy(BANK, BANK_CLASSES, heads)
    got = out["tasks"]["bank"]
    assert out["head"] == "encoder" and got["examples"] == len(BANK) and got["classes"] == 4
    assert got["correct"] == round(want * len(BANK)), (got, want)
    assert out["mean_accuracy"] == pytest.approx(want)


def test_eval_several_tasks_a_vector_and_heads_from(minilm, tmp_path):
    pre, ft = minilm["pre"], minilm["fts"]["mcid"]
    tv = tmp_path / "mcid.safetensors"
    assert main(["-q", "vector", "--pretrained", str(pre), "--finetuned", str(ft), "--out", str(tv)]) == 0
    tasks = [a for n in ("mcid", "DBPedia") for a in ("--task", f"{n}={minilm['test'][n]}")]
    tasks += ["--max-length", str(MAX_LENGTH)]
    assert main(["-q", "eval", str(pre), *tasks, "--vector", f"{tv}=1", "--scaling-coef", "0.5",
                 "--json", str(tmp_path / "v.json")]) == 0
    # the fine-tune itself with the pretrained model's heads (the benchmark's protocol)
    assert main(["-q", "eval", str(ft), "--heads-from", str(pre), *tasks, "--json", str(tmp_path / "f.json")]) == 0
    v, f = (json.loads((tmp_path / n).read_text()) for n in ("v.json", "f.json"))
    s = Scorer(pre, MAX_LENGTH)
    delta = task_vector(pre, ft)
    for name in ("mcid", "DBPedia"):
        rows = minilm["rows"][(name, "test")]
        classes = sorted({y for _, y in rows})
        s.set()
        heads = s.encode([label_text(c, name) for c in classes])
        for result, scale in ((v, 0.5), (f, 1.0)):
            s.set(delta, scale)
            want = s.accuracy(rows, classes, heads)
            assert result["tasks"][name]["correct"] == round(want * len(rows)), (name, scale, result["tasks"][name])
    s.set()


def test_eval_sequence_classifier_uses_its_own_head(minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification
    cfg = BertConfig.from_pretrained(str(minilm["pre"]), num_labels=3,
                                     id2label={0: "negative", 1: "neutral", 2: "positive"},
                                     label2id={"negative": 0, "neutral": 1, "positive": 2},
                                     architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    clf = BertForSequenceClassification(cfg).eval()
    clf.bert.load_state_dict(AutoModel.from_pretrained(str(minilm["pre"])).state_dict(), strict=False)
    d = tmp_path / "clf"
    clf.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(str(minilm["pre"]))
    tok.save_pretrained(d)
    rows = [("I love this", "positive"), ("terrible, awful", "negative"), ("it is a chair", "neutral"),
            ("great stuff", "positive"), ("meh", "1"), ("worst day", "0")]
    data = write_csv(tmp_path / "s.csv", rows)
    assert main(["-q", "eval", str(d), "--task", f"sent={data}", "--json", str(tmp_path / "o.json")]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    with torch.no_grad():
        pred = [int(clf(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t, _ in rows]
    gold = [2, 0, 1, 2, 1, 0]
    assert out["head"] == "own" and out["tasks"]["sent"]["classes"] == 3
    assert out["tasks"]["sent"]["correct"] == sum(p == g for p, g in zip(pred, gold))
    bad = write_csv(tmp_path / "bad.csv", [("x", "positive"), ("y", "happy")])
    with pytest.raises(ConfigError, match=r"bad.csv line 3: label 'happy' is not one of the 3 labels"):
        score_tasks(d, task_files={"sent": bad})


def test_eval_cli_errors_are_one_line(minilm, tmp_path, capsys):
    pre = str(minilm["pre"])
    (tmp_path / "empty.csv").write_text("")
    write_csv(tmp_path / "nolabel.csv", [("a", "b")], header=("text", "intent"))
    for args, frag in ((["--task", f"e={tmp_path / 'empty.csv'}"], "empty file"),
                       (["--task", f"n={tmp_path / 'nolabel.csv'}"], "no column 'label'"),
                       (["--task", "nofile"], "NAME=VALUE"),
                       ([], "--task"),
                       (["--task", f"n={tmp_path / 'nolabel.csv'}", "--add", "all"], "--store"),
                       (["--task", f"n={tmp_path / 'nolabel.csv'}", "--scaling-coef", "0.3"], "scales an edit")):
        assert main(["eval", pre, *args]) != 0, args
        err = capsys.readouterr().err.strip()
        assert frag in err and len(err.splitlines()) == 1, (args, err)
    assert not Path("out.json").exists()
