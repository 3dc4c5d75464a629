"""The user's own labelled files, and the accuracy of any local checkpoint on them.

Files: CSV (``.csv``), TSV (``.tsv``/``.tab``) with a header row, or JSON lines (``.jsonl``/``.ndjson``, one
object per line), each row a text and a label (columns ``text`` and ``label`` unless told otherwise). Labels are
read as strings (a JSONL ``3`` is the label ``"3"``); completely blank lines are skipped; everything else that
is not a labelled row is an error naming the file, the line and the column.

Classes: without a label-names file, the sorted set of labels found (over every file of the task, as the
benchmark sorts its labels), each head text cleaned by ``tasks.label_text`` as the benchmark does
(``card_arrival`` → "card arrival"). A label-names file fixes the classes and their order: one label per line
(optionally ``label<TAB>text for the head``), or a JSON list of labels, or a JSON object ``{label: text}``. A data
label must then be one of the names — or, when no name looks like a number, a class index ``0..C-1``.

Scoring (``score_tasks``): through the bundled encoder adapter (``Encoder``: mean pooling, frozen zero-shot
heads from the label texts, built with the weights the heads come from), or, for a sequence-classification
checkpoint, its own head (``SequenceClassifier``: argmax of its logits over ``config.id2label``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvbasis.errors import ConfigError, TensorMismatchError, UnknownTaskError
from tvbasis.eval.encoder import (
    CHARS_PER_TOKEN,
    EVAL_BATCH_SIZE,
    EVAL_DTYPES,
    Encoder,
    autocast_to,
    check_encoder_dir,
    set_threads,
)
from tvbasis.eval.inplace import InPlaceEdit
from tvbasis.eval.metrics import Evaluator
from tvbasis.eval.tasks import Split, Task, canonical_name, label_text
from tvbasis.io import open_checkpoint

log = logging.getLogger(__name__)

#: file suffix -> format
FORMATS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INDEX = re.compile(r"^\d+$")


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class LabelledRows:
    """The rows of one file, in file order: texts, raw labels and the line each row starts on."""

    path: Path
    texts: list[str]
    labels: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def file_format(path: Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise ConfigError(f"unknown data format {fmt!r}; expected csv, tsv or jsonl")
        return fmt
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ConfigError(f"{path}: cannot tell the format from the suffix {path.suffix or '(none)'!r}; expected "
                          f"{', '.join(FORMATS)} (or give --format csv|tsv|jsonl)") from None


def _text(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def read_rows(path: str | Path, text_column: str = "text", label_column: str = "label",
              fmt: str | None = None) -> LabelledRows:
    """The labelled rows of one CSV / TSV / JSONL file (see the module docstring); ConfigError naming the file,
    line and column for a missing column, an empty text or label, malformed JSON, or a file without rows."""
    path = Path(path)
    kind = file_format(path, fmt)
    raw = _text(path)
    if not raw.strip():
        raise ConfigError(f"{path}: empty file (expected a header row and labelled rows)")
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []

    def add(text: Any, label: Any, line: int) -> None:
        if text is None or (isinstance(text, str) and not text.strip()):
            raise ConfigError(f"{path} line {line}: empty text in column {text_column!r}")
        if not isinstance(text, str):
            raise ConfigError(f"{path} line {line}: column {text_column!r} must be a string, got {text!r}")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ConfigError(f"{path} line {line}: label {label!r} in column {label_column!r} must be a string "
                              f"or an integer")
        lab = str(label).strip()
        if not lab:
            raise ConfigError(f"{path} line {line}: empty label in column {label_column!r}")
        texts.append(" ".join(text.split()))
        labels.append(lab)
        lines.append(line)

    if kind == "jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path} line {i}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path} line {i}: expected a JSON object per line, got {type(obj).__name__}")
            for col in (text_column, label_column):
                if col not in obj:
                    raise ConfigError(f"{path} line {i}: no field {col!r} (fields: {', '.join(map(str, obj))}); "
                                      f"pick one with --{'text' if col == text_column else 'label'}-column")
            add(obj[text_column], obj[label_column], i)
    else:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.reader(io.StringIO(raw, newline=""), delimiter="," if kind == "csv" else "\t")
        try:
            header = next(reader)
        except csv.Error as e:
            raise ConfigError(f"{path} line 1: malformed {kind.upper()} header ({e})") from None
        names = [h.strip() for h in header]
        idx = {}
        for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if col not in names:
                raise ConfigError(f"{path}: no column {col!r} in the header (columns: {', '.join(names)}); "
                                  f"pick one with {flag}")
            idx[col] = names.index(col)
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                cells = [row[idx[c]] if idx[c] < len(row) else None for c in (text_column, label_column)]
                if cells[1] is None:
                    raise ConfigError(f"{path} line {line}: no value in column {label_column!r} "
                                      f"({len(row)} of {len(names)} fields)")
                add(cells[0], cells[1], line)
        except csv.Error as e:
            raise ConfigError(f"{path} line {reader.line_num}: malformed {kind.upper()} ({e})") from None
    if not texts:
        raise ConfigError(f"{path}: no labelled rows (only a header)" if kind != "jsonl" else
                          f"{path}: no labelled rows")
    return LabelledRows(path, texts, labels, lines)


@dataclass(frozen=True)
class LabelNames:
    """Classes fixed by a label-names file: names in class order and, where given, the head text of each."""

    path: Path
    names: tuple[str, ...]
    texts: dict[str, str] = field(default_factory=dict)


def read_label_names(path: str | Path) -> LabelNames:
    """A label-names file: one label per line (``label<TAB>head text`` optional), a JSON list of labels, or a
    JSON object {label: head text}."""
    path = Path(path)
    raw = _text(path)
    names: list[str] = []
    texts: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if isinstance(obj, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in obj):
            names = [str(x).strip() for x in obj]
        elif isinstance(obj, dict) and all(isinstance(v, str) for v in obj.values()):
            names = [str(k).strip() for k in obj]
            texts = {str(k).strip(): " ".join(v.split()) for k, v in obj.items() if v.strip()}
        else:
            raise ConfigError(f"{path}: expected a JSON list of labels or an object {{label: head text}}")
    else:
        for line in raw.splitlines():
            if not line.strip():
                continue
            name, _, text = line.partition("\t")
            names.append(name.strip())
            if text.strip():
                texts[name.strip()] = " ".join(text.split())
    if any(not n for n in names):
        raise ConfigError(f"{path}: an empty label name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: label {dup[0]!r} is listed twice")
    if not names:
        raise ConfigError(f"{path}: no label names")
    return LabelNames(path, tuple(names), texts)


def _benchmark_name(task: str) -> str | None:
    """The benchmark's name of ``task`` when it is one (its label cleaning then applies, e.g. 20NG's)."""
    try:
        return canonical_name(task)
    except UnknownTaskError:
        return None


def class_index(label: str, names: Sequence[str], index: Mapping[str, int], where: str, source: str) -> int:
    """The class of a raw label: its position among ``names``, or itself when it is a class index and no name
    looks like one; ConfigError naming the row otherwise."""
    if label in index:
        return index[label]
    if _INDEX.match(label) and not any(_INDEX.match(n) for n in names) and int(label) < len(names):
        return int(label)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise ConfigError(f"{where}: label {label!r} is not one of the {len(names)} labels of {source} ({shown})")


def build_task(name: str, splits: Mapping[str, LabelledRows], label_names: LabelNames | None = None,
               classes: Sequence[str] | None = None, classes_source: str = "") -> Task:
    """A ``Task`` of the user's rows. Classes: ``classes`` (e.g. a classifier's id2label), else the label-names
    file, else the sorted labels found in ``splits``; head texts from the file or cleaned as the benchmark does."""
    if classes is not None:
        names, source = tuple(classes), classes_source or "the model"
    elif label_names is not None:
        names, source = label_names.names, str(label_names.path)
    else:
        names, source = tuple(sorted({lab for rows in splits.values() for lab in rows.labels})), ""
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, Split] = {}
    for split, rows in splits.items():
        ys = [class_index(lab, names, index, f"{rows.path} line {line}", source)
              for lab, line in zip(rows.labels, rows.lines)] if source else [index[lab] for lab in rows.labels]
        out[split] = Split(list(rows.texts), ys)
    bench = _benchmark_name(name)
    given = label_names.texts if label_names is not None else {}
    texts = tuple(given.get(n) or label_text(n, bench) or n for n in names)
    if classes is None:
        files = ", ".join(str(r.path) for r in splits.values())
        if len(names) < 2:
            raise ConfigError(f"task {name}: {files} hold(s) only the label {names[0]!r}; a classifier needs at "
                              f"least 2 classes (give a label-names file with --labels {name}=FILE)")
        seen: dict[str, str] = {}
        for n, t in zip(names, texts):
            if t.lower() in seen:
                raise ConfigError(f"task {name}: labels {seen[t.lower()]!r} and {n!r} both read {t!r} as head text; "
                                  f"give a label-names file (--labels {name}=FILE, 'label<TAB>text' per line)")
            seen[t.lower()] = n
        if label_names is None and all(_INDEX.match(n) for n in names):
            log.warning("task %s: the labels (%s) look like class indices; the zero-shot head reads them as "
                        "text — give their names with --labels %s=FILE", name, ", ".join(names[:5]), name)
    return Task(name=name, label_names=names, label_texts=texts, splits=out, domain="user")


def load_user_task(name: str, files: Mapping[str, str | Path], text_column: str = "text",
                   label_column: str = "label", labels: str | Path | None = None, fmt: str | None = None,
                   classes: Sequence[str] | None = None, classes_source: str = "") -> Task:
    """Read a task's files (split -> file, e.g. {"dev": "bank-dev.csv", "test": "bank.csv"}) into a ``Task``."""
    rows = {split: read_rows(f, text_column, label_column, fmt) for split, f in files.items()}
    names = read_label_names(labels) if labels is not None else None
    if classes is not None and names is not None:
        if len(names.names) != len(classes):
            raise ConfigError(f"{names.path}: lists {len(names.names)} labels, the model has {len(classes)} classes")
        classes, classes_source = names.names, str(names.path)
    return build_task(name, rows, names, classes, classes_source)


