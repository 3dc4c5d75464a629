"""Inference speed of the bench's encoders in float32 and under bfloat16 autocast (``tvbasis bench --eval-dtype``).

For each model, the same real test texts (a bundled task's test split, tokenised once, length-sorted batches of
the bench's size) are encoded in float32 and in bfloat16, alternating, ``--repeats`` times; the table has the
median wall time of each, their ratio (measured in the same run, so load hits both alike), and how far the
bfloat16 embeddings are from the float32 ones (the lowest cosine over the texts). Whether bfloat16 pays depends
on the CPU (AMX / AVX512-BF16): the flags are recorded.

    python benchmarks/eval_dtype.py --models minilm mpnet --task banking --texts 128 --repeats 3

``--pairs CACHE.jsonl``: instead, the agreement of scores from a benchmark's score cache (``<out>/eval-cache.jsonl``)
where the same run was computed in two precisions (a run moved to ``--eval-dtype bfloat16`` with ``--resume``):
the precision is part of each score's context digest, so the scores of the same weights, task and split under the
two contexts with the most scores are paired (the first context in the file first: the earlier run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.models import resolve_model
from tvbasis.eval.tasks import load_task


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("amx", "avx512_bf16")))
    except OSError:
        pass
    return []


def pairs(path: Path, name: str) -> int:
    import json

    by_ctx: dict[str, dict[tuple[str, str, str], float]] = {}
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
            c, w, t, sp = d["k"].split("|")
        except (ValueError, KeyError):
            continue
        by_ctx.setdefault(c, {})[(w, t, sp)] = float(d["v"])
    ctxs = sorted(by_ctx, key=lambda c: -len(by_ctx[c]))[:2]
    if len(ctxs) < 2:
        raise SystemExit(f"{path}: fewer than two contexts")
    ctxs.sort(key=list(by_ctx).index)  # first written first
    a, b = by_ctx[ctxs[0]], by_ctx[ctxs[1]]
    common = sorted(set(a) & set(b))
    rows, records = [], {}
    for split in ("dev", "test", "all"):
        keys = [k for k in common if split == "all" or k[2] == split]
        if not keys:
            continue
        d = [b[k] - a[k] for k in keys]
        rec = {"pairs": len(d), "mean_diff": statistics.mean(d), "mean_abs_diff": statistics.mean(abs(x) for x in d),
               "max_abs_diff": max(abs(x) for x in d), "sd_diff": statistics.pstdev(d),
               "identical": sum(x == 0 for x in d)}
        records[split] = rec
        rows.append([split, len(d), f"{100 * rec['mean_diff']:+.3f}", f"{100 * rec['mean_abs_diff']:.3f}",
                     f"{100 * rec['max_abs_diff']:.2f}", f"{100 * rec['sd_diff']:.3f}", rec["identical"]])
    table = markdown_table(["split", "pairs", "mean (second − first), points", "mean |diff|, points",
                            "max |diff|, points", "sd of diff, points", "identical"], rows)
    save_results(name, {"cache": str(path), "contexts": ctxs, "scores_per_context": [len(a), len(b)],
                        "splits": records}, table)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "mpnet"])
    ap.add_argument("--task", default="banking")
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--name", default="eval_dtype")
    ap.add_argument("--pairs", type=Path, metavar="CACHE.jsonl", help="compare the two precisions' scores in a cache")
    a = ap.parse_args()
    if a.pairs:
        return pairs(a.pairs, a.name)
    texts = load_task(a.task, max_test=a.texts, seed=0)["test"].texts
    rows, records = [], []
    for name in a.models:
        path, _ = resolve_model(name)
        enc = Encoder(path, max_length=a.max_length)
        batches = enc.batches(enc.tokenize(texts))
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        emb: dict[str, torch.Tensor] = {}
        enc.encode_batches(batches, len(texts))  # warm-up (allocator, oneDNN kernels)
        for _ in range(a.repeats):
            for dt in ("float32", "bfloat16"):
                enc.eval_dtype = getattr(torch, dt)
                t0 = time.perf_counter()
                emb[dt] = enc.encode_batches(batches, len(texts))
                times[dt].append(time.perf_counter() - t0)
        f32, b16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
        cos = float((emb["float32"] * emb["bfloat16"]).sum(1).min())
        log(f"{name}: float32 {f32:.2f} s, bfloat16 {b16:.2f} s")
        records.append({"model": name, "texts": len(texts), "float32_s": times["float32"],
                        "bfloat16_s": times["bfloat16"], "speedup": f32 / b16, "min_cosine": cos,
                        "parameters": enc.describe()["parameters"]})
        rows.append([name, len(texts), f"{f32:.2f}", f"{b16:.2f}", f"{f32 / b16:.2f}×", f"{cos:.5f}"])
    flags = cpu_flags()
    table = (markdown_table(["model", "texts", "float32 s (median)", "bfloat16 s (median)", "speed-up",
                             "lowest cosine bf16 vs fp32"], rows)
             + f"\n\nCPU flags: {', '.join(flags) or 'no AMX / AVX512-BF16'}; {torch.get_num_threads()} threads.")
    save_results(a.name, {"rows": records, "cpu_flags": flags, "threads": torch.get_num_threads(),
                          "task": a.task}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
