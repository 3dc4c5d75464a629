"""Gemma 3 270M's LoRA rows: adapters of a real decoder LLM on the bench's tasks, stored through tvbasis's LoRA
stores and a ``--budget`` store of their merged deltas, scored as the MiniLM LoRA rows are
(``bench/frontier_lora.py``) but through the causal LM's label log-likelihood (``eval/lm_metrics.py``).

* adapters: ``eval/lm_lora.py`` (PEFT LoRA rank ``--rank`` on every attention and MLP projection, loss on the label
  tokens after ``Text: {text}\\nLabel:``), ``--train`` examples per task, cached under ``<work>/lm-lora/<task>``;
* rows: the adapters as they are; ``lora-factors`` int8; ``lora-joint`` (full cores, k = 8); ``--budget`` stores
  of the dense ΔW at the adapters' own bytes and at half of them (``--budget-fractions``); ``--rows all`` adds the
  rows that keep the adapters (nearly) exactly: ``lora-factors`` fp32, ``lora-joint`` k = 24 and
  ``pca M=0 + res lowrank:rank=r`` (the coded path from dense ΔW);
* per task: accuracy of θ₀ + ṽ_t at λ = 1 over the adapter's own (θ₀ + ΔW_t); addition θ₀ + λ·Σ ṽ_t with λ on dev;
  negation θ₀ − λ·ṽ_target on the pairs given, the control kept ≥ 95 % of zero-shot on dev.

Writes ``<out>/gemma_lora.json``, ``.md`` and ``frontier_lora.png``.

    python benchmarks/gemma_lora.py --tasks Yahoo,mcid,20NG,stackoverflow --train 500 --dev 16 --test 64 \\
        --out benchmarks/results/gemma-lora
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tvbasis.bench.bench import BenchConfig
from tvbasis.bench.frontier import Config
from tvbasis.bench.frontier_lora import (
    FAMILY,
    Adapters,
    adapter_file_bytes,
    lora_markdown,
    make_lora_plot,
    measure_lora,
)
from tvbasis.eval.causal_lm import CausalLMScorer
from tvbasis.eval.finetune import FinetuneSettings
from tvbasis.eval.lm_lora import lm_lora_finetune, lm_lora_settings
from tvbasis.eval.lm_metrics import LMEvaluator
from tvbasis.eval.metrics import lambda_grid
from tvbasis.eval.models import resolve_model
from tvbasis.eval.tasks import load_task


def configs(rank: int, budgets: list[str], rows: str = "") -> list[Config]:
    """The rows: every one with ``rows == "all"``; by default the ones that are not the adapters again (the fp32
    factors and a rank-r residual store the adapters exactly; a full-core joint store at k ≥ r·T nearly so)."""
    out = [Config("adapters as they are", FAMILY, "adapters"),
           Config("lora-factors fp32", FAMILY, "lora-factors"),
           Config("lora-factors int8", FAMILY, "lora-factors", {"factor_codec": "int8"}),
           Config("lora-joint full k=8", FAMILY, "lora-joint", {"k": 8, "cores": "full"}),
           Config("lora-joint full k=24", FAMILY, "lora-joint", {"k": 24, "cores": "full"}),
           Config(f"pca M=0 + res lowrank:rank={rank}", FAMILY, "residual", {"residual": f"lowrank:rank={rank}"})]
    out += [Config(f"budget {b} (dense ΔW)", "tvbasis --budget", "budget", {"budget": b}) for b in budgets]
    if rows == "all":
        return out
    skip = {"lora-factors fp32", "lora-joint full k=24", f"pca M=0 + res lowrank:rank={rank}"}
    return [c for c in out if c.label not in skip]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="Yahoo,mcid,20NG,stackoverflow")
    ap.add_argument("--pairs", default="Yahoo/mcid,stackoverflow/20NG", help="negation target/control pairs")
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--dev", type=int, default=16)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--rows", choices=["default", "all"], default="default",
                    help="all: also the rows that store the adapters exactly (fp32 factors, rank-r residuals, k=24)")
    ap.add_argument("--budget-fractions", default="1,0.5", help="budgets as fractions of the adapters' bytes")
    ap.add_argument("--work", type=Path, default=Path("tvbasis-work-gemma"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gemma-lora")
    a = ap.parse_args()
    t_start = time.time()
    names = a.tasks.split(",")
    pairs = tuple(tuple(p.split("/")) for p in a.pairs.split(",") if p)
    model_dir, _ = resolve_model("gemma3-270m")
    assert model_dir is not None
    tasks = {n: load_task(n, max_train=a.train, max_dev=a.dev, max_test=a.test, seed=0) for n in names}
    names = [t.name for t in tasks.values()]
    tasks = {t.name: t for t in tasks.values()}

    settings = FinetuneSettings(max_train=a.train, max_length=a.max_length, batch_size=8, epochs=a.epochs, seed=0,
                                data_seed=0)
    lora = lm_lora_settings(a.rank)
    t0 = time.time()
    results = {n: lm_lora_finetune(tasks[n], a.work, model_dir, settings, lora, progress=True) for n in names}
    adapters = Adapters({n: Path(r.path) for n, r in results.items()}, {n: r.reused for n, r in results.items()},
                        lora, round(time.time() - t0, 1))
    print(f"adapters: {adapters.train_seconds} s ({sum(adapters.reused.values())} reused)", flush=True)

    scorer = CausalLMScorer(model_dir, max_length=a.max_length)
    ev = LMEvaluator(scorer, tasks, progress=False)
    t0 = time.time()
    zero = {s: ev.zero_shot(s) for s in ("dev", "test")}
    print(f"zero-shot test: {zero['test']} ({time.time() - t0:.0f} s)", flush=True)

    total = sum(adapter_file_bytes(model_dir, adapters.dirs).values())  # the headers; no ΔW formed twice
    budgets = [f"{int(total * float(f))}B" for f in a.budget_fractions.split(",") if f]
    cfg = BenchConfig(tasks=tuple(names), pairs=pairs, grid=lambda_grid(0.1, 1.0), search="refine", Ms=(1,),
                      neg_grid=lambda_grid(0.25, 1.0), max_dev=a.dev, max_test=a.test, progress=True)
    cfg = cfg.resolved()
    lora_result = measure_lora(adapters, model_dir, names, ev, cfg, a.work / "stores", configs(a.rank, budgets, a.rows))
    result = {"benchmark": "gemma_lora", "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model_dir": str(model_dir),
              "tasks": names, "pairs": [list(p) for p in pairs], "train": a.train, "dev": a.dev, "test": a.test,
              "max_length": a.max_length, "zero_shot": zero, "lora": lora_result, "scoring_passes": ev.passes,
              "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None,
              "seconds": round(time.time() - t_start, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gemma_lora.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = lora_markdown(result)
    (a.out / "gemma_lora.md").write_text(f"`{result['command']}`\n\n{md}\n\nTotal {result['seconds'] / 60:.1f} min "
                                         f"({ev.passes} scoring passes over a task split).\n")
    make_lora_plot(result, a.out)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
