"""``tvbasis eval`` and ``tvbasis tune``: accuracy of any local checkpoint on the user's labelled files, and λ
chosen on the user's dev files. What they run is ``tvbasis.eval`` (the eval extra), imported inside the commands
and the registration, never when this module is imported; a missing package of the extra is one line naming
``pip install "tvbasis[eval]"`` (``cli.common.needs_eval_extra``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tvbasis.cli.common import needs_eval_extra
from tvbasis.engine import RunOptions
from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint, atomic_output, check_output, open_checkpoint, parse_dtype
from tvbasis.io.checksum import check_pretrained_checksum, chunk_digests
from tvbasis.store import BasisStore
from tvbasis.vectors import TaskVector

if TYPE_CHECKING:
    from tvbasis.eval.tune import TuneResult

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ helpers
def pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} expects NAME=VALUE, got {item!r}")
        if name in out:
            raise ConfigError(f"{flag}: name {name!r} given twice")
        out[name] = value
    return out


def coefficients(text: str, flag: str = "--combine") -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in pairs([p.strip() for p in text.split(",") if p.strip()], flag).items():
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"{flag} {name}={value!r}: not a number") from None
    if not out:
        raise ConfigError(f"{flag} expects TASK=COEF[,TASK=COEF...], got {text!r}")
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


#: most λ values a --grid may hold (every point is a full evaluation; the default grid has 20)
MAX_GRID_POINTS = 1000


def checked_grid(text: str) -> tuple[float, ...]:
    """``--grid`` parsed, with its size bounded before anything is expanded (a STEP:STOP of 1e-12:1e6 would
    otherwise build a tuple of 10¹⁸ values)."""
    if ":" in text:
        try:
            step, stop = (float(x) for x in text.strip().split(":"))
        except ValueError:
            raise ConfigError(f"bad λ grid {text[:80]!r}: expected 'a,b,c' or 'step:stop'") from None
        if math.isfinite(step) and math.isfinite(stop) and step > 0 and stop / step > MAX_GRID_POINTS:
            raise ConfigError(f"--grid {text[:80]!r} has about {stop / step:.3g} points; at most {MAX_GRID_POINTS} "
                              "(each point is a full evaluation)")
    elif text.count(",") >= MAX_GRID_POINTS:
        raise ConfigError(f"--grid has more than {MAX_GRID_POINTS} values")
    from tvbasis.eval.metrics import parse_grid

    return parse_grid(text)


def positive_int(text: str) -> int:
    """argparse type of --batch-size: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def json_inputs(args: argparse.Namespace) -> list[str]:
    """Every path a command reads: its --json output may be none of them (nor contain or lie inside one)."""
    paths: list[str] = []
    for flag in ("model", "pretrained", "store", "heads_from", "out"):
        v = getattr(args, flag, None)
        if v:
            paths.append(str(v))
    for flag in ("task", "labels", "test", "finetuned"):
        paths += [item.partition("=")[2] for item in getattr(args, flag, None) or [] if "=" in item]
    paths += [str(v).rsplit("=", 1)[0] if "=" in str(v) else str(v) for v in getattr(args, "vector", None) or []]
    return [p for p in paths if p]


def check_json_output(args: argparse.Namespace) -> None:
    """Before any work: the --json file follows the output rules (io/outputs.py): not an input, an existing file
    only with --force, never a directory."""
    if args.json:
        check_output(Path(args.json), getattr(args, "force", False), json_inputs(args), kind=None)


def write_json(args: argparse.Namespace, data: Mapping[str, Any]) -> None:
    """The --json file, written atomically (a temporary, then renamed into place) under the output rules."""
    text = json.dumps(data, indent=1, default=str) + "\n"
    with atomic_output(Path(args.json), getattr(args, "force", False), json_inputs(args), directory=False) as tmp:
        tmp.write_text(text)


