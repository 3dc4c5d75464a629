"""TaskVector: a lazy, per-tensor view of a task vector (fine-tuned − pretrained) and of combinations of them.

Nothing is materialised until a tensor is asked for: ``tv.get(name)`` reads the slices it needs, computes in
float32 and returns one tensor. Arithmetic (``+``, ``-``, scalar ``*``, ``sum``) builds a new lazy vector that
holds a list of (coefficient, source) terms; reductions (``dot``, ``norm``, cosine) accumulate in float64 over
one streaming pass; ``apply_to`` streams θ₀ + λ·τ into a Hugging Face model directory.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tvbasis.engine import Run, as_run
from tvbasis.errors import CheckpointError, ConfigError, NonFiniteError, TensorMismatchError
from tvbasis.io import (
    Checkpoint,
    ModelWriter,
    TensorSpec,
    all_finite,
    check_finite,
    dtype_name,
    model_card,
    open_checkpoint,
    open_finetuned,
    row_chunks,
    write_single_file_atomic,
)
from tvbasis.io.checksum import (
    check_pretrained_checksum,
    check_pretrained_structure,
    chunk_digests,
    combine_digests,
    structure_fingerprint,
)
from tvbasis.untrusted import load_json

VECTOR_FORMAT = "tvbasis.task_vector"
#: row-chunk size of the pretrained checksum a saved task vector records
VECTOR_CHECKSUM_CHUNK = 1 << 22
#: elements per row chunk when ``apply_to`` forms a big tensor in pieces (16 MB of float32)
APPLY_CHUNK_ELEMENTS = 1 << 22
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


# ----------------------------------------------------------------------------------------------- filters
@dataclass(frozen=True)
class KeyFilter:
    """Include/exclude patterns on tensor names: shell globs (``*embeddings*``) or regexes prefixed ``re:``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @staticmethod
    def _match(pattern: str, name: str) -> bool:
        if pattern.startswith("re:"):
            return re.search(pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, pattern)

    def __call__(self, name: str) -> bool:
        if self.include and not any(self._match(p, name) for p in self.include):
            return False
        return not any(self._match(p, name) for p in self.exclude)

    @classmethod
    def of(cls, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> KeyFilter:
        return cls(tuple(include or ()), tuple(exclude or ()))


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


def vector_specs(pretrained: Checkpoint, finetuned: Checkpoint | None, keep: KeyFilter) -> dict[str, TensorSpec]:
    """The tensors a task vector covers (floating, kept by the filter), checked against the fine-tune."""
    pre = {s.name: s for s in pretrained.specs() if s.is_float and keep(s.name)}
    if finetuned is None:
        return pre
    ft = {s.name: s for s in finetuned.specs() if s.is_float and keep(s.name)}
    missing, extra = set(pre) - set(ft), set(ft) - set(pre)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the pretrained model missing from the fine-tune: {_few(missing)}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) not in the pretrained model: {_few(extra)}")
        raise TensorMismatchError(f"{finetuned.path} vs pretrained {pretrained.path}: " + "; ".join(parts)
                                  + " (use --exclude to leave tensors out)")
    for name, s in pre.items():
        if ft[name].shape != s.shape:
            raise TensorMismatchError(f"{finetuned.path}: tensor {name!r} has shape {ft[name].shape}, "
                                      f"pretrained {pretrained.path} has {s.shape}")
    return pre


def changed_specs(specs: dict[str, TensorSpec], finetuned: Sequence[Checkpoint]) -> dict[str, TensorSpec]:
    """Leave out the tensors no fine-tune can change (``Checkpoint.changed_tensors``). When every fine-tune is a
    LoRA adapter, the tensors none of them touches have a zero delta by construction: leaving them out is what
    ``--exclude`` would do (outputs copy them from the pretrained model), and spares reading them T + 1 times per
    pass and storing M zero bases of them. With any full fine-tune among them, nothing is left out."""
    changed = [f.changed_tensors() for f in finetuned]
    if not changed or any(c is None for c in changed):
        return specs
    touched = frozenset().union(*changed)  # type: ignore[arg-type]
    return {k: v for k, v in specs.items() if k in touched}


