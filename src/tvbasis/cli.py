"""The ``tvbasis`` command: subcommands with kebab-case flags; errors are one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tvbasis._version import __version__
from tvbasis.errors import ConfigError, TvbasisError

log = logging.getLogger("tvbasis")


# ------------------------------------------------------------------------------------------------ parsing
FT_HELP = ("a fine-tuned model (any layout the pretrained may have) or a PEFT LoRA adapter directory "
           "(adapter_config.json + adapter_model.safetensors) of the pretrained model")


def _pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if not k or not v:
            raise ConfigError(f"{what} expects NAME=VALUE, got {item!r}")
        if k in out:
            raise ConfigError(f"{what}: name {k!r} given twice")
        out[k] = v
    return out


def _finetuned(items: Sequence[str] | None) -> dict[str, str]:
    ft = _pairs(items, "--finetuned")
    if not ft:
        raise ConfigError("give at least one --finetuned NAME=PATH")
    return ft


def _floats(items: dict[str, str], what: str) -> dict[str, float]:
    out = {}
    for k, v in items.items():
        try:
            out[k] = float(v)
        except ValueError:
            raise ConfigError(f"{what} {k}={v!r}: not a number") from None
    return out


def _combo(text: str) -> dict[str, float]:
    return _floats(_pairs([p for p in text.split(",") if p], "--combine"), "--combine")


def _merge_spec(args: argparse.Namespace, method: str | None = None) -> Any:
    from tvbasis.merge import MergeSpec, parse_merge_params
    params: dict[str, Any] = parse_merge_params(list(getattr(args, "param", None) or []))
    for flag in ("density", "sign", "trim_scope", "seed", "k"):
        v = getattr(args, flag, None)
        if v is not None:
            params[flag] = v
    if getattr(args, "mean", False):
        params["normalize"] = True
    return MergeSpec(method or args.method, params)


def _common_io(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    if dtype:
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of written tensors "
                       "(default: the pretrained model's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="only tensors matching this glob (or re:REGEX); repeatable")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave out tensors matching this glob (or re:REGEX), e.g. '*classifier*'; repeatable")


def _engine_flags(p: argparse.ArgumentParser, device: bool = False) -> None:
    """--engine/--workers/--ray-address; --device only where the command does its arithmetic on a device."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where per-tensor work runs (default local threads; ray needs tvbasis[ray])")
    p.add_argument("--workers", type=int, help="threads (local) or parallel tasks (ray)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    if device:
        p.add_argument("--device", default="cpu",
                       help="torch device for the Gram / merge arithmetic, e.g. cuda (default cpu)")


def _merge_flags(p: argparse.ArgumentParser, default: str | None = "task_arithmetic") -> None:
    p.add_argument("--density", type=float, help="fraction of each task vector kept by trimming (ties, topk, dare)")
    p.add_argument("--sign", choices=["total", "frequency"], help="TIES sign election (default total)")
    p.add_argument("--trim-scope", choices=["tensor", "global"],
                   help="trim per tensor (default) or against each task's threshold over the whole vector")
    p.add_argument("--seed", type=int, help="seed of random drops (dare)")
    p.add_argument("--k", type=int, help="consensus: keep coordinates selected by at least k task masks")
    p.add_argument("--mean", action="store_true", help="task_arithmetic: weighted mean instead of sum")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="any other merge parameter; repeatable")


#: run options of this command (engine and device, resolved once), closed when it ends (a Ray engine that
#: started Ray shuts it down)
_OPEN_RUNS: list[Any] = []


def _run(args: argparse.Namespace) -> Any:
    from tvbasis.engine import RunOptions
    if not _OPEN_RUNS:
        _OPEN_RUNS.append(RunOptions(args.engine, args.workers, args.ray_address, getattr(args, "device", "cpu"),
                                     progress=not getattr(args, "quiet", False)))
    return _OPEN_RUNS[0]


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