def check_store_pretrained(store: BasisStore, pre: Checkpoint) -> None:
    """The store belongs to ``pre``: structure and, when recorded, the content checksum (read here, since an
    in-memory edit streams nothing that could check it)."""
    store.check_pretrained(pre)
    ref = store.manifest.pretrained
    if ref.checksum:
        digests = [d for name, spec in store.specs.items()
                   for d in chunk_digests(spec, pre.get(name), ref.checksum_chunk_elements)]
        check_pretrained_checksum(digests, ref.to_json(), pre.path)


def store_edit(store: BasisStore, add: str | None, negate: str | None, combine: str | None) -> tuple[TaskVector, str]:
    chosen = [x for x in (add, negate, combine) if x]
    if len(chosen) != 1:
        raise ConfigError("with --store give exactly one of --add all|a,b, --negate TASK, --combine a=1,b=-0.5")
    if add:
        tasks = None if add == "all" else [t for t in add.split(",") if t]
        return store.addition(None, tasks), f"store {store.root}: add {add}"
    if negate:
        return -store.reconstruct(negate), f"store {store.root}: negate {negate}"
    assert combine
    return store.combine(coefficients(combine)), f"store {store.root}: combine {combine}"


def vector_edit(items: Sequence[str]) -> tuple[TaskVector, str]:
    vectors, coefs = [], []
    for item in items:
        path, coef = item.rsplit("=", 1) if "=" in item else (item, "1")
        try:
            c = float(coef)
        except ValueError:
            raise ConfigError(f"--vector {item!r}: coefficient {coef!r} is not a number") from None
        vectors.append(TaskVector.load(path))
        coefs.append(c)
    return TaskVector.linear_combination(vectors, coefs), "vectors " + ", ".join(items)


def data_flags(p: argparse.ArgumentParser, task_help: str) -> None:
    from tvbasis.eval.encoder import EVAL_BATCH_SIZE

    p.add_argument("--task", action="append", metavar="NAME=FILE", help=task_help)
    p.add_argument("--labels", action="append", metavar="NAME=FILE",
                   help="label names of a task (one per line, 'label<TAB>head text', or JSON); default: the labels "
                   "found in its files, cleaned as the benchmark does")
    p.add_argument("--text-column", default="text", help="column (or JSONL field) of the texts (default text)")
    p.add_argument("--label-column", default="label", help="column (or JSONL field) of the labels (default label)")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="file format (default: from the suffix)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per text (default 128)")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE,
                   help=f"batch size (default {EVAL_BATCH_SIZE})")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (an existing file only with "
                   "--force; never one of the inputs)")
    p.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of inference (default float32): bfloat16 runs the matrix products in bfloat16 "
                   "through torch.autocast, the weights and every edit in float32: faster for encoders on CPUs with "
                   "AMX or AVX512-BF16 (MPNet 2.1x, MiniLM 1.5x), slower on CPUs without them and for a small "
                   "causal LM such as Gemma 3 270M (docs/benchmark.md)")


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


