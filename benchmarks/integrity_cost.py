"""What the store's integrity checks cost: a per-chunk digest (XXH3-64) on every read, digests at build time, ``verify``.

On the build_scale family (``common.make_family``) a store is built per method, then each read is timed with
the checks on (as shipped) and off (the same reads with the chunk digests dropped from the opened store, i.e.
the version-1 path: positional reads and the finite check only), best of ``--repeat``, page cache as
``--cache``: reading every stored tensor, ``reconstruct`` (a saved task vector: reads the store only) and
``edit --add all`` (reads the store and the pretrained model, writes a model). The build's digest step (one read
back of the written files, SHA-256 and the chunk digests) is timed inside the build. Aim: checks ≤ 5 % of a read.

    python benchmarks/integrity_cost.py --T 8 --size 100MB --methods pca cluster --cache warm
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch

import tvbasis.store.build as build_mod
from common import CacheMode, common_args, gb, log, make_family, markdown_table, save_results, sequential_read
from tvbasis.engine import RunOptions
from tvbasis.store import BasisStore, build_store
from tvbasis.store.integrity import _pread_into, chunk_digest


def _timed_pair(fns: dict, repeat: int, prepare) -> dict[str, tuple[float, float]]:
    """Best wall and CPU seconds of each function, runs interleaved (the machine is shared: load drifts)."""
    best = {k: (float("inf"), float("inf")) for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            prepare()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def _unchecked(store: BasisStore) -> BasisStore:
    """The same open store read as before the checks existed: positional reads of exactly the bytes asked for,
    no chunk digest, no finite check."""
    data = store.data

    def raw(part: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        pl = data.places[part][name]
        shape = pl.inner.shape
        a, b = (0, shape[0] if shape else 1) if rows is None or not shape else rows
        out = torch.empty((pl.outer, (b - a) * pl.row_bytes), dtype=torch.uint8)
        for m in range(pl.outer):
            _pread_into(pl.fd, memoryview(out[m].numpy()), pl.offset + m * pl.inner.nbytes + a * pl.row_bytes, "")
        t = out.view(pl.inner.dtype).reshape(pl.outer, *((b - a,) if shape else ()), *shape[1:])
        return t[0] if part == "mean" else t
    data.read = raw
    return store


def crc_throughput(repeat: int = 5) -> float:
    """Bytes per second of the stores' chunk digest (XXH3-64) on one core (best of ``repeat`` over 64 MB)."""
    buf = memoryview(os.urandom(64 * 2**20))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        chunk_digest(buf)
        best = min(best, time.perf_counter() - t0)
    return len(buf) / best


