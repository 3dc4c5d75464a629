"""The store format: a typed manifest (``tvbasis.json``) read, validated and written in one place.

A store is a directory::

    tvbasis.json                         the manifest below
    bases-00001-of-0000N.safetensors     per parameter name one tensor of shape (M, *param_shape)
    mean-….safetensors                   PCA only: the mean task vector μ, one tensor per parameter
    coded-….safetensors                  codec-encoded tensors (``coded``): per-task residuals r̂_t, TALL masks,
                                         bases and mean stored through a codec
    .tvbasis.lock                        taken by writers (add-task, --force build, upgrade, gc)

(later generations name their files ``bases.g{N}…``: see ``store.layout``). Every field is checked when a store
is opened (types; shapes of B, W, mean coefficients, labels and cross-Grams against T and M; finite numbers;
dtypes; task names; file names confined to the store directory; the digests of every data file and of the
manifest itself); anything else is a ``StoreError`` naming the field. ``docs/store-format.md`` describes each
field; a test keeps the two in step.

Format version 2 adds ``generation``, ``digests`` (per data file its size, SHA-256 and an XXH3-64 digest per row chunk
of every tensor, checked on every read) and ``manifest_sha256``; ``coded`` (optional) describes the coded files
and what each coded entry holds (``CodedSection``). Version-1 stores (no digests) still open and read;
commands that write a store refuse them until ``tvbasis upgrade`` has added the digests.

Format version 3 makes the coded part cost what it stores: a coded file written by version 3 holds its tensors
back to back as one ``uint8`` safetensors tensor (``"layout": "blob"``; one header entry instead of one per stored
tensor, which was ~128 bytes each), and the bulky part of the ``coded`` section — the per-file tensor listings and
the per-entry descriptions — is written as ``"packed"``: base64 of a zstd frame of that JSON (~12× smaller). On a
128× MiniLM budget store the two took 17 % of the directory. Version-2 stores read unchanged; the next generation a
writer commits is version 3.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from tvbasis._version import __version__
from tvbasis.bases import BasisFit
from tvbasis.codecs import parse_codec
from tvbasis.errors import StoreError, TvbasisError
from tvbasis.io import TensorSpec, dtype_name, fsync_dir
from tvbasis.io.atomic import temp_path
from tvbasis.io.paths import plain_name_problem
from tvbasis.merge import MergeSpec, get_merger
from tvbasis.methods import StoredFacts, get_store_method, store_method_names
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store.faults import fault_point
from tvbasis.store.layout import SHARD_RE, chunk_count, expected_header, stacked_spec
from tvbasis.untrusted import load_json

FORMAT = "tvbasis.basis_store"
FORMAT_VERSION = 3
#: the first format version with blob-layout coded files and a packed coded section
PACKED_VERSION = 3
#: zstd level of the packed coded section (on a 128x MiniLM store's 432 KB section: level 10 gives 12x in 9 ms;
#: level 19 is 8 % smaller at 48x the time, which a 100-task LLM store would feel)
PACKED_LEVEL = 10
#: the one tensor of a blob-layout coded file
BLOB_TENSOR = "coded"
#: the oldest format version this tvbasis reads
MIN_FORMAT_VERSION = 1
MANIFEST = "tvbasis.json"
#: a manifest larger than this is refused before it is parsed
MAX_MANIFEST_BYTES = 256 * 2**20
#: dtypes a store may hold its bases in
STORE_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: task names a store may not use (``--add all`` means every task)
RESERVED_TASK_NAMES = ("all",)
#: the per-chunk digest of data files
DIGEST_ALGORITHM = "xxh3_64"
#: hex digits of one chunk's digest
CHUNK_HEX = 16
_HEX = re.compile(r"^[0-9a-f]*$")


def task_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a task (None when it can): not empty, no ``=`` or ``,``, no control characters,
    not ``all``."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if "=" in name or "," in name or any(ord(ch) < 32 for ch in name):
        return f"{name!r} contains '=', ',' or a control character"
    if name in RESERVED_TASK_NAMES:
        return f"{name!r} is reserved"
    return None


# ------------------------------------------------------------------------------------------------ checking
class _Check:
    """Field-by-field reader of an untrusted JSON object: each accessor names the field when it is wrong."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, what: str) -> StoreError:
        what = what if len(what) <= 400 else what[:400] + "…"  # an offending value is quoted, never printed whole
        return StoreError(f"{self.where}: field {path[:300]!r} {what}")

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

    def int_(self, v: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            raise self.fail(path, f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise self.fail(path, f"must be <= {hi}, got {v}")
        return v

    def num(self, v: Any, path: str, lo: float | None = None) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(path, f"must be a finite number, got {v!r}")
        if lo is not None and v < lo:
            raise self.fail(path, f"must be >= {lo}, got {v!r}")
        return float(v)

    def str_(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise self.fail(path, f"must be a string, got {type(v).__name__}")
        return v

    def hex_(self, v: Any, path: str, length: int | None = None) -> str:
        s = self.str_(v, path)
        if not _HEX.match(s) or (length is not None and len(s) != length):
            what = f"{length} lowercase hex digits" if length is not None else "lowercase hex digits"
            raise self.fail(path, f"must be {what}, got {s[:80]!r}" + ("..." if len(s) > 80 else ""))
        return s

    def bool_(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, f"must be true or false, got {v!r}")
        return v

    def strs(self, v: Any, path: str) -> list[str]:
        if not isinstance(v, list):
            raise self.fail(path, f"must be a list of strings, got {type(v).__name__}")
        return [self.str_(x, f"{path}[{i}]") for i, x in enumerate(v)]

    def array(self, v: Any, path: str, shape: tuple[int, ...]) -> np.ndarray:
        if not isinstance(v, list) and shape:
            raise self.fail(path, f"must be a numeric array of shape {shape}, got {type(v).__name__}")
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise self.fail(path, f"must be a numeric array of shape {shape}") from None
        if a.size == 0 and math.prod(shape) == 0 and a.ndim < len(shape):
            a = a.reshape(shape)  # JSON writes an empty (0, T) array as []
        if a.shape != shape:
            raise self.fail(path, f"has shape {a.shape}, expected {shape}")
        if not _only_numbers(v):
            raise self.fail(path, "must hold numbers only (no booleans or strings)")
        if not np.isfinite(a).all():
            raise self.fail(path, "holds NaN or Inf")
        return a


    def file_name(self, v: Any, path: str, part: str) -> str:
        name = self.str_(v, path)
        problem = plain_name_problem(name)
        if problem is not None:
            raise self.fail(path, f"must be a plain file name inside the store: {name!r} {problem}")
        m = SHARD_RE.match(name)
        if m is None or m["part"] != part:
            raise self.fail(path, f"must be a {part} data file name ({part}[.gN][-0000i-of-0000n].safetensors), "
                                  f"got {name!r}")
        return name


def _only_numbers(v: Any) -> bool:
    if isinstance(v, list):
        return all(_only_numbers(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strict_json(raw: bytes, where: str) -> Any:
    """Parse untrusted JSON (``untrusted.load_json``): UTF-8, no NaN/Infinity literals nor numbers overflowing to
    infinity, no repeated keys, integers of at most 40 digits, at most 64 levels deep."""
    return load_json(raw, where, StoreError, MAX_MANIFEST_BYTES, what="manifest")


def manifest_digest(d: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of a manifest without its ``manifest_sha256``."""
    body = {k: v for k, v in d.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


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
    #: files of codec-encoded tensors (their digests live in ``Manifest.coded``)
    coded: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bases": list(self.bases), "mean": list(self.mean)}
        if self.coded:
            d["coded"] = list(self.coded)
        return d

    def all(self) -> list[str]:
        return [*self.bases, *self.mean, *self.coded]

    def dense(self) -> list[str]:
        """The bases and mean files (positional layout, per-chunk digests in ``Manifest.digests``)."""
        return [*self.bases, *self.mean]

    def part_of(self, name: str) -> str:
        return "bases" if name in self.bases else "coded" if name in self.coded else "mean"


@dataclass
class FileDigest:
    """What a data file must hold: its size, the SHA-256 of its content, its tensors in order and per tensor the
    XXH3-64 digest of each chunk (16 hex digits per chunk, chunks m-major: see ``store.layout``)."""

    size: int
    sha256: str
    tensors: list[str]
    chunks: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "tensors": list(self.tensors), "chunks": dict(self.chunks)}

    def chunk_digests(self, name: str) -> list[int]:
        s = self.chunks[name]
        return [int(s[i:i + CHUNK_HEX], 16) for i in range(0, len(s), CHUNK_HEX)]


@dataclass
class Digests:
    """Digests of every data file (format version 2)."""

    chunk_elements: int
    files: dict[str, FileDigest]
    algorithm: str = DIGEST_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "chunk_elements": self.chunk_elements,
                "files": {f: d.to_json() for f, d in self.files.items()}}


#: how a store's coded per-task entries combine with its bases: ``add`` — v_t ≈ v̂_t + r̂_t (residuals);
#: ``mask`` — v_t ≈ m_t ∘ s_0 (TALL: a 0/1 mask per task over the one stored multi-task vector);
#: ``joint`` — v_t ≈ U_c Σ_t V_cᵀ per tensor (lora-joint: shared bases ``shared/{c}/{param}`` of the task's
#: cluster c and the task's core; entries of other codecs are decoded and added as they are)
CODED_MODES = ("add", "mask", "joint")
#: pseudo-codecs of mode ``joint`` (not registered codecs: an entry of them is read with its shared bases):
#: a shared entry stores ``u`` (rows × k_out) and ``v`` (cols × k_in); a core entry stores ``core``
#: (k_out × k_in, or k for diagonal cores)
JOINT_BASES = "joint-bases"
JOINT_CORE = "joint-core"
#: dtypes a coded file may hold
CODED_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def entry_key(kind: str, param: str, index: int | str | None = None) -> str:
    """Key of one coded entry: ``bases/{m}/{param}``, ``mean/{param}`` or ``residual/{task}/{param}``. A task name
    may hold ``/``: it is written with ``%`` and ``/`` escaped (``%25``, ``%2F``), so keys never collide."""
    if index is None:
        return f"{kind}/{param}"
    return f"{kind}/{str(index).replace('%', '%25').replace('/', '%2F')}/{param}"


@dataclass
class CodedTensor:
    """One tensor of a coded file, in file order: its key, dtype, shape and XXH3-64 digest (16 hex digits)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    digest: str

    def to_json(self) -> list[Any]:
        return [self.key, self.dtype, list(self.shape), self.digest]

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.key, self.shape, getattr(torch, self.dtype))


#: how a coded file lays out its tensors: ``tensors`` — one safetensors tensor per stored tensor (versions ≤ 2);
#: ``blob`` — the same bytes in the same order as one uint8 tensor ``coded`` (version 3)
CODED_LAYOUTS = ("tensors", "blob")


@dataclass
class CodedFile:
    """What a coded data file must hold: its size, SHA-256 and tensors in order, and their layout."""

    size: int
    sha256: str
    tensors: list[CodedTensor]
    layout: str = "blob"

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "tensors": [t.to_json() for t in self.tensors],
                **({"layout": self.layout} if self.layout != "tensors" else {})}

    def header(self) -> bytes:
        """The exact safetensors header of the file."""
        return coded_header(self.tensors, self.layout)


def coded_header(tensors: list[CodedTensor], layout: str) -> bytes:
    """The safetensors header tvbasis writes for a coded file holding ``tensors`` in this order."""
    if layout == "blob":
        total = sum(t.spec.nbytes for t in tensors)
        return expected_header([TensorSpec(BLOB_TENSOR, (total,), torch.uint8)])
    return expected_header([t.spec for t in tensors])


@dataclass
class CodedEntry:
    """One codec-encoded tensor: the file holding it and its ``Encoded`` description (codec spec, shape, the
    names of its stored tensors, meta, children); stored tensor ``n`` is key ``{entry key}/{n}`` in the file."""

    file: str
    encoded: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "encoded": self.encoded}


@dataclass
class CodedSection:
    """The codec-encoded part of a store: per-task residuals (or TALL masks) and/or bases through a codec."""

    mode: str
    #: canonical spec of the coder the bases (and mean) went through; None: bases stored densely
    bases_codec: str | None
    #: canonical spec of the coder of the per-task entries; None: no per-task entries
    residual_codec: str | None
    files: dict[str, CodedFile]
    entries: dict[str, CodedEntry]

    def to_json(self, packed: bool = True) -> dict[str, Any]:
        """The section's JSON; ``packed``: files and entries as one base64 zstd frame (format version 3)."""
        bulk = {"files": {f: d.to_json() for f, d in self.files.items()},
                "entries": {k: e.to_json() for k, e in self.entries.items()}}
        head = {"mode": self.mode, "bases_codec": self.bases_codec, "residual_codec": self.residual_codec}
        if not packed:
            return {**head, **bulk}
        raw = json.dumps(bulk, separators=(",", ":")).encode()
        return {**head, "packed": base64.b64encode(zstandard.ZstdCompressor(level=PACKED_LEVEL).compress(raw))
                .decode("ascii")}

    def renamed(self, names: Mapping[str, str]) -> CodedSection:
        """The section with its files renamed (``names``: old -> new; others kept)."""
        return CodedSection(self.mode, self.bases_codec, self.residual_codec,
                            {names.get(f, f): d for f, d in self.files.items()},
                            {k: CodedEntry(names.get(e.file, e.file), e.encoded) for k, e in self.entries.items()})

    def nbytes(self, prefix: str = "") -> int:
        """Stored bytes of the entries whose key starts with ``prefix`` (tensor data, headers excluded)."""
        sizes = {t.key: t.spec.nbytes for f in self.files.values() for t in f.tensors}
        return sum(n for k, n in sizes.items() if k.startswith(prefix))

    def entry_nbytes(self, keys: list[str]) -> int:
        """Stored bytes of exactly the entries ``keys``."""
        sizes = {t.key: t.spec.nbytes for f in self.files.values() for t in f.tensors}
        return sum(sizes[f"{k}/{n}"] for k in keys for n in encoded_keys(self.entries[k].encoded, ""))


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
    generation: int = 1
    digests: Digests | None = None
    coded: CodedSection | None = None
    manifest_sha256: str = ""

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """The tasks' names in store order."""
        return [t.name for t in self.tasks]

    def gram_of_group(self, group: str) -> np.ndarray:
        """The Gram matrix of one layer group (layer-wise stores), else the whole-vector Gram."""
        return self.group_grams[group] if group in self.group_grams else self.gram

    def specs(self) -> dict[str, TensorSpec]:
        """Tensor name → spec of every tensor the store covers (the pretrained dtypes)."""
        return {s.name: s for s in self.tensors}

    @property
    def has_residuals(self) -> bool:
        """Whether the store keeps a coded per-task residual for every task."""
        return self.coded is not None and self.coded.residual_codec is not None

    @property
    def bases_coded(self) -> bool:
        """Whether the bases (and PCA mean) are stored through a codec rather than densely."""
        return self.coded is not None and self.coded.bases_codec is not None

    def stacked_specs(self, part: str, names: list[str]) -> list[TensorSpec]:
        """The tensors a data file of ``part`` holding parameters ``names`` (in order) has, in stored dtypes."""
        specs = self.specs()
        return [stacked_spec(part, specs[n], self.M, getattr(torch, self.store_dtypes[n])) for n in names]

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object written to ``tvbasis.json`` (docs/store-format.md)."""
        d = {
            "format": self.format, "format_version": self.format_version, "tool": self.tool, "created": self.created,
            "generation": self.generation,
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
            "digests": None if self.digests is None else self.digests.to_json(),
            **({"coded": self.coded.to_json(packed=self.format_version >= PACKED_VERSION)}
               if self.coded is not None else {}),
            "task_vectors_bytes": self.task_vectors_bytes,
            "include": list(self.include), "exclude": list(self.exclude),
        }
        d["manifest_sha256"] = manifest_digest(d)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> Manifest:
        """Parse and validate an untrusted manifest; StoreError naming the first bad field."""
        c = _Check(where)
        d = c.obj(d, "(manifest)")
        if d.get("format") != FORMAT:
            raise StoreError(f"{where}: not a tvbasis basis store manifest (format {str(d.get('format'))[:80]!r})")
        version = c.get(d, "format_version", "")
        if isinstance(version, bool) or not isinstance(version, int) or version < MIN_FORMAT_VERSION:
            raise c.fail("format_version", f"must be an integer >= {MIN_FORMAT_VERSION}, got {version!r}")
        if version > FORMAT_VERSION:
            raise StoreError(f"{where}: store format version {version} is newer than this tvbasis "
                             f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade tvbasis")
        if version >= 2:
            recorded = c.hex_(c.get(d, "manifest_sha256", ""), "manifest_sha256", 64)
            if recorded != manifest_digest(d):
                raise StoreError(f"{where}: the manifest does not match its recorded digest (field "
                                 "'manifest_sha256'): it was edited or is corrupt")
        method = c.str_(c.get(d, "method", ""), "method")
        if method not in store_method_names():
            raise c.fail("method", f"names an unknown store method {method[:80]!r}")
        kind = get_store_method(method)
        options = c.obj(c.get(d, "options", "") if version >= 2 else (d.get("options") or {}), "options")
        M = c.int_(c.get(d, "M", ""), "M", 0)
        tasks = [_task(c, t, i) for i, t in enumerate(_list(c, c.get(d, "tasks", ""), "tasks"))]
        try:
            kind.check(options, [t.name for t in tasks])
        except (TvbasisError, TypeError, ValueError) as e:
            raise c.fail("options", f"are not valid options of {method!r}: {e}") from None
        T = len(tasks)
        if T < 1:
            raise c.fail("tasks", "is empty")
        if c.int_(c.get(d, "T", ""), "T") != T:
            raise c.fail("T", f"is {d.get('T')}, but 'tasks' lists {T} tasks")
        names = [t.name for t in tasks]
        if len(set(names)) != T:
            raise c.fail("tasks", f"repeats a task name: {sorted(n for n in set(names) if names.count(n) > 1)}")
        groups_raw = c.obj(c.get(d, "groups", ""), "groups")
        if not groups_raw:
            raise c.fail("groups", "is empty")
        groups = {g: _fit(c, f, f"groups.{g}", M, T) for g, f in groups_raw.items()}
        first = next(iter(groups.values()))
        for g, f in groups.items():
            if (f.stores_bases, f.has_mean, f.labels is None) != (first.stores_bases, first.has_mean,
                                                                   first.labels is None):
                raise c.fail(f"groups.{g}", "stores other vectors than the first group")
        n_clusters, what = kind.cluster_count(options, M)
        for i, t in enumerate(tasks):
            if t.cluster is not None and t.cluster >= n_clusters:
                raise c.fail(f"tasks[{i}].cluster", f"must be < {what} = {n_clusters}, got {t.cluster}")
            if kind.requires_clusters() and t.cluster is None:
                raise c.fail(f"tasks[{i}].cluster", f"is missing: every task of a {method} store has a cluster")
        nU = first.n_stored
        cross_raw = c.obj(c.get(d, "cross", ""), "cross")
        if set(cross_raw) != set(groups):
            raise c.fail("cross", f"must have exactly the groups of 'groups' ({sorted(groups)[:5]})")
        cross = {}
        for g in groups:
            x = c.obj(c.get(cross_raw, g, "cross."), f"cross.{g}")
            cross[g] = Cross(c.array(c.get(x, "C", f"cross.{g}."), f"cross.{g}.C", (nU, T)),
                             c.array(c.get(x, "K", f"cross.{g}."), f"cross.{g}.K", (nU, nU)))
        gram = _gram(c, c.get(d, "gram", ""), "gram", T)
        gg_raw = c.obj(d.get("group_grams") or {}, "group_grams")
        group_grams = {}
        for g, v in gg_raw.items():
            if g not in groups:
                raise c.fail(f"group_grams.{g}", "names a group that 'groups' does not have")
            group_grams[g] = _gram(c, v, f"group_grams.{g}", T)
        layerwise = c.bool_(c.get(d, "layerwise", ""), "layerwise")
        group_of = {k: c.str_(v, f"group_of.{k}") for k, v in c.obj(d.get("group_of") or {}, "group_of").items()}
        for k, g in group_of.items():
            if g not in groups:
                raise c.fail(f"group_of.{k}", f"names group {g[:80]!r} that 'groups' does not have")
        if layerwise and set(group_grams) != set(groups):
            raise c.fail("group_grams", "must hold the Gram matrix of every group of a layer-wise store")
        pre = c.obj(c.get(d, "pretrained", ""), "pretrained")
        pretrained = PretrainedRef(
            path=c.str_(pre.get("path", ""), "pretrained.path"),
            fingerprint=c.hex_(c.get(pre, "fingerprint", "pretrained."), "pretrained.fingerprint", 64),
            checksum=c.hex_(c.get(pre, "checksum", "pretrained."), "pretrained.checksum", 64),
            checksum_chunk_elements=c.int_(c.get(pre, "checksum_chunk_elements", "pretrained."),
                                           "pretrained.checksum_chunk_elements", 1))
        tensors = [_spec(c, s, i) for i, s in enumerate(_list(c, c.get(d, "tensors", ""), "tensors"))]
        if not tensors:
            raise c.fail("tensors", "is empty")
        if len({s.name for s in tensors}) != len(tensors):
            raise c.fail("tensors", "repeats a tensor name")
        specs = {s.name: s for s in tensors}
        for name in specs:
            if group_of.get(name, WHOLE_VECTOR) not in groups:
                raise c.fail("group_of", f"gives tensor {name[:80]!r} no group of 'groups'")
        for name in group_of:
            if name not in specs:
                raise c.fail(f"group_of.{name}", "names a tensor that 'tensors' does not list")
        sd = c.obj(c.get(d, "store_dtypes", ""), "store_dtypes")
        if set(sd) - set(specs):
            raise c.fail("store_dtypes", f"names tensors that 'tensors' does not list: {sorted(set(sd) - set(specs))[:3]}")
        store_dtypes = {}
        for s in tensors:
            dt = c.str_(c.get(sd, s.name, "store_dtypes."), f"store_dtypes.{s.name}")
            if dt not in STORE_DTYPES:
                raise c.fail(f"store_dtypes.{s.name}", f"must be one of {STORE_DTYPES}, got {dt[:80]!r}")
            store_dtypes[s.name] = dt
        fr = c.obj(c.get(d, "files", ""), "files")
        files = StoreFiles(
            *[[c.file_name(x, f"files.{part}[{i}]", part) for i, x in enumerate(_list(c, fr.get(part, []),
                                                                                      f"files.{part}"))]
              for part in ("bases", "mean", "coded")])
        if len(set(files.all())) != len(files.all()):
            raise c.fail("files", "names a file twice")
        coded = None
        if d.get("coded") is not None:
            if version < 2:
                raise c.fail("coded", "needs format version 2")
            coded = _coded(c, d["coded"], files, specs, [t.name for t in tasks], M, first.has_mean,
                           {t.name: t.cluster for t in tasks}, version)
        elif files.coded:
            raise c.fail("files.coded", "lists files, but the manifest has no 'coded' section")
        if M == 0 and (coded is None or coded.residual_codec is None):
            raise c.fail("M", "is 0 (no bases), which only a store with per-task coded entries ('coded') can be")
        problem = kind.problem(StoredFacts(options, M, first.has_mean, None if coded is None else coded.mode,
                                           coded is not None and coded.bases_codec is not None))
        if problem is not None:
            raise c.fail(*problem)
        if coded is not None and coded.mode not in kind.coded_modes:
            owners = [m for m in store_method_names() if coded.mode in get_store_method(m).coded_modes]
            raise c.fail("coded.mode", f"{coded.mode!r} belongs to {' / '.join(owners)} stores")
        dense_bases = first.stores_bases and M > 0 and (coded is None or coded.bases_codec is None)
        if dense_bases != bool(files.bases):
            raise c.fail("files.bases", "is empty, but the bases are stored" if dense_bases else
                         "lists files, but the bases are coded, absent or regenerated from a seed")
        dense_mean = first.has_mean and (coded is None or coded.bases_codec is None)
        if dense_mean != bool(files.mean):
            raise c.fail("files.mean", "is empty, but the basis has a stored mean" if dense_mean else
                         "lists files, but the basis has no mean stored densely")
        counts = d.get("member_counts")
        if counts is not None:
            counts = [c.int_(x, f"member_counts[{i}]", 0) for i, x in enumerate(_list(c, counts, "member_counts"))]
            if first.labels is None or len(counts) != M or sum(counts) != T:
                raise c.fail("member_counts", f"must be M = {M} cluster sizes summing to T = {T} (cluster stores only)"
                             f", got {counts[:8]}")
        digests = None
        if version >= 2:
            digests = _digests(c, c.get(d, "digests", ""), files, specs, store_dtypes, M)
        return cls(
            method=method, options=options, M=M, T=T, layerwise=layerwise,
            task_like=c.bool_(c.get(d, "task_like", ""), "task_like"), tasks=tasks, groups=groups,
            group_of=group_of, cross=cross, gram=gram, group_grams=group_grams, pretrained=pretrained,
            tensors=tensors, store_dtypes=store_dtypes, files=files,
            task_vectors_bytes=c.int_(d.get("task_vectors_bytes", 0), "task_vectors_bytes", 0),
            include=c.strs(d.get("include") or [], "include"), exclude=c.strs(d.get("exclude") or [], "exclude"),
            member_counts=counts, gram_estimated_rows=c.strs(d.get("gram_estimated_rows") or [], "gram_estimated_rows"),
            format_version=version, tool=c.str_(d.get("tool", ""), "tool"),
            created=c.str_(d.get("created", ""), "created"),
            generation=c.int_(d.get("generation", 1), "generation", 1), digests=digests, coded=coded,
            manifest_sha256=str(d.get("manifest_sha256", "")))

    # -- files -----------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, raw: bytes, where: str) -> Manifest:
        """Validate the bytes of a manifest file."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise StoreError(f"{where}: manifest of {len(raw)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
        return cls.from_json(_strict_json(raw, where), where)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        """Read and validate the manifest of the store at ``root`` (every field checked; StoreError naming the field
        and the file on anything malformed)."""
        mf = root / MANIFEST
        if not root.exists():
            raise StoreError(f"{root}: no such store")
        if not mf.is_file():
            raise StoreError(f"{root}: not a tvbasis store (no {MANIFEST})")
        try:
            with open(mf, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise StoreError(f"{mf}: unreadable manifest ({e.strerror})") from None
        return cls.parse(raw, str(mf))

    def dumps(self) -> str:
        """``to_json`` as the text written to disk (NaN/Inf refused): one top-level field per line, each value
        compact. A manifest's bytes count against a ``--budget`` (its per-entry listing is a tenth of a 128×
        store of a small model), so no indentation; ``python -m json.tool`` pretty-prints it."""
        body = self.to_json()
        lines = [f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'), allow_nan=False)}" for k, v in body.items()]
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def write(self, root: Path) -> None:
        """Write the manifest into ``root`` durably and atomically: a temporary file (the one temp pattern,
        ``.tvbasis.json.tvbasis-tmp-{pid}-{random}``), fsynced, renamed over the old manifest in one step, then the
        directory fsynced."""
        text = self.dumps()
        tmp = temp_path(root / MANIFEST)
        try:
            with open(tmp, "x") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            fault_point("manifest written")
            os.replace(tmp, root / MANIFEST)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fault_point("manifest switched")
        fsync_dir(root)


def manifest_fields() -> list[str]:
    """The top-level keys of a manifest, in the order they are written (docs/store-format.md lists each)."""
    return [f.name for f in fields(Manifest)]


def _list(c: _Check, v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        raise c.fail(path, f"must be a list, got {type(v).__name__}")
    return v


def _gram(c: _Check, v: Any, path: str, T: int) -> np.ndarray:
    G = c.array(v, path, (T, T))
    if (np.diag(G) < 0).any():
        raise c.fail(path, "has a negative diagonal entry (squared norms are >= 0)")
    scale = max(1.0, float(np.abs(G).max()))
    if not np.allclose(G, G.T, rtol=1e-6, atol=1e-9 * scale):
        raise c.fail(path, "is not symmetric")
    return G


def _task(c: _Check, t: Any, i: int) -> TaskEntry:
    p = f"tasks[{i}]"
    t = c.obj(t, p)
    name = c.str_(c.get(t, "name", f"{p}."), f"{p}.name")
    problem = task_name_problem(name)
    if problem is not None:
        raise c.fail(f"{p}.name", f"is not a valid task name: {problem}")
    cluster = t.get("cluster")
    return TaskEntry(name=name, source=c.str_(t.get("source", ""), f"{p}.source"),
                     norm=c.num(c.get(t, "norm", f"{p}."), f"{p}.norm", 0.0),
                     rel_error=c.num(c.get(t, "rel_error", f"{p}."), f"{p}.rel_error", 0.0),
                     error_exact=c.bool_(t.get("error_exact", True), f"{p}.error_exact"),
                     added=c.bool_(t.get("added", False), f"{p}.added"),
                     cluster=None if cluster is None else c.int_(cluster, f"{p}.cluster", 0))


def _spec(c: _Check, s: Any, i: int) -> TensorSpec:
    p = f"tensors[{i}]"
    s = c.obj(s, p)
    name = c.str_(c.get(s, "name", f"{p}."), f"{p}.name")
    if not name:
        raise c.fail(f"{p}.name", "is empty")
    shape = tuple(c.int_(x, f"{p}.shape", 1, 2**40) for x in _list(c, c.get(s, "shape", f"{p}."), f"{p}.shape"))
    if len(shape) > 8 or math.prod(shape) > 2**42:
        raise c.fail(f"{p}.shape", f"is not a plausible tensor shape: {shape}")
    dt = c.str_(c.get(s, "dtype", f"{p}."), f"{p}.dtype")
    dtype = getattr(torch, dt, None) if dt.isidentifier() and not dt.startswith("_") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise c.fail(f"{p}.dtype", f"must be a floating-point torch dtype, got {dt[:80]!r}")
    return TensorSpec(name, shape, dtype)


def _fit(c: _Check, f: Any, p: str, M: int, T: int) -> BasisFit:
    f = c.obj(f, p)
    if c.int_(c.get(f, "M", f"{p}."), f"{p}.M", 0) != M:
        raise c.fail(f"{p}.M", f"is {f['M']}, but the store's M is {M}")

    def opt(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        v = f.get(key)
        return None if v is None else c.array(v, f"{p}.{key}", shape)
    W = c.array(c.get(f, "W", f"{p}."), f"{p}.W", (M, T))
    labels = f.get("labels")
    if labels is not None:
        labels = [c.int_(x, f"{p}.labels[{i}]", 0) for i, x in enumerate(_list(c, labels, f"{p}.labels"))]
        if len(labels) != T or any(x >= M for x in labels):
            raise c.fail(f"{p}.labels", f"must be {T} cluster indices in [0, {M}), got {labels[:12]}")
    inner = f.get("inner")
    spec = None
    if inner is not None:
        inner = c.obj(inner, f"{p}.inner")
        spec = MergeSpec(c.str_(c.get(inner, "method", f"{p}.inner."), f"{p}.inner.method"),
                         c.obj(inner.get("params") or {}, f"{p}.inner.params"))
        try:
            get_merger(spec)
        except (TvbasisError, TypeError, ValueError) as e:
            raise c.fail(f"{p}.inner", f"is not a valid merge: {e}") from None
    seed = f.get("random_seed")
    refit = f.get("refit")
    if refit not in (None, "full", "cluster_scale"):
        raise c.fail(f"{p}.refit", f"must be null, 'full' or 'cluster_scale', got {refit!r}")
    stats = c.obj(f.get("stats") or {}, f"{p}.stats")
    sizes = stats.get("cluster_sizes")
    if sizes is not None:
        sizes = [c.int_(x, f"{p}.stats.cluster_sizes[{i}]", 0)
                 for i, x in enumerate(_list(c, sizes, f"{p}.stats.cluster_sizes"))]
        if labels is None or len(sizes) != M or sum(sizes) != T:
            raise c.fail(f"{p}.stats.cluster_sizes", f"must be M = {M} cluster sizes summing to T = {T}")
    fit = BasisFit(M=M, B=opt("B", (T, M)), W=W, mean_weights=opt("mean_weights", (T,)),
                   mean_coef=opt("mean_coef", (T,)), labels=labels, inner=spec,
                   random_seed=None if seed is None else c.int_(seed, f"{p}.random_seed", 0, 2**63 - 1), refit=refit,
                   stats=stats)
    if (fit.mean_weights is None) != (fit.mean_coef is None):
        raise c.fail(p, "must have both or neither of 'mean_weights' and 'mean_coef'")
    if fit.B is None and fit.random_seed is None and fit.inner is None:
        raise c.fail(p, "must say how its bases are made: 'B', 'inner' or 'random_seed'")
    if fit.random_seed is not None and (fit.B is not None or fit.has_mean):
        raise c.fail(p, "has a 'random_seed' and 'B' or a mean: a random basis is made from its seed alone")
    if fit.is_merged and fit.labels is None:
        raise c.fail(f"{p}.labels", "are required for bases made by an inner merge")
    if fit.refit == "cluster_scale" and fit.labels is None:
        raise c.fail(f"{p}.refit", "'cluster_scale' needs cluster 'labels'")
    return fit


def _digests(c: _Check, v: Any, files: StoreFiles, specs: dict[str, TensorSpec], store_dtypes: dict[str, str],
             M: int) -> Digests:
    p = "digests"
    d = c.obj(v, p)
    algorithm = c.str_(c.get(d, "algorithm", f"{p}."), f"{p}.algorithm")
    if algorithm != DIGEST_ALGORITHM:
        raise c.fail(f"{p}.algorithm", f"must be {DIGEST_ALGORITHM!r}, got {algorithm[:40]!r}")
    chunk = c.int_(c.get(d, "chunk_elements", f"{p}."), f"{p}.chunk_elements", 1)
    raw = c.obj(c.get(d, "files", f"{p}."), f"{p}.files")
    if set(raw) != set(files.dense()):
        raise c.fail(f"{p}.files", "must have one entry per bases and mean file of 'files', and no other")
    out: dict[str, FileDigest] = {}
    for part, names in (("bases", files.bases), ("mean", files.mean)):
        seen: dict[str, str] = {}
        for fname in names:
            q = f"{p}.files.{fname}"
            e = c.obj(raw[fname], q)
            tensors = c.strs(c.get(e, "tensors", f"{q}."), f"{q}.tensors")
            if not tensors:
                raise c.fail(f"{q}.tensors", "is empty")
            for t in tensors:
                if t not in specs:
                    raise c.fail(f"{q}.tensors", f"names a tensor that 'tensors' does not list: {t[:80]!r}")
                if t in seen:
                    raise c.fail(f"{q}.tensors", f"lists {t[:80]!r}, which {seen[t]} holds too")
                seen[t] = fname
            chunk_hex = c.obj(c.get(e, "chunks", f"{q}."), f"{q}.chunks")  # XXH3-64 per chunk, as hex
            if set(chunk_hex) != set(tensors):
                raise c.fail(f"{q}.chunks", "must have one entry per tensor of the file")
            stacked = [stacked_spec(part, specs[t], M, getattr(torch, store_dtypes[t])) for t in tensors]
            for t in tensors:
                n = chunk_count(specs[t], chunk) * (M if part == "bases" else 1)
                c.hex_(chunk_hex[t], f"{q}.chunks.{t}", CHUNK_HEX * n)
            size = len(expected_header(stacked)) + sum(s.nbytes for s in stacked)
            if c.int_(c.get(e, "size", f"{q}."), f"{q}.size", 0) != size:
                raise c.fail(f"{q}.size", f"is {e['size']}, but the tensors it lists take {size} bytes")
            out[fname] = FileDigest(size, c.hex_(c.get(e, "sha256", f"{q}."), f"{q}.sha256", 64), tensors,
                                    {t: chunk_hex[t] for t in tensors})
        if names and set(seen) != set(specs):
            missing = sorted(set(specs) - set(seen))
            raise c.fail(f"{p}.files", f"gives {len(missing)} tensor(s) no {part} file, e.g. {missing[0][:80]!r}")
    return Digests(chunk, out, algorithm)


#: nesting depth of an encoded description (a codec chain: lowrank+sparse-rows+int8 is 3)
MAX_CODEC_DEPTH = 6
NONE_CODEC = "none"


def coded_keys(tasks: list[str], params: list[str], M: int, has_mean: bool, residuals: bool,
               bases: bool, shared: Iterable[tuple[int, str]] = ()) -> dict[str, str]:
    """Every entry key a coded section must have -> the parameter it codes (``shared``: the (cluster, param)
    pairs of a joint store's shared bases, listed first)."""
    keys: dict[str, str] = {entry_key("shared", p, c): p for c, p in shared}
    if bases:
        keys.update({entry_key("bases", p, m): p for p in params for m in range(M)})
        if has_mean:
            keys.update({entry_key("mean", p): p for p in params})
    if residuals:
        keys.update({entry_key("residual", p, t): p for t in tasks for p in params})
    return keys


def unpack_coded(v: Any, where: str, version: int = FORMAT_VERSION) -> Any:
    """A ``coded`` section with its ``packed`` part (if any) expanded back into ``files`` and ``entries`` — the
    plain form, which a manifest may also hold. Untrusted: the frame is read to at most ``MAX_MANIFEST_BYTES``
    (a small frame cannot expand into a large allocation); StoreError naming ``coded.packed`` otherwise."""
    if not isinstance(v, dict) or "packed" not in v:
        return v
    c = _Check(where)
    p = "coded.packed"
    if version < PACKED_VERSION:
        raise c.fail(p, f"needs format version {PACKED_VERSION}, the manifest is version {version}")
    if "files" in v or "entries" in v:
        raise c.fail("coded", "has both 'packed' and 'files'/'entries'")
    text = c.str_(v["packed"], p)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise c.fail(p, "is not base64") from None
    try:
        parts, n = [], 0
        with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            while n <= MAX_MANIFEST_BYTES and (part := reader.read(2**20)):
                parts.append(part)
                n += len(part)
        data = b"".join(parts)
    except zstandard.ZstdError as e:
        raise c.fail(p, f"is not a zstd frame ({str(e)[:120]})") from None
    bulk = load_json(data, f"{where}: field 'coded.packed'", StoreError, MAX_MANIFEST_BYTES, what="packed section")
    if not isinstance(bulk, dict) or set(bulk) != {"files", "entries"}:
        raise c.fail(p, "must hold a JSON object with exactly the keys 'files' and 'entries'")
    return {**{k: x for k, x in v.items() if k != "packed"}, **bulk}


def _coded(c: _Check, v: Any, files: StoreFiles, specs: dict[str, TensorSpec], tasks: list[str], M: int,
           has_mean: bool, clusters: Mapping[str, int | None] | None = None,
           version: int = FORMAT_VERSION) -> CodedSection:
    p = "coded"
    d = c.obj(unpack_coded(v, c.where, version), p)
    mode = c.str_(c.get(d, "mode", f"{p}."), f"{p}.mode")
    if mode not in CODED_MODES:
        raise c.fail(f"{p}.mode", f"must be one of {CODED_MODES}, got {mode[:40]!r}")
    codecs = {}
    for k in ("bases_codec", "residual_codec"):
        x = d.get(k)
        codecs[k] = None if x is None else c.str_(x, f"{p}.{k}")
    if codecs["bases_codec"] is None and codecs["residual_codec"] is None:
        raise c.fail(p, "codes neither the bases nor per-task entries")
    raw = c.obj(c.get(d, "files", f"{p}."), f"{p}.files")
    if set(raw) != set(files.coded):
        raise c.fail(f"{p}.files", "must have one entry per file of 'files.coded', and no other")
    out_files: dict[str, CodedFile] = {}
    where_key: dict[str, str] = {}
    for fname in files.coded:
        q = f"{p}.files.{fname}"
        e = c.obj(raw[fname], q)
        tensors = []
        for i, t in enumerate(_list(c, c.get(e, "tensors", f"{q}."), f"{q}.tensors")):
            r = f"{q}.tensors[{i}]"
            if not isinstance(t, list) or len(t) != 4:
                raise c.fail(r, "must be [key, dtype, shape, digest]")
            key = c.str_(t[0], f"{r}[0]")
            dt = c.str_(t[1], f"{r}[1]")
            if dt not in CODED_DTYPES:
                raise c.fail(f"{r}[1]", f"must be one of {CODED_DTYPES}, got {dt[:40]!r}")
            shape = tuple(c.int_(x, f"{r}[2]", 0, 2**40) for x in _list(c, t[2], f"{r}[2]"))
            if len(shape) > 8 or math.prod(shape) > 2**42:
                raise c.fail(f"{r}[2]", f"is not a plausible tensor shape: {shape}")
            if key in where_key:
                raise c.fail(r, f"repeats key {key[:80]!r} (also in {where_key[key]})")
            where_key[key] = fname
            tensors.append(CodedTensor(key, dt, shape, c.hex_(t[3], f"{r}[3]", CHUNK_HEX)))
        layout = c.str_(e.get("layout", "tensors"), f"{q}.layout")
        if layout not in CODED_LAYOUTS:
            raise c.fail(f"{q}.layout", f"must be one of {CODED_LAYOUTS}, got {layout[:40]!r}")
        if layout == "blob" and version < PACKED_VERSION:
            raise c.fail(f"{q}.layout", f"'blob' needs format version {PACKED_VERSION}, the manifest is {version}")
        size = len(coded_header(tensors, layout)) + sum(t.spec.nbytes for t in tensors)
        if c.int_(c.get(e, "size", f"{q}."), f"{q}.size", 0) != size:
            raise c.fail(f"{q}.size", f"is {e['size']}, but the tensors it lists take {size} bytes")
        out_files[fname] = CodedFile(size, c.hex_(c.get(e, "sha256", f"{q}."), f"{q}.sha256", 64), tensors,
                                     layout)
    er = c.obj(c.get(d, "entries", f"{p}."), f"{p}.entries")
    shared = _shared_pairs(c, er, specs, mode)
    want = coded_keys(tasks, list(specs), M, has_mean, codecs["residual_codec"] is not None,
                      codecs["bases_codec"] is not None, shared)
    if set(er) != set(want):
        missing = sorted(set(want) - set(er))
        extra = sorted(set(er) - set(want))
        raise c.fail(f"{p}.entries", "must have one entry per (task, tensor) coded and no other: "
                     + (f"missing {missing[0][:80]!r}" if missing else f"unexpected {extra[0][:80]!r}")
                     + f" ({len(missing)} missing, {len(extra)} unexpected)")
    entries: dict[str, CodedEntry] = {}
    # each file's tensor keys, once (keys are unique across files, checked above): per entry this was a set built
    # from the whole file, quadratic in the entries of a file (0.6 s of a 4-task 50 MB residual build's 4 s)
    keys_in = {fname: {t.key for t in f.tensors} for fname, f in out_files.items()}
    for key, param in want.items():
        q = f"{p}.entries.{key}"
        e = c.obj(er[key], q)
        fname = c.str_(c.get(e, "file", f"{q}."), f"{q}.file")
        if fname not in out_files:
            raise c.fail(f"{q}.file", f"names {fname[:80]!r}, which 'files.coded' does not list")
        enc = c.obj(c.get(e, "encoded", f"{q}."), f"{q}.encoded")
        shape = specs[param].shape
        if tuple(enc.get("shape", ())) != shape or not isinstance(enc.get("shape"), list):
            raise c.fail(f"{q}.encoded.shape", f"must be the tensor's shape {list(shape)}")
        pseudo = (JOINT_BASES,) if key.startswith("shared/") else (JOINT_CORE,) if mode == "joint" else ()
        _check_encoded(c, enc, f"{q}.encoded", f"{key}/", keys_in[fname], 0, pseudo)
        entries[key] = CodedEntry(fname, enc)
    listed = {t.key for f in out_files.values() for t in f.tensors}
    stray = listed - {f"{k}/{n}" for k, e in entries.items() for n in encoded_keys(e.encoded, "")}
    if stray:
        raise c.fail(f"{p}.files", f"lists tensor {sorted(stray)[0][:80]!r} that no entry uses")
    if mode == "joint":
        shapes = {t.key: t.shape for f in out_files.values() for t in f.tensors}
        _check_joint(c, entries, shapes, specs, tasks, dict(clusters or {}), shared)
    return CodedSection(mode, codecs["bases_codec"], codecs["residual_codec"], out_files, entries)


def _shared_pairs(c: _Check, entries: Mapping[str, Any], specs: Mapping[str, TensorSpec],
                  mode: str) -> list[tuple[int, str]]:
    """The (cluster, param) pairs of the ``shared/{cluster}/{param}`` keys of a joint section."""
    out = []
    for key in entries:
        if not key.startswith("shared/"):
            continue
        _, cl, param = key.split("/", 2) if key.count("/") >= 2 else (None, "", "")
        if mode != "joint" or not cl.isdigit() or param not in specs:
            raise c.fail(f"coded.entries.{key[:80]}", "is not a shared entry 'shared/{cluster}/{param}' of a "
                         "tensor the store covers" + ("" if mode == "joint" else " (only mode 'joint' has them)"))
        out.append((int(cl), param))
    return out


def _check_joint(c: _Check, entries: Mapping[str, CodedEntry], shapes: Mapping[str, tuple[int, ...]],
                 specs: Mapping[str, TensorSpec], tasks: list[str], clusters: Mapping[str, int | None],
                 shared: list[tuple[int, str]]) -> None:
    """Mode ``joint``: every shared entry holds ``u`` (rows × k_out) and ``v`` (cols × k_in); every core entry a
    ``core`` of shape (k_out, k_in) — or (k,) with k_out = k_in = k — over the shared entry of its task's cluster;
    every shared entry is used by some core."""
    ks: dict[tuple[int, str], tuple[int, int]] = {}
    for cl, param in shared:
        key = entry_key("shared", param, cl)
        desc = entries[key].encoded
        spec = specs[param]
        rows = spec.shape[0] if spec.shape else 1
        cols = spec.numel // max(1, rows)
        u, v = shapes.get(f"{key}/u"), shapes.get(f"{key}/v")
        if desc["codec"] != JOINT_BASES or sorted(desc.get("tensors", [])) != ["u", "v"] or desc.get("children") \
                or u is None or v is None or len(u) != 2 or len(v) != 2 or u[0] != rows or v[0] != cols:
            raise c.fail(f"coded.entries.{key}", f"must be a {JOINT_BASES!r} entry with u ({rows} × k) and "
                         f"v ({cols} × k)")
        ks[(cl, param)] = (u[1], v[1])
    used = set()
    for t in tasks:
        for param in specs:
            key = entry_key("residual", param, t)
            desc = entries[key].encoded
            if desc["codec"] != JOINT_CORE:
                continue
            cl = clusters.get(t)
            if cl is None or (cl, param) not in ks:
                raise c.fail(f"coded.entries.{key}", f"is a core over the shared bases of cluster {cl}, which has "
                             f"no entry {entry_key('shared', param, cl)!r}")
            ko, ki = ks[(cl, param)]
            core = shapes.get(f"{key}/core")
            if desc.get("tensors") != ["core"] or desc.get("children") or core not in ((ko, ki), *(((ko,),)
                                                                                        if ko == ki else ())):
                raise c.fail(f"coded.entries.{key}", f"must hold one 'core' of shape ({ko}, {ki})"
                             + (f" or ({ko},)" if ko == ki else "") + f", got {core}")
            used.add((cl, param))
    unused = sorted(set(ks) - used)
    if unused:
        raise c.fail("coded.entries", f"has shared entry {entry_key('shared', unused[0][1], unused[0][0])!r} "
                     "that no task's core uses")


def encoded_keys(desc: Mapping[str, Any], prefix: str) -> list[str]:
    """The stored tensor names of an ``Encoded`` description (children's as ``child.name``), each with ``prefix``."""
    keys = [prefix + str(n) for n in desc.get("tensors", [])]
    for cname, child in dict(desc.get("children", {})).items():
        keys += encoded_keys(child, f"{prefix}{cname}.")
    return keys


def _check_encoded(c: _Check, d: Any, path: str, prefix: str, available: set[str], depth: int,
                   pseudo: tuple[str, ...] = ()) -> None:
    """An ``Encoded`` description: a known codec spec (or one of the ``pseudo`` codecs this entry may have), a
    shape, stored tensor names present in its file, meta and children of the same form."""
    d = c.obj(d, path)
    if depth > MAX_CODEC_DEPTH:
        raise c.fail(path, f"nests deeper than {MAX_CODEC_DEPTH} codecs")
    spec = c.str_(c.get(d, "codec", f"{path}."), f"{path}.codec")
    if pseudo and pseudo[0] == JOINT_BASES and spec != JOINT_BASES:
        raise c.fail(f"{path}.codec", f"of a shared entry must be {JOINT_BASES!r}, got {spec[:40]!r}")
    if spec != NONE_CODEC and spec not in pseudo:
        try:
            parse_codec(spec)
        except TvbasisError as e:
            raise c.fail(f"{path}.codec", f"is not a valid codec spec: {e}") from None
    for x in _list(c, c.get(d, "shape", f"{path}."), f"{path}.shape"):
        c.int_(x, f"{path}.shape", 0, 2**40)
    if spec == NONE_CODEC and (d.get("tensors") or d.get("children")):
        raise c.fail(path, f"is an empty entry (codec {NONE_CODEC!r}, all zeros) but lists stored tensors")
    c.obj(d.get("meta", {}), f"{path}.meta")
    for i, n in enumerate(c.strs(d.get("tensors", []), f"{path}.tensors")):
        if not n or "." in n:
            raise c.fail(f"{path}.tensors[{i}]", f"must be a name without '.', got {n[:40]!r}")
        if prefix + n not in available:
            raise c.fail(f"{path}.tensors[{i}]", f"names {prefix + n!r}, which its file does not hold")
    for cname, child in c.obj(d.get("children", {}), f"{path}.children").items():
        if not cname or "." in cname:
            raise c.fail(f"{path}.children", f"has a child name with '.' or empty: {cname[:40]!r}")
        _check_encoded(c, child, f"{path}.children.{cname}", f"{prefix}{cname}.", available, depth + 1)
