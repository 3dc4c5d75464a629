"""Switching a loaded model to task t: from disk (``from_pretrained`` of the fine-tune), through ``tvbasis get``
(the task written to disk, then loaded), and in place from a store (``BasisStore.apply_into``, ``swapped``).

On a synthetic BERT-like family (``common.make_family``: a pretrained model of ``--size`` and T fine-tunes with
low-rank matrix deltas) loaded as a ``transformers.BertModel``:

* (a) ``BertModel.from_pretrained(ft_t)`` — warm page cache (after an untimed load of the same directory), and
  cold where the page cache can be dropped (root);
* (b) ``store.reconstruct(t).apply_to(pretrained, out=tmp)`` (what ``tvbasis get`` runs) then ``from_pretrained``;
* (c) ``store.apply_into(model, t)`` into a model holding θ₀, from three stores of the family: a dense PCA store
  (M = T/2, no residuals), a residual store with the frontier run's ≥ 64× settings (PCA M = 1, bases through
  ``tvbasis.bench.frontier.BASES_PLAN``, residuals through its ``lr32-int4`` plan), and a ``lora-factors`` store
  of T PEFT adapters (rank ``--rank`` on every linear layer of the same model); also a whole ``swapped`` round trip
  (apply, then θ₀ restored from copies).

Memory: the peak of this process's private (anonymous) RSS during each step, polled every 2 ms, minus its value
before the step — against the model's bytes and the largest tensor's float32 bytes (the goal: a switch needs at
most the model plus one decoded tensor). ``from_pretrained`` memory-maps the safetensors file, so its weights
are only read on first use: (a) is timed both as the call alone and with every weight read once (the baseline of
the speed-ups); the model (c) updates is first copied into private memory (an in-place update of a mapped
checkpoint would copy its pages on first write). Drift: ``--drift-swaps`` swaps in ``restore="subtract"`` mode
(float32) and ``"copy"`` mode (float32, bf16) with a lora-factors store of adapters on the first encoder layer of a
``--drift-size`` model of the same family, max |θ − θ₀| after them.

    python benchmarks/serve.py                                  # 1 GB fp32 model, T = 4, 3 repeats
    python benchmarks/serve.py --size 100MB --T 4 --repeats 2 --name serve-small
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_WORK,
    _gen,
    drop_caches,
    gb,
    log,
    make_family,
    markdown_table,
    mb,
    read_files,
    save_results,
)
from tvbasis import RunOptions, build_store
from tvbasis.store import BasisStore, build_lora_store

LINEAR = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "intermediate.dense", "output.dense")


# ------------------------------------------------------------------------------------------------ memory
def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_extra() -> Iterator[dict[str, float]]:
    """Polls RssAnon every 2 ms while the block runs; out["extra"] = peak − value before, out["seconds"]."""
    out: dict[str, float] = {}
    gc.collect()
    base = rss_anon()
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        stop.set()
        th.join()
        out["extra"] = max(peak[0], rss_anon()) - base


# ------------------------------------------------------------------------------------------------ inputs
def write_adapters(root: Path, pre_dir: Path, config: dict[str, Any], T: int, rank: int,
                   layers: int | None = None) -> dict[str, Path]:
    """T PEFT LoRA adapters (rank ``rank`` on every linear layer of the first ``layers`` encoder layers, default
    all) of the family's pretrained model."""
    from safetensors.torch import save_file

    h, L = int(config["hidden_size"]), int(config["num_hidden_layers"])
    L = min(L, layers or L)
    shapes = {"attention.output.dense": (h, h), "intermediate.dense": (4 * h, h), "output.dense": (h, 4 * h)}
    out = {}
    for t in range(T):
        d = root / f"lora-r{rank}-{t:02d}" if layers is None else root / f"lora-r{rank}-L{L}-{t:02d}"
        out[f"task{t:02d}"] = d
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(L):
            for j, m in enumerate(LINEAR):
                o, inn = shapes.get(m, (h, h))
                key = f"base_model.model.encoder.layer.{i}.{m}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inn, generator=_gen(11, 1, t, i, j)) / inn ** 0.5
                tensors[f"{key}.lora_B.weight"] = 1e-3 * torch.randn(o, rank, generator=_gen(11, 2, t, i, j))
        save_file(tensors, str(d / "adapter_model.safetensors"), {"format": "pt"})
        import json
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank, "bias": "none", "fan_in_fan_out": False,
            "target_modules": list(LINEAR), "base_model_name_or_path": str(pre_dir)}))
    return out


