"""Shared pieces of the performance benchmarks.

* ``make_family``: a synthetic BERT-like pretrained model of a given size on disk (fp32 or bf16; HF directory
  with ``config.json`` and ``model.safetensors``) and T fine-tunes of it (pretrained + small low-rank deltas
  around a few cluster directions), written tensor by tensor and cached in a work directory;
* ``run_measured``: runs a command in a child process and measures wall time and memory: the peak RSS of
  that child (its VmHWM, the kernel's peak RSS since exec; ``ru_maxrss`` would include this parent's RSS at
  fork) and, by polling /proc every 20 ms over the
  whole process tree (Ray workers included), the peak of the summed *anonymous* RSS (private memory) and of
  the summed total RSS. Total RSS also counts pages of memory-mapped files the process has touched (page
  cache the kernel can drop, not memory the process allocated), so anonymous RSS is the measure to compare;
* ``sequential_read``: the I/O reference, one plain sequential read of all input files (16 MiB reads into one
  reused buffer), with the page cache dropped first (``cold``) or after a warm-up read (``warm``);
* ``drop_caches`` (needs root), Markdown tables and JSON results under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvbasis.io import TensorSpec, parse_size, write_safetensors_file

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = Path(os.environ.get("TVBASIS_BENCH_WORK", "/tmp/tvbasis-bench"))
VOCAB, MAX_POS = 30522, 512


# --------------------------------------------------------------------------------------------- formatting
def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    import psutil
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "cpu": cpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def save_results(name: str, payload: dict[str, Any], table: str) -> Path:
    """Write ``benchmarks/results/<name>.json`` and ``<name>.md`` (the table) and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
               "machine": machine(), **payload}
    js = RESULTS / f"{name}.json"
    js.write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(f"`{payload['command']}`\n\n{table}\n")
    print(table)
    log(f"wrote {js} and {js.with_suffix('.md')}")
    return js


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work directory (default {DEFAULT_WORK})")
    p.add_argument("--keep", action="store_true", help="keep generated models in the work directory")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold",
                   help="page cache before every timed run: dropped (cold, needs root; default) or warmed by a "
                   "read of all inputs (warm). Falls back to warm when the cache cannot be dropped")
    p.add_argument("--name", help="results file name (default: the script's name)")


