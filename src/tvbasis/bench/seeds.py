"""``tvbasis bench --seeds K``: the benchmark repeated over K seeds, every number reported as mean ± std.

Seed k of a run with ``--seed S`` is S + k (k = 0 … K − 1). It is the fine-tuning seed of the full task vectors
(each seed's fine-tunes are cached side by side: ``finetune.finetune_dir``) and the basis seed of the stores
(``options["seed"]`` of the autoencoder, random, random-sample and cluster methods). The train/dev/test subsets
stay those of seed S for every k, so the spread is that of training and basis fitting, on the same examples.

With the bad-task filter on (``--tasks many``), every seed's fine-tunes are trained first and a task is kept
only when all of them beat the majority baseline; every seed then runs on the same kept tasks.

Output: ``<out>/seed-<s>/bench.json`` and ``bench.md`` per seed, and ``<out>/bench.json``, ``bench.md`` and the
plots of the aggregate, whose numbers are stats ``{"mean", "std", "per_seed"}`` (``spread.aggregate``; std is
the sample standard deviation). K = 1 is exactly ``run_bench``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tvbasis.bench import bench
from tvbasis.bench.plots import make_plots
from tvbasis.bench.spread import STD_KIND, aggregate, means_view
from tvbasis.bench.stitch_rows import stitch_markdown
from tvbasis.bench.task_filter import TaskFilterReport, filter_tasks
from tvbasis.eval.finetune import ensure_writable

log = logging.getLogger(__name__)


def seed_list(cfg: bench.BenchConfig) -> list[int]:
    return [cfg.seed + k for k in range(cfg.seeds)]


def seed_config(cfg: bench.BenchConfig, seed: int, out: Path) -> bench.BenchConfig:
    """The one-seed run of ``cfg`` at ``seed``: fine-tuning and basis seed ``seed``, data subsets of cfg's."""
    return replace(cfg, seed=seed, data_seed=cfg.subset_seed, seeds=1, out=str(out / f"seed-{seed}"), plots=False)


def _row_key(row: Mapping[str, Any]) -> tuple[str, Any]:
    return row["method"], row.get("M")


def aggregate_results(results: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One result from the per-seed results: rows matched by (method, M) in the first seed's order, every
    number a stat over the seeds (``spread.aggregate``)."""
    first = results[0]
    keys = list(dict.fromkeys(_row_key(r) for res in results for r in res["rows"]))
    by_seed = [{_row_key(r): r for r in res["rows"]} for res in results]
    rows = [aggregate([rs.get(k) for rs in by_seed]) for k in keys]
    timings = [res.get("timings", {}) for res in results]
    total = {k: round(sum(float(t.get(k, 0.0)) for t in timings), 1) for k in dict.fromkeys(k for t in timings
                                                                                              for k in t)}
    config = dict(first.get("config") or {})
    config.update(seed=seeds[0], seeds=len(seeds))
    return {
        "config": config, "seeds": list(seeds), "std": STD_KIND,
        "tasks": first.get("tasks"), "model": first.get("model"), "vector_bytes": first["vector_bytes"],
        "zero_shot": aggregate([r["zero_shot"] for r in results]),
        "finetuned": aggregate([r["finetuned"] for r in results]),
        "rows": rows,
        "cosine": aggregate([r.get("cosine") for r in results], "cosine"),
        "task_filter": first.get("task_filter"),
        "continual": aggregate([r.get("continual") for r in results], "continual"),
        "timings": dict(total, per_seed=timings),
    }


def prefilter(cfg: bench.BenchConfig, seeds: Sequence[int], out: Path) -> tuple[bench.BenchConfig, TaskFilterReport]:
    """The bad-task filter over every seed's fine-tunes; cfg on the kept tasks (filter off from then on)."""
    tasks: Mapping[str, Any] = {}
    devs = []
    for s in seeds:
        tasks, ft_dev = bench.finetuned_dev_accuracies(seed_config(cfg, s, out))
        devs.append(ft_dev)
    report = filter_tasks(tasks, devs)
    for line in report.lines():
        log.info(line)
    kept = cfg.keep_tasks(list(report.kept), pairs_given=cfg.pairs is not None) if report.dropped else cfg
    return replace(kept, task_filter=False), report


def run_seeds(config: bench.BenchConfig) -> dict[str, Any]:
    """Run the benchmark for ``config.seeds`` seeds and aggregate (``config.seeds == 1``: ``run_bench``)."""
    if config.seeds == 1:
        return bench.run_bench(config)
    cfg = config.resolved()
    seeds = seed_list(cfg)
    work = ensure_writable(cfg.work)
    out = ensure_writable(cfg.out or work / "bench")
    report = None
    t0 = time.time()
    if cfg.task_filter:
        cfg, report = prefilter(replace(cfg, pairs=config.pairs), seeds, out)
        cfg = cfg.resolved()
    t_filter = time.time() - t0
    per_seed = []
    for s in seeds:
        log.info("bench: seed %d of %s", s, seeds)
        per_seed.append(bench.run_bench(seed_config(cfg, s, out)))
    result = aggregate_results(per_seed, seeds)
    result["config"] = bench._jsonable(dict(asdict(cfg), seed=seeds[0], seeds=len(seeds)))
    result["task_filter"] = report.to_dict() if report else None
    if report:  # the fine-tunes were trained (or read from the cache) here, before the runs
        t = result["timings"]
        t.update(task_filter=round(t_filter, 1), total=round(t.get("total", 0.0) + t_filter, 1))
        t["finetune"] = round(t.get("finetune", 0.0) + t_filter, 1)
    result["per_seed_results"] = [str(Path(r.get("out") or out / f"seed-{s}") / "bench.json")
                                  for r, s in zip(per_seed, seeds)]
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["markdown"] = bench.markdown_table(result) + stitch_markdown(means_view(result))
    (out / "bench.md").write_text(result["markdown"] + "\n")
    if cfg.plots:
        result["plots"] = [str(p) for p in make_plots(result, out)]
    result["out"] = str(out)
    return result
