"""Subcommands on checkpoints and task vectors: ``vector``, ``merge``, ``apply``, ``info``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tvbasis.cli.common import (
    FT_HELP,
    common_io,
    dry_run,
    dry_run_flag,
    engine_flags,
    filters,
    finetuned,
    finish,
    finite,
    finite_float,
    floats,
    json_flag,
    merge_flags,
    merge_spec,
    pairs,
    print_table,
    run_options,
)
from tvbasis.cli.plans import merge_plan
from tvbasis.errors import ConfigError


def cmd_vector(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.vectors import TaskVector
    tv = TaskVector.from_checkpoints(args.pretrained, args.finetuned, args.include, args.exclude)
    out = tv.save(args.out, dtype=parse_dtype(args.dtype), force=args.force, run=run_options(args))
    return finish(args, f"wrote task vector {out} ({len(tv)} tensors, {tv.num_parameters:,} parameters)",
                  {"out": str(out), "tensors": len(tv), "parameters": tv.num_parameters, "dtype": args.dtype or "float32"})


#: PEFT's add_weighted_adapter combinations, for --out-format peft only (tvbasis.lora.merge_peft.PEFT_MERGES)
_PEFT_ONLY = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "linear")

#: flags a mergekit config replaces (it gives the models, the method and its parameters, weights, λ and dtype)
_CONFIG_EXCLUDES = ("pretrained", "finetuned", "method", "weight", "fisher", "scaling_coef", "dtype", "density",
                    "sign", "trim_scope", "seed", "k", "mean", "param")


def cmd_merge_config(args: argparse.Namespace) -> int:
    """``merge --config merge.yml``: mergekit's YAML (tvbasis.interop.mergekit) as θ₀ + λ·merge(w_t·τ_t)."""
    from tvbasis.interop.mergekit import load_mergekit_config
    from tvbasis.io import check_output, parse_dtype
    from tvbasis.passes import merge_task_vectors
    given = [f"--{f.replace('_', '-')}" for f in _CONFIG_EXCLUDES if getattr(args, f, None) not in (None, False, [])]
    if given:
        raise ConfigError(f"--config gives the models, method, parameters, weights, scaling and dtype of the merge; "
                          f"drop {', '.join(given)}")
    cfg = load_mergekit_config(args.config)
    for note in cfg.notes:
        print(f"note: {args.config}: {note}", file=sys.stderr)
    models = {n: str(p) for n, p in cfg.models.items()}
    if (rc := dry_run(args, lambda: merge_plan(str(cfg.base_model), models, cfg.method, cfg.spec.params, args.include,
                                               args.exclude, args.out, cfg.dtype, args.max_shard_size))) is not None:
        return rc
    check_output(Path(args.out), args.force)
    run = run_options(args)
    tv = merge_task_vectors(str(cfg.base_model), models, cfg.spec, cfg.weights, None, args.include, args.exclude, run,
                            plan=cfg.plan)
    params = {"method": cfg.method, **cfg.spec.params, "models": ", ".join(models), "weights": cfg.weights,
              "mergekit_config": str(args.config), "mergekit_method": cfg.mergekit_method,
              **({"per_tensor_values": "gradients/filters/per-model values from the config"} if cfg.plan else {})}
    out = tv.apply_to(str(cfg.base_model), cfg.scaling_coef, args.out, dtype=parse_dtype(cfg.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=run, method=cfg.method,
                      parameters=params, inputs=[str(cfg.base_model), *models.values()])
    return finish(args, f"wrote merged model {out} (mergekit {cfg.mergekit_method} as tvbasis {cfg.method}, "
                  f"{len(models)} models, scaling_coef {cfg.scaling_coef:g}" + (f", {cfg.dtype}" if cfg.dtype else "")
                  + ")", {"out": str(out), "method": cfg.method, "mergekit_method": cfg.mergekit_method,
                          "models": models, "scaling_coef": cfg.scaling_coef, "dtype": cfg.dtype})


def cmd_merge_peft(args: argparse.Namespace) -> int:
    """``merge --out-format peft``: PEFT adapters merged into one adapter (tvbasis.lora.merge_peft)."""
    from tvbasis.io import parse_dtype
    from tvbasis.lora.merge_peft import merge_adapters, plan_merge
    method = args.method or "cat"
    peft_method = method in _PEFT_ONLY  # else a tvbasis merge method on each module's ΔW, cut to --rank
    flags = ("fisher", "scaling_coef", *(("trim_scope", "k", "mean", "param") if peft_method else ()))
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f, None) not in (None, False, [])]
    if given or args.config:
        raise ConfigError(f"--out-format peft merges adapters into an adapter (--method, --weight, --rank, the "
                          f"method's parameters, --dtype); drop {', '.join(given) or '--config'}")
    adapters = finetuned(args.finetuned)
    weights = floats(pairs(args.weight, "--weight"), "--weight")
    kw: dict[str, Any] = {"rank": args.rank}
    if peft_method:
        kw.update(density=1.0 if args.density is None else args.density, sign=args.sign or "total",
                  seed=args.seed or 0)
    else:
        kw["params"] = merge_spec(args, method).params
    if (rc := dry_run(args, lambda: plan_merge(args.pretrained, adapters, args.out, method, weights,
                                               **{k: v for k, v in kw.items() if k != "seed"}))) is not None:
        return rc
    res = merge_adapters(args.pretrained, adapters, args.out, method, weights, dtype=parse_dtype(args.dtype),
                         force=args.force, **kw)
    err = "n/a" if res.rel_error is None else f"{res.rel_error:.3g}"
    return finish(args, f"wrote PEFT adapter {res.path} ({res.method}, {len(res.ranks)} modules, rank "
                  f"{min(res.ranks.values())}..{max(res.ranks.values())}, relative error of the rank cut {err})",
                  {"out": str(res.path), "out_format": "peft", "method": res.method, "adapters": adapters,
                   "ranks": res.ranks, "rel_error": res.rel_error})