# ------------------------------------------------------------------------------------------ synthetic models
def bert_like_shapes(total_bytes: int, itemsize: int) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Tensor names and shapes of a BERT-like encoder of about ``total_bytes``: 30522-token embeddings,
    hidden size a multiple of 64 chosen so the model has ~12 layers (at least 1), FFN 4×hidden."""
    params = total_bytes // itemsize

    def count(h: int, L: int) -> int:
        return (VOCAB + MAX_POS + 2) * h + 2 * h + L * (12 * h * h + 13 * h) + h * h + h

    h = 64
    while count(h + 64, 12) <= params:
        h += 64
    L = max(1, round((params - count(h, 0)) / (12 * h * h + 13 * h)))
    while L > 1 and count(h, L) > params * 1.03:
        L -= 1
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (VOCAB, h),
        "embeddings.position_embeddings.weight": (MAX_POS, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "embeddings.position_ids": (1, MAX_POS),  # an integer buffer, as in HF BERT checkpoints
    }
    for i in range(L):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"] = (h, h)
            shapes[p + m + ".bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (4 * h, h)
        shapes[p + "intermediate.dense.bias"] = (4 * h,)
        shapes[p + "output.dense.weight"] = (h, 4 * h)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    shapes["pooler.dense.weight"] = (h, h)
    shapes["pooler.dense.bias"] = (h,)
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": h, "num_hidden_layers": L,
              "num_attention_heads": max(1, h // 64), "intermediate_size": 4 * h, "vocab_size": VOCAB,
              "max_position_embeddings": MAX_POS, "type_vocab_size": 2}
    return shapes, config


@dataclass
class Family:
    root: Path
    pretrained: Path
    finetuned: dict[str, Path]
    dtype: str
    model_bytes: int  # bytes of the pretrained model.safetensors
    largest_tensor_bytes: int
    num_parameters: int
    config: dict[str, Any] = field(default_factory=dict)

    def input_files(self, T: int | None = None) -> list[Path]:
        fts = list(self.finetuned.values())[: T or len(self.finetuned)]
        return [self.pretrained / "model.safetensors", *(p / "model.safetensors" for p in fts)]

    def input_bytes(self, T: int | None = None) -> int:
        return sum(f.stat().st_size for f in self.input_files(T))

    def subset(self, T: int) -> dict[str, Path]:
        return dict(list(self.finetuned.items())[:T])

    def cli_args(self, T: int | None = None) -> list[str]:
        out = ["--pretrained", str(self.pretrained)]
        for n, p in list(self.finetuned.items())[: T or len(self.finetuned)]:
            out += ["--finetuned", f"{n}={p}"]
        return out


def _gen(seed: int, *parts: int) -> torch.Generator:
    s = seed
    for p in parts:
        s = (s * 1_000_003 + p) % (2**61 - 1)
    return torch.Generator().manual_seed(s)


def _write_model(d: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, config: dict[str, Any],
                 tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    tmp = d.parent / f".{d.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [TensorSpec(n, s, torch.int64 if n.endswith("position_ids") else dtype) for n, s in shapes.items()]
    write_safetensors_file(tmp / "model.safetensors", specs, tensors, {"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)


def make_family(work: Path, size: int | str, dtype: str = "float32", T: int = 8, seed: int = 0,
                clusters: int = 4, rank: int = 4, delta_scale: float = 1e-3) -> Family:
    """Pretrained model of ``size`` bytes and T fine-tunes (cached: a family with more fine-tunes is reused,
    fine-tune t is the same whatever T). Task vector of task t in cluster k = t mod clusters, per matrix:
    delta_scale/sqrt(2·rank) · (U_k V_kᵀ + U_t V_tᵀ) with rank-``rank`` Gaussian factors (vectors: Gaussian);
    the cluster part makes the Gram structured, the private part keeps every task distinct."""
    size = parse_size(size)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    shapes, config = bert_like_shapes(size, tdt.itemsize)
    root = work / f"bert-{size // 10**6}MB-{dtype}-s{seed}-c{clusters}"
    root.mkdir(parents=True, exist_ok=True)
    pre_dir = root / "pre"
    names = list(shapes)

    def pretrained_tensors() -> Iterable[tuple[str, torch.Tensor]]:
        for i, n in enumerate(names):
            if n.endswith("position_ids"):
                yield n, torch.arange(shapes[n][1]).reshape(shapes[n])
            elif n.endswith("LayerNorm.weight"):
                yield n, torch.ones(shapes[n], dtype=tdt)
            else:
                yield n, (torch.randn(shapes[n], generator=_gen(seed, 0, i)) * 0.02).to(tdt)

    if not (pre_dir / "model.safetensors").is_file():
        log(f"generating pretrained {mb(size)} {dtype} model (hidden {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers) in {pre_dir}")
        _write_model(pre_dir, shapes, tdt, config, pretrained_tensors())
    from safetensors import safe_open
    fts: dict[str, Path] = {}
    for t in range(T):
        d = root / f"ft{t:02d}"
        fts[f"task{t:02d}"] = d
        if (d / "model.safetensors").is_file():
            continue
        log(f"generating fine-tune {t + 1}/{T} in {d}")
        k = t % clusters

        def tensors(t: int = t, k: int = k) -> Iterable[tuple[str, torch.Tensor]]:
            with safe_open(str(pre_dir / "model.safetensors"), framework="pt") as pre:
                for i, n in enumerate(names):
                    base = pre.get_tensor(n)
                    if not base.is_floating_point():
                        yield n, base
                        continue
                    if base.dim() == 2:  # one fused pass: base + scale·[U_k U_t]·[V_k; V_t]
                        o, inn = base.shape
                        gk, gt = _gen(seed, 1, k, i), _gen(seed, 2, t, i)
                        u = torch.cat([torch.randn(o, rank, generator=gk), torch.randn(o, rank, generator=gt)], 1)
                        v = torch.cat([torch.randn(rank, inn, generator=gk), torch.randn(rank, inn, generator=gt)])
                        out = torch.addmm(base.to(torch.float32), u, v, alpha=delta_scale / math.sqrt(2 * rank))
                    else:
                        out = torch.randn(base.shape, generator=_gen(seed, 3, t, i)).mul_(delta_scale)
                        out.add_(base.to(torch.float32))
                    yield n, out.to(tdt)

        _write_model(d, shapes, tdt, config, tensors())
    specs = [TensorSpec(n, s, torch.int64 if n.endswith("position_ids") else tdt) for n, s in shapes.items()]
    return Family(root, pre_dir, fts, dtype, (pre_dir / "model.safetensors").stat().st_size,
                  max(s.nbytes for s in specs), sum(s.numel for s in specs if s.is_float), config)


# ------------------------------------------------------------------------------------------ caches and I/O
def drop_caches() -> bool:
    """Drop the page cache (root only). True when it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_files(paths: Iterable[Path], block: int = 16 * 2**20) -> int:
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return total