# ------------------------------------------------------------------------------------------------ eval
@needs_eval_extra("tvbasis eval")
def cmd_eval(args: argparse.Namespace) -> int:
    from tvbasis.eval.userdata import score_tasks

    task_files = pairs(args.task, "--task")
    labels = pairs(args.labels, "--labels")
    check_json_output(args)
    edit: TaskVector | None = None
    what = None
    if args.vector and args.store:
        raise ConfigError("give --vector or --store, not both")
    if (args.add or args.negate or args.combine) and not args.store:
        raise ConfigError("--add/--negate/--combine edit a store: give --store STORE")
    if args.store:
        store = BasisStore.open(args.store)
        check_store_pretrained(store, open_checkpoint(args.model))
        edit, what = store_edit(store, args.add, args.negate, args.combine)
    elif args.vector:
        edit, what = vector_edit(args.vector)
    if edit is None and args.scaling_coef is not None:
        raise ConfigError("--scaling-coef scales an edit: give --vector FILE[=COEF] or --store STORE")
    coef = 1.0 if args.scaling_coef is None else args.scaling_coef
    delta = edit.to_state_dict() if edit is not None else None
    head, scores = score_tasks(args.model, task_files=task_files, head=args.head, heads_from=args.heads_from,
                               delta=delta, scale=coef, max_length=args.max_length, batch_size=args.batch_size,
                               text_column=args.text_column, label_column=args.label_column, labels=labels,
                               fmt=args.format, progress=_progress(args), what=what or "the edit",
                               eval_dtype=args.eval_dtype)
    mean = sum(s.accuracy for s in scores.values()) / len(scores)
    model = f"{args.model}" + (f" + {coef:g}·({what})" if what else "")
    how = {"own": "its own classification head", "lm": "causal LM, log-likelihood of each label's text"}
    print(f"{model}: {how.get(head, 'encoder adapter, zero-shot heads')}"
          + (f" from {args.heads_from}" if args.heads_from else ""))
    print(table(["task", "file", "examples", "classes", "accuracy %"],
                [[n, s.file, s.examples, s.classes, pct(s.accuracy)] for n, s in scores.items()]
                + ([["mean", "", sum(s.examples for s in scores.values()), "", pct(mean)]] if len(scores) > 1 else [])))
    if args.json:
        write_json(args, {"model": str(args.model), "head": head, "heads_from": args.heads_from,
                               "edit": what, "scaling_coef": coef if what else None, "eval_dtype": args.eval_dtype,
                               "tasks": {n: s.to_dict() for n, s in scores.items()}, "mean_accuracy": mean})
    return 0


# ------------------------------------------------------------------------------------------------ tune
def _vectors(args: argparse.Namespace, pre: Checkpoint) -> tuple[dict[str, TaskVector], BasisStore | None]:
    ft = pairs(args.finetuned, "--finetuned")
    if bool(ft) == bool(args.store):
        raise ConfigError("give the task vectors as fine-tunes (--finetuned NAME=DIR, repeated) or as --store STORE")
    if ft:
        return {n: TaskVector.from_checkpoints(pre, p, name=n) for n, p in ft.items()}, None
    store = BasisStore.open(args.store)
    check_store_pretrained(store, pre)
    return {n: store.reconstruct(n) for n in store.task_names}, store


