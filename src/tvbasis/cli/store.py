"""Subcommands on basis stores: ``build``, ``inspect``, ``reconstruct``, ``edit``, ``add-task``, ``verify``,
``upgrade``, ``gc``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.cli.common import (
    FT_HELP,
    combo,
    common_io,
    dry_run,
    dry_run_flag,
    engine_flags,
    eval_extra,
    filters,
    finetuned,
    finish,
    finite_float,
    json_flag,
    lock_flag,
    merge_flags,
    merge_spec,
    pairs,
    print_json,
    print_table,
    print_warnings,
    require_eval_extra,
    run_options,
)
from tvbasis.errors import ConfigError


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--method`` from ``--option`` and the flags that set one option each."""
    from tvbasis.merge import parse_merge_params
    opts: dict[str, Any] = parse_merge_params(list(args.option or []))
    if args.inner:
        opts["inner"] = args.inner
    inner_params = parse_merge_params(list(args.inner_param or []))
    if args.density is not None:
        inner_params["density"] = args.density
    if inner_params:
        opts["inner_params"] = inner_params
    for flag in ("seed", "steps", "k", "cores", "clusters", "affinity", "refine", "factor_codec"):
        if getattr(args, flag, None) is not None:
            opts[flag] = getattr(args, flag)
    return opts


def _given(args: argparse.Namespace, flag: str) -> bool:
    return getattr(args, flag, None) not in (None, False, [])


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse a method-specific flag that ``--method`` does not take (each method lists its flags)."""
    from tvbasis.methods import METHOD_FLAGS, get_store_method, methods_taking
    method = get_store_method(args.method)
    for flag, shown in METHOD_FLAGS.items():
        if flag in method.flags or not _given(args, flag):
            continue
        if method.flags_refused_because is not None:
            raise ConfigError(f"--method {args.method} {method.flags_refused_because}; {shown} does not apply")
        raise ConfigError(f"{shown} applies to --method {' / '.join(methods_taking(flag))}")


def store_spec(args: argparse.Namespace) -> Any:
    """The ``StoreSpec`` of ``tvbasis build``'s flags."""
    from tvbasis.store import StoreSpec
    return StoreSpec(args.method, M=args.M, options=_method_options(args), layerwise=bool(args.layerwise),
                     residual=args.residual, codec=args.codec, dtype=args.dtype,
                     include=tuple(args.include) if args.include else None,
                     exclude=tuple(args.exclude) if args.exclude else None,
                     fisher=pairs(args.fisher, "--fisher") or None)


def write_options(args: argparse.Namespace) -> Any:
    from tvbasis.store import WriteOptions
    return WriteOptions(max_shard_size=args.max_shard_size, force=args.force, lock_timeout=args.lock_timeout)


def _method_flags() -> tuple[str, ...]:
    from tvbasis.methods import METHOD_FLAGS
    return tuple(METHOD_FLAGS)


def cmd_build(args: argparse.Namespace) -> int:
    from tvbasis.store.builders import builder_of
    ft = finetuned(args.finetuned)
    if (rc := dry_run(args, lambda: _build_plan(args, ft))) is not None:
        return rc
    if args.budget is not None or args.quality is not None:
        return _build_budget(args, ft)
    if args.method is None:
        raise ConfigError("give --method (how to store the tasks), or --budget/--quality to let tvbasis choose")
    if getattr(args, "calibration", None):
        raise ConfigError("--calibration sharpens a --budget/--quality build; --method builds do not use it")
    if getattr(args, "probe", None):
        raise ConfigError("--probe re-allocates a --budget build; --method builds do not use it")
    _check_flags(args)
    build = builder_of(args.method)
    return _report_build(args, build(args.pretrained, ft, store_spec(args), args.out, run_options(args),
                                     write_options(args)))


#: the method flags a --budget/--quality build takes too
BUDGET_TAKES = ("include", "exclude")


