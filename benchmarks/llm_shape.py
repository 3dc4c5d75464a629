"""Builds and merges on Llama-7B-shaped synthetic fine-tunes: wall ÷ one read of the inputs, peak memory, GB/min.

The model has Llama-2-7B's tensor shapes (hidden 4096, intermediate 11008, vocab 32000, 32 heads: per layer q/k/v/o
4096², gate/up 11008×4096, down 4096×11008 and two RMSNorm vectors; ``model.embed_tokens`` and ``lm_head``
32000×4096, the final norm), but only ``L`` of its 32 layers, in bfloat16, written as Hugging Face sharded
safetensors (``model-0000i-of-0000n.safetensors`` at most ``--shard-size`` each, plus ``model.safetensors.index.json``).
Each of the T fine-tunes is the pretrained model plus a low-rank-plus-noise delta per matrix (a rank-``rank``
cluster part shared by the tasks of one cluster, a rank-``rank`` private part, and dense Gaussian noise carrying
``--noise`` of the delta's energy), so the codecs have structure to find; vectors get Gaussian deltas.

For each layer count the family is generated, measured and deleted before the next (disk stays under about
three models' worth of stores plus the inputs). Per layer count, each row runs as its own ``tvbasis`` child process
(peak anonymous RSS over its process tree polled from /proc, as ``common.run_measured``), each paired with one
plain sequential read of every input file measured just before it, with the page cache prepared the same way
(dropped, when root) before the read and before the row:

* ``build --method pca -M 2`` (the plain build: a Gram pass and a materialisation pass, two reads);
* ``build --budget 64x`` (the allocation's measuring pass, the plan, the coded write), only at the layer counts
  in ``--budget-layers`` (it is the slow one);
* ``merge --method ties`` (one read, one model written).

    nice -n 10 python benchmarks/llm_shape.py --layers 2 4 --T 4 --budget-layers 2
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CacheMode,
    common_args,
    gb,
    log,
    markdown_table,
    run_measured,
    save_results,
    sequential_read,
    tvbasis_cmd,
)
from tvbasis.io import TensorSpec, parse_size, write_safetensors_file
from tvbasis.io.writer import plan_shards, shard_names

HIDDEN, INTER, VOCAB, HEADS, FULL_LAYERS = 4096, 11008, 32000, 32, 32


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Llama-2-7B with ``layers`` decoder layers, in a HF checkpoint's order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{m}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def llama_config(layers: int) -> dict[str, Any]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
            "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False, "max_position_embeddings": 4096}


def _gen(*parts: int) -> torch.Generator:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p) % (2**61 - 1)
    return torch.Generator().manual_seed(s)


def write_sharded(d: Path, shapes: dict[str, tuple[int, ...]], config: dict[str, Any], shard_size: str,
                  tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A HF sharded safetensors directory (index written even for one shard), atomically renamed into place."""
    tmp = d.parent / f".{d.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()]
    shards = plan_shards(specs, shard_size)
    names = shard_names("model", len(shards)) if len(shards) > 1 else ["model-00001-of-00001.safetensors"]
    it = iter(tensors)
    for shard, fname in zip(shards, names):
        write_safetensors_file(tmp / fname, shard, (next(it) for _ in shard), {"format": "pt"})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": {s.name: f for shard, f in zip(shards, names) for s in shard}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)


