"""Build the legacy store fixtures of ``tests/test_store_compat.py`` with the tvbasis on ``PYTHONPATH``.

They were built by tvbasis at commit d1e36e1 (before store methods became a registry, issue 26), from the source
of that commit alone::

    git archive d1e36e1 src | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head/src python tests/data/legacy_stores/make.py

The tiny model and its fine-tunes / LoRA adapters are made deterministically here (``model_states``,
``adapter_factors``): the test imports these functions to compute the true task vectors itself. Each store
directory sits next to ``expected.safetensors``, every task's reconstruction (``{store}/{task}/{tensor}``) read back
by that tvbasis right after the build.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TASKS = ("a", "b", "c")
SHAPES = {
    "emb.weight": (12, 6),
    "layer.0.attn.query.weight": (6, 6),
    "layer.0.attn.query.bias": (6,),
    "layer.0.out.weight": (8, 6),
    "layer.1.attn.query.weight": (6, 6),
    "norm.weight": (6,),
}
#: modules the LoRA adapters touch (``{module}.weight`` of ``SHAPES``) and their rank
LORA_MODULES = ("layer.0.attn.query", "layer.1.attn.query")
LORA_RANK = 2
LORA_ALPHA = 4.0
PFX = "base_model.model."
#: store name -> how it is built (``build_store`` keywords; ``lora`` ones through ``build_lora_store``)
STORES: dict[str, dict[str, object]] = {
    "pca_m2": {"method": "pca", "M": 2},
    "pca_residual": {"method": "pca", "M": 1, "residual": "int8", "codec": "float16"},
    "tall": {"method": "tall", "M": None},
    "tvq": {"method": "tvq", "M": None, "options": {"bits": 4}},
    "lora_factors": {"lora": "factors"},
}


def model_states() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The pretrained state and one fine-tuned state per task (float32, deterministic)."""
    g = torch.Generator().manual_seed(26)
    pre = {n: torch.randn(s, generator=g, dtype=torch.float32) * 0.5 for n, s in SHAPES.items()}
    fts = {
        t: {n: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float32) for n, v in pre.items()} for t in TASKS
    }
    return pre, fts


def adapter_factors() -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per task and LoRA module its (B, A) factors (ΔW = alpha/r · B·A), float32, deterministic."""
    g = torch.Generator().manual_seed(27)
    out = {}
    for t in TASKS:
        out[t] = {
            m: (
                0.1 * torch.randn(SHAPES[m + ".weight"][0], LORA_RANK, generator=g),
                0.1 * torch.randn(LORA_RANK, SHAPES[m + ".weight"][1], generator=g),
            )
            for m in LORA_MODULES
        }
    return out


def _save_model(sd: dict[str, torch.Tensor], d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 6}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def _save_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], d: Path) -> Path:
    d.mkdir(parents=True)
    tensors = {}
    for module, (B, A) in factors.items():
        tensors[f"{PFX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PFX}{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(d / "adapter_model.safetensors"), {"format": "pt"})
    (d / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": LORA_RANK,
                "lora_alpha": LORA_ALPHA,
                "bias": "none",
                "fan_in_fan_out": False,
                "target_modules": sorted({m.rsplit(".", 1)[1] for m in factors}),
            }
        )
    )
    return d


def main() -> None:
    from tvbasis.store import BasisStore, build_store
    from tvbasis.store.factor import build_lora_store

    pre, fts = model_states()
    expected: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre_dir = _save_model(pre, root / "pre")
        ft_dirs = {t: _save_model(fts[t], root / f"ft_{t}") for t in TASKS}
        ad_dirs = {t: _save_adapter(f, root / f"ad_{t}") for t, f in adapter_factors().items()}
        for name, how in STORES.items():
            out = root / name
            if "lora" in how:
                store = build_lora_store(pre_dir, ad_dirs, out, method=str(how["lora"]))
            else:
                kw: dict = dict(how)
                store = build_store(pre_dir, ft_dirs, kw.pop("method"), kw.pop("M"), out, **kw)
            assert store.verify() == [], name
            for t in TASKS:
                for k, v in BasisStore.open(out).reconstruct(t).items():
                    expected[f"{name}/{t}/{k}"] = v.to(torch.float32).contiguous()
            store.close()
            dst = HERE / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(out, dst, ignore=shutil.ignore_patterns(".tvbasis.lock"))
    save_file(expected, str(HERE / "expected.safetensors"))
    print(f"wrote {len(STORES)} stores and {len(expected)} expected tensors under {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
