"""Build throughput and memory over a grid: T fine-tunes × model size × dtype, local threads vs Ray.

For every (dtype, size) a synthetic family with max(T) fine-tunes is generated in the work directory (and
deleted after its row block unless ``--keep``); for every T: one sequential read of the T+1 input files,
``tvbasis build`` in a child process (throughput = input bytes ÷ wall time, ratio to the read, CPU seconds,
peak anonymous RSS of the process tree, peak RSS of the main process), and the naive in-memory build where its estimated peak
fits in 60 % of RAM. One configuration also runs with ``--engine ray`` (local Ray, same number of workers).

    python benchmarks/perf_scale.py                                       # the default grid (≈15 min, 2 cores)
    python benchmarks/perf_scale.py --sizes 100MB 1GB --T 8 16 32 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_scale import run_builds
from common import CacheMode, common_args, gb, log, make_family, markdown_table, save_results
from tvbasis.io import parse_size


def main() -> None:
    import psutil
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "400MB"], help="pretrained sizes (default 100MB 400MB)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--method", default="pca")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ray", default="first,float32,16", metavar="SIZE,DTYPE,T",
                    help="the configuration also run with --engine ray ('first' = the first size; 'none' to skip)")
    ap.add_argument("--naive", choices=["auto", "no", "force"], default="auto")
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ram = psutil.virtual_memory().total
    cache = CacheMode(a.cache)
    ray_cfg = None
    if a.ray != "none":
        s, d, t = a.ray.split(",")
        ray_cfg = (a.sizes[0] if s == "first" else s, d, int(t))
    results, rows = [], []
    for dtype in a.dtypes:
        for size in a.sizes:
            fam = make_family(a.work, size, dtype, max(a.T))
            for T in a.T:
                M = max(1, T // 4)
                engines = ["local"]
                if ray_cfg and parse_size(ray_cfg[0]) == parse_size(size) and ray_cfg[1] == dtype and ray_cfg[2] == T:
                    engines.append("ray")
                for engine in engines:
                    log(f"{dtype} {size} T = {T} engine {engine}")
                    r = run_builds(fam, T, M, [a.method], engine, a.workers, cache, a.work,
                                   a.naive if engine == "local" else "no", ram)
                    r.update(dtype=dtype, size=size, model_bytes=fam.model_bytes, engine=engine)
                    results.append(r)
                    nv = r["naive"] or {}
                    for b in r["builds"]:
                        inputs = r["read"]["bytes"]
                        rows.append([dtype, gb(fam.model_bytes), T, engine, gb(inputs),
                                     f"{r['read']['seconds']:.1f}", f"{b['wall_s']:.1f}",
                                     f"{inputs / b['wall_s'] / 1e9:.2f}", f"{b['x_read']:.1f}×", f"{b['cpu_s']:.0f}",
                                     gb(b["peak_anon_bytes"]), gb(b["maxrss_bytes"]),
                                     gb(nv["peak_anon_bytes"]) if "peak_anon_bytes" in nv else
                                     ("skipped (> 60% RAM)" if "estimate_bytes" in nv else "–")])
            if not a.keep:
                shutil.rmtree(fam.root, ignore_errors=True)
    head = (f"`tvbasis build --method {a.method} -M T/4` on synthetic BERT-like models, {a.workers} workers on "
            f"{os.cpu_count()} cores, page cache {cache.mode} before every timed run. Throughput = bytes of all input "
            "checkpoints ÷ wall time of the whole build (both passes, fit, writing the store, process start). "
            "Peak anon = private memory of the process tree (Ray: driver, raylet, GCS and workers); peak RSS = kernel peak RSS (VmHWM) of the main process. "
            "Naive = all task vectors in memory (own process).\n\n")
    table = head + markdown_table(["dtype", "model", "T", "engine", "inputs", "read s", "build s",
                                   "GB/s", "÷ read", "CPU s", "peak anon", "peak RSS", "naive peak anon"], rows)
    save_results(a.name or "perf_scale", {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "cache": cache.mode, "results": results}, table)


if __name__ == "__main__":
    main()
