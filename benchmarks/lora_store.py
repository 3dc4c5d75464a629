"""``tvbasis build`` from T LoRA adapters directly, against the same build from the adapters merged into full
checkpoints (what a user without adapter support would have to do: merge_and_unload each, then build), and the
factor-space stores of the same adapters (``--method lora-factors``, plain and ``--factor-codec int8``, and
``--method lora-joint`` at a few k), which never expand ΔW = s·B·A.

The adapters are written in PEFT's on-disk layout (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A/B.weight``; the reader is tested against PEFT's own merge) for a synthetic
BERT-like pretrained model: rank r on the query and value projections of every layer, B = B_cluster + B_task so
the Gram has structure. Reported per build (child process, page cache prepared the same way before each): wall
and CPU time, peak private memory, bytes read (inputs on disk) and bytes of the store on disk.

    python benchmarks/lora_store.py                       # T = 16 adapters (r = 16) of a 400 MB fp32 model
    python benchmarks/lora_store.py --T 32 --size 1GB --rank 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CacheMode,
    _gen,
    _write_model,
    common_args,
    gb,
    log,
    make_family,
    markdown_table,
    mb,
    run_measured,
    save_results,
    tvbasis_cmd,
)
from tvbasis.io import open_checkpoint, open_finetuned
from tvbasis.store import BasisStore

TARGETS = ("attention.self.query", "attention.self.value")


def write_adapter(d: Path, pre_dir: Path, layers: int, hidden: int, rank: int, t: int, clusters: int) -> None:
    if (d / "adapter_model.safetensors").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    k = t % clusters
    for i in range(layers):
        for j, m in enumerate(TARGETS):
            key = f"base_model.model.encoder.layer.{i}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=_gen(7, 1, t, i, j)) / hidden ** 0.5
            tensors[f"{key}.lora_B.weight"] = 1e-3 * (torch.randn(hidden, rank, generator=_gen(7, 2, k, i, j))
                                                      + torch.randn(hidden, rank, generator=_gen(7, 3, t, i, j)))
    from safetensors.torch import save_file
    save_file(tensors, str(d / "adapter_model.safetensors"), {"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["query", "value"],
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": str(pre_dir)}, indent=1))


def write_merged(d: Path, pre_dir: Path, adapter: Path, config: dict) -> None:
    """pretrained + s·B·A as a full checkpoint in the pretrained dtype (PEFT's merge_and_unload)."""
    if (d / "model.safetensors").is_file():
        return
    pre = open_checkpoint(pre_dir)
    ck = open_finetuned(adapter, pre)
    shapes = {s.name: s.shape for s in pre.specs()}
    _write_model(d, shapes, torch.float32, config, ((n, ck.get(n).to(pre.spec(n).dtype)) for n in shapes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=16, help="number of adapters (default 16)")
    ap.add_argument("--size", default="400MB", help="pretrained model size (default 400MB)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="pca")
    ap.add_argument("-M", type=int, help="bases (default T/4)")
    ap.add_argument("--joint-k", type=int, nargs="+", default=[64, 128], help="k of the lora-joint rows")
    ap.add_argument("--cluster-k", type=int, default=64, help="k of the clustered lora-joint row")
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fam = make_family(a.work, a.size, "float32", T=0)
    hidden, layers = fam.config["hidden_size"], fam.config["num_hidden_layers"]
    root = fam.root / f"lora-r{a.rank}"
    adapters = {f"task{t:02d}": root / f"ad{t:02d}" for t in range(a.T)}
    merged = {n: root / f"merged-{p.name}" for n, p in adapters.items()}
    for t, (n, p) in enumerate(adapters.items()):
        write_adapter(p, fam.pretrained, layers, hidden, a.rank, t, clusters=4)
        if not (merged[n] / "model.safetensors").is_file():
            log(f"merging adapter {t + 1}/{a.T} into a full checkpoint ({mb(fam.model_bytes)})")
        write_merged(merged[n], fam.pretrained, p, fam.config)
    M = a.M or max(1, a.T // 4)
    cache = CacheMode(a.cache)
    adapter_bytes = sum(f.stat().st_size for p in adapters.values() for f in p.iterdir())
    adapter_files = [p / "adapter_model.safetensors" for p in adapters.values()]
    builds = [
        (f"{a.method} -M {M}", "LoRA adapters", adapters, adapter_files, ["--method", a.method, "-M", str(M)]),
        (f"{a.method} -M {M}", "merged full checkpoints", merged, [p / "model.safetensors" for p in merged.values()],
         ["--method", a.method, "-M", str(M)]),
        ("lora-factors", "LoRA adapters", adapters, adapter_files, ["--method", "lora-factors"]),
        ("lora-factors --factor-codec int8", "LoRA adapters", adapters, adapter_files,
         ["--method", "lora-factors", "--factor-codec", "int8"]),
        *[(f"lora-joint -k {k}", "LoRA adapters", adapters, adapter_files, ["--method", "lora-joint", "-k", str(k)])
          for k in a.joint_k],
        (f"lora-joint -k {a.cluster_k} --clusters 4 --affinity subspace", "LoRA adapters", adapters, adapter_files,
         ["--method", "lora-joint", "-k", str(a.cluster_k), "--clusters", "4", "--affinity", "subspace"]),
    ]
    rows, runs = [], []
    for label, what, fts, files, method_args in builds:
        inputs = [fam.pretrained / "model.safetensors", *files]
        store = a.work / "store-lora"
        cache.prepare(inputs)
        log(f"build {label} from {a.T} {what} ...")
        args = ["--pretrained", str(fam.pretrained)]
        for n, p in fts.items():
            args += ["--finetuned", f"{n}={p}"]
        m = run_measured(tvbasis_cmd("build", *args, *method_args, "--out", str(store), "--force"))
        built = BasisStore.open(store)
        store_bytes, tensors = built.nbytes, len(built.specs)
        errs = built.rel_errors
        shutil.rmtree(store, ignore_errors=True)
        in_bytes = sum(f.stat().st_size for f in inputs)
        mean_err, max_err = sum(errs.values()) / len(errs), max(errs.values())
        log(f"  {m.wall_s:.1f} s, CPU {m.cpu_s:.1f} s, peak anon {gb(m.peak_anon_bytes)}, store {mb(store_bytes)}, "
            f"rel err mean {mean_err:.4f} max {max_err:.4f}")
        runs.append({"method": label, "inputs": what, **m.to_json(), "input_bytes": in_bytes,
                     "store_bytes": store_bytes, "tensors": tensors, "rel_errors": errs,
                     "rel_error_mean": mean_err, "rel_error_max": max_err})
        rows.append([label, what, gb(in_bytes), f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}", gb(m.peak_anon_bytes),
                     str(tensors), mb(store_bytes), f"{store_bytes / adapter_bytes:.2f}", f"{mean_err:.4f}",
                     f"{max_err:.4f}"])
    head = (f"`tvbasis build` of T = {a.T} LoRA adapters (r = {a.rank}, query and value of {layers} layers) of a "
            f"synthetic BERT-like pretrained model of {gb(fam.model_bytes)} fp32 (hidden {hidden}), page cache "
            f"{cache.mode} before each build. The T adapters take {mb(adapter_bytes)} on disk. Rows 1-2: a dense "
            f"{a.method} store, directly from the adapters and from the same adapters merged into full checkpoints "
            "(input files = pretrained + the T inputs; from adapters only the tensors they change are read). "
            "Then the factor-space stores, which never expand ΔW = s·B·A: lora-factors (every adapter's own "
            "factors; with int8 factors), lora-joint (per tensor shared U, V and per-adapter k × k cores; "
            "clustered: one shared basis per cluster of adapters). rel err = ‖ΔW_t − ΔW̃_t‖ / ‖ΔW_t‖ of every "
            "adapter as the store records it (exact, from the factors), mean and max over the T adapters. "
            "This family is adversarial for shared bases: every adapter's A is an independent random matrix, so a "
            "shared V must span Σr = " + str(a.T * a.rank) + " directions per tensor to be exact "
            "(benchmarks/results/lora_factors.md). 1-min load average during the builds "
            f"{min(r['loadavg_1m'] for r in runs):.1f}–{max(r['loadavg_1m'] for r in runs):.1f} on "
            f"{os.cpu_count()} CPUs.\n\n")
    table = head + markdown_table(["store", "inputs", "input files", "wall s", "CPU s", "peak anon", "tensors in store",
                                   "store on disk", "× adapters", "mean rel err", "max rel err"], rows)
    save_results(a.name or "lora_store", {"params": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(a).items()},
                                          "model_bytes": fam.model_bytes, "config": fam.config,
                                          "adapter_bytes": adapter_bytes, "runs": runs}, table)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