def _build_budget(args: argparse.Namespace, ft: dict[str, str]) -> int:
    from tvbasis.io import human_bytes
    from tvbasis.store.budget import build_budget_store
    if args.budget is not None and args.quality is not None:
        raise ConfigError("give --budget or --quality, not both")
    # which tensors to store (--include/--exclude) a budget build takes like any build; the rest it chooses
    given = [f for f in ("method", *_method_flags()) if f not in BUDGET_TAKES and _given(args, f)]
    if given:
        raise ConfigError(f"--budget/--quality choose the method, codecs and ranks themselves; "
                          f"--{given[0].replace('_', '-')} does not apply")
    if getattr(args, "probe", None) and args.budget is None:
        raise ConfigError("--probe re-allocates a byte budget: give --budget, not --quality")
    if not 0 <= args.probe_rounds <= 10:
        raise ConfigError(f"--probe-rounds must be within 0 .. 10, got {args.probe_rounds}")
    calibration = _calibration(args, ft)
    probe = _probe(args, ft)
    store, report = build_budget_store(args.pretrained, ft, args.out, budget=args.budget, quality=args.quality,
                                       include=args.include, exclude=args.exclude,
                                       max_shard_size=args.max_shard_size, force=args.force, run=run_options(args),
                                       calibration=calibration, probe=probe, probe_rounds=args.probe_rounds)
    j = report.to_json()
    if getattr(args, "json", False):
        print(json.dumps({"store": str(store.root), **j}, indent=1))
        return 0
    what = (f"budget {report.budget} ({human_bytes(report.budget_bytes or 0)})" if report.budget
            else f"quality: every task's relative error <= {report.max_error:.4f}")
    print(f"wrote budget store {store.root}: {human_bytes(report.store_bytes)} on disk for T = {store.T} tasks "
          f"({report.ratio:.1f}x against float32 task vectors; {what}); M = {report.M}")
    rows = []
    for t, info in j["tasks"].items():
        fams = ", ".join(f"{n}× {f}" for f, n in sorted(info["codecs"].items(), key=lambda kv: -kv[1]))
        rows.append([t, human_bytes(info["bytes"]), f"{info['rel_error']:.4f}", fams])
    print_table(["task", "bytes", "rel. error", "codecs (tensors)"], rows)
    for note in report.allocation.notes:
        print(f"note: {note}")
    if report.probe_rounds:
        worst = ", ".join(f"{r['worst']:.4f}" + (" (kept)" if r.get("kept") else "") for r in report.probe_rounds)
        print(f"probe: worst task's prediction shift (mean total variation) per round: {worst}")
    print(f"the codec of every (task, tensor) is recorded in the store's manifest; --json prints the plan "
          f"(measure {j['seconds'].get('measure', 0):.1f} s, write {j['seconds'].get('write', 0):.1f} s)")
    return 0


def _task_files(flag: str, given: list[str] | None, ft: dict[str, str],
                args: argparse.Namespace) -> dict[str, str] | None:
    """``--FLAG NAME=FILE`` repeated, one per task of ``ft`` (and ``--calibration-texts/-length`` in range);
    ConfigError naming the item otherwise."""
    if not given:
        return None
    if args.calibration_texts < 1 or not 8 <= args.calibration_length <= 8192:
        raise ConfigError("--calibration-texts must be >= 1 and --calibration-length within 8 .. 8192 tokens")
    files: dict[str, str] = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--{flag} {item[:80]!r}: expected NAME=FILE")
        if name in files:
            raise ConfigError(f"--{flag}: task {name[:40]!r} given twice")
        files[name] = path
    if set(files) != set(ft):
        raise ConfigError(f"--{flag}: give one file per task; missing {sorted(set(ft) - set(files))[:5]}, "
                          f"unknown {sorted(set(files) - set(ft))[:5]}")
    return files


def _probe(args: argparse.Namespace, ft: dict[str, str]) -> Any:
    """``--probe NAME=FILE`` (one per task): a labelled file as ``tvbasis eval`` reads it; its texts are run
    through each compressed task and its labels name the classes of the task's zero-shot head
    (``tvbasis.eval.probe``; needs the eval extra)."""
    files = _task_files("probe", getattr(args, "probe", None), ft, args)
    if files is None:
        return None
    with eval_extra("build --probe"):
        from tvbasis.eval.probe import PredictionProbe
        from tvbasis.eval.userdata import load_user_task
        tasks = {t: load_user_task(t, {"probe": files[t]}) for t in ft}  # every file checked first
        return PredictionProbe(args.pretrained, ft, {t: list(tasks[t]["probe"].texts)[: args.calibration_texts]
                                                     for t in ft},
                               {t: tasks[t].label_texts for t in ft}, max_length=args.calibration_length)


