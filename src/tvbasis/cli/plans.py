"""The plans ``--dry-run`` prints: what a command would read and write, how big, and which codec each tensor kind
gets. Computing a plan opens the inputs (headers only: every checkpoint is validated, no tensor data is read,
except that a codec's size is measured on a random tensor of each shape) and writes nothing.

Every plan is a JSON-ready dict (``docs/cli-json.md``): ``inputs`` (what would be read), ``read_bytes``, ``out``,
``write_bytes`` (an estimate where it depends on the data: ``write_bytes_exact`` says which), ``kinds`` (one row
per tensor kind: ``embedding``, ``matrix``, ``vector``) and the command's own fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tvbasis.compress.kinds import KINDS, tensor_kind
from tvbasis.io import TensorSpec, dtype_name, open_checkpoint, parse_dtype
from tvbasis.io.reader import Checkpoint

__all__ = ["add_task_plan", "build_plan", "codec_bytes", "edit_plan", "kind_rows", "merge_plan"]


def _dtype(name: str | None) -> torch.dtype | None:
    return parse_dtype(name) if name else None


def codec_bytes(coder: Any, name: str, shape: tuple[int, ...], cache: dict[tuple[str, tuple[int, ...]], int]) -> int:
    """Bytes the coder stores for a tensor of ``shape`` named ``name``, measured by coding a seeded random tensor
    of that shape (exact for fixed-rate codecs: intN, lowrank:rank=r, float16; an upper bound for codecs whose
    size follows the data: sparse rows, top-k)."""
    codec = coder.codec_for(name, shape)
    key = (codec.spec if codec is not None else "-", tuple(shape))
    if key not in cache:
        if codec is None:
            cache[key] = 0
        else:
            g = torch.Generator().manual_seed(0)
            enc = coder.encode(name, torch.randn(shape, generator=g))
            cache[key] = 0 if enc is None else int(enc.nbytes)
    return cache[key]


def kind_rows(specs: Iterable[TensorSpec], dtype: torch.dtype | None = None, coder: Any | None = None,
              copies: int = 1) -> list[dict[str, Any]]:
    """One row per tensor kind: tensors, parameters, dense bytes (in ``dtype`` or each tensor's own), and with a
    coder its codec(s) and coded bytes; ``copies`` multiplies the bytes (M bases, T residuals)."""
    rows: dict[str, dict[str, Any]] = {}
    cache: dict[tuple[str, tuple[int, ...]], int] = {}
    for s in specs:
        k = tensor_kind(s.name, s.shape)
        r = rows.setdefault(k, {"kind": k, "tensors": 0, "parameters": 0, "dense_bytes": 0})
        r["tensors"] += 1
        r["parameters"] += s.numel
        r["dense_bytes"] += copies * s.numel * (dtype or s.dtype).itemsize
        if coder is not None:
            codec = coder.codec_for(s.name, s.shape)
            specs_seen: list[str] = r.setdefault("codec", [])
            spec = codec.spec if codec is not None else "not stored"
            if spec not in specs_seen:
                specs_seen.append(spec)
            r["coded_bytes"] = r.get("coded_bytes", 0) + copies * codec_bytes(coder, s.name, tuple(s.shape), cache)
    out = [rows[k] for k in KINDS if k in rows]
    for r in out:
        if "codec" in r:
            r["codec"] = ", ".join(r["codec"])
    return out


def _checkpoint_bytes(ckpt: Checkpoint, names: Iterable[str] | None = None) -> int:
    if names is None:
        return int(ckpt.nbytes)
    return sum(ckpt.spec(n).nbytes for n in names if n in ckpt)


def _output_model(pre: Checkpoint, dtype: torch.dtype | None) -> tuple[int, list[TensorSpec]]:
    specs = [s.with_dtype(dtype) if (dtype is not None and s.is_float) else s for s in pre.specs()]
    return sum(s.nbytes for s in specs), specs


def merge_plan(pretrained: str, finetuned: Mapping[str, str], method: str, params: Mapping[str, Any],
               include: Iterable[str] | None, exclude: Iterable[str] | None, out: str, dtype: str | None,
               max_shard_size: str) -> dict[str, Any]:
    """``merge --dry-run``: the models read (their headers validated), the merged tensors by kind, the model
    directory written."""
    from tvbasis.io.writer import plan_shards
    from tvbasis.taskset import TaskSet
    ts = TaskSet.open(pretrained, finetuned, include, exclude)
    out_dtype = _dtype(dtype)
    write, specs = _output_model(ts.pretrained, out_dtype)
    read = _checkpoint_bytes(ts.pretrained) + sum(_checkpoint_bytes(ft, ts.specs) for ft in ts.finetuned)
    from tvbasis.errors import ConfigError
    from tvbasis.merge import MergeSpec, get_merger
    try:  # every parameter the merge would use, defaults included
        params = dict(get_merger(MergeSpec(method, dict(params))).params)
    except ConfigError:  # a merge validated only by the pass itself (a mergekit plan): plan with the given ones
        params = dict(params)
    return {"method": method, "parameters": params, "T": ts.T,
            "inputs": {"pretrained": str(ts.pretrained.path), **{n: str(f.path) for n, f in zip(ts.names,
                                                                                              ts.finetuned)}},
            "read_bytes": read, "out": str(out), "out_dtype": dtype_name(out_dtype) if out_dtype else "as pretrained",
            "write_bytes": write, "write_bytes_exact": True, "shards": len(plan_shards(specs, max_shard_size)),
            "merged_tensors": len(ts.specs), "copied_tensors": len(specs) - len(ts.specs),
            "kinds": kind_rows(ts.specs.values(), out_dtype)}


def build_plan(pretrained: str, finetuned: Mapping[str, str], method: str, M: int | None, codec: str | None,
               residual: str | None, include: Iterable[str] | None, exclude: Iterable[str] | None, out: str,
               dtype: str | None) -> dict[str, Any]:
    """``build --dry-run``: the models read, the store's parts (M bases, the PCA mean, T coded residuals) by
    tensor kind with their codec and size."""
    from tvbasis.compress.plan import Coder
    from tvbasis.methods import get_store_method, store_method_names
    from tvbasis.taskset import TaskSet
    ts = TaskSet.open(pretrained, finetuned, include, exclude)
    out_dtype = _dtype(dtype)
    specs = list(ts.specs.values())
    known = get_store_method(method) if method in store_method_names() else None  # else chosen by --budget
    fits = known if known is not None and known.fits_bases else None  # a basis method: -M bases fitted
    read = _checkpoint_bytes(ts.pretrained, ts.specs) + sum(_checkpoint_bytes(ft, ts.specs) for ft in ts.finetuned)
    plan: dict[str, Any] = {
        "method": method, "T": ts.T, "M": M if M is not None else "from the eigengap (after the Gram pass)",
        "inputs": {"pretrained": str(ts.pretrained.path), **{n: str(f.path) for n, f in zip(ts.names, ts.finetuned)}},
        "passes": "two streaming passes over the inputs (Gram, then bases)",
        "read_bytes_per_pass": read, "out": str(out),
        "task_vectors_bytes": ts.T * sum(s.numel * (out_dtype or s.dtype).itemsize for s in specs)}
    warnings: list[str] = []
    m = M if isinstance(M, int) else None
    parts: dict[str, int] = {}
    if m is not None and m > 0:
        bases_coder = Coder(codec) if codec else None
        rows = kind_rows(specs, out_dtype, bases_coder, copies=m)
        plan["bases"] = rows
        parts["bases"] = sum(r.get("coded_bytes", r["dense_bytes"]) for r in rows)
        if fits is not None and fits.stores_mean:
            mean_rows = kind_rows(specs, out_dtype, bases_coder)
            parts["mean"] = sum(r.get("coded_bytes", r["dense_bytes"]) for r in mean_rows)
    elif m is None and fits is not None:
        plan["bytes_per_basis"] = sum(s.numel * (out_dtype or s.dtype).itemsize for s in specs)
    if residual:
        rows = kind_rows(specs, torch.float32, Coder(residual, ts.T), copies=ts.T)
        plan["residuals"] = rows
        parts["residuals"] = sum(r.get("coded_bytes", 0) for r in rows)
    if fits is None and not residual:
        plan["M"] = M
        warnings.append(f"--method {method}: the store's size depends on the data (and the choices a --budget or "
                        "--quality build makes); only the inputs are planned")
    plan["parts_bytes"] = parts
    if parts and (m is not None):
        plan["write_bytes"] = sum(parts.values())
        plan["write_bytes_exact"] = not residual and not codec
        plan["compression"] = plan["task_vectors_bytes"] / max(1, plan["write_bytes"])
    plan["warnings"] = warnings
    return plan


def edit_plan(store: Any, pretrained: str, out: str, dtype: str | None, what: str,
              max_shard_size: str) -> dict[str, Any]:
    """``edit --dry-run``: the store and pretrained read, the model directory written."""
    from tvbasis.io.writer import plan_shards
    pre = open_checkpoint(pretrained)
    store.check_pretrained(pre)
    out_dtype = _dtype(dtype)
    write, specs = _output_model(pre, out_dtype)
    return {"edit": what, "store": str(store.root), "store_method": store.method, "M": store.M, "T": store.T,
            "inputs": {"store": str(store.root), "pretrained": str(pre.path)},
            "read_bytes": int(store.nbytes) + _checkpoint_bytes(pre), "out": str(out),
            "out_dtype": dtype_name(out_dtype) if out_dtype else "as pretrained", "write_bytes": write,
            "write_bytes_exact": True, "shards": len(plan_shards(specs, max_shard_size)),
            "kinds": kind_rows(store.specs.values(), out_dtype)}


def add_task_plan(store: Any, name: str, path: str, pretrained: str) -> dict[str, Any]:
    """``add-task --dry-run``: the new fine-tune checked against the store's pretrained, what would be added."""
    from tvbasis.errors import ConfigError
    if name in store.task_names:
        raise ConfigError(f"{store.root}: already has a task named {name!r}")
    pre = open_checkpoint(pretrained)
    store.check_pretrained(pre)
    from tvbasis.taskset import TaskSet
    ts = TaskSet.open(pre, {name: path}, None, None)
    missing = [n for n in store.specs if n not in ts.specs]
    per_task = 0
    summary = store.summary()
    coded = summary.get("coded") or {}
    if coded.get("per_task_bytes"):
        per_task = int(coded["per_task_bytes"] / max(1, store.T))
    return {"store": str(store.root), "store_method": store.method, "task": name, "T_after": store.T + 1,
            "M": store.M, "inputs": {"pretrained": str(pre.path), name: str(Path(path))},
            "read_bytes": _checkpoint_bytes(pre, store.specs) + _checkpoint_bytes(ts.finetuned[0], store.specs),
            "out": str(store.root), "write_bytes": per_task, "write_bytes_exact": per_task == 0,
            "note": ("a new generation of the store's manifest (coefficients and errors), plus the task's coded "
                     "residual where the store keeps them (estimated from the mean of the others)"),
            "tensors_not_changed_by_task": len(missing),
            "kinds": kind_rows([s for s in store.specs.values()])}