# ------------------------------------------------------------------------------------------------ scoring
def is_causal_lm(model_dir: str | Path) -> bool:
    """True when the checkpoint's config names a ``*ForCausalLM`` architecture."""
    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in archs)


def is_sequence_classifier(model_dir: str | Path) -> bool:
    """True when the checkpoint's config names a ``*ForSequenceClassification`` architecture."""
    p = Path(model_dir) / "config.json"
    try:
        archs = json.loads(p.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


class SequenceClassifier(InPlaceEdit):
    """A local sequence-classification checkpoint with its own head: predictions are the argmax of its logits.
    ``set_delta`` edits the weights in place (θ + scale·delta), as ``Encoder.set_delta`` does."""

    def __init__(self, model_dir: str | Path, max_length: int = 128, batch_size: int = EVAL_BATCH_SIZE) -> None:
        set_threads()
        self.model_dir = Path(model_dir)
        check_encoder_dir(self.model_dir)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(self.model_dir),
                                                                            local_files_only=True)
        except Exception as e:
            raise ConfigError(f"{self.model_dir}: cannot load as a sequence classifier: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]) from None
        self.model.eval()
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        id2label = self.model.config.id2label or {}
        n = int(self.model.config.num_labels)
        self.class_names = tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(n))
        self._params = dict(self.model.state_dict(keep_vars=True))
        self._base: dict[str, torch.Tensor] = {}
        #: precision of inference: float32, or bfloat16 matrix products through autocast (``Encoder.eval_dtype``)
        self.eval_dtype: torch.dtype = torch.float32

    @torch.no_grad()
    def predict(self, texts: Sequence[str], progress: bool | str = False) -> torch.Tensor:
        m = self.max_length
        enc = self.tokenizer([t[: m * CHARS_PER_TOKEN] for t in texts], truncation=True, max_length=m,
                             padding=False)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        out = torch.empty(len(texts), dtype=torch.long)
        starts = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=progress if isinstance(progress, str) else "predict", unit="batch",
                          leave=False)
        with autocast_to(self.model, self.eval_dtype):
            for s in starts:
                idx = order[s:s + self.batch_size]
                batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, return_tensors="pt")
                out[torch.tensor(idx)] = self.model(**batch).logits.argmax(-1)
        return out