def make_llama_family(root: Path, layers: int, T: int, shard_size: str, rank: int = 8, clusters: int = 2,
                      noise: float = 0.2, delta_scale: float = 1e-3) -> tuple[Path, dict[str, Path]]:
    """Pretrained and T fine-tunes under ``root`` (reused when present). Per matrix of fine-tune t in cluster
    k = t mod clusters: Δ = delta_scale·(√(1−noise)·(U_k V_kᵀ + U_t V_tᵀ)/√(2·rank) + √noise·N), each part of
    unit RMS per element, so ``noise`` is the share of Δ's energy without structure."""
    shapes = llama_shapes(layers)
    config = llama_config(layers)
    names = list(shapes)
    pre = root / "pre"
    if not (pre / "model.safetensors.index.json").is_file():
        log(f"generating pretrained Llama-shaped model, {layers} layers, in {pre}")

        def pre_tensors() -> Iterable[tuple[str, torch.Tensor]]:
            for i, n in enumerate(names):
                if len(shapes[n]) == 1:
                    yield n, torch.ones(shapes[n], dtype=torch.bfloat16)
                else:
                    yield n, (torch.randn(shapes[n], generator=_gen(0, i)) * 0.02).to(torch.bfloat16)

        write_sharded(pre, shapes, config, shard_size, pre_tensors())
    from safetensors import safe_open
    index = json.loads((pre / "model.safetensors.index.json").read_text())["weight_map"]
    fts: dict[str, Path] = {}
    a, b = math.sqrt(1.0 - noise), math.sqrt(noise)
    for t in range(T):
        d = root / f"ft{t}"
        fts[f"task{t}"] = d
        if (d / "model.safetensors.index.json").is_file():
            continue
        log(f"generating fine-tune {t + 1}/{T} in {d}")

        def ft_tensors(t: int = t) -> Iterable[tuple[str, torch.Tensor]]:
            k = t % clusters
            handles: dict[str, Any] = {}
            for i, n in enumerate(names):
                f = index[n]
                if f not in handles:
                    handles = {f: safe_open(str(pre / f), framework="pt")}  # one shard open at a time
                base = handles[f].get_tensor(n).float()
                g = _gen(3, t, i)
                delta = torch.randn(base.shape, generator=g).mul_(b * delta_scale)
                if base.dim() == 2:
                    o, inn = base.shape
                    gk, gt = _gen(1, k, i), _gen(2, t, i)
                    u = torch.cat([torch.randn(o, rank, generator=gk), torch.randn(o, rank, generator=gt)], 1)
                    v = torch.cat([torch.randn(rank, inn, generator=gk), torch.randn(rank, inn, generator=gt)])
                    delta.addmm_(u, v, alpha=a * delta_scale / math.sqrt(2 * rank))
                else:
                    delta.mul_(1.0 / b if b else 1.0)
                yield n, base.add_(delta).to(torch.bfloat16)
                del delta, base

        write_sharded(d, shapes, config, shard_size, ft_tensors())
    return pre, fts


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="decoder layers per family (of 32)")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--shard-size", default="1GB", help="largest input shard (HF uses 5GB; at most 5GB)")
    ap.add_argument("--budget", default="64x")
    ap.add_argument("--budget-layers", type=int, nargs="*", default=None,
                    help="layer counts at which the --budget build runs (default: the smallest)")
    ap.add_argument("--budget-include", default="",
                    help="run the --budget build (and a plain build beside it) on these tensors only (needs a "
                    "tvbasis whose --budget takes --include)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per row; a row past it is killed and reported")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (hidden 64), to check the script runs")
    common_args(ap)
    a = ap.parse_args()
    if a.smoke:
        global HIDDEN, INTER, VOCAB, HEADS
        HIDDEN, INTER, VOCAB, HEADS = 64, 172, 500, 4
    if parse_size(a.shard_size) > parse_size("5GB"):
        ap.error("--shard-size at most 5GB")
    budget_layers = set(a.budget_layers if a.budget_layers is not None else [min(a.layers)])
    work = a.work / "llm-shape"
    work.mkdir(parents=True, exist_ok=True)
    cache = CacheMode(a.cache)
    runs: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for L in a.layers:
        root = work / f"llama-L{L}"
        t0 = time.perf_counter()
        pre, fts = make_llama_family(root, L, a.T, a.shard_size)
        gen_s = time.perf_counter() - t0
        files = [f for d in (pre, *fts.values()) for f in shard_files(d)]
        in_bytes = sum(f.stat().st_size for f in files)
        shapes = llama_shapes(L)
        largest = max(math.prod(s) for s in shapes.values()) * 2  # bf16 bytes
        ft_args = [x for n, p in fts.items() for x in ("--finetuned", f"{n}={p}")]
        plain = ["build", "--pretrained", str(pre), *ft_args, "--method", "pca", "-M", "2"]
        configs: list[tuple[str, list[str]]] = [("build pca -M 2 (plain)", plain)]
        if L in budget_layers:
            inc = ["--include", a.budget_include] if a.budget_include else []
            where = f" --include '{a.budget_include}'" if a.budget_include else ""
            if inc:
                configs.append((f"build pca -M 2{where} (plain)", [*plain, *inc]))
            configs.append((f"build --budget {a.budget}{where}", ["build", "--pretrained", str(pre), *ft_args,
                                                                  "--budget", a.budget, *inc]))
        configs.append(("merge ties", ["merge", "--pretrained", str(pre), *ft_args, "--method", "ties"]))
        log(f"L = {L}: {len(files)} input shards, {gb(in_bytes)} (generated in {gen_s:.0f} s)")
        plain_wall: dict[bool, float] = {}
        for label, args in configs:
            read = sequential_read(files, cache)
            out = work / "out"
            cache.prepare(files)
            log(f"L = {L}: {label} ... (read {read['seconds']:.1f} s)")
            m = run_measured(["timeout", str(a.timeout), *tvbasis_cmd(*args, "--workers", str(a.workers), "--out",
                                                                     str(out), "--force")], check=False)
            if m.returncode:
                log(f"    {'timed out' if m.returncode == 124 else 'failed'}: {m.stderr_tail[-1500:]}")
            out_bytes = dir_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
            sub = "--include" in args
            row_bytes = sum(math.prod(s) * 2 for n, s in shapes.items() if fnmatch.fnmatch(n, a.budget_include)) \
                * (a.T + 1) if sub else in_bytes
            ratio = m.wall_s / read["seconds"] if not sub else float("nan")
            gb_min = row_bytes / 1e9 / (m.wall_s / 60)
            if "plain" in label:
                plain_wall[sub] = m.wall_s
            x_plain = m.wall_s / plain_wall[sub] if "budget" in label else float("nan")
            goal_peak = 1e9 + a.T * largest
            r = {"layers": L, "T": a.T, "row": label, "input_bytes": in_bytes, "row_input_bytes": row_bytes,
                 "x_plain_same_tensors": x_plain, "timed_out": m.returncode == 124, "input_shards": len(files),
                 "largest_tensor_bytes": largest, "read": read, "x_read": ratio, "gb_per_min": gb_min,
                 "output_bytes": out_bytes, "peak_goal_bytes": goal_peak, **m.to_json()}
            runs.append(r)
            log(f"    {m.wall_s:.1f} s = {ratio:.2f}x one read, peak anon {gb(m.peak_anon_bytes)}, "
                f"{gb_min:.2f} GB/min")
            status = {0: None, 124: f"timed out at {a.timeout} s"}.get(m.returncode, "failed")
            rows.append([L, label, gb(row_bytes), f"{read['seconds']:.1f}", f"{m.wall_s:.1f}",
                         "–" if sub else f"{ratio:.2f}×", "–" if x_plain != x_plain else f"{x_plain:.2f}×",
                         f"{gb_min:.2f}", gb(m.peak_anon_bytes), gb(goal_peak),
                         status or ("yes" if m.peak_anon_bytes <= goal_peak else "**no**"), gb(out_bytes),
                         f"{m.loadavg_1m:.1f}"])
        shutil.rmtree(root, ignore_errors=True)  # the inputs go before the next family is generated
    head = (f"Llama-2-7B tensor shapes (hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB}, {HEADS} heads) with L "
            f"of its {FULL_LAYERS} layers, bfloat16, HF sharded safetensors (≤ {a.shard_size} shards + index), "
            f"T = {a.T} synthetic fine-tunes (rank-8 cluster + rank-8 private + 20 % noise energy per matrix), "
            f"engine local, {a.workers} workers, {os.cpu_count()} cores shared with other work (load column: 1-min "
            f"load average at the row's start), page cache {cache.mode} before every read and row. Each row's "
            "ratio is to the sequential read of all input shards measured just before it. Peak = the child's "
            "anonymous RSS summed over its process tree; goal = 1 GB + T × the largest tensor (embed/lm_head "
            f"{gb(VOCAB * HIDDEN * 2)} in bf16). The --budget row's '÷ plain' is to the plain build of the same "
            "inputs in the same run."
            + (" Rows with --include read only those tensors of every input; they are compared with a plain build of "
               "the same tensors, not with the read of all shards." if a.budget_include else "") + "\n\n")
    table = head + markdown_table(["L", "row", "inputs read", "read s (all shards)", "wall s", "÷ one read",
                                   "÷ plain (same tensors)", "GB/min", "peak anon", "peak goal", "peak met", "output",
                                   "load"], rows)
    save_results(a.name or "llm_shape", {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "cache": cache.mode, "runs": runs}, table)


if __name__ == "__main__":
    main()