STORE_KINDS = ("dense", "residual", "lora")


def build_stores(fam: Any, root: Path, rank: int, kinds: tuple[str, ...] = STORE_KINDS
                 ) -> dict[str, tuple[BasisStore, float]]:
    from tvbasis.bench.frontier import BASES_PLAN, PLANS

    run = RunOptions(progress=False)
    T = len(fam.finetuned)
    specs: dict[str, Callable[[Path], BasisStore]] = {
        f"dense (pca M={T // 2})": lambda out: build_store(fam.pretrained, fam.finetuned, "pca", T // 2, out,
                                                           run=run),
        "residual (pca M=1, lr32-int4, frontier >= 64x)": lambda out: build_store(
            fam.pretrained, fam.finetuned, "pca", 1, out, codec=BASES_PLAN, residual=PLANS["lr32-int4"], run=run),
        f"lora-factors (r={rank})": lambda out: build_lora_store(
            fam.pretrained, write_adapters(root, fam.pretrained, fam.config, T, rank), out, method="factors", run=run),
    }
    stores = {}
    for i, (label, make) in enumerate(specs.items()):
        if STORE_KINDS[i] not in kinds:
            continue
        out = root / f"serve-store-{i}-T{T}"
        t0 = time.perf_counter()
        if (out / "tvbasis.json").is_file():
            st, built = BasisStore.open(out), float("nan")
        else:
            log(f"building {label} at {out}")
            st = make(out)
            built = time.perf_counter() - t0
        stores[label] = (st, built)
    return stores


