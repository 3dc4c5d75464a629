"""One PEFT LoRA adapter per task on the same pretrained encoder, with the task's frozen zero-shot head.

The protocol of ``finetune.py`` (same data subset, loss on 20·cos logits, AdamW with weight decay 0, 6 %
linear warm-up then linear decay, batch 32 in length-sorted micro-batches, 1 epoch, max length 64, fixed seed)
with only the LoRA matrices trained: rank 8, α = 16 (s = 2), no dropout, on every linear layer of the
transformer blocks (query, key, value, attention output, intermediate and output dense; not the pooler, which
the mean-pooled embedding never uses), lr 1e-3 (LoRA's usual 10× the full fine-tune's 2e-4: B starts at zero).
PEFT's default init (A Kaiming-uniform, B = 0) under ``torch.manual_seed(seed)``, so every task's adapter
starts from the same A — as adapters trained from one recipe with one seed do.

Layout: ``<work>/lora/<task>/`` is a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, read by ``tvbasis.io.LoraCheckpoint`` over ``<work>/pretrained``) plus
``tvbasis-lora.json``, which records the hash of everything that determines the adapter (the fine-tune record
of ``finetune.py`` with the LoRA settings) and the adapter file's size and sha256. A cached adapter is reused
only when both match and the file opens; otherwise it is retrained (logged why). Writes are atomic.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tvbasis.errors import CheckpointError, ConfigError
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.finetune import (
    PRETRAINED_META,
    FinetuneResult,
    FinetuneSettings,
    _read_meta,
    _task_record,
    _versions,
    config_hash,
    ensure_writable,
    file_sha256,
    prepare_pretrained,
    pretrained_encoder,
    train_loop,
)
from tvbasis.eval.tasks import Task, load_task
from tvbasis.io.atomic import ANY, atomic_output

log = logging.getLogger(__name__)

LORA_RECIPE_VERSION = 1
LORA_META = "tvbasis-lora.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: transformers deprecation noise that PEFT triggers (not ours to fix)
_PEFT_NOISE = ".*is_gradient_checkpointing.*"
#: every linear layer of the transformer blocks (PEFT matches a string as a full-name regex)
BLOCK_LINEARS = r".*layer\.\d+\..*(query|key|value|dense)$"


@dataclass(frozen=True)
class LoraSettings:
    """What the adapter adds to the fine-tune settings (``FinetuneSettings.lr`` is replaced by ``lr``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = BLOCK_LINEARS
    lr: float = 1e-3

    def check(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ConfigError(f"invalid LoRA settings: {self}")

    def peft_config(self) -> object:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias="none")


def lora_record(task: Task, settings: FinetuneSettings, lora: LoraSettings, pretrained_hash: str
                ) -> dict[str, object]:
    """The fine-tune record of ``finetune.py`` for the same task and data, made a LoRA one."""
    rec = _task_record(task, settings, pretrained_hash)
    rec.update(kind="tvbasis-lora", lora_recipe_version=LORA_RECIPE_VERSION, lr=lora.lr, lora=asdict(lora))
    return rec


def lora_cache_problem(directory: Path, expected_hash: str) -> str | None:
    """Why the cached adapter in ``directory`` cannot be reused (None = it can)."""
    if not directory.exists():
        return "not built yet"
    meta = _read_meta(directory / LORA_META)
    if meta is None:
        return f"{LORA_META} is missing or unreadable"
    if meta.get("config_hash") != expected_hash:
        return f"settings changed (hash {meta.get('config_hash')} != {expected_hash})"
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file() or not (directory / ADAPTER_CONFIG).is_file():
        return f"{ADAPTER_WEIGHTS} or {ADAPTER_CONFIG} is missing"
    recorded = (meta.get("files") or {}).get(ADAPTER_WEIGHTS) or {}
    if weights.stat().st_size != recorded.get("size") or file_sha256(weights) != recorded.get("sha256"):
        return f"{ADAPTER_WEIGHTS} differs from the recorded size/checksum (truncated or corrupt)"
    try:
        json.loads((directory / ADAPTER_CONFIG).read_text())
        from safetensors import safe_open
        with safe_open(str(weights), "pt") as f:
            f.keys()
    except Exception as e:
        return f"the adapter does not open ({type(e).__name__})"
    return None


def train_lora(encoder: Encoder, task: Task, settings: FinetuneSettings, lora: LoraSettings,
               progress: bool = True) -> tuple[torch.nn.Module, dict[str, object]]:
    """Train a LoRA adapter of a copy of the encoder's θ₀ on ``task``; returns (PEFT model, training stats)."""
    from peft import get_peft_model

    torch.manual_seed(settings.seed)  # the same A init for every task
    with encoder.at_pretrained(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", _PEFT_NOISE, FutureWarning)
        model = get_peft_model(copy.deepcopy(encoder.model), lora.peft_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stats = train_loop(encoder, model, params, lora.lr, task, settings, f"LoRA {task.name}", progress)
    return model, {**stats, "trainable_parameters": sum(p.numel() for p in params)}


def _write_adapter_dir(out: Path, model: torch.nn.Module, pre_dir: Path, meta: dict[str, object]) -> None:
    with atomic_output(out, force=True, kind=ANY) as tmp:  # a stale cached adapter is replaced
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _PEFT_NOISE, FutureWarning)
            model.save_pretrained(str(tmp), safe_serialization=True)
        if not (tmp / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"save_pretrained wrote no {ADAPTER_WEIGHTS} in {tmp}")
        cfg = json.loads((tmp / ADAPTER_CONFIG).read_text())
        cfg["base_model_name_or_path"] = str(pre_dir)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        meta = dict(meta, files={ADAPTER_WEIGHTS: {"size": (tmp / ADAPTER_WEIGHTS).stat().st_size,
                                                   "sha256": file_sha256(tmp / ADAPTER_WEIGHTS)}})
        (tmp / LORA_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def lora_finetune(task: str | Task, work: str | Path, settings: FinetuneSettings | None = None,
                  lora: LoraSettings | None = None, encoder: Encoder | None = None, force: bool = False,
                  progress: bool = True) -> FinetuneResult:
    """Train θ₀'s LoRA adapter for one task into ``<work>/lora/<task>/`` (or reuse the valid cached one)."""
    settings = settings or FinetuneSettings()
    lora = lora or LoraSettings()
    settings.check()
    lora.check()
    work = ensure_writable(work)
    pre_dir = prepare_pretrained(work, settings)
    pre_hash = str((_read_meta(pre_dir / PRETRAINED_META) or {}).get("config_hash"))
    if not isinstance(task, Task):
        task = load_task(task, max_train=settings.max_train, seed=settings.data_seed)
    elif len(task["train"]) > settings.max_train:
        raise ConfigError(f"{task.name}: {len(task['train'])} training examples loaded, "
                          f"more than max_train={settings.max_train}")
    record = lora_record(task, settings, lora, pre_hash)
    h = config_hash(record)
    out = work / "lora" / task.name
    ensure_writable(out.parent)
    problem = "forced" if force else lora_cache_problem(out, h)
    if problem is None:
        log.info("reusing cached LoRA adapter of %s in %s", task.name, out)
        return FinetuneResult(task.name, out, True, _read_meta(out / LORA_META) or {})
    if problem != "not built yet":
        log.warning("retraining LoRA adapter of %s in %s: %s", task.name, out, problem)
    if encoder is None or Path(encoder.model_dir).resolve() != pre_dir.resolve():
        encoder = Encoder(pre_dir, max_length=settings.max_length)
    model, stats = train_lora(encoder, task, settings, lora, progress=progress)
    meta = dict(record, config_hash=h, pretrained_dir=str(pre_dir.resolve()), created=time.time(), train=stats,
                **_versions())
    _write_adapter_dir(out, model, pre_dir.resolve(), meta)
    log.info("trained LoRA adapter of %s in %.1fs (loss %.3f -> %.3f) -> %s", task.name, stats["seconds"],
             stats["loss_first"], stats["loss_last"], out)
    return FinetuneResult(task.name, out, False, _read_meta(out / LORA_META) or meta)


def lora_finetune_tasks(tasks: list[str] | dict[str, Task], work: str | Path,
                        settings: FinetuneSettings | None = None, lora: LoraSettings | None = None,
                        force: bool = False, progress: bool = True) -> dict[str, FinetuneResult]:
    """Train (or reuse) every task's adapter; θ₀ is loaded once."""
    settings = settings or FinetuneSettings()
    encoder = pretrained_encoder(work, settings)
    items = tasks.values() if isinstance(tasks, dict) else tasks
    out = {}
    for t in items:
        r = lora_finetune(t, work, settings, lora, encoder=encoder, force=force, progress=progress)
        out[r.task] = r
    return out


__all__ = ["BLOCK_LINEARS", "LORA_META", "LoraSettings", "lora_cache_problem", "lora_finetune",
           "lora_finetune_tasks", "lora_record", "train_lora"]