def cmd_merge(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.passes import merge_task_vectors
    if getattr(args, "out_format", "model") == "peft":
        if not args.pretrained:
            raise ConfigError("merge --out-format peft needs --pretrained and --finetuned NAME=ADAPTER_DIR")
        return cmd_merge_peft(args)
    if args.rank is not None:
        raise ConfigError("--rank applies to --out-format peft (the rank of the merged adapter)")
    if args.method in _PEFT_ONLY:
        raise ConfigError(f"method {args.method!r} is PEFT's adapter merge: add --out-format peft (every input a "
                          f"PEFT adapter)")
    if args.config:
        return cmd_merge_config(args)
    if not args.pretrained:
        raise ConfigError("merge needs --pretrained and --finetuned NAME=PATH (or a mergekit --config merge.yml)")
    args.method = args.method or "task_arithmetic"
    args.scaling_coef = 1.0 if args.scaling_coef is None else args.scaling_coef
    ft = finetuned(args.finetuned)
    spec = merge_spec(args)
    weights = floats(pairs(args.weight, "--weight"), "--weight")
    fisher = pairs(args.fisher, "--fisher") or None
    if (rc := dry_run(args, lambda: merge_plan(args.pretrained, ft, spec.method, spec.params, args.include,
                                               args.exclude, args.out, args.dtype, args.max_shard_size))) is not None:
        return rc
    from tvbasis.io import check_output
    check_output(Path(args.out), args.force)
    run = run_options(args)
    tv = merge_task_vectors(args.pretrained, ft, spec, weights, fisher, args.include, args.exclude, run)
    params = {"method": spec.method, **spec.params, "models": ", ".join(ft), **({"weights": weights} if weights else {})}
    out = tv.apply_to(args.pretrained, args.scaling_coef, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=run, method=spec.method,
                      parameters=params, inputs=[args.pretrained, *ft.values(), *(fisher or {}).values()])
    return finish(args, f"wrote merged model {out} ({spec.method}, {len(ft)} models, scaling_coef "
                  f"{args.scaling_coef})", {"out": str(out), "method": spec.method, "parameters": spec.params,
                                            "models": ft, "scaling_coef": args.scaling_coef, "dtype": args.dtype})


def cmd_apply(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.vectors import TaskVector
    if not args.vector:
        raise ConfigError("give at least one --vector FILE[=COEF]")
    vectors, coefs = [], []
    for item in args.vector:
        path, _, coef = item.rpartition("=") if "=" in item else (item, "", "1")
        c = finite(coef, f"--vector {item!r}: coefficient")
        vectors.append(TaskVector.load(path, args.include, args.exclude))
        coefs.append(c)
    tv = TaskVector.linear_combination(vectors, coefs)
    out = tv.apply_to(args.pretrained, args.scaling_coef, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=run_options(args),
                      method="task_arithmetic", parameters={"vectors": ", ".join(args.vector)})
    return finish(args, f"wrote {out} (θ₀ + {args.scaling_coef}·Σ coef·τ over {len(vectors)} vector(s))",
                  {"out": str(out), "vectors": dict(zip(args.vector, coefs)), "scaling_coef": args.scaling_coef,
                   "dtype": args.dtype})


def cmd_info(args: argparse.Namespace) -> int:
    from tvbasis.io import dtype_name, human_bytes, open_checkpoint
    ckpt = open_checkpoint(args.path)
    rows = []
    total_sq = 0.0
    dtypes: dict[str, int] = {}
    for s in ckpt.specs():
        dtypes[dtype_name(s.dtype)] = dtypes.get(dtype_name(s.dtype), 0) + s.numel
        norm = None
        if args.norms and s.is_float:
            t = ckpt.get(s.name).double()
            sq = float((t * t).sum())
            total_sq += sq
            norm = sq**0.5
        rows.append({"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "numel": s.numel,
                     **({"norm": norm} if norm is not None else {})})
    summary = {"path": str(ckpt.path), "tensors": len(rows), "parameters": ckpt.num_parameters,
               "bytes": ckpt.nbytes, "dtypes": dtypes, **({"norm": total_sq**0.5} if args.norms else {}),
               "metadata": ckpt.metadata()}
    if args.json:
        print(json.dumps({**summary, "tensor_list": rows}, indent=1))
        return 0
    print(f"{ckpt.path}: {len(rows)} tensors, {ckpt.num_parameters:,} parameters, {human_bytes(ckpt.nbytes)}")
    print("dtypes: " + ", ".join(f"{k} ({v:,})" for k, v in dtypes.items()))
    if args.norms:
        print(f"global L2 norm: {total_sq**0.5:.6g}")
    shown = rows if args.all else rows[:40]
    print_table(["tensor", "shape", "dtype", *(["norm"] if args.norms else [])],
                 [[r["name"], "×".join(map(str, r["shape"])) or "scalar", r["dtype"],
                   *([f"{r['norm']:.5g}" if "norm" in r else "–"] if args.norms else [])] for r in shown])
    if len(rows) > len(shown):
        print(f"... {len(rows) - len(shown)} more (use --all)")
    return 0



def register(sub: Any) -> None:
    s = sub.add_parser("vector", help="extract a task vector (fine-tuned − pretrained) and save it",
                       description="Extract the task vector of one fine-tune and save it as safetensors.")
    s.add_argument("--pretrained", required=True, help="pretrained model (HF dir, .safetensors, .bin/.pt)")
    s.add_argument("--finetuned", required=True, help=FT_HELP)
    s.add_argument("--out", required=True, help="output .safetensors file")
    common_io(s)
    filters(s)
    engine_flags(s)
    json_flag(s)
    s.set_defaults(fn=cmd_vector)

    s = sub.add_parser("merge", help="merge fine-tunes into one model directory",
                       description="Merge fine-tunes of one pretrained model with a merge method and write a Hugging "
                       "Face model directory: θ₀ + scaling_coef · merge(τ_1..τ_T). Or read mergekit's YAML "
                       "(--config merge.yml: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, "
                       "breadcrumbs_ties, della, della_linear, slerp, nuslerp, model_stock, with gradient lists, "
                       "filters and per-model densities; anything tvbasis cannot reproduce is refused by key; "
                       "docs/mergekit.md). With --out-format peft, PEFT adapters merge into one adapter.")
    from tvbasis.merge import available_methods
    s.add_argument("--config", metavar="MERGE.YML", help="a mergekit config (models: form); replaces --pretrained, "
                   "--finetuned, --method, the merge parameters, --weight, --scaling-coef and --dtype")
    s.add_argument("--pretrained")
    s.add_argument("--finetuned", action="append", metavar="NAME=PATH",
                   help="task name and " + FT_HELP + "; repeat per task")
    s.add_argument("--method", choices=sorted({*available_methods(), *_PEFT_ONLY}),
                   help="merge method (default task_arithmetic; with --out-format peft: PEFT's cat (default), svd, "
                   "ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd or linear, or any tvbasis method "
                   "on each module's ΔW, cut to --rank)")
    s.add_argument("--scaling-coef", type=finite_float, help="λ in θ₀ + λ·τ (default 1.0)")
    s.add_argument("--weight", action="append", metavar="NAME=W", help="per-model weight (default 1)")
    s.add_argument("--fisher", action="append", metavar="NAME=FILE", help="diagonal Fisher safetensors per model")
    s.add_argument("--out", required=True)
    s.add_argument("--out-format", choices=["model", "peft"], default="model",
                   help="model: a merged model directory (default); peft: every --finetuned a PEFT LoRA adapter, "
                   "merged into one PEFT adapter directory as PEFT's add_weighted_adapter does")
    s.add_argument("--rank", type=int, help="--out-format peft, SVD methods: rank of the merged adapter (default: the "
                   "largest input rank)")
    merge_flags(s)
    common_io(s)
    filters(s)
    engine_flags(s, device=True)
    json_flag(s)
    dry_run_flag(s)
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("apply", help="apply saved task vectors with signed coefficients (add, negate, analogy)",
                       description="Write θ₀ + scaling_coef · Σ coef_i·τ_i for saved task vectors; negative "
                       "coefficients negate (unlearn), c + b − a is an analogy.")
    s.add_argument("--pretrained", required=True)
    s.add_argument("--vector", action="append", metavar="FILE[=COEF]", help="a saved task vector and its coefficient")
    s.add_argument("--scaling-coef", type=finite_float, default=1.0)
    s.add_argument("--out", required=True)
    common_io(s)
    filters(s)
    engine_flags(s)
    json_flag(s)
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser("info", help="tensors, parameter count, dtypes and norms of a checkpoint or task vector")
    s.add_argument("path")
    s.add_argument("--norms", action="store_true", help="compute per-tensor L2 norms (reads the data)")
    s.add_argument("--all", action="store_true", help="list every tensor")
    json_flag(s, "the checkpoint's summary and tensor list")
    s.set_defaults(fn=cmd_info)
