"""tvbasis `merge --config` against mergekit itself on the same YAML configs (not a test dependency).

Builds a tiny Llama (transformers' LlamaForCausalLM, random weights, float32) and fine-tunes of it (base +
0.05·N(0, 1) per tensor), then for each config runs mergekit's ``run_merge`` and ``tvbasis merge --config`` and
compares every output tensor: the largest absolute difference and the relative difference of the merged task
vectors, ‖(θ_tv − θ₀) − (θ_mk − θ₀)‖ / ‖θ_mk − θ₀‖ over the whole model. Methods with random drops (dare_*,
della*) draw from different generators in the two tools and are compared in distribution only (the relative
norm difference of the merged task vectors), which the table says.

mergekit must be importable: install it anywhere (it is not a tvbasis dependency), e.g.
``pip install --no-deps --target /tmp/mk mergekit==0.1.5 immutables`` next to tvbasis's venv, then
``python benchmarks/mergekit_compare.py --mergekit-path /tmp/mk``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.cli import main as tvbasis_main

L = 4
CONFIGS: dict[str, tuple[str, str]] = {  # name -> (kind: exact | random, YAML)
    "linear (examples/linear.yml)": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0}
          - model: ft_b
            parameters: {weight: 0.3}
          - model: ft_c
            parameters: {weight: 0.5}
        merge_method: linear
        dtype: float32
        """),
    "task_arithmetic": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 0.7}
          - model: ft_b
            parameters: {weight: [0.2, 1.0]}
        merge_method: task_arithmetic
        base_model: base
        parameters: {lambda: 0.8}
        dtype: float32
        """),
    "ties (examples/bio-merge.yml)": ("exact", """\
        models:
          - model: ft_a
            parameters: {density: 0.5, weight: 0.5}
          - model: ft_b
            parameters: {density: 0.5, weight: 0.5}
        merge_method: ties
        base_model: base
        parameters: {normalize: false, int8_mask: true}
        dtype: float32
        """),
    "ties (examples/ties.yml)": ("exact", """\
        models:
          - model: ft_a
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: ft_b
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
          - model: ft_c
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: base
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
        """),
    "slerp (examples/gradient-slerp.yml)": ("exact", f"""\
        slices:
          - sources:
              - model: ft_a
                layer_range: [0, {L}]
              - model: ft_b
                layer_range: [0, {L}]
        merge_method: slerp
        base_model: ft_a
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
        """),
    "nuslerp (base model)": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0}
          - model: ft_b
            parameters: {weight: 3.0}
        merge_method: nuslerp
        base_model: base
        dtype: float32
        """),
    "nuslerp (no base, row-wise)": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 2.0}
          - model: ft_b
            parameters: {weight: 1.0}
        merge_method: nuslerp
        parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
        dtype: float32
        """),
    "model_stock": ("exact", """\
        models:
          - model: ft_a
          - model: ft_b
          - model: ft_c
        merge_method: model_stock
        base_model: base
        dtype: float32
        """),
    "breadcrumbs": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
          - model: ft_b
            parameters: {weight: 0.5, density: 0.8, gamma: 0.1}
        merge_method: breadcrumbs
        base_model: base
        dtype: float32
        """),
    "breadcrumbs_ties": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
          - model: ft_b
            parameters: {weight: 0.5, density: 0.8, gamma: 0.1}
        merge_method: breadcrumbs_ties
        base_model: base
        parameters: {normalize: true}
        dtype: float32
        """),
    "arcee_fusion (examples/arcee_fusion.yml, float32)": ("exact", """\
        models:
          - model: ft_a
          - model: ft_b
        merge_method: arcee_fusion
        base_model: ft_a
        dtype: float32
        """),
    "sce": ("exact", """\
        models:
          - model: ft_a
          - model: ft_b
          - model: ft_c
        merge_method: sce
        base_model: base
        parameters: {select_topk: 0.4}
        dtype: float32
        """),
    "multislerp (base model)": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0}
          - model: ft_b
            parameters: {weight: 2.0}
          - model: ft_c
            parameters: {weight: 0.5}
        merge_method: multislerp
        base_model: base
        dtype: float32
        """),
    "multislerp (no base)": ("exact", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0}
          - model: ft_b
            parameters: {weight: 0.7}
        merge_method: multislerp
        dtype: float32
        """),
    "nearswap": ("exact", """\
        models:
          - model: ft_a
        merge_method: nearswap
        base_model: base
        parameters: {t: 0.02}
        dtype: float32
        """),
    "karcher (base model)": ("exact", """\
        models:
          - model: ft_a
          - model: ft_b
        merge_method: karcher
        base_model: base
        dtype: float32
        """),
    "karcher (no base)": ("exact", """\
        models:
          - model: ft_a
          - model: ft_b
          - model: ft_c
        merge_method: karcher
        parameters: {max_iter: 20}
        dtype: float32
        """),
    "dare_ties": ("random", """\
        models:
          - model: ft_a
            parameters: {weight: 0.5, density: 0.6}
          - model: ft_b
            parameters: {weight: 0.3, density: 0.8}
        merge_method: dare_ties
        base_model: base
        dtype: float32
        """),
    "della": ("random", """\
        models:
          - model: ft_a
            parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
          - model: ft_b
            parameters: {weight: 1.0, density: 0.7}
        merge_method: della
        base_model: base
        parameters: {lambda: 1.0}
        dtype: float32
        """),
}


def make_models(work: Path, seed: int) -> None:
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():  # random norms too, so no tensor is all ones
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(str(work / "base"))
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"]):
        g = torch.Generator().manual_seed(seed + 1 + i)
        ft = transformers.LlamaForCausalLM(cfg).eval()
        ft.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        ft.save_pretrained(str(work / name))


def read(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return {k: v.double() for k, v in out.items()}


def run_mergekit(cfg_text: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    conf = MergeConfiguration.model_validate(yaml.safe_load(cfg_text))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_merge(conf, str(out), options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False, write_model_card=False,
                                                       random_seed=0))


def compare(base: dict[str, torch.Tensor], mk: dict[str, torch.Tensor], tv: dict[str, torch.Tensor]) -> dict[str, Any]:
    common = sorted(set(mk) & set(tv))
    missing = sorted(set(mk) ^ set(tv))
    max_abs = max(float((mk[k] - tv[k]).abs().max()) for k in common)
    num = sum(float((tv[k] - mk[k]).pow(2).sum()) for k in common) ** 0.5
    den = sum(float((mk[k] - base[k]).pow(2).sum()) for k in common) ** 0.5
    n_tv = sum(float((tv[k] - base[k]).pow(2).sum()) for k in common) ** 0.5
    worst = max(common, key=lambda k: float((mk[k] - tv[k]).abs().max()))
    differing = max(int((mk[k] - tv[k]).abs().gt(1e-6).sum()) for k in common)
    return {"tensors": len(common), "unmatched": missing, "max_abs_diff": max_abs, "rel_diff": num / den,
            "norm_ratio": n_tv / den, "worst_tensor": worst, "max_entries_differing_per_tensor": differing}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-path", help="a directory to put on sys.path for `import mergekit`")
    ap.add_argument("--work", default="/tmp/tvbasis-mergekit-compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="mergekit_compare")
    args = ap.parse_args()
    if args.mergekit_path:
        sys.path.insert(0, args.mergekit_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mergekit asks the Hub whether model names are repos
    from importlib.metadata import version

    import mergekit  # noqa: F401  (fails here, with its own message, when it is not installed)
    try:
        mk_version = version("mergekit")
    except Exception:
        mk_version = next((p.name.split("-")[1] for p in Path(args.mergekit_path or ".").glob("mergekit-*.dist-info")),
                          "unknown")
    work = Path(args.work)
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.chdir(work)  # both tools resolve the configs' relative model paths against the current directory
    make_models(work, args.seed)
    base = read(work / "base")
    rows, results = [], []
    for name, (kind, text) in CONFIGS.items():
        cfg_text = textwrap.dedent(text)
        slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
        (work / f"{slug}.yml").write_text(cfg_text)
        t0 = time.perf_counter()
        run_mergekit(cfg_text, work / f"mk_{slug}")
        t_mk = time.perf_counter() - t0
        t0 = time.perf_counter()
        rc = tvbasis_main(["-q", "merge", "--config", f"{slug}.yml", "--out", f"tv_{slug}"])
        t_tv = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"tvbasis refused {name}")
        r = {"config": name, "kind": kind, **compare(base, read(work / f"mk_{slug}"), read(work / f"tv_{slug}")),
             "mergekit_s": t_mk, "tvbasis_s": t_tv}
        results.append(r)
        log(f"{name}: max |diff| {r['max_abs_diff']:.2e}, rel {r['rel_diff']:.2e}")
        rows.append([name, kind, r["tensors"], f"{r['max_abs_diff']:.1e}", f"{r['rel_diff']:.1e}",
                     f"{r['norm_ratio']:.4f}", r["max_entries_differing_per_tensor"], r["worst_tensor"]])
    table = markdown_table(["config", "compared", "tensors", "max abs diff", "rel diff of merged τ",
                            "‖τ_tv‖/‖τ_mk‖", "entries > 1e-6 apart (max per tensor)", "worst tensor"], rows)
    note = (f"mergekit {mk_version} vs tvbasis merge --config, tiny Llama (hidden 64, {L} layers, float32), fine-tunes "
            "= base + 0.05 N(0,1). 'random' rows draw drop masks from different generators: only the norm ratio "
            "is comparable there. tvbasis maps mergekit's TIES to rounding=floor, mergekit's int(density*n) kept "
            "entries, so ties.yml's fractional gradient densities match too.")
    save_results(args.name, {"mergekit_version": mk_version, "layers": L, "seed": args.seed, "rows": results,
                             "note": note}, note + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