# ----------------------------------------------------------------------------------------------- sources
Rows = tuple[int, int] | None


def _read(ckpt: Checkpoint, name: str, rows: Rows) -> torch.Tensor:
    return ckpt.get(name) if rows is None else ckpt.get_rows(name, *rows)


class Source(ABC):
    """Produces the float32 slice of one tensor of a task vector."""

    #: True when ``get`` always returns a new tensor that the caller may modify in place
    fresh: bool = False

    @abstractmethod
    def get(self, name: str, rows: Rows = None) -> torch.Tensor: ...

    def row_reads(self, name: str) -> bool:
        """True when ``get(name, rows)`` costs about the rows' share of the tensor (checkpoint reads do), so a
        big tensor may be produced in row chunks; False where every call would redo the whole tensor."""
        return True

    def paths(self) -> list[Path]:
        """The files or directories this source reads (an output must not overwrite them)."""
        return []


def _ckpt_paths(*ckpts: Checkpoint) -> list[Path]:
    out = []
    for c in ckpts:
        out.append(Path(str(c.path)))
        if c.root_dir is not None:
            out.append(Path(str(c.root_dir)))
    return out


def models_read(paths: Iterable[str | Path]) -> int:
    """How many models (checkpoint files or directories) ``paths`` name: a file inside a named directory is the
    same model, and paths are compared resolved. At least 1."""
    resolved = {Path(str(p)).resolve() for p in paths}
    return max(1, sum(1 for p in resolved if p.parent not in resolved))


def finite_coefficient(k: object, what: str) -> float:
    """``k`` as a float; ConfigError for NaN, ±Inf or a non-number (they would turn every output value NaN)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k):
        raise ConfigError(f"{what} must be a finite number, got {k!r}")
    return float(k)


class DiffSource(Source):
    """v = θ_ft − θ₀, read tensor by tensor (float32), with NaN/Inf checks on both inputs."""

    fresh = True

    def __init__(self, pretrained: Checkpoint, finetuned: Checkpoint) -> None:
        self.pretrained = pretrained
        self.finetuned = finetuned

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        return self.get_with(_read(self.pretrained, name, rows), name, rows)

    def get_with(self, pre: torch.Tensor, name: str, rows: Rows = None) -> torch.Tensor:
        """The delta given the pretrained slice already read (so T deltas read the pretrained once)."""
        ft = _read(self.finetuned, name, rows)
        out = ft.to(torch.float32, copy=True)
        out.sub_(pre)
        if not all_finite(out):  # NaN/Inf in either input shows in the difference
            check_finite(ft, str(self.finetuned.path), name)
            check_finite(pre, str(self.pretrained.path), name)
            raise NonFiniteError(f"{self.finetuned.path}: tensor {name!r} minus the pretrained overflows float32")
        return out

    def paths(self) -> list[Path]:
        return _ckpt_paths(self.pretrained, self.finetuned)


class FileSource(Source):
    """A saved task vector (safetensors of deltas)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        t = _read(self.ckpt, name, rows)
        check_finite(t, str(self.ckpt.path), name)
        return t.to(torch.float32)

    def paths(self) -> list[Path]:
        return _ckpt_paths(self.ckpt)


class Producer(ABC):
    """A picklable per-tensor function (merges, store reconstructions) wrapped by ``FnSource``."""

    @abstractmethod
    def __call__(self, name: str, rows: Rows) -> torch.Tensor: ...

    def row_reads(self, name: str) -> bool:
        """See ``Source.row_reads``; a producer that makes the whole tensor and slices it says False."""
        return False


class FnSource(Source):
    def __init__(self, fn: Producer) -> None:
        self.fn = fn
        self.fresh = bool(getattr(fn, "fresh", False))

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        return self.fn(name, rows).to(torch.float32)

    def row_reads(self, name: str) -> bool:
        return self.fn.row_reads(name)

    def paths(self) -> list[Path]:
        return [Path(str(p)) for p in getattr(self.fn, "inputs", ())]


