"""Tiny models built inside the tests, saved in every supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "embeddings.word_embeddings.weight": (50, 8),
    "embeddings.position_ids": (16,),  # integer buffer
    "encoder.layer.0.attention.query.weight": (8, 8),
    "encoder.layer.0.attention.query.bias": (8,),
    "encoder.layer.0.output.dense.weight": (12, 8),
    "encoder.layer.1.attention.query.weight": (8, 8),
    "encoder.layer.1.output.dense.weight": (12, 8),
    "encoder.layer.1.output.LayerNorm.weight": (8,),
    "pooler.dense.weight": (8, 8),
}


def pretrained_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[0], dtype=torch.int64)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.5).to(dtype)
    return out


def finetune_states(pre: dict[str, torch.Tensor], T: int, clusters: int | None = None, seed: int = 1,
                    noise: float = 0.05) -> list[dict[str, torch.Tensor]]:
    """T fine-tunes; with ``clusters`` their task vectors are planted around that many orthogonal-ish centres."""
    g = torch.Generator().manual_seed(seed)
    centres = [{k: torch.randn(v.shape, generator=g) for k, v in pre.items() if v.is_floating_point()}
               for _ in range(clusters or T)]
    out = []
    for t in range(T):
        c = centres[t % len(centres)]
        sd = {}
        for k, v in pre.items():
            if not v.is_floating_point():
                sd[k] = v.clone()
                continue
            delta = (c[k] + noise * torch.randn(v.shape, generator=g)) if clusters else torch.randn(v.shape, generator=g)
            sd[k] = (v.float() + 0.1 * delta).to(v.dtype)
        out.append(sd)
    return out


def save_hf(sd: dict[str, torch.Tensor], d: Path, layout: str = "safetensors") -> Path:
    """Save in a layout: safetensors | sharded | bin | bin-sharded | pt-wrapped | file."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (d / "tokenizer.json").write_text("{}")
    names = list(sd)
    if layout == "safetensors":
        save_file(sd, str(d / "model.safetensors"))
    elif layout == "sharded":
        half = len(names) // 2
        parts = [names[:half], names[half:]]
        wm = {}
        for i, part in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, str(d / fn))
            wm.update({k: fn for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    elif layout == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    elif layout == "bin-sharded":
        half = len(names) // 2
        wm = {}
        for i, part in enumerate([names[:half], names[half:]]):
            fn = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, d / fn)
            wm.update({k: fn for k in part})
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    elif layout == "pt-wrapped":
        torch.save({"state_dict": sd, "epoch": 3}, d / "model.pt")
    elif layout == "file":
        save_file(sd, str(d / "weights.safetensors"))
        return d / "weights.safetensors"
    else:
        raise ValueError(layout)
    return d


def make_family(root: Path, T: int = 4, clusters: int | None = None, layout: str = "safetensors",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Path, dict[str, Path], dict, list[dict]]:
    pre = pretrained_state(seed, dtype)
    fts = finetune_states(pre, T, clusters, seed + 1)
    p = save_hf(pre, root / "pre", layout)
    ft_paths = {f"task{t}": save_hf(sd, root / f"ft{t}", layout) for t, sd in enumerate(fts)}
    return p, ft_paths, pre, fts


def dense_vector(pre: dict, ft: dict) -> dict[str, torch.Tensor]:
    return {k: ft[k].double() - pre[k].double() for k in pre if pre[k].is_floating_point()}


def flat(sd: dict[str, torch.Tensor], keys: list[str] | None = None) -> torch.Tensor:
    keys = keys or sorted(sd)
    return torch.cat([sd[k].reshape(-1).double() for k in keys])


def dense_V(pre: dict, sds: list[dict]) -> tuple[torch.Tensor, list[str]]:
    """The task vectors as the columns of a dense float64 matrix V (D, T), and the tensor order used."""
    vs = [dense_vector(pre, sd) for sd in sds]
    keys = sorted(vs[0])
    return torch.stack([flat(v, keys) for v in vs], 1), keys


def ft_args(fts: dict[str, Path]) -> list[str]:
    """--finetuned NAME=PATH arguments for the CLI."""
    return [a for n, p in fts.items() for a in ("--finetuned", f"{n}={p}")]
