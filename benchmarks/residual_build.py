"""A residual store's build against a plain build of the same bases: wall time, CPU and peak memory.

``tvbasis build --residual CODEC`` codes every task's residual r_t = v_t − v̂_t in the materialisation pass (whole
tensors, the T slices of one tensor in a buffer that spills to a memory-mapped scratch file above 256 MB), so it
still reads the inputs twice; the goal is a wall time within 1.5× the plain build's and a peak memory bounded by
tensors, flat in T. Each configuration runs in a child process (``-q``), the page cache prepared the same way
before each, plain and residual builds interleaved so that drift on the machine hits both.

    python benchmarks/residual_build.py                         # T = 16, 250MB fp32 synthetic family, M = 4
    python benchmarks/residual_build.py --T 8 16 --size 250MB
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CacheMode,
    common_args,
    gb,
    log,
    make_family,
    markdown_table,
    run_measured,
    save_results,
    tvbasis_cmd,
)

#: (label, extra build arguments); the first is the baseline every ratio is taken against
CONFIGS: list[tuple[str, list[str]]] = [
    ("pca -M 4 (plain)", ["--method", "pca", "-M", "{M}"]),
    ("pca -M 4 --residual int8", ["--method", "pca", "-M", "{M}", "--residual", "int8"]),
    ("pca -M 4 --residual lowrank:rank=16+int8", ["--method", "pca", "-M", "{M}", "--residual", "lowrank:rank=16+int8"]),
    ("pca -M 4 --codec int8 --residual int4", ["--method", "pca", "-M", "{M}", "--codec", "int8", "--residual", "int4"]),
    ("pca -M 0 --residual int8", ["--method", "pca", "-M", "0", "--residual", "int8"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[16])
    ap.add_argument("--size", default="250MB")
    ap.add_argument("-M", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fam = make_family(a.work, a.size, "float32", max(a.T))
    cache = CacheMode(a.cache)
    runs, rows = [], []
    for T in a.T:
        files = fam.input_files(T)
        base = None
        for label, extra in CONFIGS:
            label = label.replace("-M 4", f"-M {a.M}")
            store = a.work / "store-residual"
            cache.prepare(files)
            log(f"T = {T}: build {label} ...")
            args = [x.replace("{M}", str(a.M)) for x in extra]
            m = run_measured(tvbasis_cmd("build", *fam.cli_args(T), *args, "--workers", str(a.workers),
                                         "--out", str(store), "--force"))
            size = sum(p.stat().st_size for p in store.iterdir() if p.is_file()) if store.is_dir() else 0
            shutil.rmtree(store, ignore_errors=True)
            base = base or m
            r = {"T": T, "config": label, **m.to_json(), "store_bytes": size, "x_plain": m.wall_s / base.wall_s,
                 "task_vectors_bytes": T * fam.model_bytes}
            runs.append(r)
            log(f"    {m.wall_s:.1f} s ({r['x_plain']:.2f}x plain), CPU {m.cpu_s:.1f} s, peak anon "
                f"{gb(m.peak_anon_bytes)}, store {gb(size)}")
            rows.append([T, label, f"{m.wall_s:.1f}", f"{r['x_plain']:.2f}×", f"{m.cpu_s:.1f}",
                         gb(m.peak_anon_bytes), gb(size), f"{T * fam.model_bytes / max(1, size):.1f}×"])
    head = (f"`tvbasis build` on a synthetic BERT-like model (pretrained {gb(fam.model_bytes)} float32, hidden "
            f"{fam.config['hidden_size']}, {fam.config['num_hidden_layers']} layers), {a.workers} workers, "
            f"{os.cpu_count()} cores, page cache {cache.mode} before every build. Ratios are to the plain build of "
            "the same T in the same run. The synthetic task vectors are dense noise (no low-rank structure), so "
            "the compression column says nothing about real fine-tunes; see the frontier benchmark for those.\n\n")
    table = head + markdown_table(["T", "build", "wall s", "÷ plain", "CPU s", "peak anon RSS", "store on disk",
                                   "task vectors ÷ store"], rows)
    save_results(a.name or "residual_build", {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "model_bytes": fam.model_bytes, "config": fam.config, "cache": cache.mode, "runs": runs}, table)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
