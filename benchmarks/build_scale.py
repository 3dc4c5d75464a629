"""``tvbasis build`` with each basis method: wall time against one plain read of the inputs, peak memory
against the task vectors' size and against a naive in-memory build.

Per method a child process runs ``tvbasis build`` (``-q``, page cache prepared the same way before every
timed run). Reported: wall time and its ratio to one sequential read of all input files, CPU seconds (less
sensitive than wall time to other load on the machine), peak anonymous RSS over the process tree (the memory
the build allocated), peak RSS (VmHWM: the kernel's peak RSS of the main process, file pages included; checkpoints are read with
pread, so no mapped input pages count), and the same for the naive build (``naive_build.py``: every task vector in memory as
the paper's code keeps them) in its own child process. Aim: time within 3× one read, memory independent of T
and a small fraction of the naive peak.

    python benchmarks/build_scale.py                          # T = 16, 250MB fp32, all methods
    python benchmarks/build_scale.py --T 8 16 32 --size 250MB --methods pca
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
    naive_cmd,
    naive_peak_estimate,
    run_measured,
    save_results,
    sequential_read,
    tvbasis_cmd,
)

METHODS = ["autoencoder", "pca", "cluster", "random", "random-sample"]


def run_builds(fam, T: int, M: int, methods: list[str], engine: str, workers: int,
               cache: CacheMode, work: Path, naive: str, ram: int, extra: list[str] | None = None) -> dict:
    """One read, the builds, the naive build: a dict of measurements (used by perf_scale too)."""
    files = fam.input_files(T)
    read = sequential_read(files, cache)
    log(f"T = {T}: one sequential read of {gb(read['bytes'])}: {read['seconds']:.1f} s ({read['gb_per_s']:.2f} GB/s)")
    out: dict = {"T": T, "M": M, "read": read, "builds": [], "naive": None,
                 "task_vectors_bytes": T * fam.model_bytes}
    for method in methods:
        store = work / f"store-{method}"
        # every build is paired with a read measured just before it: the host-cached "cold" read of this VM
        # drifts 2-4 s between minutes, and a ratio to one read taken minutes earlier would carry that drift
        pair = read if method == methods[0] else sequential_read(files, cache)
        cache.prepare(files)
        log(f"  build {method} ({engine}) ...")
        m = run_measured(tvbasis_cmd("build", *fam.cli_args(T), "--method", method, "-M", str(M), "--engine", engine,
                                     "--workers", str(workers), "--out", str(store), "--force", *(extra or [])))
        shutil.rmtree(store, ignore_errors=True)
        log(f"    {m.wall_s:.1f} s ({m.wall_s / pair['seconds']:.1f}× its read of {pair['seconds']:.1f} s), "
            f"CPU {m.cpu_s:.1f} s, peak anon {gb(m.peak_anon_bytes)}, peak RSS {gb(m.maxrss_bytes)}")
        out["builds"].append({"method": method, "engine": engine, **m.to_json(), "read": pair,
                              "x_read": m.wall_s / pair["seconds"]})
    est = naive_peak_estimate(fam, T, M)
    if naive == "no":
        out["naive"] = {"skipped": "--naive no"}
    elif est > 0.6 * ram and naive != "force":
        out["naive"] = {"skipped": f"estimated peak {gb(est)} > 60% of RAM ({gb(ram)})", "estimate_bytes": est}
        log(f"  naive build skipped: estimated {gb(est)} > 60% of RAM")
    else:
        cache.prepare(files)
        log(f"  naive in-memory build (estimated peak {gb(est)}) ...")
        bases = work / "naive-bases.safetensors"
        m = run_measured(naive_cmd(fam, T, M, bases))
        bases.unlink(missing_ok=True)
        log(f"    {m.wall_s:.1f} s, peak anon {gb(m.peak_anon_bytes)}, peak RSS {gb(m.maxrss_bytes)}")
        out["naive"] = {**m.to_json(), "estimate_bytes": est}
    return out


def main() -> None:
    import psutil
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[16], help="numbers of fine-tunes (default 16)")
    ap.add_argument("--size", default="250MB", help="pretrained model size (default 250MB)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("-M", type=int, help="bases (default T/4)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--naive", choices=["auto", "no", "force"], default="auto",
                    help="run the naive in-memory build (auto: when its estimated peak is < 60%% of RAM)")
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ram = psutil.virtual_memory().total
    fam = make_family(a.work, a.size, a.dtype, max(a.T))
    cache = CacheMode(a.cache)
    runs = []
    for T in a.T:
        M = a.M or max(1, T // 4)
        runs.append(run_builds(fam, T, M, a.methods, a.engine, a.workers, cache, a.work, a.naive, ram))
    rows = []
    for r in runs:
        nv = r["naive"] or {}
        naive_anon = nv.get("peak_anon_bytes")
        for b in r["builds"]:
            rows.append([r["T"], b["method"], f"{b['read']['seconds']:.1f}", f"{b['wall_s']:.1f}", f"{b['x_read']:.1f}×",
                         f"{b['cpu_s']:.1f}", gb(b["peak_anon_bytes"]), gb(b["maxrss_bytes"]),
                         f"{b['peak_anon_bytes'] / r['task_vectors_bytes']:.1%}",
                         f"{b['peak_anon_bytes'] / naive_anon:.1%}" if naive_anon else "–"])
        if naive_anon:
            rows.append([r["T"], "*naive in-memory*", f"{r['read']['seconds']:.1f}", f"{nv['wall_s']:.1f}",
                         f"{nv['wall_s'] / r['read']['seconds']:.1f}×", f"{nv['cpu_s']:.1f}", gb(naive_anon),
                         gb(nv["maxrss_bytes"]), f"{naive_anon / r['task_vectors_bytes']:.0%}", "100%"])
        elif nv.get("skipped"):
            rows.append([r["T"], "*naive in-memory*", "", "skipped", "", "", nv["skipped"], "", "", ""])
    reads = "; ".join(f"T = {r['T']}: {gb(r['read']['bytes'])} in {r['read']['seconds']:.1f} s "
                      f"({r['read']['gb_per_s']:.2f} GB/s)" for r in runs)
    head = (f"`tvbasis build` on a synthetic BERT-like model: pretrained {gb(fam.model_bytes)} {a.dtype} (hidden "
            f"{fam.config['hidden_size']}, {fam.config['num_hidden_layers']} layers), M = T/4, engine {a.engine} "
            f"with {a.workers} workers, {os.cpu_count()} cores, page cache {cache.mode} before every run. "
            f"One sequential read of all inputs, first of the run: {reads}; every build's ratio is to the read "
            f"measured just before it (read s). Task vectors of T tasks = T × model size.\n\n")
    table = head + markdown_table(["T", "method", "read s", "wall s", "÷ one read", "CPU s", "peak anon RSS",
                                   "peak RSS", "anon ÷ T task vectors", "anon ÷ naive anon"], rows)
    save_results(a.name or "build_scale", {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "model_bytes": fam.model_bytes, "config": fam.config, "cache": cache.mode, "runs": runs}, table)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