def _read_all(store: BasisStore) -> None:
    for name in store.specs:
        if store.manifest.files.bases:
            store.bases_rows(name)
        store.mean_rows(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--size", default="100MB")
    ap.add_argument("-M", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["pca", "cluster"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="engine workers and torch threads (default 1: on a shared machine, CPU seconds of one "
                    "thread are the stable measure)")
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    run = RunOptions(workers=a.threads, progress=False)
    fam = make_family(a.work, a.size, "float32", a.T)
    cache = CacheMode(a.cache)
    crc_bps = crc_throughput()
    log(f"chunk digest (XXH3-64): {crc_bps / 1e9:.2f} GB/s on one core; load average {os.getloadavg()[0]:.1f}")
    digest_s = [0.0]
    real_digest = build_mod.digest_file

    def timed_digest(*args, **kw):
        t0 = time.perf_counter()
        try:
            return real_digest(*args, **kw)
        finally:
            digest_s[0] += time.perf_counter() - t0
    build_mod.digest_file = timed_digest
    rows, runs = [], []
    for method in a.methods:
        out = a.work / f"integrity-{method}"
        shutil.rmtree(out, ignore_errors=True)
        cache.prepare(fam.input_files(a.T))
        digest_s[0] = 0.0
        t0 = time.perf_counter()
        store = build_store(fam.pretrained, fam.subset(a.T), method, None if method == "cluster" else a.M, out,
                            force=True, run=run)
        build_s = time.perf_counter() - t0
        files = [out / f for f in store.manifest.files.all()]
        store_bytes = sum(f.stat().st_size for f in files)
        log(f"{method}: build {build_s:.1f} s, digests {digest_s[0]:.2f} s, store {gb(store_bytes)}")
        read = sequential_read(files, cache)

        def prep(files=files) -> None:
            cache.prepare(files)

        def prep_edit(files=files) -> None:
            cache.prepare([*files, fam.pretrained / "model.safetensors"])
        res = {"method": method, "M": store.M, "store_bytes": store_bytes, "build_s": build_s,
               "build_digest_s": digest_s[0], "sequential_read": read, "crc32_bytes_per_s": crc_bps,
               "crc32_of_store_s": store_bytes / crc_bps, "load_average_1min": os.getloadavg()[0]}
        stores = {"checked": BasisStore.open(out), "unchecked": _unchecked(BasisStore.open(out))}
        task = store.task_names[0]
        vec, model = a.work / f"integrity-{method}-vec.safetensors", a.work / f"integrity-{method}-edit"
        ops = {
            "read_all": (lambda s: _read_all(s), prep),
            "reconstruct": (lambda s, task=task, vec=vec: s.reconstruct(task).save(vec, force=True, run=run), prep),
            "edit": (lambda s, model=model: s.addition().apply_to(fam.pretrained, 0.3, model, force=True, run=run),
                     prep_edit),
        }
        for what, (fn, pr) in ops.items():
            got = _timed_pair({k: (lambda s=s, fn=fn: fn(s)) for k, s in stores.items()}, a.repeat, pr)
            for k, (wall, cpu) in got.items():
                res[f"{what}_{k}_s"], res[f"{what}_{k}_cpu_s"] = wall, cpu
        vec.unlink(missing_ok=True)
        shutil.rmtree(model, ignore_errors=True)
        fresh = BasisStore.open(out)
        res["verify_s"] = _timed_pair({"v": fresh.verify}, a.repeat, prep)["v"][0]
        runs.append(res)
        for what in ("read_all", "reconstruct", "edit"):
            on, off = res[f"{what}_checked_s"], res[f"{what}_unchecked_s"]
            con, coff = res[f"{what}_checked_cpu_s"], res[f"{what}_unchecked_cpu_s"]
            rows.append([method, what, f"{off:.3f}", f"{on:.3f}", f"{(on - off) / off:+.1%}",
                         f"{coff:.3f}", f"{con:.3f}", f"{(con - coff) / coff:+.1%}",
                         f"{res['crc32_of_store_s'] / off:.1%}"])
        rows.append([method, f"verify (whole store; one read: {read['seconds']:.3f} s)", "–",
                     f"{res['verify_s']:.3f}", "–", "–", "–", "–", "–"])
        rows.append([method, "build (digests of the written files)", f"{build_s - digest_s[0]:.2f}",
                     f"{build_s:.2f}", f"{digest_s[0] / (build_s - digest_s[0]):+.1%}", "–", "–", "–", "–"])
        shutil.rmtree(out, ignore_errors=True)
    head = (f"Integrity checks of a store, `{a.size}` float32 BERT-like pretrained model, T = {a.T}, M = {a.M} "
            f"(cluster: eigengap), page cache {cache.mode}, best of {a.repeat} interleaved runs, {a.threads} "
            f"thread(s), load average {os.getloadavg()[0]:.1f} at the end, "
            f"{os.cpu_count()} cores shared with other work. *unchecked*: the same reads as before the checks existed "
            "(positional reads only); *checked*: as shipped (every chunk's digest). Wall and CPU seconds (CPU: all "
            "threads; less sensitive to other load). Last column: the digest of every stored byte at the measured "
            f"single-core rate ({crc_bps / 1e9:.2f} GB/s) ÷ the unchecked operation: the checks' intrinsic cost, "
            "free of the run-to-run noise of the other columns.\n\n")
    table = head + markdown_table(["method", "operation", "unchecked s", "checked s", "overhead", "unchecked CPU s",
                                   "checked CPU s", "CPU overhead", "digest ÷ unchecked"], rows)
    save_results(a.name or "integrity_cost", {"params": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(a).items()}, "runs": runs}, table)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