# ----------------------------------------------------------------------------------------------- vector
class TaskVector:
    """A lazy task vector: Σ coef·source over the tensors in ``specs`` (float tensors of the pretrained model).

    ``specs`` maps tensor name -> spec with the *pretrained* dtype (the dtype written by ``apply_to``).
    """

    def __init__(self, specs: Mapping[str, TensorSpec], terms: Sequence[tuple[float, Source]],
                 pretrained: Checkpoint | None = None, name: str = "task_vector") -> None:
        self.specs = dict(specs)
        self.terms = list(terms)
        self.pretrained = pretrained
        self.name = name
        #: set by basis stores: {"fingerprint", "checksum", "checksum_chunk_elements", "path"} of the pretrained
        #: model the vector belongs to; ``apply_to`` checks it (structure up front, content while streaming)
        self.expected_pretrained: dict[str, object] | None = None

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, pretrained: str | Path | Checkpoint, finetuned: str | Path | Checkpoint,
                         include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                         name: str | None = None) -> TaskVector:
        """The task vector fine-tuned − pretrained, lazily: only headers are read here, each tensor's delta is
        computed when asked for. ``finetuned`` may be a PEFT LoRA adapter directory (then only the tensors the adapter
        changes). ``include``/``exclude``: glob or ``re:REGEX`` patterns on tensor names."""
        pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
        ft = open_finetuned(finetuned, pre)
        specs = changed_specs(vector_specs(pre, ft, KeyFilter.of(include, exclude)), [ft])
        if not specs:
            raise ConfigError(f"{ft.path}: no floating-point tensors left to form a task vector (check "
                              "--include/--exclude; an adapter must change at least one kept tensor)")
        return cls(specs, [(1.0, DiffSource(pre, ft))], pre, name or Path(str(ft.path)).name)

    @classmethod
    def load(cls, path: str | Path, include: Iterable[str] | None = None,
             exclude: Iterable[str] | None = None) -> TaskVector:
        """A task vector saved by ``save`` (or any safetensors file of deltas)."""
        ckpt = open_checkpoint(path)
        keep = KeyFilter.of(include, exclude)
        meta = ckpt.metadata()
        dtypes = {}
        if "dtypes" in meta:
            dtypes = load_json(meta["dtypes"], f"{ckpt.path}: metadata 'dtypes'", CheckpointError, 64 * 2**20)
            if not isinstance(dtypes, dict) or not all(v in _FLOAT_DTYPES for v in dtypes.values()):
                raise CheckpointError(f"{ckpt.path}: metadata 'dtypes' must map tensor names to float dtypes")
        specs = {}
        for s in ckpt.specs():
            if s.is_float and keep(s.name):
                dt = getattr(torch, dtypes[s.name]) if s.name in dtypes else s.dtype
                specs[s.name] = TensorSpec(s.name, s.shape, dt)
        if not specs:
            raise CheckpointError(f"{ckpt.path}: holds no floating-point tensors")
        tv = cls(specs, [(1.0, FileSource(ckpt))], None, Path(str(path)).stem)
        fp, checksum, chunk = (meta.get(k) for k in ("pretrained_fingerprint", "pretrained_checksum",
                                                      "checksum_chunk_elements"))
        if fp:  # applied to a model, it is checked against the pretrained model it was made from
            tv.expected_pretrained = {"fingerprint": fp, "path": meta.get("pretrained") or "unknown",
                                      "what": f"the task vector {ckpt.path}"}
            if checksum and chunk and chunk.isdigit() and int(chunk) > 0:
                tv.expected_pretrained |= {"checksum": checksum, "checksum_chunk_elements": int(chunk)}
        return tv

    @classmethod
    def from_producer(cls, specs: Mapping[str, TensorSpec], fn: Producer, pretrained: Checkpoint | None = None,
                      name: str = "task_vector") -> TaskVector:
        """A task vector whose tensors come from ``fn`` (a picklable per-tensor Producer: a merge, a store's
        reconstruction), over the tensors of ``specs``."""
        return cls(specs, [(1.0, FnSource(fn))], pretrained, name)

    # -- access ----------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The names of the tensors this vector has (floating tensors of the pretrained model it changes)."""
        return list(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def num_parameters(self) -> int:
        """Number of parameters (elements) over all tensors of the vector."""
        return sum(s.numel for s in self.specs.values())

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        """The float32 tensor (or rows [a, b) of it) of this vector."""
        if name not in self.specs:
            raise CheckpointError(f"task vector {self.name!r} has no tensor {name!r}")
        out: torch.Tensor | None = None
        for coef, src in self.terms:
            t = src.get(name, rows)
            if out is None:
                if coef != 1.0:
                    out = t.mul_(coef) if src.fresh else t * coef
                else:
                    out = t if src.fresh else t.clone()
            else:
                out.add_(t, alpha=coef)
        if out is None:  # the zero vector
            spec = self.specs[name]
            shape = spec.shape if rows is None or not spec.shape else (rows[1] - rows[0], *spec.shape[1:])
            return torch.zeros(shape, dtype=torch.float32)
        return out

    def row_reads(self, name: str) -> bool:
        """True when rows of tensor ``name`` cost about their share of it in every term (``Source.row_reads``)."""
        return all(src.row_reads(name) for _c, src in self.terms)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, float32 tensor) pairs, computed one at a time in tensor order."""
        for name in self.specs:
            yield name, self.get(name)

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Materialise every tensor (float32). For small models and evaluation; big ones should stream."""
        return dict(self.items())

    # -- algebra ---------------------------------------------------------------------------------------
    def _check_compatible(self, other: TaskVector) -> None:
        if set(self.specs) != set(other.specs):
            a, b = set(self.specs) - set(other.specs), set(other.specs) - set(self.specs)
            raise TensorMismatchError(
                f"task vectors {self.name!r} and {other.name!r} cover different tensors "
                f"(only in the first: {_few(a)}; only in the second: {_few(b)})")
        for n, s in self.specs.items():
            if other.specs[n].shape != s.shape:
                raise TensorMismatchError(f"tensor {n!r}: shape {s.shape} in {self.name!r} vs "
                                          f"{other.specs[n].shape} in {other.name!r}")

    def __add__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_compatible(other)
        out = TaskVector(self.specs, self.terms + other.terms, self.pretrained or other.pretrained,
                         f"({self.name} + {other.name})")
        out.expected_pretrained = self.expected_pretrained or other.expected_pretrained
        return out

    def __radd__(self, other: object) -> TaskVector:
        if other == 0:  # so that builtin sum() works
            return self
        return NotImplemented

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, k: float) -> TaskVector:
        if not isinstance(k, (int, float)):
            return NotImplemented
        finite_coefficient(k, f"coefficient of task vector {self.name!r}")
        out = TaskVector(self.specs, [(c * float(k), s) for c, s in self.terms], self.pretrained,
                         f"{k}*{self.name}")
        out.expected_pretrained = self.expected_pretrained
        return out

    __rmul__ = __mul__

    @staticmethod
    def sum(vectors: Sequence[TaskVector]) -> TaskVector:
        """Σ of the vectors (lazy); ConfigError for an empty sequence."""
        if not vectors:
            raise ConfigError("sum of no task vectors")
        out = vectors[0]
        for v in vectors[1:]:
            out = out + v
        return out

    @staticmethod
    def linear_combination(vectors: Sequence[TaskVector], coefs: Sequence[float]) -> TaskVector:
        """Σ coef_i·v_i — covers addition, negation (coef −1) and analogy (c + b − a)."""
        if len(vectors) != len(coefs):
            raise ConfigError(f"{len(vectors)} vectors but {len(coefs)} coefficients")
        return TaskVector.sum([float(c) * v for v, c in zip(vectors, coefs)])

    # -- reductions (float64) --------------------------------------------------------------------------
    def dot(self, other: TaskVector, run: Run = None) -> float:
        """⟨self, other⟩ over every tensor, accumulated in float64 tensor by tensor (math.fsum of the per-tensor
        products); the vectors must have the same tensors and shapes."""
        self._check_compatible(other)
        eng = as_run(run).quiet().get_engine()
        return math.fsum(eng.map(_DotTask(self, other), self.keys()))

    def norm(self, run: Run = None) -> float:
        """‖self‖₂ over every tensor, accumulated in float64."""
        eng = as_run(run).quiet().get_engine()
        return math.sqrt(math.fsum(eng.map(_DotTask(self, None), self.keys())))

    def cosine(self, other: TaskVector, run: Run = None) -> float:
        """Cosine similarity ⟨a, b⟩ / (‖a‖‖b‖) in float64; 0.0 when either vector is zero."""
        d = self.dot(other, run)
        n = self.norm(run) * other.norm(run)
        return d / n if n > 0 else 0.0

    # -- outputs ---------------------------------------------------------------------------------------
    def input_paths(self) -> list[Path]:
        """Every file or directory this vector reads (checkpoints, saved vectors, stores)."""
        out: list[Path] = []
        for _c, src in self.terms:
            out.extend(src.paths())
        if self.pretrained is not None:
            out.extend(_ckpt_paths(self.pretrained))
        return out

    def save(self, path: str | Path, dtype: torch.dtype | None = None, force: bool = False,
             run: Run = None) -> Path:
        """Save as one safetensors file of deltas (float32 unless ``dtype``); metadata records the format. The
        output may not be, contain or lie inside an input of the vector."""
        out_dtype = dtype or torch.float32
        specs = [s.with_dtype(out_dtype) for s in self.specs.values()]
        meta = {"format": "pt", "tvbasis": VECTOR_FORMAT, "name": self.name,
                "pretrained": str(self.pretrained.path) if self.pretrained else "",
                "dtypes": json.dumps({n: dtype_name(s.dtype) for n, s in self.specs.items()})}
        if self.pretrained is not None:  # the model it belongs to: names, shapes, dtypes and the weights it changes
            pre = self.pretrained
            meta["pretrained_fingerprint"] = structure_fingerprint(pre)
            meta["pretrained_checksum"] = combine_digests(
                d for n, sp in self.specs.items() for d in chunk_digests(sp, pre.get(n), VECTOR_CHECKSUM_CHUNK))
            meta["checksum_chunk_elements"] = str(VECTOR_CHECKSUM_CHUNK)
        eng = as_run(run).get_engine()
        names = self.keys()
        stream = zip(names, eng.map(_GetTask(self), names, desc="task vector",
                                    sizes=[self.specs[n].numel * 4 for n in names]))
        return write_single_file_atomic(Path(path), specs, stream, meta, force=force, inputs=self.input_paths())

    def apply_to(self, pretrained: str | Path | Checkpoint, scaling_coef: float = 1.0, out: str | Path | None = None,
                 dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB", force: bool = False,
                 run: Run = None, method: str = "task_arithmetic",
                 parameters: dict[str, object] | None = None, inputs: Sequence[str | Path] = ()) -> Path:
        """Write θ₀ + scaling_coef·τ as a Hugging Face model directory at ``out``.

        Floating tensors of the vector are computed in float32 and written in the pretrained dtype (or
        ``dtype``); every other tensor (integer buffers, excluded tensors) is copied from the pretrained model.
        """
        if out is None:
            raise ConfigError("apply_to needs an output directory")
        finite_coefficient(scaling_coef, "scaling_coef")
        pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
        expected = self.expected_pretrained
        if expected is not None:
            check_pretrained_structure(expected, pre, Path(str(expected.get("path", "store"))))
        for n, s in self.specs.items():
            if n not in pre:
                raise TensorMismatchError(f"{pre.path}: has no tensor {n!r} that the task vector changes")
            if pre.spec(n).shape != s.shape:
                raise TensorMismatchError(f"{pre.path}: tensor {n!r} has shape {pre.spec(n).shape}, "
                                          f"the task vector has {s.shape}")
        out_specs = [s.with_dtype(dtype) if (dtype is not None and s.is_float) else s for s in pre.specs()]
        base = str(pre.root_dir or pre.path)
        params = {"scaling_coef": scaling_coef, **(parameters or {})}
        eng = as_run(run).get_engine()
        names = [s.name for s in out_specs]
        chunk = int(expected["checksum_chunk_elements"]) if expected and expected.get("checksum") else None  # type: ignore[call-overload]
        task = _ApplyTask(self, pre, float(scaling_coef), chunk, {s.name: s.dtype for s in out_specs})
        digests: list[tuple[str, bytes]] = []
        all_inputs = [*_ckpt_paths(pre), *self.input_paths(), *(Path(str(p)) for p in inputs)]
        reads = models_read(all_inputs)  # the bar counts the bytes of every model read (T fine-tunes for a merge)
        with ModelWriter(out, out_specs, max_shard_size=max_shard_size, force=force, inputs=all_inputs) as w:
            for name, (t, d) in zip(names, eng.map(task, names, desc="apply",
                                                    sizes=[pre.spec(n).nbytes * reads for n in names])):
                w.write(name, t)
                digests.extend(d)
            if chunk is not None and expected is not None:
                check_pretrained_checksum(digests, expected, pre.path, "; nothing written")
            return w.finalize(copy_from=pre.root_dir, card=model_card(base, method, params))


