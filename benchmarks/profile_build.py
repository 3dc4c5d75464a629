"""Where the time of ``tvbasis build`` goes: the Gram pass and the whole build timed in-process (wall and CPU
seconds), with cProfile's top functions (``--profile``; use ``--workers 1`` so the work runs in the profiled
thread), next to one sequential read of the same files.

    python benchmarks/profile_build.py --size 250MB --T 16
    python benchmarks/profile_build.py --size 250MB --T 16 --workers 1 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CacheMode, common_args, gb, log, make_family, markdown_table, save_results
from tvbasis.engine import LocalEngine
from tvbasis.passes import compute_gram
from tvbasis.store import build_store
from tvbasis.taskset import TaskSet


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="250MB", help="pretrained model size (default 250MB)")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("-M", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--method", default="pca")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fam = make_family(a.work, a.size, a.dtype, a.T)
    files = fam.input_files(a.T)
    cache = CacheMode(a.cache)
    ts = TaskSet.open(fam.pretrained, fam.subset(a.T))
    rows, results = [], []
    profiles: dict[str, str] = {}
    for v in ["current"]:
        eng = LocalEngine(a.workers, progress=False)
        prof = cProfile.Profile() if a.profile else None
        cache.prepare(files)
        load = os.getloadavg()[0]
        c0, w0 = cpu_s(), time.perf_counter()
        if prof:
            prof.enable()
        compute_gram(ts, eng)
        t_gram = time.perf_counter() - w0
        c_gram = cpu_s() - c0
        out = a.work / f"profile-store-{v}"
        cache.prepare(files)
        c1, w1 = cpu_s(), time.perf_counter()
        build_store(fam.pretrained, fam.subset(a.T), a.method, a.M, out, force=True, run=eng)
        t_build = time.perf_counter() - w1
        c_build = cpu_s() - c1
        if prof:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            top = "\n".join(line for line in s.getvalue().splitlines()[:28] if line.strip())
            profiles[v] = top
            print(f"--- {v}\n{top}")
        shutil.rmtree(out, ignore_errors=True)
        r = {"loadavg_1m": load, "gram_s": t_gram, "gram_cpu_s": c_gram, "build_s": t_build, "build_cpu_s": c_build}
        results.append(r)
        log(f"gram {t_gram:.1f} s, build {t_build:.1f} s (gram + fit + materialise)")
        rows.append([f"{load:.1f}", f"{t_gram:.1f}", f"{c_gram:.1f}", f"{t_build:.1f}", f"{c_build:.1f}"])
    read = None
    from common import sequential_read
    read = sequential_read(files, cache)
    table = (f"Build profile: T = {a.T}, pretrained {gb(fam.model_bytes)} {a.dtype}, inputs {gb(read['bytes'])}, "
             f"method {a.method}, M = {a.M}, {a.workers} threads, page cache {cache.mode}; one sequential read of all "
             f"inputs {read['seconds']:.1f} s ({read['gb_per_s']:.2f} GB/s).\n\n"
             + markdown_table(["load avg", "Gram pass s", "Gram CPU s", "build s", "build CPU s"], rows))
    for top in profiles.values():
        table += f"\n\ncProfile (Gram pass + whole build, {a.workers} worker(s), torch threads " \
                 f"{torch.get_num_threads()}):\n\n```\n{top}\n```"
    save_results(a.name or f"profile_build_T{a.T}_{a.size}_{a.dtype}",
                 {"params": vars(a) | {"work": str(a.work)}, "read": read, "results": results,
                  "torch_threads": torch.get_num_threads(), "profiles": profiles}, table)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