def keep_known(delta: Mapping[str, torch.Tensor], known: Any, what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``delta`` that ``known(name)`` resolves (a vector may cover a classifier head or layers the
    model lacks); ConfigError when none does."""
    kept = {k: v for k, v in delta.items() if known(k)}
    if not kept:
        raise ConfigError(f"{what}: none of its {len(delta)} tensors is a parameter of the model")
    if len(kept) < len(delta):
        left = sorted(set(delta) - set(kept))
        log.warning("%s: %d tensor(s) the model does not have are left out (%s%s)", what, len(left),
                    ", ".join(left[:3]), ", ..." if len(left) > 3 else "")
    return kept


def encoder_resolves(encoder: Encoder) -> Any:
    def known(name: str) -> bool:
        try:
            encoder._resolve(name)
        except TensorMismatchError:
            return False
        return True
    return known


@dataclass
class TaskScore:
    task: str
    file: str
    examples: int
    classes: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "examples": self.examples, "classes": self.classes, "correct": self.correct,
                "accuracy": self.accuracy}


def score_tasks(model_dir: str | Path, *, task_files: Mapping[str, str | Path] | None = None, head: str = "auto",
                heads_from: str | Path | None = None, delta: Mapping[str, torch.Tensor] | None = None,
                scale: float = 1.0, max_length: int = 128, batch_size: int = EVAL_BATCH_SIZE,
                text_column: str = "text", label_column: str = "label",
                labels: Mapping[str, str | Path] | None = None, fmt: str | None = None,
                progress: bool = False, what: str = "the edit", eval_dtype: str = "float32"
                ) -> tuple[str, dict[str, TaskScore]]:
    """Accuracy of ``model_dir`` (edited in memory to θ + scale·delta when ``delta`` is given) on each task file
    (name -> file). ``head``: ``encoder`` (the bundled adapter: mean pooling, frozen heads from label names —
    built from ``heads_from``'s weights when given, the model then loaded into that encoder), ``own`` (a
    sequence-classification checkpoint's head) or ``auto`` (own for such a checkpoint, unless ``heads_from``).
    ``eval_dtype``: a name of ``EVAL_DTYPES`` (bfloat16: matrix products through autocast). Returns the head used
    and the scores."""
    task_files = dict(task_files or {})
    if eval_dtype not in EVAL_DTYPES:
        raise ConfigError(f"--eval-dtype {eval_dtype!r}: expected one of {', '.join(EVAL_DTYPES)}")
    dtype = EVAL_DTYPES[eval_dtype]
    if not task_files:
        raise ConfigError("give at least one --task NAME=FILE")
    labels = dict(labels or {})
    unknown = sorted(set(labels) - set(task_files))
    if unknown:
        raise ConfigError(f"--labels {unknown[0]}=...: no --task named {unknown[0]!r}")
    if head not in ("auto", "encoder", "own", "lm"):
        raise ConfigError(f"unknown head {head!r}; expected auto, encoder, own or lm")
    if head == "auto":
        head = "own" if is_sequence_classifier(model_dir) and heads_from is None else "encoder"
        if heads_from is None and is_causal_lm(model_dir):
            head = "lm"
    if head in ("own", "lm") and heads_from is not None:
        raise ConfigError("--heads-from builds zero-shot heads: it applies to --head encoder only")
    out: dict[str, TaskScore] = {}
    if head == "lm":  # a causal LM: each class scored by the log-likelihood of its label text (eval/causal_lm.py)
        from tvbasis.eval.causal_lm import CausalLMScorer

        lm = CausalLMScorer(model_dir, max_length, batch_size)
        lm.eval_dtype = dtype
        loaded = {n: load_user_task(n, {"test": f}, text_column, label_column, labels.get(n), fmt)
                  for n, f in task_files.items()}
        if delta is not None:
            lm.set_delta(keep_known(delta, lm.resolve, what), scale)
        for n, t in loaded.items():
            pred = lm.predict(t["test"].texts, progress=f"{n}" if progress else False, label_texts=t.label_texts)
            correct = int((pred == torch.as_tensor(t["test"].labels)).sum())
            out[n] = TaskScore(n, str(task_files[n]), len(t["test"]), t.num_classes, correct)
        return head, out
    if head == "own":
        clf = SequenceClassifier(model_dir, max_length, batch_size)
        clf.eval_dtype = dtype
        loaded = {n: load_user_task(n, {"test": f}, text_column, label_column, labels.get(n), fmt,
                                    classes=clf.class_names, classes_source=f"{model_dir} (config.id2label)")
                  for n, f in task_files.items()}
        if delta is not None:
            clf.set_delta(keep_known(delta, clf.resolve, what), scale)
        for n, t in loaded.items():
            pred = clf.predict(t["test"].texts, progress=f"{n}" if progress else False)
            correct = int((pred == torch.as_tensor(t["test"].labels)).sum())
            out[n] = TaskScore(n, str(task_files[n]), len(t["test"]), t.num_classes, correct)
        return head, out
    loaded = {n: load_user_task(n, {"test": f}, text_column, label_column, labels.get(n), fmt)
              for n, f in task_files.items()}
    encoder = Encoder(heads_from if heads_from is not None else model_dir, max_length=max_length,
                      batch_size=batch_size)
    encoder.eval_dtype = dtype  # before the evaluator builds the heads: they are encoded in the same precision
    ev = Evaluator(encoder, loaded, splits=("test",), progress=progress)
    if heads_from is not None:  # the model's own weights into the encoder whose θ₀ built the heads
        ckpt = open_checkpoint(model_dir)
        state = {s.name: ckpt.get(s.name) for s in ckpt.specs() if s.is_float}
        state = keep_known(state, encoder_resolves(encoder), str(model_dir))
        model_delta = {k: v.float() - encoder.pretrained_state[encoder._resolve(k)].float() for k, v in state.items()}
        if delta is not None:
            for k, v in keep_known(delta, encoder_resolves(encoder), what).items():
                model_delta[k] = model_delta.get(k, 0) + scale * v.float()
        delta, scale = model_delta, 1.0
    elif delta is not None:
        delta = keep_known(delta, encoder_resolves(encoder), what)
    accs = ev.with_delta(delta, scale, "test") if delta is not None else ev.accuracies("test")
    for n, t in loaded.items():
        correct = int(round(accs[n] * len(t["test"])))
        out[n] = TaskScore(n, str(task_files[n]), len(t["test"]), t.num_classes, correct)
    return head, out
