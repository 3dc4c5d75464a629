"""Localize-and-Stitch subcommands: ``localize`` (masks file) and ``stitch`` (model directory).

``localize`` is dataless unless ``--data`` is given; the trained localizer (``tvbasis.eval.localize``) runs on the
evaluation encoder, imported only then — so the core CLI needs nothing of the eval extra, and says so in one line
when ``--data`` is used without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tvbasis.cli.common import (
    FT_HELP,
    common_io,
    engine_flags,
    eval_extra,
    filters,
    finetuned,
    finish,
    json_flag,
    pairs,
    print_table,
    run_options,
)
from tvbasis.errors import ConfigError
from tvbasis.io import check_output, human_bytes, parse_dtype
from tvbasis.stitch import DEFAULT_SPARSITY, MaskSet, localize, open_masks, parse_clusters, stitch
from tvbasis.stitch.rules import rule_of
from tvbasis.store import open_store


def clusters_of(args: argparse.Namespace) -> Any:
    """The clusters of --store S (a cluster basis store) or --clusters a=0,b=0,c=1 (None when neither)."""
    store, text = getattr(args, "store", None), getattr(args, "clusters", None)
    if store and text:
        raise ConfigError("give --store or --clusters, not both")
    if store:
        return open_store(store)
    if text:
        return parse_clusters(text)
    return None


def _rule(args: argparse.Namespace) -> tuple[str, Any]:
    rule = rule_of(args.shared_mask, args.stitch_twice)
    clusters = clusters_of(args)
    if rule != "stitch" and clusters is None:
        raise ConfigError(f"--{'shared-mask' if rule == 'shared' else 'stitch-twice'} needs the clusters: "
                          "--store S (a cluster basis store) or --clusters a=0,b=0,c=1")
    if rule == "stitch" and clusters is not None:
        raise ConfigError("--store / --clusters are used with --shared-mask or --stitch-twice")
    return rule, clusters


def _summary(ms: MaskSet, what: str) -> None:
    dense = ms.num_parameters * 4 * ms.T
    print(f"wrote {what} {ms.path}: {len(ms.masks)} mask(s) for {ms.T} task(s) over {len(ms.specs)} tensors "
          f"({ms.num_parameters:,} parameters); {human_bytes(ms.nbytes)} = {100 * ms.nbytes / max(1, dense):.2f} % "
          f"of the float32 task vectors (masks {human_bytes(ms.mask_bytes)}, values {human_bytes(ms.value_bytes)})")
    print_table(["task", "mask", "density %"],
                [[t, ms.masks[ms.mask_of[t]], f"{100 * ms.density(t):.3f}"] for t in ms.tasks])


def cmd_localize(args: argparse.Namespace) -> int:
    ft = finetuned(args.finetuned)
    rule, clusters = _rule(args)
    data = pairs(args.data, "--data")
    check_output(Path(args.out), args.force)
    run = run_options(args)
    common: dict[str, Any] = {"include": args.include, "exclude": args.exclude, "shared_mask": rule == "shared",
                              "stitch_twice": rule == "twice", "clusters": clusters, "values": args.values,
                              "force": args.force, "run": run}
    if data:
        with eval_extra("--data (the trained localizer)"):
            from tvbasis.eval.localize import TrainedLocalizeSettings, localize_trained

            settings = TrainedLocalizeSettings(
                sparsity=args.sparsity, trim_scope=args.trim_scope, sigmoid_bias=args.sigmoid_bias, epochs=args.epochs,
                lr=args.lr, l1=args.l1, budget=args.budget, shots=args.shots, max_examples=args.max_examples,
                batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
            ms = localize_trained(pretrained=args.pretrained, finetuned=ft, data=data, out=args.out,
                                  settings=settings, progress=not args.quiet, **common)
    else:
        ms = localize(args.pretrained, ft, args.out, args.sparsity, args.trim_scope, **common)
    return finish(args, lambda: _summary(ms, "trained masks" if data else "masks"), {"out": str(ms.path),
                                                                                     **ms.summary()})


def cmd_stitch(args: argparse.Namespace) -> int:
    ft = pairs(args.finetuned, "--finetuned") or None
    rule, clusters = _rule(args)
    check_output(Path(args.out), args.force)
    masks = open_masks(args.masks)
    run = run_options(args)
    tv = stitch(args.pretrained, ft, masks, clusters=clusters, rule=rule,
                tasks=args.tasks.split(",") if args.tasks else None)
    params = {"masks": str(masks.path), "rule": rule, "tasks": ", ".join(ft or masks.tasks),
              "sparsity": masks.settings.get("sparsity"), "localizer": masks.settings.get("localizer")}
    out = tv.apply_to(args.pretrained, 1.0, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=run,
                      method="localize_and_stitch", parameters=params)
    src = "the fine-tunes" if ft else "the values stored in the masks file"
    return finish(args, f"wrote stitched model {out} ({rule}, {len(ft or masks.tasks)} tasks, τ from {src})",
                  {"out": str(out), "rule": rule, "masks": str(masks.path), "tasks": list(ft or masks.tasks),
                   "values_from": "finetuned" if ft else "masks", "dtype": args.dtype})


def _rule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shared-mask", action="store_true",
                   help="SharedMask: one majority-vote mask per cluster (M masks stored instead of T)")
    g.add_argument("--stitch-twice", action="store_true",
                   help="StitchTwice: within each cluster keep only coordinates claimed by exactly one member, "
                        "then stitch across all tasks with overlap averaging")
    p.add_argument("--store", metavar="S", help="the clusters of this cluster basis store (tvbasis build "
                   "--method cluster)")
    p.add_argument("--clusters", metavar="A=0,B=0,C=1", help="the clusters, one label per task")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "localize", help="Localize-and-Stitch: a sparse mask per task vector (dataless, or trained with --data)",
        description="Localize each task vector: a binary mask at --sparsity (default 1 %% of the localized "
                    "tensors — all floating-point tensors, or those --include / --exclude choose). Dataless (no "
                    "--data): the entries of largest |τ| per tensor (--trim-scope global: over all of them). "
                    "Trained (--data NAME=FILE per task, a CSV/TSV/JSONL with text and label columns or a "
                    "benchmark task name): the L&S localizer on few-shot examples through the evaluation encoder. "
                    "Writes a masks file: masks bit-packed, the task vectors' values on them, every setting.")
    p.add_argument("--pretrained", required=True, help="the pretrained model")
    p.add_argument("--finetuned", action="append", metavar="NAME=PATH", help=FT_HELP + "; repeatable")
    p.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                   help=f"fraction of the localized parameters each mask keeps (default {DEFAULT_SPARSITY})")
    p.add_argument("--trim-scope", choices=["tensor", "global"], default="tensor",
                   help="top entries per tensor (default) or over all localized tensors together")
    filters(p)
    _rule_flags(p)
    p.add_argument("--values", choices=["float32", "float16", "bfloat16", "none"], default="float32",
                   help="dtype of the task-vector values stored on the masks (none: masks only; default float32)")
    t = p.add_argument_group("trained localizer (with --data)")
    t.add_argument("--data", action="append", metavar="NAME=FILE",
                   help="labelled few-shot data of a task (CSV/TSV/JSONL, text and label columns) or a benchmark "
                        "task name; one per --finetuned")
    t.add_argument("--shots", type=int, default=64, help="examples per class (default 64)")
    t.add_argument("--max-examples", type=int, help="at most this many examples per task")
    t.add_argument("--epochs", type=int, default=10, help="mask training epochs (default 10)")
    t.add_argument("--lr", type=float, default=10.0,
                   help="mask learning rate in logits per epoch at the top-s gradient (default 10)")
    t.add_argument("--l1", type=float, default=0.0, help="L1 weight on sigmoid(S), same units (default 0)")
    t.add_argument("--sigmoid-bias", type=float, default=3.0, help="initial mask logits ±σ_b (default 3)")
    t.add_argument("--budget", choices=["round", "topk"], default="round",
                   help="final mask: round(sigmoid(S)) (default, L&S) or exactly the initial mask's size")
    t.add_argument("--batch-size", type=int, default=32, help="few-shot batch size (default 32)")
    t.add_argument("--max-length", type=int, default=64, help="max tokens per text (default 64)")
    t.add_argument("--seed", type=int, default=0, help="seed of the few-shot choice (default 0)")
    p.add_argument("--out", required=True, metavar="MASKS", help="the masks file (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    json_flag(p, "the masks file's summary")
    engine_flags(p)
    p.set_defaults(fn=cmd_localize)

    s = sub.add_parser(
        "stitch", help="Localize-and-Stitch: θ₀ + Σ_t (m_t / n) ⊙ τ_t from a masks file",
        description="Stitch the localized task vectors into the pretrained model with overlap averaging (a "
                    "coordinate covered by n masks gets the mean of their τ; no scaling coefficient). τ comes from "
                    "the fine-tunes when given, else from the values the masks file stores. With --shared-mask / "
                    "--stitch-twice and the clusters of --store or --clusters: SharedMask / StitchTwice.")
    s.add_argument("--pretrained", required=True, help="the pretrained model")
    s.add_argument("--finetuned", action="append", metavar="NAME=PATH",
                   help=FT_HELP + "; repeatable (default: the values stored in the masks file)")
    s.add_argument("--masks", required=True, metavar="MASKS", help="a masks file from tvbasis localize")
    s.add_argument("--tasks", metavar="A,B", help="stitch only these tasks of the masks file (without --finetuned)")
    _rule_flags(s)
    s.add_argument("--out", required=True, help="output model directory")
    common_io(s)
    engine_flags(s)
    json_flag(s)
    s.set_defaults(fn=cmd_stitch)
