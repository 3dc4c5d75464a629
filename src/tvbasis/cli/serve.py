"""Subcommands to use a task straight from a store and to manage its tasks: ``get``, ``export-lora``,
``remove-task``, ``rename-task``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tvbasis.cli.common import common_io, dry_run, dry_run_flag, finish, json_flag, lock_flag


def cmd_get(args: argparse.Namespace) -> int:
    from tvbasis.cli.plans import edit_plan
    from tvbasis.io import check_output, open_checkpoint, parse_dtype
    from tvbasis.store import BasisStore

    store = BasisStore.open(args.store)
    store.task_index(args.task)
    check_output(Path(args.out), args.force)
    pre = open_checkpoint(args.pretrained)
    store.check_pretrained(pre)
    if (rc := dry_run(args, lambda: edit_plan(store, args.pretrained, args.out, args.dtype, f"get {args.task}",
                                              args.max_shard_size))) is not None:
        return rc
    out = store.reconstruct(args.task).apply_to(pre, 1.0, args.out, dtype=parse_dtype(args.dtype),
                                                max_shard_size=args.max_shard_size, force=args.force,
                                                method=f"tvbasis get ({store.method} store)",
                                                parameters={"task": args.task})
    return finish(args, f"wrote task {args.task} to {out} (the store's relative reconstruction error of this task: "
                  f"{store.rel_errors[args.task]:.4g})",
                  {"out": str(out), "store": str(store.root), "task": args.task,
                   "rel_error": store.rel_errors[args.task], "dtype": args.dtype})


def cmd_export_lora(args: argparse.Namespace) -> int:
    from tvbasis.store.lora_export import export_lora

    res = export_lora(args.store, args.task, args.out, args.pretrained, rank=args.rank, force=args.force)
    hows: dict[str, int] = {}
    for r in res.tensors.values():
        hows[r["how"]] = hows.get(r["how"], 0) + 1
    ranks = sorted(set(res.ranks.values()))

    def text() -> None:
        print(f"wrote {res.path}: {hows.get('factors', 0)} module(s) as the store's own factors, {hows.get('svd', 0)} "
              f"by truncated SVD, {len(res.modules_to_save)} module(s) to save; rank {'/'.join(map(str, ranks))}")
        print(f"relative error of the adapter against the store's task: {res.rel_error:.4g} (the store's own error "
              f"against the fine-tune: {res.store_rel_error:.4g}); per tensor in {res.path}/tvbasis_export.json")
    return finish(args, text, {"out": str(res.path), "task": args.task, "rel_error": res.rel_error,
                               "store_rel_error": res.store_rel_error, "ranks": res.ranks,
                               "modules_to_save": res.modules_to_save, "tensors": hows})


def _errors(store: object) -> None:
    from tvbasis.store import BasisStore

    assert isinstance(store, BasisStore)
    for t in store.manifest.tasks:
        print(f"  {t.name}: relative reconstruction error {t.rel_error:.4f}"
              + ("" if t.error_exact else " (estimated)"))


def cmd_remove_task(args: argparse.Namespace) -> int:
    from tvbasis.store.lifecycle import remove_task

    new = remove_task(args.store, args.name, lock_timeout=args.lock_timeout)
    kept = "" if new.M == 0 else f"; its {new.M} bases are kept as they were fit (with {args.name})"

    def text() -> None:
        print(f"removed task {args.name} from {new.root} (T = {new.T}, generation {new.manifest.generation}{kept}); "
              "the remaining tasks' errors:")
        _errors(new)
    return finish(args, text, {"store": str(new.root), "removed": args.name, "T": new.T,
                               "generation": new.manifest.generation, "rel_errors": new.rel_errors})


def cmd_rename_task(args: argparse.Namespace) -> int:
    from tvbasis.store.lifecycle import rename_task

    new = rename_task(args.store, args.old, args.new, lock_timeout=args.lock_timeout)
    return finish(args, f"renamed task {args.old} to {args.new} in {new.root} (generation "
                  f"{new.manifest.generation})", {"store": str(new.root), "old": args.old, "new": args.new,
                                                  "generation": new.manifest.generation, "tasks": new.task_names})


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("get", help="a task's fine-tune back from a store, as a Hugging Face model directory",
                       description="Write θ₀ + ṽ_TASK (the task as the store holds it) as a Hugging Face directory: "
                       "what `edit --combine TASK=1 --scaling-coef 1` writes. The pretrained model is checked "
                       "against the store (structure and content checksum).")
    s.add_argument("store")
    s.add_argument("task")
    s.add_argument("--pretrained", required=True)
    s.add_argument("--out", required=True)
    common_io(s)
    json_flag(s)
    dry_run_flag(s)
    s.set_defaults(fn=cmd_get)

    s = sub.add_parser("export-lora", help="a task of any store as a PEFT LoRA adapter directory",
                       description="Write task TASK as a PEFT LoRA adapter: exactly where the store holds it as "
                       "low-rank factors (lora-factors, lora-joint, -M 0 --residual lowrank), otherwise by a "
                       "truncated SVD of its decoded ΔW at rank R (the relative error is printed and recorded in "
                       "tvbasis_export.json). Embeddings as lora_embedding_A/B, convolutions as conv LoRA, GPT-2 "
                       "Conv1D as fan_in_fan_out, biases and norms as modules_to_save (these need --pretrained).")
    s.add_argument("store")
    s.add_argument("task")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--rank", type=int, help="rank of the truncated SVD of tensors not held as factors (default 16)")
    s.add_argument("--pretrained", help="the pretrained model: module classes from its config.json, and the values "
                   "of modules_to_save (checked against the store)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    json_flag(s)
    s.set_defaults(fn=cmd_export_lora)

    s = sub.add_parser("remove-task", help="remove a task from a store (a new generation; bases kept)",
                       description="Remove task NAME from the store, under its writer lock, as one new generation. "
                       "Nothing is refit: the bases are kept as they were fit (so the paper's sum of bases, and a "
                       "TALL store's multi-task vector, still carry the removed task); the task's coefficients, "
                       "Gram row, cluster label and per-task entries (residual, mask, core) are dropped, and the "
                       "other tasks' reconstructions and errors are unchanged. Refuses the last task.")
    s.add_argument("store")
    s.add_argument("name")
    lock_flag(s)
    json_flag(s)
    s.set_defaults(fn=cmd_remove_task)

    s = sub.add_parser("rename-task", help="rename a task of a store (a new generation)",
                       description="Rename task OLD to NEW under the store's writer lock, as one new generation "
                       "(coded files holding the task's entries are rewritten under the new keys, data unchanged).")
    s.add_argument("store")
    s.add_argument("old")
    s.add_argument("new")
    lock_flag(s)
    json_flag(s)
    s.set_defaults(fn=cmd_rename_task)