def _calibration(args: argparse.Namespace, ft: dict[str, str]) -> dict[str, Any] | None:
    """``--calibration NAME=FILE`` (one per task): each task's statistics from its own text through its fine-tune
    (``tvbasis.eval.calibration``; needs the eval extra)."""
    files = _task_files("calibration", getattr(args, "calibration", None), ft, args)
    if files is None:
        return None
    with eval_extra("build --calibration"):
        from tvbasis.eval.calibration import calibrate_model, read_texts
        texts = {t: read_texts(files[t], limit=args.calibration_texts) for t in ft}  # every file checked first
        return {t: calibrate_model(ft[t], texts[t], max_length=args.calibration_length) for t in ft}


def _summary(store: Any) -> dict[str, Any]:
    """``store.summary()`` with what a reader needs to trust it (``store.notes``): ``errors_unknown``,
    ``adapter_bytes`` and ``compression_vs_adapters`` (a store built from PEFT adapters), ``warnings``."""
    from tvbasis.store.notes import adapter_bytes, error_warnings, unknown_errors
    s = store.summary()
    s["errors_unknown"] = unknown_errors(store)
    s["adapter_bytes"] = adapter_bytes(t.source for t in store.manifest.tasks)
    if s["adapter_bytes"]:
        s["compression_vs_adapters"] = s["adapter_bytes"] / max(1, s["bytes_on_disk"])
    s["warnings"] = error_warnings(store)
    return s


def _json_summary(s: dict[str, Any]) -> dict[str, Any]:
    """The summary as --json prints it: unknown errors are null, warnings go in the command's own field."""
    out = {k: v for k, v in s.items() if k != "warnings"}
    out["rel_errors"] = {t: (None if t in s["errors_unknown"] else e) for t, e in s["rel_errors"].items()}
    return out


def _sizes(s: dict[str, Any]) -> str:
    from tvbasis.io import human_bytes
    if s.get("adapter_bytes"):
        return (f"{human_bytes(s['bytes_on_disk'])} on disk vs {human_bytes(s['adapter_bytes'])} of the adapters' "
                f"weight files ({s['compression_vs_adapters']:.2f}x; {human_bytes(s['task_vectors_bytes'])} as "
                "dense task vectors)")
    return (f"{human_bytes(s['bytes_on_disk'])} on disk vs {human_bytes(s['task_vectors_bytes'])} of task vectors "
            f"({s['compression']:.2f}x)")


def _build_plan(args: argparse.Namespace, ft: dict[str, str]) -> dict[str, Any]:
    """``build --dry-run``'s plan (cli/plans.py); a ``--budget``/``--quality`` build plans its inputs only."""
    from tvbasis.cli.plans import build_plan
    method = args.method
    if getattr(args, "budget", None) is not None or getattr(args, "quality", None) is not None:
        method = "chosen by --budget/--quality"
    if method is None:
        raise ConfigError("give --method (how to store the tasks), or --budget/--quality to let tvbasis choose")
    return build_plan(args.pretrained, ft, method, args.M, args.codec, args.residual, args.include, args.exclude,
                      args.out, args.dtype)


def _report_build(args: argparse.Namespace, store: Any) -> int:
    s = _summary(store)

    def text() -> None:
        print(f"wrote {args.method} store {store.root}: M = {store.M} bases for T = {store.T} tasks, {_sizes(s)}")
        _print_coded(s)
        _print_errors(s)

    return finish(args, text, {"store": str(store.root), **_json_summary(s)}, s["warnings"])


def _print_coded(s: dict[str, Any]) -> None:
    from tvbasis.io import human_bytes
    c = s.get("coded")
    if not c:
        return
    parts = []
    if c["bases_codec"]:
        parts.append(f"bases through {c['bases_codec']} ({human_bytes(c['bases_bytes'])})")
    if c["mode"] == "joint":
        parts.append(f"shared bases ({human_bytes(c['bases_bytes'])})")
    if c["residual_codec"]:
        what = ("per-task masks" if c["mode"] == "mask" else "per-task cores" if c["mode"] == "joint"
                else f"per-task residuals through {c['residual_codec']}")
        parts.append(f"{what} ({human_bytes(c['per_task_bytes'])})")
    print("coded: " + "; ".join(parts))