class CacheMode:
    """Prepares the page cache the same way before every timed run (reads and builds alike)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        if mode == "cold" and not drop_caches():
            log("cannot drop the page cache (not root?): falling back to warm-cache timings for everything")
            self.mode = "warm"

    def prepare(self, inputs: Sequence[Path]) -> None:
        if self.mode == "cold":
            drop_caches()
        else:
            os.sync()  # no dirty backlog from generating the inputs: the build would pay for its writeback
            read_files(inputs)


def sequential_read(paths: Sequence[Path], cache: CacheMode) -> dict[str, float]:
    cache.prepare(paths)
    t0 = time.perf_counter()
    n = read_files(paths)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": n, "gb_per_s": n / dt / 1e9}


# ------------------------------------------------------------------------------------------- measured runs
@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    maxrss_bytes: int  # VmHWM of the child: the kernel's peak RSS of the main process since exec (incl. file pages)
    peak_anon_bytes: int  # peak Σ RssAnon over the process tree (private memory), polled
    peak_tree_rss_bytes: int  # peak Σ VmRSS over the process tree, polled
    peak_processes: int
    cpu_s: float = 0.0  # user + system CPU of the child and the descendants it waited for
    loadavg_1m: float = 0.0  # the machine's 1-minute load average when the run started (other work!)
    stderr_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _proc_mem(pid: int) -> tuple[int, int, int]:
    """(RssAnon, VmRSS, VmHWM) of one process from /proc, zeros where it is gone."""
    anon = rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, rss, hwm


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None, poll_s: float = 0.02,
                 timeout_s: float | None = None, check: bool = True) -> Measured:
    """Run ``cmd`` as a child; wall time, its peak RSS and the polled peaks over its process tree.

    The child's peak RSS is its VmHWM polled from /proc, not ``ru_maxrss``: Linux carries the parent's RSS at
    fork into the child's ``ru_maxrss`` across exec, so a benchmark that had generated a 1 GB model in memory
    would see every later child "peak" at 1 GB+. ``ru_maxrss`` is the fallback when no poll saw the child.
    """
    import psutil
    full_env = {**os.environ, **(env or {})}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"anon": 0, "rss": 0, "n": 0, "hwm": 0}
    stop = threading.Event()
    out_chunks: list[str] = []
    err_chunks: list[str] = []

    def pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if len(sink) > 400:
                del sink[:200]

    def poller() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = [root]
            anon = rss = 0
            for p in procs:
                a, r, h = _proc_mem(p.pid)
                anon += a
                rss += r
                if p.pid == proc.pid:
                    peaks["hwm"] = max(peaks["hwm"], h)
            peaks["anon"] = max(peaks["anon"], anon)
            peaks["rss"] = max(peaks["rss"], rss)
            peaks["n"] = max(peaks["n"], len(procs))
            stop.wait(poll_s)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_chunks), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_chunks), daemon=True),
               threading.Thread(target=poller, daemon=True)]
    for th in threads:
        th.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.kill()
        raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    for th in threads:
        th.join(timeout=5)
    m = Measured(list(cmd), proc.returncode, wall, peaks["hwm"] or ru.ru_maxrss * 1024, peaks["anon"], peaks["rss"], peaks["n"],
                 ru.ru_utime + ru.ru_stime, load, "".join(err_chunks)[-3000:])
    if check and m.returncode != 0:
        raise RuntimeError(f"command failed ({m.returncode}): {' '.join(cmd)}\n{m.stderr_tail}")
    return m


def tvbasis_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tvbasis.cli", "-q", *args]


def naive_cmd(fam: Family, T: int, M: int, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve().parent / "naive_build.py"), "--pretrained",
            str(fam.pretrained), *[str(p) for p in list(fam.finetuned.values())[:T]], "-M", str(M), "--out", str(out)]


def naive_peak_estimate(fam: Family, T: int, M: int) -> int:
    """Bytes the naive in-memory build holds at its peak, for deciding whether it fits: while V is stacked,
    the T float32 task-vector dicts, the T flattened copies and V itself (3T float32 models), plus M bases and
    the pretrained. Measured peaks were 0.93–1.0× this (fp32 250 MB T = 16: 12.3 GB; bf16 100 MB T = 32: 21.0 GB)."""
    p32 = fam.num_parameters * 4
    return (3 * T + M + 1) * p32 + fam.model_bytes


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
