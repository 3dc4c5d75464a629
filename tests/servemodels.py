"""Tiny transformers models and their fine-tunes / LoRA adapters, built inside the tests of using a store
(test_serve.py, test_export_lora.py, test_lifecycle.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

F64 = torch.float64


def bert(seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def full_family(root: Path, T: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0
                ) -> tuple[Path, dict[str, Path], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A tiny BERT saved at root/pre and T full fine-tunes (every float tensor moved by 0.05·N(0, 1)) at root/ft{t}:
    (pretrained dir, {task: dir}, θ₀, {task: θ_t}), the states in ``dtype``."""
    base = bert(seed).to(dtype)
    base.save_pretrained(str(root / "pre"))
    g = torch.Generator().manual_seed(seed + 1)
    dirs, states = {}, {}
    for t in range(T):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(dtype))
        m.save_pretrained(str(root / f"ft{t}"))
        dirs[f"task{t}"] = root / f"ft{t}"
        states[f"task{t}"] = state(m)
    return root / "pre", dirs, state(base), states


def lora_family(root: Path, T: int = 3, seed: int = 0, **config: object
                ) -> tuple[Path, dict[str, Path], dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A tiny BERT at root/pre and T PEFT LoRA adapters of it (random non-zero A, B) at root/ad{t}:
    (pretrained dir, {task: adapter dir}, θ₀, {task: PEFT's merge_and_unload state})."""
    import peft

    base = bert(seed)
    base.save_pretrained(str(root / "pre"))
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "word_embeddings"], **config}
    dirs, merged = {}, {}
    for t in range(T):
        torch.manual_seed(seed + 10 + t)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))  # type: ignore[arg-type]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(str(root / f"ad{t}"))
        dirs[f"task{t}"] = root / f"ad{t}"
        merged[f"task{t}"] = state(model.merge_and_unload())
    return root / "pre", dirs, state(base), merged


def rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], pre: dict[str, torch.Tensor],
        keys: list[str]) -> float:
    """‖got − want‖ / ‖want − θ₀‖ over ``keys`` (float64)."""
    num = sum(float((got[k].to(F64) - want[k].to(F64)).pow(2).sum()) for k in keys)
    den = sum(float((want[k].to(F64) - pre[k].to(F64)).pow(2).sum()) for k in keys)
    return (num / den) ** 0.5