class _GetTask:
    def __init__(self, tv: TaskVector) -> None:
        self.tv = tv

    def __call__(self, name: str) -> torch.Tensor:
        return self.tv.get(name)


class _DotTask:
    def __init__(self, a: TaskVector, b: TaskVector | None) -> None:
        self.a, self.b = a, b

    def __call__(self, name: str) -> float:
        x = self.a.get(name).reshape(-1).to(torch.float64)
        y = x if self.b is None else self.b.get(name).reshape(-1).to(torch.float64)
        return float(torch.dot(x, y))


class _ApplyTask:
    """θ₀ + coef·τ for one tensor. A big tensor whose vector reads rows cheaply (``TaskVector.row_reads``) is
    formed in row chunks straight into the output dtype, so a worker holds the pretrained tensor, the output
    and one chunk in float32, not the whole tensor three times in float32 (the sum, the vector, the cast)."""

    def __init__(self, tv: TaskVector, pre: Checkpoint, coef: float, checksum_chunk: int | None = None,
                 out_dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        self.tv, self.pre, self.coef, self.checksum_chunk = tv, pre, coef, checksum_chunk
        self.out_dtypes = dict(out_dtypes or {})

    def __call__(self, name: str) -> tuple[torch.Tensor, list[tuple[str, bytes]]]:
        spec = self.tv.specs.get(name)
        if (spec is not None and spec.shape and spec.numel > APPLY_CHUNK_ELEMENTS and self.checksum_chunk is None
                and self.tv.row_reads(name)):
            out = torch.empty(spec.shape, dtype=self.out_dtypes.get(name, torch.float32))
            for a, b in row_chunks(spec, APPLY_CHUNK_ELEMENTS):  # the pretrained rows too: no whole copy of it
                base = self.pre.get_rows(name, a, b)
                check_finite(base, str(self.pre.path), name)
                part = base.to(torch.float32, copy=True)
                part.add_(self.tv.get(name, (a, b)), alpha=self.coef)
                out[a:b] = part  # the same rounding as casting the whole float32 sum
            return out, []
        base = self.pre.get(name)
        if spec is None:
            return base, []
        digests: list[tuple[str, bytes]] = []
        if self.checksum_chunk is not None:
            digests = chunk_digests(spec, base, self.checksum_chunk)
        check_finite(base, str(self.pre.path), name)
        out = base.to(torch.float32, copy=True)
        out.add_(self.tv.get(name), alpha=self.coef)
        return out, digests