# ------------------------------------------------------------------------------------------------ commands
def cmd_vector(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.vectors import TaskVector
    tv = TaskVector.from_checkpoints(args.pretrained, args.finetuned, args.include, args.exclude)
    out = tv.save(args.out, dtype=parse_dtype(args.dtype), force=args.force, run=_run(args))
    print(f"wrote task vector {out} ({len(tv)} tensors, {tv.num_parameters:,} parameters)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.passes import merge_task_vectors
    ft = _finetuned(args.finetuned)
    spec = _merge_spec(args)
    weights = _floats(_pairs(args.weight, "--weight"), "--weight")
    fisher = _pairs(args.fisher, "--fisher") or None
    from tvbasis.io import check_output
    check_output(Path(args.out), args.force)
    run = _run(args)
    tv = merge_task_vectors(args.pretrained, ft, spec, weights, fisher, args.include, args.exclude, run)
    params = {"method": spec.method, **spec.params, "models": ", ".join(ft), **({"weights": weights} if weights else {})}
    out = tv.apply_to(args.pretrained, args.scaling_coef, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=run, method=spec.method,
                      parameters=params)
    print(f"wrote merged model {out} ({spec.method}, {len(ft)} models, scaling_coef {args.scaling_coef})")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.vectors import TaskVector
    if not args.vector:
        raise ConfigError("give at least one --vector FILE[=COEF]")
    vectors, coefs = [], []
    for item in args.vector:
        path, _, coef = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            c = float(coef)
        except ValueError:
            raise ConfigError(f"--vector {item!r}: coefficient {coef!r} is not a number") from None
        vectors.append(TaskVector.load(path, args.include, args.exclude))
        coefs.append(c)
    tv = TaskVector.linear_combination(vectors, coefs)
    out = tv.apply_to(args.pretrained, args.scaling_coef, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=_run(args),
                      method="task_arithmetic", parameters={"vectors": ", ".join(args.vector)})
    print(f"wrote {out} (θ₀ + {args.scaling_coef}·Σ coef·τ over {len(vectors)} vector(s))")
    return 0


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
    _print_table(["tensor", "shape", "dtype", *(["norm"] if args.norms else [])],
                 [[r["name"], "×".join(map(str, r["shape"])) or "scalar", r["dtype"],
                   *([f"{r['norm']:.5g}" if "norm" in r else "–"] if args.norms else [])] for r in shown])
    if len(rows) > len(shown):
        print(f"... {len(rows) - len(shown)} more (use --all)")
    return 0


def _basis_options(args: argparse.Namespace) -> dict[str, Any]:
    from tvbasis.merge import parse_merge_params
    opts: dict[str, Any] = parse_merge_params(list(args.option or []))
    if args.method == "cluster":
        if args.inner:
            opts["inner"] = args.inner
        inner_params = parse_merge_params(list(args.inner_param or []))
        if args.density is not None:
            inner_params["density"] = args.density
        if inner_params:
            opts["inner_params"] = inner_params
    elif args.inner or args.inner_param:
        raise ConfigError("--inner/--inner-param only apply to --method cluster")
    if args.seed is not None:
        opts["seed"] = args.seed
    if args.steps is not None:
        opts["steps"] = args.steps
    return opts


def cmd_build(args: argparse.Namespace) -> int:
    from tvbasis.io import human_bytes
    from tvbasis.store import build_store
    ft = _finetuned(args.finetuned)
    store = build_store(args.pretrained, ft, args.method, args.M, args.out, _basis_options(args), args.layerwise,
                        args.dtype, args.include, args.exclude, args.max_shard_size, args.force, _run(args),
                        fisher=_pairs(args.fisher, "--fisher") or None)
    s = store.summary()
    print(f"wrote {args.method} store {store.root}: M = {store.M} bases for T = {store.T} tasks, "
          f"{human_bytes(s['bytes_on_disk'])} on disk vs {human_bytes(s['task_vectors_bytes'])} of task vectors "
          f"({s['compression']:.2f}x)")
    _print_errors(s)
    return 0


def _print_errors(s: dict[str, Any]) -> None:
    labels = s.get("labels")
    rows = []
    for i, t in enumerate(s["tasks"]):
        exact = s["errors_exact"].get(t, True)
        rows.append([t, f"{s['norms'][t]:.4g}", f"{s['rel_errors'][t]:.4f}" + ("" if exact else " (est.)"),
                     *([labels[i]] if labels else [])])
    _print_table(["task", "‖v‖", "rel. error", *(["cluster"] if labels else [])], rows)


def cmd_inspect(args: argparse.Namespace) -> int:
    from tvbasis.io import human_bytes
    from tvbasis.store import BasisStore
    store = BasisStore.open(args.store)
    s = store.summary()
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"store {store.root}  (method {s['method']}, M = {s['M']}, T = {s['T']}"
          f"{', layerwise' if s['layerwise'] else ''})")
    print(f"bytes on disk: {human_bytes(s['bytes_on_disk'])}; the T task vectors: "
          f"{human_bytes(s['task_vectors_bytes'])} (compression {s['compression']:.2f}x)")
    if s.get("loss") is not None:
        print(f"reconstruction loss tr(EᵀGE)/T²: {s['loss']:.6g}   Eckart–Young lower bound: {s['lower_bound']:.6g}")
    elif s.get("lower_bound") is not None:
        print(f"Eckart–Young lower bound tr(EᵀGE)/T²: {s['lower_bound']:.6g}")
    _print_errors(s)
    print("cosine similarity:")
    C = np.asarray(s["cosine"])
    names = [t[:10] for t in s["tasks"]]
    _print_table(["", *names], [[names[i], *[f"{C[i, j]:+.3f}" for j in range(len(names))]] for i in range(len(names))])
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.store import BasisStore
    store = BasisStore.open(args.store)
    tv = store.reconstruct(args.task)
    out = tv.save(args.out, dtype=parse_dtype(args.dtype), force=args.force, run=_run(args))
    print(f"wrote reconstructed task vector {args.task} to {out} "
          f"(relative reconstruction error {store.rel_errors[args.task]:.4f})")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from tvbasis.io import check_output, open_checkpoint, parse_dtype
    from tvbasis.store import BasisStore
    store = BasisStore.open(args.store)
    chosen = [x for x in (args.add, args.negate, args.combine) if x]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --add all|a,b, --negate TASK, --combine a=1,b=-0.5")
    pre = open_checkpoint(args.pretrained)
    store.check_pretrained(pre)
    check_output(Path(args.out), args.force)
    outer = _merge_spec(args, args.outer) if args.outer else None
    if args.add:
        tasks = None if args.add == "all" else [t for t in args.add.split(",") if t]
        tv = store.addition(outer, tasks)
        what = f"add {args.add}" + (f" (outer {args.outer})" if outer else "")
    elif args.negate:
        if outer:
            raise ConfigError("--outer applies to --add only")
        tv = -store.reconstruct(args.negate)
        what = f"negate {args.negate}"
    else:
        if outer:
            raise ConfigError("--outer applies to --add only")
        tv = store.combine(_combo(args.combine))
        what = f"combine {args.combine}"
    out = tv.apply_to(pre, args.scaling_coef, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=_run(args),
                      method=f"tvbasis edit ({store.method} store)", parameters={"edit": what, "store": str(store.root)})
    print(f"wrote {out}: {what}, scaling_coef {args.scaling_coef}")
    return 0


def cmd_add_task(args: argparse.Namespace) -> int:
    from tvbasis.store import BasisStore, add_task
    pair = _pairs([args.task], "NAME=PATH")
    (name, path), = pair.items()
    new = add_task(BasisStore.open(args.store), name, path, args.pretrained, run=_run(args))
    task = new.manifest.tasks[-1]
    where = f", joined cluster {task.cluster}" if task.cluster is not None else ""
    print(f"added task {name} to {new.root} (T = {new.T}{where}); "
          f"relative reconstruction error {task.rel_error:.4f}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvbasis", description="Task vector bases: store many fine-tunes of one model "
                                "compactly and edit models by arithmetic on their task vectors.")
    p.add_argument("--version", action="version", version=f"tvbasis {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("vector", help="extract a task vector (fine-tuned − pretrained) and save it",
                       description="Extract the task vector of one fine-tune and save it as safetensors.")
    s.add_argument("--pretrained", required=True, help="pretrained model (HF dir, .safetensors, .bin/.pt)")
    s.add_argument("--finetuned", required=True, help=FT_HELP)
    s.add_argument("--out", required=True, help="output .safetensors file")
    _common_io(s)
    _filters(s)
    _engine_flags(s)
    s.set_defaults(fn=cmd_vector)

    s = sub.add_parser("merge", help="merge fine-tunes into one model directory",
                       description="Merge fine-tunes of one pretrained model with a merge method and write a Hugging "
                       "Face model directory: θ₀ + scaling_coef · merge(τ_1..τ_T).")
    from tvbasis.merge import available_methods
    s.add_argument("--pretrained", required=True)
    s.add_argument("--finetuned", action="append", required=True, metavar="NAME=PATH",
                   help="task name and " + FT_HELP + "; repeat per task")
    s.add_argument("--method", default="task_arithmetic", choices=available_methods())
    s.add_argument("--scaling-coef", type=float, default=1.0, help="λ in θ₀ + λ·τ (default 1.0)")
    s.add_argument("--weight", action="append", metavar="NAME=W", help="per-model weight (default 1)")
    s.add_argument("--fisher", action="append", metavar="NAME=FILE", help="diagonal Fisher safetensors per model")
    s.add_argument("--out", required=True)
    _merge_flags(s)
    _common_io(s)
    _filters(s)
    _engine_flags(s, device=True)
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("apply", help="apply saved task vectors with signed coefficients (add, negate, analogy)",
                       description="Write θ₀ + scaling_coef · Σ coef_i·τ_i for saved task vectors; negative "
                       "coefficients negate (unlearn), c + b − a is an analogy.")
    s.add_argument("--pretrained", required=True)
    s.add_argument("--vector", action="append", metavar="FILE[=COEF]", help="a saved task vector and its coefficient")
    s.add_argument("--scaling-coef", type=float, default=1.0)
    s.add_argument("--out", required=True)
    _common_io(s)
    _filters(s)
    _engine_flags(s)
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser("info", help="tensors, parameter count, dtypes and norms of a checkpoint or task vector")
    s.add_argument("path")
    s.add_argument("--norms", action="store_true", help="compute per-tensor L2 norms (reads the data)")
    s.add_argument("--all", action="store_true", help="list every tensor")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)

    from tvbasis.bases import BASIS_METHODS
    s = sub.add_parser("build", help="compress T fine-tunes into a store of M basis vectors",
                       description="One streaming Gram pass, a fit from the Gram matrix, one materialisation pass.")
    s.add_argument("--pretrained", required=True)
    s.add_argument("--finetuned", action="append", required=True, metavar="NAME=PATH",
                   help="task name and " + FT_HELP + "; repeat per task")
    s.add_argument("--method", required=True, choices=sorted(BASIS_METHODS))
    s.add_argument("-M", type=int, help="number of bases, 1 <= M < T (cluster: default from the eigengap)")
    s.add_argument("--layerwise", action="store_true", help="fit bases and coefficients per layer group")
    s.add_argument("--inner", help="cluster: inner merge per cluster (mean, task_arithmetic, ties, topk, dare_ties, ...)")
    s.add_argument("--inner-param", action="append", metavar="KEY=VALUE", help="parameter of the inner merge")
    s.add_argument("--density", type=float, help="shortcut for --inner-param density=...")
    s.add_argument("--fisher", action="append", metavar="NAME=FILE",
                   help="diagonal Fisher safetensors per task (for --inner fisher)")
    s.add_argument("--seed", type=int, help="seed (autoencoder init, clustering, random bases)")
    s.add_argument("--steps", type=int, help="autoencoder: Adam steps (default 6000)")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any basis-method option (e.g. temperature=5, lr=0.01, encoder=linear, rescale=false)")
    s.add_argument("--out", required=True)
    _common_io(s)
    _filters(s)
    _engine_flags(s, device=True)
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("inspect", help="a store's tasks, sizes, reconstruction errors and cosine matrix")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("reconstruct", help="reconstruct one task vector from a store (reads only the store)")
    s.add_argument("store")
    s.add_argument("task")
    s.add_argument("--out", required=True, help="output .safetensors file")
    _common_io(s)
    _engine_flags(s)
    s.set_defaults(fn=cmd_reconstruct)

    s = sub.add_parser("edit", help="write an edited model from a store: addition, negation, any combination",
                       description="θ₀ + scaling_coef·τ with τ from the store: --add (sum of bases, or an --outer "
                       "merge), --negate TASK, or --combine a=1,b=-0.5 (analogy and any linear combination).")
    s.add_argument("store")
    s.add_argument("--pretrained", required=True)
    s.add_argument("--add", metavar="all|a,b")
    s.add_argument("--negate", metavar="TASK")
    s.add_argument("--combine", metavar="a=1,b=-0.5")
    s.add_argument("--outer", help="merge method over the bases for --add (default: their sum, as the paper)")
    s.add_argument("--scaling-coef", type=float, required=True)
    s.add_argument("--out", required=True)
    _merge_flags(s, None)
    _common_io(s)
    _engine_flags(s)
    s.set_defaults(fn=cmd_edit)

    s = sub.add_parser("add-task", help="fold a new fine-tune into a store without the old checkpoints")
    s.add_argument("store")
    s.add_argument("task", metavar="NAME=PATH", help="task name and " + FT_HELP)
    s.add_argument("--pretrained", required=True)
    _engine_flags(s)
    s.set_defaults(fn=cmd_add_task)

    try:
        from tvbasis.eval.commands import register
    except ImportError:  # the evaluation extras are optional at import time
        pass
    else:
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(2, args.verbose), format="%(levelname)s %(message)s")
    if args.quiet:
        import os
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return int(args.fn(args) or 0)
    except TvbasisError as e:
        print(f"tvbasis {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tvbasis: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        while _OPEN_RUNS:
            _OPEN_RUNS.pop().close()


if __name__ == "__main__":
    sys.exit(main())
