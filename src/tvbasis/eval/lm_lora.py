"""LoRA fine-tunes of a causal LM (``--model gemma3-270m``) on the benchmark tasks, cast as next-token label
prediction: the loss is −log p(label text | "Text: {text}\\nLabel:") over the label's tokens only
(``causal_lm.lm_label_loss``), so the LM head sees a handful of positions per example instead of every position
of a 262 k-token vocabulary; the embedding (tied to the head) is never trained.

Recipe: PEFT LoRA rank 8, α = 16, no dropout, on the attention and MLP projections of every decoder layer
(``LM_LINEARS``); AdamW lr 1e-3, weight decay 0, 6 % linear warm-up then linear decay, ``batch_size`` examples
per step, ``epochs`` epochs over at most ``max_train`` examples, fixed seed (the same A init for every task).

Layout: ``<work>/lm-lora/<task>/`` is a PEFT adapter directory over the causal LM's own directory (read by
``tvbasis.io`` like the encoder adapters of ``lora_finetune``) plus ``tvbasis-lora.json`` with the settings hash
and the adapter's checksum; a cached adapter is reused while both match.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tvbasis.errors import ConfigError
from tvbasis.eval.causal_lm import DEFAULT_TEMPLATE, lm_label_loss
from tvbasis.eval.encoder import autocast_to, set_threads
from tvbasis.eval.finetune import (
    FinetuneResult,
    FinetuneSettings,
    _lr_lambda,
    _read_meta,
    _versions,
    config_hash,
    ensure_writable,
    mean_or_nan,
    model_fingerprint,
)
from tvbasis.eval.lora_finetune import _PEFT_NOISE, LORA_META, LoraSettings, _write_adapter_dir, lora_cache_problem
from tvbasis.eval.tasks import Task

log = logging.getLogger(__name__)

LM_LORA_VERSION = 1
#: the attention and MLP projections of every decoder layer (Gemma / Llama naming)
LM_LINEARS = r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"


def lm_lora_settings(rank: int = 8) -> LoraSettings:
    return LoraSettings(r=rank, alpha=2.0 * rank, target_modules=LM_LINEARS, lr=1e-3)


def load_lm(model_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """(model in float32, tokenizer) of a local causal-LM directory; ConfigError naming it otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise ConfigError(f"{model_dir}: cannot load as a causal LM: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}"[:300]) from None
    return model, tok


def train_lm_lora(model: torch.nn.Module, tokenizer: object, task: Task, settings: FinetuneSettings,
                  lora: LoraSettings, template: str = DEFAULT_TEMPLATE, progress: bool = False,
                  max_steps: int | None = None, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.nn.Module, dict[str, object]]:
    """Train a LoRA adapter of ``model`` (modified: PEFT wraps it) on ``task``'s training split with the
    label-token loss; ``max_steps`` stops early (to time a step). ``dtype`` bfloat16: mixed precision (forward
    and backward matrix products under autocast; the weights, the adapter and AdamW's state stay float32).
    Returns (PEFT model, training stats)."""
    from peft import get_peft_model

    set_threads()
    torch.manual_seed(settings.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _PEFT_NOISE, FutureWarning)
        peft = get_peft_model(model, lora.peft_config())
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    train = task["train"]
    n = len(train)
    total = math.ceil(n / settings.batch_size) * settings.epochs
    warm = math.ceil(settings.warmup * total)
    opt = torch.optim.AdamW(params, lr=lora.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warm, total))
    gen = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    step_seconds: list[float] = []
    t0 = time.time()
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, settings.batch_size):
            if max_steps is not None and len(losses) >= max_steps:
                break
            ts = time.time()
            idx = perm[s:s + settings.batch_size]
            opt.zero_grad(set_to_none=True)
            with autocast_to(peft, dtype):
                loss = lm_label_loss(peft, tokenizer, [train.texts[i] for i in idx], task.label_texts,
                                     [train.labels[i] for i in idx], settings.max_length, template)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step_seconds.append(time.time() - ts)
            if progress:
                log.info("%s step %d/%d loss %.3f (%.1fs)", task.name, len(losses), total, losses[-1],
                         step_seconds[-1])
    peft.eval()
    k = max(1, len(losses) // 10)
    return peft, {"steps": len(losses), "planned_steps": total, "warmup_steps": warm,
                  "seconds": round(time.time() - t0, 2), "step_seconds": [round(x, 2) for x in step_seconds],
                  "loss_first": mean_or_nan(losses[:k]), "loss_last": mean_or_nan(losses[-k:]),
                  "trainable_parameters": sum(p.numel() for p in params),
                  "dtype": str(dtype).removeprefix("torch.")}


def lm_lora_finetune(task: Task, work: str | Path, model_dir: str | Path, settings: FinetuneSettings | None = None,
                     lora: LoraSettings | None = None, template: str = DEFAULT_TEMPLATE, force: bool = False,
                     progress: bool = False, dtype: torch.dtype = torch.float32) -> FinetuneResult:
    """Train (or reuse) the LoRA adapter of the causal LM in ``model_dir`` for ``task`` into
    ``<work>/lm-lora/<task>/`` (``dtype``: ``train_lm_lora``'s precision, part of the cache key)."""
    settings = settings or FinetuneSettings(batch_size=8)
    lora = lora or lm_lora_settings()
    settings.check()
    lora.check()
    if len(task["train"]) > settings.max_train:
        raise ConfigError(f"{task.name}: {len(task['train'])} training examples loaded, "
                          f"more than max_train={settings.max_train}")
    work = ensure_writable(work)
    s = asdict(replace(settings, model_dir=None))
    record = {"kind": "tvbasis-lm-lora", "version": LM_LORA_VERSION, "model_files": model_fingerprint(Path(model_dir)),
              "task": task.name, "train": [list(task["train"].texts), list(task["train"].labels)],
              "label_texts": list(task.label_texts), "template": template, "settings": s, "lora": asdict(lora)}
    if dtype != torch.float32:  # float32 keeps the key of adapters trained before the setting existed
        record["dtype"] = str(dtype)
    h = config_hash(record)
    out = work / "lm-lora" / task.name
    ensure_writable(out.parent)
    problem = "forced" if force else lora_cache_problem(out, h)
    if problem is None:
        return FinetuneResult(task.name, out, True, _read_meta(out / LORA_META) or {})
    model, tok = load_lm(model_dir)
    peft, stats = train_lm_lora(model, tok, task, settings, lora, template, progress, dtype=dtype)
    meta = {k: v for k, v in record.items() if k != "train"}
    meta.update(config_hash=h, pretrained_dir=str(Path(model_dir).resolve()), created=time.time(), train=stats,
                **_versions())
    _write_adapter_dir(out, peft, Path(model_dir).resolve(), meta)
    log.info("trained LoRA adapter of %s on %s in %.1fs (loss %.3f -> %.3f) -> %s", Path(model_dir).name,
             task.name, stats["seconds"], stats["loss_first"], stats["loss_last"], out)
    return FinetuneResult(task.name, out, False, _read_meta(out / LORA_META) or meta)