def _print_errors(s: dict[str, Any], weights: bool = False) -> None:
    labels = s.get("labels")
    r = s.get("addition_weights") if weights else None
    r_range = s.get("addition_weights_range") or {}
    rows = []
    unknown = set(s.get("errors_unknown") or ())
    for i, t in enumerate(s["tasks"]):
        exact = s["errors_exact"].get(t, True)
        err = "unknown" if t in unknown else f"{s['rel_errors'][t]:.4f}" + ("" if exact else " (est.)")
        row = [t, f"{s['norms'][t]:.4g}", err,
               *([labels[i]] if labels else [])]
        if r is not None:
            lo_hi = r_range.get(t)
            row.append(f"{r[t]:.4f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""))
        rows.append(row)
    print_table(["task", "‖v‖", "rel. error", *(["cluster"] if labels else []),
                 *(["r_t (weight in Σ_m s_m)"] if r is not None else [])], rows)


def cmd_inspect(args: argparse.Namespace) -> int:
    from tvbasis.methods import get_store_method
    from tvbasis.store import BasisStore
    store = BasisStore.open(args.store)
    s = _summary(store)
    if args.plot:  # eval/plots: of the eval extra (matplotlib)
        require_eval_extra("--plot", "matplotlib")
        with eval_extra("--plot"):
            from tvbasis.eval.plots import store_plots

            for path in store_plots(store, args.plot):
                print(f"wrote {path}", file=sys.stderr)
    print_warnings(s["warnings"])
    if args.json:
        print_json({"command": "inspect", **_json_summary(s), "warnings": s["warnings"]})
        return 0
    print(f"store {store.root}  (method {s['method']}, M = {s['M']}, T = {s['T']}"
          f"{', layerwise' if s['layerwise'] else ''})")
    print(f"bytes on disk: {_sizes(s)}")
    # PCA keeps the tasks' mean as well as M components: M + 1 directions, so its loss may be below the rank-M bound
    bound = ("Eckart–Young bound for M directions (PCA also keeps the mean, so its loss can be lower)"
             if get_store_method(s["method"]).stores_mean else "Eckart–Young lower bound")
    if s.get("loss") is not None:
        print(f"reconstruction loss tr(EᵀGE)/T²: {s['loss']:.6g}   {bound}: {s['lower_bound']:.6g}")
    elif s.get("lower_bound") is not None:
        print(f"{bound} tr(EᵀGE)/T²: {s['lower_bound']:.6g}")
    _print_coded(s)
    _print_errors(s, weights=True)
    print("cosine similarity:")
    C = np.asarray(s["cosine"])
    names = [t[:10] for t in s["tasks"]]
    print_table(["", *names], [[names[i], *[f"{C[i, j]:+.3f}" for j in range(len(names))]] for i in range(len(names))])
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from tvbasis.io import parse_dtype
    from tvbasis.store import BasisStore
    if (args.out is None) == (args.peft_dir is None):
        raise ConfigError("give exactly one of --out FILE (a task vector) or --peft-dir DIR (a PEFT adapter)")
    store = BasisStore.open(args.store)
    if args.peft_dir is not None:
        from tvbasis.store.lora_factor_space import export_peft
        if args.dtype:
            raise ConfigError("--dtype applies to --out; a PEFT adapter is written in float32")
        out = export_peft(store, args.task, args.peft_dir, args.pretrained, force=args.force)
        return finish(args, f"wrote PEFT LoRA adapter of task {args.task} to {out} (relative reconstruction error "
                      f"{store.rel_errors[args.task]:.4f})", {"out": str(out), "format": "peft", "task": args.task,
                                                              "rel_error": store.rel_errors[args.task]})
    if args.pretrained:
        raise ConfigError("--pretrained applies to --peft-dir")
    tv = store.reconstruct(args.task)
    out = tv.save(args.out, dtype=parse_dtype(args.dtype), force=args.force, run=run_options(args))
    return finish(args, f"wrote reconstructed task vector {args.task} to {out} (relative reconstruction error "
                  f"{store.rel_errors[args.task]:.4f})", {"out": str(out), "format": "safetensors",
                                                          "task": args.task, "rel_error": store.rel_errors[args.task]})


def cmd_edit(args: argparse.Namespace) -> int:
    from tvbasis.cli.plans import edit_plan
    from tvbasis.io import check_output, open_checkpoint, parse_dtype
    from tvbasis.store import BasisStore
    store = BasisStore.open(args.store)
    chosen = [x for x in (args.add, args.negate, args.combine) if x]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --add all|a,b, --negate TASK, --combine a=1,b=-0.5")
    pre = open_checkpoint(args.pretrained)
    store.check_pretrained(pre)
    check_output(Path(args.out), args.force)
    outer = merge_spec(args, args.outer) if args.outer else None
    card: dict[str, Any] = {"store": str(store.root), "store_method": store.method,
                            "store_manifest_sha256": store.manifest.manifest_sha256}
    if outer is not None:
        from tvbasis.merge import get_merger
        card["outer"] = outer.method
        card["outer_params"] = dict(get_merger(outer).params)  # every parameter used, defaults and seeds included
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
        alpha = combo(args.combine)
        tv = store.combine(alpha)
        what = f"combine {args.combine}"
        card["coefficients"] = alpha
    if (rc := dry_run(args, lambda: edit_plan(store, args.pretrained, args.out, args.dtype, what,
                                              args.max_shard_size))) is not None:
        return rc
    out = tv.apply_to(pre, args.scaling_coef, args.out, dtype=parse_dtype(args.dtype),
                      max_shard_size=args.max_shard_size, force=args.force, run=run_options(args),
                      method=f"tvbasis edit ({store.method} store)", parameters={"edit": what, **card},
                      inputs=[store.root])
    return finish(args, f"wrote {out}: {what}, scaling_coef {args.scaling_coef}",
                  {"out": str(out), "edit": what, "scaling_coef": args.scaling_coef, "store": str(store.root),
                   "dtype": args.dtype})


def cmd_add_task(args: argparse.Namespace) -> int:
    from tvbasis.cli.plans import add_task_plan
    from tvbasis.store import BasisStore, add_task
    pair = pairs([args.task], "NAME=PATH")
    (name, path), = pair.items()
    if (rc := dry_run(args, lambda: add_task_plan(BasisStore.open(args.store), name, path,
                                                  args.pretrained))) is not None:
        return rc
    new = add_task(BasisStore.open(args.store), name, path, args.pretrained, run=run_options(args),
                   lock_timeout=args.lock_timeout)
    from tvbasis.store.notes import error_warnings
    task = new.manifest.tasks[-1]
    where = f", joined cluster {task.cluster}" if task.cluster is not None else ""
    return finish(args, f"added task {name} to {new.root} (T = {new.T}{where}); relative reconstruction error "
                  f"{task.rel_error:.4f}", {"store": str(new.root), "task": name, "T": new.T, "cluster": task.cluster,
                                             "rel_error": task.rel_error, "rel_errors": new.rel_errors},
                  error_warnings(new, [name]))


def cmd_verify(args: argparse.Namespace) -> int:
    from tvbasis.errors import StoreError
    from tvbasis.store import BasisStore, foreign_entries
    store = BasisStore.open(args.store)  # the manifest: every field and its digest; each file's size and header
    problems = store.verify()
    for line in problems if not args.json else ():
        print(f"problem: {line}")
    extra = foreign_entries(store.root)
    if extra and not args.json:
        print(f"note: {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} not written by tvbasis (left alone): "
              + ", ".join(extra[:8]))
    files = store.manifest.files.all()
    fields = {"store": str(store.root), "ok": not problems, "problems": problems, "foreign_entries": extra,
              "format_version": store.manifest.format_version, "generation": store.manifest.generation,
              "data_files": len(files)}
    if problems:
        if args.json:
            print_json({"command": "verify", **fields, "warnings": []})
        raise StoreError(f"{store.root}: {len(problems)} problem(s) found")
    return finish(args, f"{store.root}: OK (format version {store.manifest.format_version}, generation "
                  f"{store.manifest.generation}: manifest digest, {len(files)} data file(s): sizes, headers, SHA-256 "
                  "and every chunk's digest, all values finite)", fields)


def cmd_upgrade(args: argparse.Namespace) -> int:
    from tvbasis.store import upgrade_store
    store, changed = upgrade_store(args.store, args.lock_timeout)
    fields = {"store": str(store.root), "changed": changed, "format_version": store.manifest.format_version}
    if changed:
        return finish(args, f"upgraded {store.root} to store format version {store.manifest.format_version} (digests "
                      f"of {len(store.manifest.files.all())} data file(s) recorded; data not rewritten)", fields)
    return finish(args, f"{store.root}: already store format version {store.manifest.format_version}; nothing to do",
                  fields)


def cmd_gc(args: argparse.Namespace) -> int:
    from tvbasis.store import collect_garbage
    removed = collect_garbage(Path(args.dir), args.lock_timeout)

    def text() -> None:
        for p in removed:
            print(f"removed {p}")
        print(f"{args.dir}: removed {len(removed)} leftover(s) of interrupted tvbasis runs")

    return finish(args, text, {"dir": str(args.dir), "removed": [str(p) for p in removed]})



def register(sub: Any) -> None:
    from tvbasis.methods import get_store_method, store_method_names
    from tvbasis.methods.lora import LORA_AFFINITIES, LORA_CORES
    s = sub.add_parser("build", help="compress T fine-tunes into a store of M basis vectors",
                       description="One streaming Gram pass, a fit from the Gram matrix, one materialisation pass.")
    s.add_argument("--pretrained", required=True)
    s.add_argument("--finetuned", action="append", required=True, metavar="NAME=PATH",
                   help="task name and " + FT_HELP + "; repeat per task")
    s.add_argument("--budget", metavar="X", help="let tvbasis choose everything (codec, rank, bits per task and "
                   "tensor) so the whole store fits X: a ratio against float32 task vectors (128x) or a size (20MB); "
                   "minimises the worst task's relative error (docs/budget.md)")
    s.add_argument("--quality", type=finite_float, metavar="Q", help="instead of --budget: the smallest store in "
                   "which every task keeps at least Q of its task vector's energy (1 - relative error²), e.g. 0.9")
    s.add_argument("--calibration", action="append", metavar="NAME=FILE",
                   help="with --budget/--quality: a file of task NAME's own text (.txt one per line, or the "
                   ".csv/.tsv/.jsonl files tvbasis eval reads; labels not needed), repeat per task; the allocation "
                   "then minimises each task's output error in its model instead of its task vector's error "
                   "(needs the eval extra; docs/budget.md)")
    s.add_argument("--probe", action="append", metavar="NAME=FILE",
                   help="with --budget: a labelled file of task NAME (the .csv/.tsv/.jsonl files tvbasis eval reads; "
                   "the labels only name the classes), repeat per task; the written store is probed — how far each "
                   "task's predictions on these texts move from its fine-tune's — and the bytes re-allocated so "
                   "every task moves the same (encoder checkpoints; needs the eval extra; docs/budget.md)")
    s.add_argument("--probe-rounds", type=int, default=2, metavar="N",
                   help="with --probe: re-allocations after the first probe (default 2; each one write and one "
                   "probe of every task); the round whose worst task moved least is kept")
    s.add_argument("--calibration-texts", type=int, default=256, metavar="N",
                   help="with --calibration/--probe: use the first N texts of each file (default 256)")
    s.add_argument("--calibration-length", type=int, default=128, metavar="TOKENS",
                   help="with --calibration/--probe: truncate each text to this many tokens (default 128)")
    s.add_argument("--json", action="store_true", help="print the store's summary and any warning as one JSON "
                   "object (docs/cli-json.md); with --budget/--quality the report and plan")
    s.add_argument("--method", choices=store_method_names(),
                   help="how the tasks are stored (tvbasis.methods): "
                   + "; ".join(f"{n}: {get_store_method(n).summary}" for n in store_method_names()))
    s.add_argument("-M", type=int, help="number of bases, 1 <= M < T (cluster: default from the eigengap); "
                   "0 with --residual: no bases, every task through the residual codec alone")
    s.add_argument("--residual", metavar="CODEC",
                   help="also store every task's residual v_t - v̂_t through CODEC (e.g. int8, lowrank:rank=8+int8, "
                   "or a plan 'embedding=sparse-rows+int8;matrix=lowrank:rank=16+int4;vector=float16'), so each task "
                   "comes back as v̂_t + r̂_t")
    s.add_argument("--codec", metavar="CODEC", help="store the bases (and PCA mean) through CODEC instead of densely")
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
    g = s.add_argument_group("LoRA stores (--method lora-factors | lora-joint: every --finetuned a PEFT adapter "
                             "directory; built in factor space, no ΔW expanded)")
    g.add_argument("--factor-codec", metavar="CODEC", help="lora-factors: code each adapter's factors (e.g. int8); "
                   "default float32, exact")
    g.add_argument("-k", type=int, help="lora-joint: size of the shared per-tensor bases U, V")
    g.add_argument("--cores", choices=list(LORA_CORES), help="lora-joint: per-adapter cores k × k or diagonal k "
                   "(default full)")
    g.add_argument("--clusters", type=int, help="lora-joint: clusters of adapters, one shared basis each (default 1)")
    g.add_argument("--affinity", choices=list(LORA_AFFINITIES), help="lora-joint: what the clusters are found from "
                   "(default cosine)")
    g.add_argument("--refine", type=int, help="lora-joint: rounds of reassigning adapters to clusters (default 0)")
    s.add_argument("--out", required=True)
    common_io(s)
    lock_flag(s)
    filters(s)
    engine_flags(s, device=True)
    dry_run_flag(s)
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("inspect", help="a store's tasks, sizes, reconstruction errors and cosine matrix")
    s.add_argument("store")
    json_flag(s, "the summary (sizes, errors, cosine matrix, warnings)")
    s.add_argument("--plot", metavar="DIR", help="also write cosine.png, spectrum.png and rel_errors.png into DIR "
                   "(needs the eval extra)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("reconstruct", help="reconstruct one task vector from a store (reads only the store)")
    s.add_argument("store")
    s.add_argument("task")
    s.add_argument("--out", help="output .safetensors file (the task vector)")
    s.add_argument("--peft-dir", metavar="DIR", help="write the task as a PEFT LoRA adapter directory instead (stores "
                   "with M = 0 whose tasks are low-rank entries: lora-factors, lora-joint, --residual lowrank)")
    s.add_argument("--pretrained", help="--peft-dir: the pretrained model, for tensors the task replaces whole "
                   "(checked against the store)")
    common_io(s)
    engine_flags(s)
    json_flag(s)
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
    s.add_argument("--scaling-coef", type=finite_float, required=True)
    s.add_argument("--out", required=True)
    merge_flags(s, None)
    common_io(s)
    engine_flags(s)
    json_flag(s)
    dry_run_flag(s)
    s.set_defaults(fn=cmd_edit)

    s = sub.add_parser("add-task", help="fold a new fine-tune into a store without the old checkpoints")
    s.add_argument("store")
    s.add_argument("task", metavar="NAME=PATH", help="task name and " + FT_HELP)
    s.add_argument("--pretrained", required=True)
    lock_flag(s)
    engine_flags(s)
    json_flag(s, "the result and any warning")
    dry_run_flag(s)
    s.set_defaults(fn=cmd_add_task)

    s = sub.add_parser("verify", help="check a store completely: manifest, every data file's size, header, "
                       "SHA-256 and per-chunk XXH3-64 digests, finite values")
    s.add_argument("store")
    json_flag(s, "the verdict and every problem")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("upgrade", help="bring a version-1 store to the current format (records the digests)")
    s.add_argument("store")
    lock_flag(s)
    json_flag(s)
    s.set_defaults(fn=cmd_upgrade)

    s = sub.add_parser("gc", help="remove leftovers of killed tvbasis runs (stale temporaries, unreferenced "
                       "store files) in DIR and the stores directly inside it")
    s.add_argument("dir", nargs="?", default=".", metavar="DIR")
    lock_flag(s)
    json_flag(s, "what was removed")
    s.set_defaults(fn=cmd_gc)
