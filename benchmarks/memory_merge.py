"""Peak memory of ``tvbasis merge`` (TIES) of T fine-tunes of a ~400 MB model, in a child process.

The claim to check: merging streams tensor by tensor, so peak memory is bounded by a few tensors' T slices,
not by the T models — well under 1 GB for 8 fine-tunes of a 400 MB model (3.6 GB of inputs).

Reported per run: the child's peak RSS (VmHWM, the kernel's peak RSS of the process) and the polled
peak of anonymous (private) RSS over the process tree, wall and CPU time, next to the total input size and the
largest tensor.

    python benchmarks/memory_merge.py                         # T = 8, 400MB fp32, ties density 0.2
    python benchmarks/memory_merge.py --T 8 16 --engine local ray
"""

from __future__ import annotations

import argparse
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
    mb,
    run_measured,
    save_results,
    tvbasis_cmd,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="400MB", help="pretrained model size (default 400MB)")
    ap.add_argument("--T", type=int, nargs="+", default=[8], help="numbers of fine-tunes (default 8)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--method", default="ties")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--trim-scope", nargs="+", default=["tensor", "global"], choices=["tensor", "global"])
    ap.add_argument("--engine", nargs="+", default=["local"], choices=["local", "ray"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", default="1GB", help="the bound to check peak anonymous RSS against")
    common_args(ap)
    a = ap.parse_args()
    from tvbasis.io import parse_size
    limit = parse_size(a.limit)
    a.work.mkdir(parents=True, exist_ok=True)
    fam = make_family(a.work, a.size, a.dtype, max(a.T))
    cache = CacheMode(a.cache)
    rows, results = [], []
    for T, engine, scope in [(t, e, s) for t in a.T for e in a.engine for s in a.trim_scope]:
        files = fam.input_files(T)
        out = a.work / f"merged-{T}-{engine}-{scope}"
        shutil.rmtree(out, ignore_errors=True)
        cache.prepare(files)
        log(f"T = {T}: merge {a.method} density {a.density} trim {scope}, engine {engine} ...")
        m = run_measured(tvbasis_cmd("merge", *fam.cli_args(T), "--method", a.method, "--density", str(a.density),
                                     "--trim-scope", scope, "--engine", engine, "--workers", str(a.workers),
                                     "--out", str(out), "--force"))
        shutil.rmtree(out, ignore_errors=True)
        ok = m.peak_anon_bytes < limit
        log(f"  {m.wall_s:.1f} s, peak RSS {gb(m.maxrss_bytes)}, peak anonymous {gb(m.peak_anon_bytes)}")
        results.append({"T": T, "inputs_bytes": fam.input_bytes(T), "engine": engine,
                        "trim_scope": scope, **m.to_json(), "under_limit": ok})
        rows.append([T, gb(fam.input_bytes(T)), engine, scope, f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}",
                     gb(m.maxrss_bytes), gb(m.peak_anon_bytes), gb(m.peak_tree_rss_bytes), "yes" if ok else "**no**"])
    head = (f"`tvbasis merge --method {a.method} --density {a.density}` of T fine-tunes; pretrained "
            f"{gb(fam.model_bytes)} {a.dtype} (hidden {fam.config['hidden_size']}, {fam.config['num_hidden_layers']} "
            f"layers), largest tensor {mb(fam.largest_tensor_bytes)}; {a.workers} workers; page cache {cache.mode}. "
            "Anonymous RSS is the memory the process tree allocated; peak RSS is the main process's kernel peak "
            "RSS (VmHWM).\n\n")
    table = head + markdown_table(["T", "inputs", "engine", "trim scope", "wall s", "CPU s", "peak RSS",
                                   "peak anon RSS (tree)", "peak total RSS (tree)", f"anon < {a.limit}"], rows)
    save_results(a.name or "memory_merge", {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "model_bytes": fam.model_bytes, "largest_tensor_bytes": fam.largest_tensor_bytes,
        "config": fam.config, "cache": cache.mode, "results": results}, table)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