def _pick(vectors: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    missing = [t for t in names if t not in vectors]
    if missing:
        raise ConfigError(f"{what}: no task vector named {missing[0]!r}; the task vectors are {', '.join(vectors)}")


@needs_eval_extra("tvbasis tune")
def cmd_tune(args: argparse.Namespace) -> int:
    from tvbasis.eval.encoder import EVAL_DTYPES, Encoder
    from tvbasis.eval.metrics import DEFAULT_GRID, Evaluator
    from tvbasis.eval.tune import tune_addition, tune_addition_per_task, tune_negation
    from tvbasis.eval.userdata import encoder_resolves, keep_known, load_user_task

    modes = [m for m, on in (("negate", args.negate), ("combine", args.combine), ("add", args.add)) if on]
    if len(modes) > 1:
        raise ConfigError("give one of --add, --negate TARGET --control CONTROL, --combine a=1,b=-0.5")
    mode = modes[0] if modes else "add"
    if mode == "negate" and not args.control:
        raise ConfigError("--negate TARGET needs --control TASK (a task whose accuracy must stay)")
    if args.control and mode != "negate":
        raise ConfigError("--control applies to --negate only")
    if args.per_task and mode != "add":
        raise ConfigError("--per-task applies to addition (--add) only")
    dev_files = pairs(args.task, "--task")
    if not dev_files:
        raise ConfigError("give the dev files with --task NAME=FILE (repeated)")
    test_files = pairs(args.test, "--test")
    if test_files and set(test_files) != set(dev_files):
        raise ConfigError(f"--test must name the same tasks as --task ({', '.join(dev_files)}), "
                          f"got {', '.join(test_files)}")
    labels = pairs(args.labels, "--labels")
    unknown = sorted(set(labels) - set(dev_files))
    if unknown:
        raise ConfigError(f"--labels {unknown[0]}=...: no --task named {unknown[0]!r}")
    grid = checked_grid(args.grid) if args.grid else DEFAULT_GRID
    check_json_output(args)
    if args.out:
        check_output(Path(args.out), args.force, [p for p in json_inputs(args) if p != args.out])
    pre = open_checkpoint(args.pretrained)
    vectors, store = _vectors(args, pre)

    tasks = {n: load_user_task(n, {"dev": f, **({"test": test_files[n]} if test_files else {})}, args.text_column,
                               args.label_column, labels.get(n), args.format) for n, f in dev_files.items()}
    encoder = Encoder(args.pretrained, max_length=args.max_length, batch_size=args.batch_size)
    encoder.eval_dtype = EVAL_DTYPES[args.eval_dtype]  # before the evaluator encodes the heads
    report = "test" if test_files else None
    ev = Evaluator(encoder, tasks, splits=("dev", "test") if test_files else ("dev",), progress=_progress(args))
    known = encoder_resolves(encoder)

    def state(tv: TaskVector, what: str) -> dict[str, torch.Tensor]:
        return keep_known(tv.to_state_dict(), known, what)

    if args.method == "atlas":  # learned per-block coefficients (eval/atlas.py)
        from tvbasis.eval.atlas import tune_atlas
        return tune_atlas(args, pre, vectors, store, tasks, encoder, report, _progress(args))

    finetuned_dev = None
    if args.criterion == "normalized":
        if store is not None:
            raise ConfigError("--criterion normalized needs the fine-tunes (--finetuned), not a store")
        _pick(vectors, list(tasks), "--criterion normalized")
        finetuned_dev = {t: ev.with_delta(state(vectors[t], t), 1.0, "dev", [t])[t] for t in tasks}

    if mode == "add":
        selected = list(vectors) if args.add in (None, "all") else [t for t in args.add.split(",") if t]
        _pick(vectors, selected, "--add")
        if args.per_task:
            r = tune_addition_per_task(ev, {t: state(vectors[t], t) for t in selected}, list(tasks), grid,
                                       args.search, finetuned_dev, args.rounds, report)
            edit = (store.combine(r.lams, name="per-task addition") if store is not None else
                    TaskVector.linear_combination([vectors[t] for t in r.lams], list(r.lams.values())))
            coef = 1.0
        else:
            edit = (store.addition(None, None if len(selected) == len(vectors) else selected) if store is not None
                    else TaskVector.sum([vectors[t] for t in selected]))
            r = tune_addition(ev, state(edit, "the addition"), list(tasks), grid, args.search, finetuned_dev, report)
            coef = float(r.lam or 0.0)
        what = f"add {', '.join(selected)}"
    elif mode == "negate":
        _pick(vectors, [args.negate], "--negate")
        r = tune_negation(ev, state(vectors[args.negate], args.negate), args.negate, args.control, grid,
                          args.threshold, report)
        edit, coef = -vectors[args.negate], float(r.lam or 0.0)
        what = f"negate {args.negate} (control {args.control} ≥ {args.threshold:g} × pretrained)"
    else:
        combo = coefficients(args.combine)
        _pick(vectors, list(combo), "--combine")
        edit = (store.combine(combo) if store is not None else
                TaskVector.linear_combination([vectors[t] for t in combo], list(combo.values())))
        r = tune_addition(ev, state(edit, "the combination"), list(tasks), grid, args.search, finetuned_dev, report,
                          mode="combine")
        coef = float(r.lam or 0.0)
        what = f"combine {args.combine}"

    _print_tune(r, what)
    written = None
    if args.out:
        written = edit.apply_to(pre, coef, args.out, dtype=parse_dtype(args.dtype), max_shard_size=args.max_shard_size,
                                force=args.force, run=RunOptions(progress=_progress(args)),
                                method=f"tvbasis tune ({r.mode})",
                                parameters={"edit": what, **({"lambdas": r.lams} if r.lams else {"lambda": coef})})
        print(f"wrote {written}")
    if args.json:
        write_json(args, {"pretrained": str(args.pretrained), "source": str(args.store) if store else "fine-tunes",
                               "edit": what, "grid": list(grid), "search": args.search,
                               "eval_dtype": args.eval_dtype, **r.to_dict(),
                               "out": str(written) if written else None})
    return 0


def _print_tune(r: TuneResult, what: str) -> None:
    if r.lams:
        print(f"{what}: λ per task " + ", ".join(f"{t}={lam:g}" for t, lam in r.lams.items())
              + f" (mean dev {r.criterion} {pct(r.score)} %)")
    elif r.mode == "negation":
        n = r.negation
        assert n is not None
        if n.feasible:
            print(f"{what}: λ = {r.lam:g} (target dev {pct(n.target_dev)} %, control dev {pct(n.control_dev)} %; "
                  f"pretrained control dev {pct(n.pretrained_control_dev)} %)")
        else:
            print(f"{what}: no λ on the grid keeps the control; λ = 0 (no edit)")
    else:
        print(f"{what}: λ = {r.lam:g} (mean dev {r.criterion} {pct(r.score)} %)")
    rows = []
    for t in r.dev:
        row = [t, pct(r.pretrained_dev.get(t)), pct(r.dev[t])]
        if r.test:
            row += [pct(r.pretrained_test.get(t)), pct(r.test.get(t))]
        rows.append(row)
    print(table(["task", "pretrained dev %", "tuned dev %", *(["pretrained test %", "tuned test %"] if r.test else [])],
                rows))


# ------------------------------------------------------------------------------------------------ parsers
def register(sub: Any) -> None:
    """Add the ``eval`` and ``tune`` subcommands to the main parser's subparsers."""
    from tvbasis.eval.metrics import CONTROL_THRESHOLD, SEARCHES

    s = sub.add_parser(
        "eval", help="accuracy of a local checkpoint on your labelled CSV / TSV / JSONL files",
        description="Accuracy of MODEL (a model directory; or the pretrained model edited in memory by --vector "
                    "or --store with --scaling-coef) on labelled files: a text column and a label column. "
                    "Through the bundled encoder adapter (mean pooling, frozen zero-shot heads from the label "
                    "names) or, for a sequence-classification checkpoint, its own head.")
    s.add_argument("model", metavar="MODEL_DIR", help="a Hugging Face model directory (with --vector/--store: the "
                   "pretrained model)")
    data_flags(s, "a task and its labelled file (.csv, .tsv, .jsonl); repeat per task")
    s.add_argument("--head", choices=["auto", "encoder", "own", "lm"], default="auto",
                   help="auto (default): the model's own head for a *ForSequenceClassification checkpoint, the "
                   "label texts' log-likelihood for a *ForCausalLM one (lm: 'Text: {text}\\nLabel:' then each "
                   "label; the most likely label wins), else the encoder adapter")
    s.add_argument("--heads-from", metavar="DIR", help="encoder adapter: build the zero-shot heads from this "
                   "model's weights (e.g. the pretrained model of a fine-tune, as the benchmark does)")
    s.add_argument("--vector", action="append", metavar="FILE[=COEF]", help="a saved task vector; repeatable")
    s.add_argument("--store", help="a basis store of MODEL_DIR's fine-tunes; with --add, --negate or --combine")
    s.add_argument("--add", metavar="all|a,b")
    s.add_argument("--negate", metavar="TASK")
    s.add_argument("--combine", metavar="a=1,b=-0.5")
    s.add_argument("--scaling-coef", type=float, help="λ in θ₀ + λ·τ (default 1.0)")
    s.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    s.set_defaults(fn=cmd_eval)

    t = sub.add_parser(
        "tune", help="choose λ on your dev files (addition, negation, any combination); write the model",
        description="Choose the scaling coefficient λ of an edit on your labelled dev files with the benchmark's "
                    "grid and search: addition (one λ, or --per-task), negation (lowest target accuracy with a "
                    "control kept ≥ --threshold × the pretrained's) or --combine; over fine-tunes or a store. "
                    "Prints λ; --out writes the chosen model.")
    t.add_argument("--pretrained", required=True, help="the pretrained model (an encoder directory)")
    t.add_argument("--finetuned", action="append", metavar="NAME=DIR", help="a fine-tune; repeat per task")
    t.add_argument("--store", help="a basis store (instead of --finetuned)")
    data_flags(t, "a task and its labelled dev file; repeat per task")
    t.add_argument("--test", action="append", metavar="NAME=FILE",
                   help="held-out file per task (all or none): accuracy reported at the chosen λ")
    t.add_argument("--add", nargs="?", const="all", metavar="all|a,b",
                   help="task addition (the default): the sum of these task vectors")
    t.add_argument("--per-task", action="store_true", help="addition: one λ per task vector (coordinate search)")
    t.add_argument("--rounds", type=int, default=2, help="--per-task: rounds of the coordinate search (default 2)")
    t.add_argument("--negate", metavar="TARGET", help="negation of TARGET's task vector")
    t.add_argument("--control", metavar="TASK", help="negation: the task whose dev accuracy must stay")
    t.add_argument("--threshold", type=float, default=CONTROL_THRESHOLD,
                   help=f"negation: keep the control ≥ this fraction of the pretrained's (default {CONTROL_THRESHOLD})")
    t.add_argument("--combine", metavar="a=1,b=-0.5", help="any linear combination; λ maximises mean dev accuracy")
    t.add_argument("--grid", help="λ grid: 'a,b,c' or 'STEP:STOP' (default 0.05:1, the benchmark's)")
    t.add_argument("--search", choices=list(SEARCHES), default="grid",
                   help="every grid point, or coarse-to-fine (default grid)")
    t.add_argument("--criterion", choices=["accuracy", "normalized"], default="accuracy",
                   help="addition: mean dev accuracy (default) or mean accuracy normalized by each fine-tune's "
                   "(needs --finetuned for every task)")
    t.add_argument("--method", choices=["lambda", "atlas"], default="lambda",
                   help="lambda (default): choose λ on a grid; atlas: learn one coefficient per task vector (or "
                        "store basis) and parameter tensor by gradient descent on the dev files (aTLAS)")
    t.add_argument("--objective", choices=["supervised", "entropy"], default="supervised",
                   help="atlas: cross-entropy on the labels, or the predictions' entropy (no labels used)")
    t.add_argument("--scalar", action="store_true", help="atlas: one coefficient per task vector, not per tensor")
    t.add_argument("--epochs", type=int, default=10, help="atlas: epochs over the dev examples (default 10)")
    t.add_argument("--atlas-lr", type=float, default=0.1, help="atlas: AdamW learning rate (default 0.1)")
    t.add_argument("--save-coefficients", metavar="FILE", help="atlas: write the learned coefficients (JSON)")
    t.add_argument("--apply-coefficients", metavar="FILE", help="atlas: apply saved coefficients, learn nothing")
    t.add_argument("--out", metavar="DIR", help="write θ₀ + λ·τ at the chosen λ as a model directory")
    t.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the written model")
    t.add_argument("--max-shard-size", default="5GB")
    t.add_argument("--force", action="store_true", help="overwrite an existing --out and --json file")
    t.set_defaults(fn=cmd_tune)
