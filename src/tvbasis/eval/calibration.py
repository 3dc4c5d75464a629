"""Calibration statistics for ``tvbasis build --budget ... --calibration NAME=FILE``: what a task's own text does
inside its fine-tuned model, so the allocator can weigh each tensor's coding error by the output error it causes.

One forward pass over the texts (no gradients, no labels) with hooks on every ``nn.Linear`` and ``nn.Embedding``:

- a linear layer's input second moment per feature, ``E[x_j²]`` over every non-padding token (its root is the
  column scale the ``colscale`` codec codes ``ΔW·diag(s)`` with: the mean square output error of ``E·x`` is
  ``‖E·diag(s)‖²`` for uncorrelated features);
- an embedding table's row frequencies (which token ids, positions or token types the text uses, and how often):
  an error in row ``t`` perturbs only the tokens that look it up.

Returned in the model's parameter names (``<module>.weight``); ``tvbasis.store.budget`` matches them to the
checkpoint's tensor names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tvbasis.compress.budget import TaskCalibration
from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import Encoder


@torch.no_grad()
def collect(encoder: Encoder, texts: Sequence[str], max_length: int | None = None,
            batch_size: int | None = None) -> TaskCalibration:
    """Input second moments of every linear layer and row frequencies of every embedding of ``encoder``'s live
    model over ``texts`` (padding excluded)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ConfigError("calibration: no non-empty text to calibrate with")
    model = encoder.model
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []
    handles = []

    def linear_hook(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            m = mask_now[0] if mask_now and x.ndim == 3 and x.shape[:2] == mask_now[0].shape else None
            flat = x.reshape(-1, x.shape[-1])
            if m is not None:
                flat = flat[m.reshape(-1)]
            acc = (flat * flat).sum(0, dtype=torch.float64)
            sums[name] = sums.get(name, 0) + acc
            counts[name] = counts.get(name, 0) + torch.tensor(float(flat.shape[0]), dtype=torch.float64)
        return hook

    def embedding_hook(name: str, rows: int):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            ids = args[0].detach()
            m = mask_now[0] if mask_now and ids.shape == mask_now[0].shape else None
            flat = ids.reshape(-1) if m is None else ids[m]
            c = torch.bincount(flat.long().clamp(0, rows - 1), minlength=rows).to(torch.float64)
            counts[name] = counts.get(name, 0) + c
        return hook

    for mod_name, module in model.named_modules():
        key = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_hook(key)))
        elif isinstance(module, torch.nn.Embedding):
            handles.append(module.register_forward_pre_hook(embedding_hook(key, module.num_embeddings)))
    tokens = 0
    try:
        toks = encoder.tokenize(texts, max_length)
        for _idx, inputs in encoder.batches(toks, batch_size):
            mask = inputs["attention_mask"].bool()
            mask_now[:] = [mask]
            tokens += int(mask.sum())
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        mask_now.clear()
    col_rms = {k: (v / counts[k].clamp_min(1.0)).sqrt().float() for k, v in sums.items()}
    row_freq = {k: (v / v.sum().clamp_min(1.0)).float() for k, v in counts.items() if k not in sums}
    return TaskCalibration(col_rms=col_rms, row_freq=row_freq, tokens=tokens, texts=len(texts))


def calibrate_model(model_dir: str | Path, texts: Sequence[str], max_length: int = 128,
                    batch_size: int | None = None) -> TaskCalibration:
    """``collect`` on the model saved at ``model_dir`` (a fine-tune: the inputs its own layers see)."""
    return collect(Encoder(model_dir, max_length=max_length), texts, max_length, batch_size)


#: the most calibration texts read from one file (a few hundred give stable second moments)
MAX_CALIBRATION_TEXTS = 100_000


def read_texts(path: str | Path, text_column: str = "text", limit: int | None = None) -> list[str]:
    """The texts of one calibration file: ``.txt`` one text per line; ``.csv`` / ``.tsv`` / ``.jsonl`` the
    ``text_column`` of each row (labels not needed; the files ``tvbasis eval`` reads work as they are).
    ConfigError naming the file (and row) when it is unreadable, has no such column, or holds no text."""
    import csv
    import io
    import json

    from tvbasis.eval.userdata import FORMATS, _text
    path = Path(path)
    raw = _text(path)
    suffix = path.suffix.lower()
    texts: list[str] = []
    if suffix == ".txt":
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
    elif suffix in FORMATS:
        kind = FORMATS[suffix]
        if kind == "jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ConfigError(f"{path}: line {i} is not JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                    raise ConfigError(f"{path}: line {i} has no text field {text_column!r}")
                texts.append(row[text_column])
        else:
            reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if kind == "tsv" else ",")
            if reader.fieldnames is None or text_column not in reader.fieldnames:
                raise ConfigError(f"{path}: no column {text_column!r} (columns: {reader.fieldnames})")
            texts = [row[text_column] for row in reader if isinstance(row.get(text_column), str)]
    else:
        raise ConfigError(f"{path}: calibration text must be .txt (one text per line), .csv, .tsv or .jsonl")
    texts = [t for t in texts if t.strip()][: limit or MAX_CALIBRATION_TEXTS]
    if not texts:
        raise ConfigError(f"{path}: no calibration text in it")
    return texts