# ------------------------------------------------------------------------------------------------ steps
def load(d: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    return transformers.BertModel.from_pretrained(str(d), dtype=dtype).eval()


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def read_weights(m: torch.nn.Module) -> float:
    """Read every weight once (a sum per tensor): from_pretrained memory-maps safetensors files, so the weights
    are only paged in when first used — this is that first use."""
    with torch.no_grad():
        return float(sum(float(t.sum()) for t in m.state_dict().values() if t.is_floating_point()))


def in_memory(m: torch.nn.Module) -> torch.nn.Module:
    """The model's tensors copied into private memory (no longer backed by the memory-mapped checkpoint, whose
    pages an in-place update would copy on first write)."""
    with torch.no_grad():
        for p in m.parameters():
            p.data = p.data.clone()
        for b in m.buffers():
            b.data = b.data.clone()
    return m


def bench_from_pretrained(fam: Any, tasks: list[str], repeats: int, cold: bool,
                          touch: bool = False) -> dict[str, Any]:
    secs, extra = [], []
    for t in tasks:
        d = fam.finetuned[t]
        if not cold:
            read_files([d / "model.safetensors"])
            m = load(d)
            del m
        for _ in range(repeats):
            if cold:
                drop_caches()
            with peak_extra() as r:
                m = load(d)
                if touch:
                    read_weights(m)
            del m
            secs.append(r["seconds"])
            extra.append(r["extra"])
    return {"seconds": median(secs), "all_seconds": secs, "peak_extra_bytes": max(extra)}


def bench_get(store: BasisStore, fam: Any, task: str, tmp: Path) -> dict[str, Any]:
    out = tmp / "get-out"
    shutil.rmtree(out, ignore_errors=True)
    with peak_extra() as r:
        store.reconstruct(task).apply_to(fam.pretrained, 1.0, out=out, run=RunOptions(progress=False))
        m = load(out)
        read_weights(m)
    del m
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": r["seconds"], "peak_extra_bytes": r["extra"]}


def bench_apply(store: BasisStore, model: torch.nn.Module, theta0: dict[str, torch.Tensor], tasks: list[str],
                repeats: int) -> dict[str, Any]:
    secs, extra, swap = [], [], []
    for t in tasks:
        for _ in range(repeats):
            with peak_extra() as r:
                store.apply_into(model, t)
            secs.append(r["seconds"])
            extra.append(r["extra"])
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(theta0[k])
        t0 = time.perf_counter()
        with store.swapped(model, t):
            pass
        swap.append(time.perf_counter() - t0)
    return {"seconds": median(secs), "all_seconds": secs, "peak_extra_bytes": max(extra),
            "swap_round_trip_seconds": median(swap)}


def drift(fam_small: Any, rank: int, root: Path, swaps: int) -> dict[str, Any]:
    """Max |θ − θ₀| after ``swaps`` swaps: float32 with restore="subtract", bf16 with restore="copy". The adapters
    cover the six linear layers of the first encoder layer: the drift is per element, so the number of swaps is
    what matters, and 1,000 swaps of a whole model would take hours on this machine."""
    ads = write_adapters(root, fam_small.pretrained, fam_small.config, 2, rank, layers=1)
    out = root / f"serve-drift-store-r{rank}-L1"
    store = BasisStore.open(out) if (out / "tvbasis.json").is_file() else \
        build_lora_store(fam_small.pretrained, ads, out, method="factors", run=RunOptions(progress=False))
    res: dict[str, Any] = {"swaps": swaps, "model_bytes": fam_small.model_bytes}
    for dtype, mode in ((torch.float32, "subtract"), (torch.float32, "copy"), (torch.bfloat16, "copy")):
        model = load(fam_small.pretrained, dtype)
        theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        for i in range(swaps):
            with store.swapped(model, store.task_names[i % 2], restore=mode):
                pass
        dt = time.perf_counter() - t0
        diffs = [float((v.float() - theta0[k].float()).abs().max()) for k, v in model.state_dict().items()
                 if v.is_floating_point()]
        rel = math.sqrt(sum(float((v.double() - theta0[k].double()).pow(2).sum()) for k, v in
                            model.state_dict().items() if v.is_floating_point())
                        / sum(float(v.double().pow(2).sum()) for v in theta0.values() if v.is_floating_point()))
        exact = all(torch.equal(v, theta0[k]) for k, v in model.state_dict().items())
        res[f"{str(dtype).removeprefix('torch.')}-{mode}"] = {"max_abs": max(diffs), "rel": rel, "bit_exact": exact,
                                                             "seconds_per_swap": dt / swaps}
        log(f"drift {dtype} {mode}: max |Δ| {max(diffs):.3g}, exact {exact}, {dt / swaps * 1e3:.1f} ms/swap")
        del model
    return res


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1GB", help="pretrained model size (default 1GB)")
    p.add_argument("--T", type=int, default=4, help="fine-tunes in the family and tasks per store (default 4)")
    p.add_argument("--tasks", type=int, default=2, help="tasks timed per store (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=16, help="rank of the LoRA adapters (default 16)")
    p.add_argument("--drift-size", default="100MB")
    p.add_argument("--drift-swaps", type=int, default=1000)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--stores", default=",".join(STORE_KINDS),
                   help=f"which stores to time, comma-separated from {','.join(STORE_KINDS)} (default all)")
    p.add_argument("--name", default="serve")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every step (default 1: on an "
                   "oversubscribed machine two OpenMP threads made small products 100x slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    fam = make_family(args.work, args.size, "float32", T=args.T)
    root = fam.root
    tasks = list(fam.finetuned)[: args.tasks]
    kinds = tuple(k.strip() for k in args.stores.split(","))
    if not kinds or any(k not in STORE_KINDS for k in kinds):
        p.error(f"--stores: choose from {','.join(STORE_KINDS)}")
    stores = build_stores(fam, root, args.rank, kinds)
    model = in_memory(load(fam.pretrained))
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in theta0.values())
    largest = max(v.numel() * 4 for v in theta0.values() if v.is_floating_point())
    log(f"model {mb(model_bytes)}, largest tensor {mb(largest)} in float32; load {os.getloadavg()[0]:.1f}")

    rows: list[dict[str, Any]] = []
    warm = bench_from_pretrained(fam, tasks, args.repeats, cold=False)
    rows.append({"how": "(a) from_pretrained(ft), warm cache (weights memory-mapped, not yet read)", **warm})
    log(f"(a) warm {warm['seconds']:.2f} s")
    warm = bench_from_pretrained(fam, tasks, args.repeats, cold=False, touch=True)
    rows.append({"how": "(a) from_pretrained(ft), warm cache, then every weight read once", **warm})
    log(f"(a) warm + read {warm['seconds']:.2f} s")
    if drop_caches():
        cold = bench_from_pretrained(fam, tasks, 1, cold=True, touch=True)
        rows.append({"how": "(a) from_pretrained(ft), cold cache, then every weight read once", **cold})
        log(f"(a) cold {cold['seconds']:.2f} s")
    else:
        log("(a) cold: cannot drop the page cache here (not root); not measured")
    for label, (st, _built) in stores.items():
        g = bench_get(st, fam, tasks[0], root)
        rows.append({"how": f"(b) get then from_pretrained: {label}", **g, "store_bytes": st.nbytes})
        log(f"(b) {label}: {g['seconds']:.2f} s")
    del theta0
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for label, (st, built) in stores.items():
        a = bench_apply(st, model, theta0, tasks, args.repeats)
        rows.append({"how": f"(c) apply_into: {label}", **a, "store_bytes": st.nbytes, "build_seconds": built})
        log(f"(c) {label}: {a['seconds']:.3f} s (swap round trip {a['swap_round_trip_seconds']:.3f} s)")
    del model, theta0
    gc.collect()
    dr: dict[str, Any] = {"swaps": 0, "model_bytes": 0}
    if args.drift_swaps > 0:
        small = make_family(args.work, args.drift_size, "float32", T=2)
        dr = drift(small, args.rank, small.root, args.drift_swaps)

    base = warm["seconds"]
    table_rows = []
    for r in rows:
        extra = r["peak_extra_bytes"]
        table_rows.append([r["how"], f"{r['seconds']:.3f}", f"{base / r['seconds']:.1f}x",
                           mb(extra), f"{extra / model_bytes:.2f}",
                           f"{r['swap_round_trip_seconds']:.3f}" if "swap_round_trip_seconds" in r else "",
                           mb(r["store_bytes"]) if "store_bytes" in r else ""])
    table = markdown_table(["switch to task t by", "seconds (median)", "speed-up vs (a) warm + read",
                            "peak extra private memory", "÷ model bytes", "swapped round trip (s)", "store on disk"],
                           table_rows)
    drift_rows = [[k, v["max_abs"], f"{v['rel']:.2e}", v["bit_exact"], f"{v['seconds_per_swap'] * 1e3:.1f}"]
                  for k, v in dr.items() if isinstance(v, dict)]
    table += (f"\n\nModel: synthetic BERT-like, {gb(model_bytes)} float32 ({len(fam.finetuned)} fine-tunes; largest "
              f"tensor {mb(largest)} in float32); tasks timed {tasks}, {args.repeats} repeats each; load average at "
              f"start {load0:.1f}, at the end {os.getloadavg()[0]:.1f}, on {os.cpu_count()} CPUs, torch on {args.threads} thread(s).\n\n"
              + (f"Drift after {args.drift_swaps} swaps (lora-factors store, {gb(dr['model_bytes'])} model):\n\n"
                 + markdown_table(["dtype-restore", "max |θ − θ₀|", "‖θ − θ₀‖/‖θ₀‖", "bit-exact", "ms per swap"],
                                  drift_rows) if drift_rows else "(drift not measured in this run)"))
    save_results(args.name, {"model_bytes": model_bytes, "largest_tensor_f32_bytes": largest, "tasks": tasks,
                             "repeats": args.repeats, "rows": rows, "drift": dr, "size": args.size, "T": args.T,
                             "rank": args.rank, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                             "threads": args.threads}, table)


if __name__ == "__main__":
    main()
