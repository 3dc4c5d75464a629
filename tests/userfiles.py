"""The bundled MiniLM cut to 1 layer, two real fine-tunes of it, the user's labelled files written as CSV, and
an independent scorer (plain transformers: mean pooling, cosine to the label texts) for the expectations."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tvbasis.eval.finetune import FinetuneSettings, finetune, pretrained_encoder
from tvbasis.eval.tasks import load_task

TASKS = ("mcid", "DBPedia")
#: tokens per text in the eval/tune tests (their CLI calls pass --max-length 32 too): keeps the forward passes cheap
MAX_LENGTH = 32
SETTINGS = FinetuneSettings(num_layers=1, max_train=64, max_length=32, seed=0)
_CACHE: dict[str, dict] = {}


def write_csv(path: Path, rows: Sequence[tuple[str, str]], header: tuple[str, str] = ("text", "label"),
              delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def minilm_family(tmp_path_factory) -> dict:
    """{work, pre, fts: {task: dir}, dev/test: {task: csv}, rows: {(task, split): [(text, raw label)]}} (built once
    per test session)."""
    if "fam" not in _CACHE:
        work = tmp_path_factory.mktemp("minilm")
        enc = pretrained_encoder(work, SETTINGS)
        out: dict = {"work": work, "pre": work / "pretrained", "fts": {}, "dev": {}, "test": {}, "rows": {}}
        for name in TASKS:
            task = load_task(name, max_train=64, max_dev=16, max_test=16, seed=0)
            out["fts"][name] = finetune(task, work, SETTINGS, encoder=enc, progress=False).path
            for split in ("dev", "test"):
                rows = [(x, task.label_names[y]) for x, y in zip(task[split].texts, task[split].labels)]
                out["rows"][(name, split)] = rows
                out[split][name] = write_csv(work / f"{name}-{split}.csv", rows)
        _CACHE["fam"] = out
    return _CACHE["fam"]


class Scorer:
    """Sentence embeddings of a BERT directory by plain transformers calls (one padded batch): the
    attention-masked mean of the last hidden states, L2-normalised; a text's class is the label text of highest
    cosine."""

    def __init__(self, model_dir: Path, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self.params = dict(self.model.named_parameters())
        self.base = {k: v.detach().clone() for k, v in self.params.items()}
        self.max_length = max_length

    @torch.no_grad()
    def set(self, delta: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0) -> None:
        """Weights θ₀ + scale·delta (θ₀ as loaded)."""
        for k, p in self.params.items():
            p.copy_(self.base[k] + scale * delta[k].float() if delta and k in delta else self.base[k])

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tok(list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        h = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def predict(self, texts: Sequence[str], heads: torch.Tensor) -> torch.Tensor:
        return (self.encode(texts) @ heads.T).argmax(-1)

    def accuracy(self, rows: Sequence[tuple[str, str]], classes: Sequence[str], heads: torch.Tensor) -> float:
        pred = self.predict([x for x, _ in rows], heads)
        gold = torch.tensor([list(classes).index(y) for _, y in rows])
        return float((pred == gold).float().mean())


def task_vector(pre: Path, ft: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    a, b = load_file(str(pre / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    return {k: b[k].float() - a[k].float() for k in a if a[k].is_floating_point()}
