"""The store format: a typed manifest (``tvbasis.json``) read, validated and written in one place.

A store is a directory::

    tvbasis.json                         the manifest below
    bases-00001-of-0000N.safetensors     per parameter name one tensor of shape (M, *param_shape)
    bases.safetensors.index.json         (when sharded)
    mean-….safetensors                   PCA only: the mean task vector μ, one tensor per parameter

Every field is checked when a store is opened (types, shapes against T and M, finite numbers, dtypes, file
names confined to the store directory); anything else is a ``StoreError`` naming the field. ``docs/store-format.md``
describes each field; a test keeps the two in step.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis._version import __version__
from tvbasis.bases import BASIS_METHODS, BasisFit
from tvbasis.errors import StoreError
from tvbasis.io import TensorSpec, dtype_name
from tvbasis.merge import MergeSpec
from tvbasis.passes import ALL

FORMAT = "tvbasis.basis_store"
FORMAT_VERSION = 1
MANIFEST = "tvbasis.json"
#: dtypes a store may hold its bases in
STORE_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: task names a store may not use (``--add all`` means every task)
RESERVED_TASK_NAMES = ("all",)


# ------------------------------------------------------------------------------------------------ checking
class _Check:
    """Field-by-field reader of an untrusted JSON object: each accessor names the field when it is wrong."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, what: str) -> StoreError:
        return StoreError(f"{self.where}: field {path!r} {what}")

    def obj(self, d: Any, path: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise self.fail(path, f"must be an object, got {type(d).__name__}")
        return d

    def get(self, d: Mapping[str, Any], key: str, path: str, default: Any = ...) -> Any:
        if key not in d:
            if default is ...:
                raise self.fail(f"{path}{key}", "is missing")
            return default
        return d[key]

    def int_(self, v: Any, path: str, lo: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            raise self.fail(path, f"must be >= {lo}, got {v}")
        return v

    def num(self, v: Any, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(path, f"must be a finite number, got {v!r}")
        return float(v)

    def str_(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise self.fail(path, f"must be a string, got {type(v).__name__}")
        return v

    def bool_(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, f"must be true or false, got {v!r}")
        return v

    def strs(self, v: Any, path: str) -> list[str]:
        if not isinstance(v, list):
            raise self.fail(path, f"must be a list of strings, got {type(v).__name__}")
        return [self.str_(x, f"{path}[{i}]") for i, x in enumerate(v)]

    def array(self, v: Any, path: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise self.fail(path, f"must be a numeric array of shape {shape}") from None
        if a.shape != shape:
            raise self.fail(path, f"has shape {a.shape}, expected {shape}")
        if not np.isfinite(a).all():
            raise self.fail(path, "holds NaN or Inf")
        return a

    def file_name(self, v: Any, path: str) -> str:
        name = self.str_(v, path)
        if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or "\0" in name:
            raise self.fail(path, f"must be a plain file name inside the store, got {name!r}")
        return name


# ------------------------------------------------------------------------------------------------ records
@dataclass
class TaskEntry:
    """One task of the store, in order."""

    name: str
    source: str
    norm: float
    rel_error: float
    error_exact: bool = True
    added: bool = False
    cluster: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "source": self.source, "norm": self.norm,
                             "rel_error": self.rel_error, "error_exact": self.error_exact}
        if self.added:
            d["added"] = True
        if self.cluster is not None:
            d["cluster"] = self.cluster
        return d


@dataclass
class PretrainedRef:
    """The pretrained model a store was built from: checked before anything is applied to a model."""

    path: str
    fingerprint: str
    checksum: str | None
    checksum_chunk_elements: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint, "checksum": self.checksum,
                "checksum_chunk_elements": self.checksum_chunk_elements}


@dataclass
class Cross:
    """Cross-Grams of one group measured by the materialisation pass: C = U·Vᵀ (n_stored, T), K = U·Uᵀ."""

    C: np.ndarray
    K: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"C": self.C.tolist(), "K": self.K.tolist()}


@dataclass
class StoreFiles:
    """Data files of the store: shards of the stacked bases and of the PCA mean (plain names in the store)."""

    bases: list[str] = field(default_factory=list)
    mean: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"bases": list(self.bases), "mean": list(self.mean)}


@dataclass
class Manifest:
    """Everything a store knows besides its tensors. ``to_json``/``from_json`` are the on-disk form."""

    method: str
    options: dict[str, Any]
    M: int
    T: int
    layerwise: bool
    task_like: bool
    tasks: list[TaskEntry]
    groups: dict[str, BasisFit]
    group_of: dict[str, str]
    cross: dict[str, Cross]
    gram: np.ndarray
    group_grams: dict[str, np.ndarray]
    pretrained: PretrainedRef
    tensors: list[TensorSpec]
    store_dtypes: dict[str, str]
    files: StoreFiles
    task_vectors_bytes: int
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    member_counts: list[int] | None = None
    gram_estimated_rows: list[str] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    tool: str = f"tvbasis {__version__}"
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def gram_of_group(self, group: str) -> np.ndarray:
        return self.group_grams[group] if group in self.group_grams else self.gram

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "format_version": self.format_version, "tool": self.tool, "created": self.created,
            "method": self.method, "options": self.options, "M": self.M, "T": self.T, "layerwise": self.layerwise,
            "task_like": self.task_like, "tasks": [t.to_json() for t in self.tasks],
            "member_counts": self.member_counts,
            "groups": {g: f.to_json() for g, f in self.groups.items()},
            "group_of": dict(self.group_of),
            "cross": {g: c.to_json() for g, c in self.cross.items()},
            "gram": self.gram.tolist(),
            "group_grams": {g: v.tolist() for g, v in self.group_grams.items()},
            **({"gram_estimated_rows": list(self.gram_estimated_rows)} if self.gram_estimated_rows else {}),
            "pretrained": self.pretrained.to_json(),
            "tensors": [{"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype)} for s in self.tensors],
            "store_dtypes": dict(self.store_dtypes),
            "files": self.files.to_json(),
            "task_vectors_bytes": self.task_vectors_bytes,
            "include": list(self.include), "exclude": list(self.exclude),
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> Manifest:
        """Parse and validate an untrusted manifest; StoreError naming the first bad field."""
        c = _Check(where)
        d = c.obj(d, "(manifest)")
        if d.get("format") != FORMAT:
            raise StoreError(f"{where}: not a tvbasis basis store manifest (format {d.get('format')!r})")
        version = c.get(d, "format_version", "")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise c.fail("format_version", f"must be an integer >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise StoreError(f"{where}: store format version {version} is newer than this tvbasis "
                             f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade tvbasis")
        method = c.str_(c.get(d, "method", ""), "method")
        if method not in BASIS_METHODS:
            raise StoreError(f"{where}: unknown basis method {method!r}")
        M = c.int_(c.get(d, "M", ""), "M", 1)
        tasks = [_task(c, t, i) for i, t in enumerate(_list(c, c.get(d, "tasks", ""), "tasks"))]
        T = len(tasks)
        if c.int_(d.get("T", T), "T") != T:
            raise c.fail("T", f"is {d.get('T')}, but 'tasks' lists {T} tasks")
        names = [t.name for t in tasks]
        if len(set(names)) != T:
            raise c.fail("tasks", f"repeats a task name: {names}")
        groups_raw = c.obj(c.get(d, "groups", ""), "groups")
        if not groups_raw:
            raise c.fail("groups", "is empty")
        groups = {c.str_(g, "groups"): _fit(c, f, f"groups.{g}", M, T) for g, f in groups_raw.items()}
        first = next(iter(groups.values()))
        for g, f in groups.items():
            if (f.stores_bases, f.has_mean) != (first.stores_bases, first.has_mean):
                raise c.fail(f"groups.{g}", "stores other vectors than the first group")
        nU = first.n_stored
        cross_raw = c.obj(c.get(d, "cross", ""), "cross")
        cross = {}
        for g in groups:
            x = c.obj(c.get(cross_raw, g, "cross."), f"cross.{g}")
            cross[g] = Cross(c.array(c.get(x, "C", f"cross.{g}."), f"cross.{g}.C", (nU, T)),
                             c.array(c.get(x, "K", f"cross.{g}."), f"cross.{g}.K", (nU, nU)))
        gram = c.array(c.get(d, "gram", ""), "gram", (T, T))
        gg_raw = c.obj(d.get("group_grams") or {}, "group_grams")
        group_grams = {g: c.array(v, f"group_grams.{g}", (T, T)) for g, v in gg_raw.items()}
        layerwise = c.bool_(d.get("layerwise", False), "layerwise")
        group_of = {c.str_(k, "group_of"): c.str_(v, f"group_of.{k}") for k, v in
                    c.obj(d.get("group_of") or {}, "group_of").items()}
        for k, g in group_of.items():
            if g not in groups:
                raise c.fail(f"group_of.{k}", f"names group {g!r} that 'groups' does not have")
        if not group_of and ALL not in groups:
            raise c.fail("groups", f"has no group {ALL!r} and 'group_of' is empty")
        pre = c.obj(c.get(d, "pretrained", ""), "pretrained")
        pretrained = PretrainedRef(
            path=c.str_(pre.get("path", ""), "pretrained.path"),
            fingerprint=c.str_(c.get(pre, "fingerprint", "pretrained."), "pretrained.fingerprint"),
            checksum=c.str_(c.get(pre, "checksum", "pretrained."), "pretrained.checksum"),
            checksum_chunk_elements=c.int_(pre.get("checksum_chunk_elements", 0), "pretrained.checksum_chunk_elements",
                                           0))
        if pretrained.checksum is not None and pretrained.checksum_chunk_elements < 1:
            raise c.fail("pretrained.checksum_chunk_elements", "must be >= 1 when a checksum is recorded")
        tensors = [_spec(c, s, i) for i, s in enumerate(_list(c, c.get(d, "tensors", ""), "tensors"))]
        if not tensors:
            raise c.fail("tensors", "is empty")
        if len({s.name for s in tensors}) != len(tensors):
            raise c.fail("tensors", "repeats a tensor name")
        sd = c.obj(c.get(d, "store_dtypes", ""), "store_dtypes")
        store_dtypes = {}
        for s in tensors:
            dt = c.str_(c.get(sd, s.name, "store_dtypes."), f"store_dtypes.{s.name}")
            if dt not in STORE_DTYPES:
                raise c.fail(f"store_dtypes.{s.name}", f"must be one of {STORE_DTYPES}, got {dt!r}")
            store_dtypes[s.name] = dt
        for name in group_of:
            if name not in store_dtypes:
                raise c.fail(f"group_of.{name}", "names a tensor that 'tensors' does not list")
        fr = c.obj(d.get("files") or {}, "files")
        files = StoreFiles([c.file_name(x, f"files.bases[{i}]") for i, x in enumerate(_list(c, fr.get("bases", []),
                                                                                               "files.bases"))],
                           [c.file_name(x, f"files.mean[{i}]") for i, x in enumerate(_list(c, fr.get("mean", []),
                                                                                             "files.mean"))])
        if first.stores_bases and not files.bases:
            raise c.fail("files.bases", "is empty, but the bases are stored")
        if first.has_mean and not files.mean:
            raise c.fail("files.mean", "is empty, but the basis has a stored mean")
        counts = d.get("member_counts")
        if counts is not None:
            counts = [c.int_(x, f"member_counts[{i}]", 0) for i, x in enumerate(_list(c, counts, "member_counts"))]
        return cls(
            method=method, options=c.obj(d.get("options") or {}, "options"), M=M, T=T, layerwise=layerwise,
            task_like=c.bool_(d.get("task_like", True), "task_like"), tasks=tasks, groups=groups, group_of=group_of,
            cross=cross, gram=gram, group_grams=group_grams, pretrained=pretrained, tensors=tensors,
            store_dtypes=store_dtypes, files=files,
            task_vectors_bytes=c.int_(d.get("task_vectors_bytes", 0), "task_vectors_bytes", 0),
            include=c.strs(d.get("include") or [], "include"), exclude=c.strs(d.get("exclude") or [], "exclude"),
            member_counts=counts, gram_estimated_rows=c.strs(d.get("gram_estimated_rows") or [], "gram_estimated_rows"),
            format_version=version, tool=str(d.get("tool", "")), created=str(d.get("created", "")))

    # -- files -----------------------------------------------------------------------------------------
    @classmethod
    def read(cls, root: Path) -> Manifest:
        mf = root / MANIFEST
        if not root.exists():
            raise StoreError(f"{root}: no such store")
        if not mf.is_file():
            raise StoreError(f"{root}: not a tvbasis store (no {MANIFEST})")
        try:
            data = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{mf}: unreadable manifest ({e})") from None
        return cls.from_json(data, str(mf))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    def write(self, root: Path) -> None:
        """Write the manifest into ``root`` through a temporary file renamed over the old one."""
        tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)


def manifest_fields() -> list[str]:
    """The top-level keys of a manifest, in the order they are written (docs/store-format.md lists each)."""
    return [f.name for f in fields(Manifest)]


def _list(c: _Check, v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        raise c.fail(path, f"must be a list, got {type(v).__name__}")
    return v


def _task(c: _Check, t: Any, i: int) -> TaskEntry:
    p = f"tasks[{i}]"
    t = c.obj(t, p)
    name = c.str_(c.get(t, "name", f"{p}."), f"{p}.name")
    if not name or "=" in name or "," in name or name in RESERVED_TASK_NAMES:
        raise c.fail(f"{p}.name", f"is not a valid task name: {name!r}")
    cluster = t.get("cluster")
    return TaskEntry(name=name, source=str(t.get("source", "")), norm=c.num(c.get(t, "norm", f"{p}."), f"{p}.norm"),
                     rel_error=c.num(c.get(t, "rel_error", f"{p}."), f"{p}.rel_error"),
                     error_exact=c.bool_(t.get("error_exact", True), f"{p}.error_exact"),
                     added=c.bool_(t.get("added", False), f"{p}.added"),
                     cluster=None if cluster is None else c.int_(cluster, f"{p}.cluster", 0))


def _spec(c: _Check, s: Any, i: int) -> TensorSpec:
    p = f"tensors[{i}]"
    s = c.obj(s, p)
    name = c.str_(c.get(s, "name", f"{p}."), f"{p}.name")
    shape = tuple(c.int_(x, f"{p}.shape", 1) for x in _list(c, c.get(s, "shape", f"{p}."), f"{p}.shape"))
    dt = c.str_(c.get(s, "dtype", f"{p}."), f"{p}.dtype")
    dtype = getattr(torch, dt, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise c.fail(f"{p}.dtype", f"must be a floating-point torch dtype, got {dt!r}")
    return TensorSpec(name, shape, dtype)


def _fit(c: _Check, f: Any, p: str, M: int, T: int) -> BasisFit:
    f = c.obj(f, p)
    if c.int_(c.get(f, "M", f"{p}."), f"{p}.M", 1) != M:
        raise c.fail(f"{p}.M", f"is {f['M']}, but the store's M is {M}")

    def opt(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        v = f.get(key)
        return None if v is None else c.array(v, f"{p}.{key}", shape)
    W = c.array(c.get(f, "W", f"{p}."), f"{p}.W", (M, T))
    labels = f.get("labels")
    if labels is not None:
        labels = [c.int_(x, f"{p}.labels[{i}]", 0) for i, x in enumerate(_list(c, labels, f"{p}.labels"))]
        if len(labels) != T or any(x >= M for x in labels):
            raise c.fail(f"{p}.labels", f"must be {T} cluster indices in [0, {M}), got {labels}")
    inner = f.get("inner")
    spec = None
    if inner is not None:
        inner = c.obj(inner, f"{p}.inner")
        spec = MergeSpec(c.str_(c.get(inner, "method", f"{p}.inner."), f"{p}.inner.method"),
                         c.obj(inner.get("params") or {}, f"{p}.inner.params"))
    seed = f.get("random_seed")
    refit = f.get("refit")
    if refit not in (None, "full", "cluster_scale"):
        raise c.fail(f"{p}.refit", f"must be null, 'full' or 'cluster_scale', got {refit!r}")
    fit = BasisFit(M=M, B=opt("B", (T, M)), W=W, mean_weights=opt("mean_weights", (T,)),
                   mean_coef=opt("mean_coef", (T,)), labels=labels, inner=spec,
                   random_seed=None if seed is None else c.int_(seed, f"{p}.random_seed", 0), refit=refit,
                   stats=c.obj(f.get("stats") or {}, f"{p}.stats"))
    if (fit.mean_weights is None) != (fit.mean_coef is None):
        raise c.fail(p, "must have both or neither of 'mean_weights' and 'mean_coef'")
    if fit.B is None and fit.random_seed is None and fit.inner is None:
        raise c.fail(p, "must say how its bases are made: 'B', 'inner' or 'random_seed'")
    if fit.is_merged and fit.labels is None:
        raise c.fail(f"{p}.labels", "are required for bases made by an inner merge")
    return fit
