"""The masks file: binary masks over the localized tensors, bit-packed, with each task's task-vector values on
its mask's support — a sparse, self-contained form of the localized task vectors.

One safetensors file. Tensors (the index i of a mask and t of a task are positions in the metadata's lists):

* ``mask.{i}.{tensor}``: uint8 (ceil(n/8),), the n bits of mask i over the tensor, packed little-endian within
  each byte (``tvbasis.codecs.bits.pack_bits``);
* ``value.{t}.{tensor}``: (k,) in ``values_dtype``, task t's τ at the k coordinates its mask sets, in flat
  (row-major) order. Absent when the file holds masks only.

``__metadata__`` (strings; JSON where structured): ``tvbasis`` = ``tvbasis.masks``, ``format_version``, ``tasks``,
``masks`` (mask names: the tasks themselves, or one per cluster for shared masks), ``mask_of`` (task -> mask index),
``tensors`` ({name: [shape, dtype]} of the localized tensors, the pretrained dtype), ``values_dtype`` (or ``none``),
``settings`` (every setting of the localizer and the rule) and ``stats`` (support sizes).
Values come first in the file, masks after, so every value tensor is aligned to its item size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from tvbasis._version import __version__
from tvbasis.codecs.bits import unpack_bits
from tvbasis.errors import CheckpointError, ConfigError
from tvbasis.io import Checkpoint, TensorSpec, atomic_output, dtype_name, open_checkpoint
from tvbasis.io.writer import header_for
from tvbasis.untrusted import load_json, quote

MASKS_FORMAT = "tvbasis.masks"
MASKS_VERSION = 1
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: dtypes a localized tensor may have (the pretrained's), and the size cap of one metadata field
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
MAX_META_CHARS = 64 * 2**20
#: row-chunk size of the pretrained checksum a masks file records (``settings.pretrained_checksum``)
MASKS_CHECKSUM_CHUNK = 1 << 22

#: popcount of every byte value
_POP = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def mask_key(i: int, name: str) -> str:
    return f"mask.{i}.{name}"


def value_key(t: int, name: str) -> str:
    return f"value.{t}.{name}"


def popcount(packed: torch.Tensor) -> int:
    """Set bits in a packed uint8 tensor."""
    return int(_POP[packed.reshape(-1).to(torch.long)].sum()) if packed.numel() else 0


def unpack_range(packed: torch.Tensor, a: int, b: int, offset: int = 0) -> torch.Tensor:
    """Bits [a, b) of a mask whose packed bytes from byte ``offset`` on are ``packed``: 1-d bool."""
    lo = a // 8 - offset
    return unpack_bits(packed[lo:], (len(packed) - lo) * 8)[a % 8: a % 8 + (b - a)]


def values_dtype(name: str | None) -> torch.dtype | None:
    """'float32' | 'float16' | 'bfloat16' -> dtype; None / 'none' -> None (masks only)."""
    if name is None or name == "none":
        return None
    try:
        return VALUE_DTYPES[name]
    except KeyError:
        raise ConfigError(f"values dtype {name!r}: expected one of {', '.join(VALUE_DTYPES)} or none") from None


# ---------------------------------------------------------------------------------------------- writing
def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


@dataclass
class _Spill:
    """Tensors appended to an unnamed temporary file, in order, remembered as (spec)."""

    fh: BinaryIO
    specs: list[TensorSpec] = field(default_factory=list)
    nbytes: int = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        t = t.reshape(-1)
        if t.numel():
            self.fh.write(_raw(t))
        self.specs.append(TensorSpec(key, (t.numel(),), t.dtype))
        self.nbytes += t.numel() * t.element_size()


def write_masks(out: str | Path, parts: Iterable[Iterable[tuple[str, torch.Tensor]]],
                metadata: Callable[[], Mapping[str, Any]], force: bool = False,
                inputs: Sequence[str | Path] = ()) -> Path:
    """Write a masks file from ``parts`` (per tensor: its (key, tensor) pairs, masks ``mask.*`` uint8 and values
    ``value.*``), streamed through temporary files next to the output (memory: one tensor's part), then the
    header (``metadata()`` is called once the parts are consumed) and the data, swapped into place atomically."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: a masks file is a .safetensors file; name it so")
    with atomic_output(out, force, inputs, directory=False) as tmp:
        with tempfile.TemporaryFile(dir=out.parent) as vf, tempfile.TemporaryFile(dir=out.parent) as mf:
            values, masks = _Spill(vf), _Spill(mf)
            for part in parts:
                for key, t in part:
                    (masks if key.startswith("mask.") else values).add(key, t)
            meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata().items()}
            meta = {"format": "pt", "tvbasis": MASKS_FORMAT, "format_version": str(MASKS_VERSION), **meta}
            with open(tmp, "wb") as fh:
                fh.write(header_for(values.specs + masks.specs, meta))
                for f in (vf, mf):
                    f.flush()
                    f.seek(0)
                    shutil.copyfileobj(f, fh, 1 << 22)
                fh.flush()
                os.fsync(fh.fileno())
    return out


# ---------------------------------------------------------------------------------------------- reading
class MaskSet:
    """A masks file, opened (cheap: reads the header). Masks and values are read per tensor (or row range)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ckpt: Checkpoint = open_checkpoint(self.path)
        meta = self.ckpt.metadata()
        if meta.get("tvbasis") != MASKS_FORMAT:
            raise CheckpointError(f"{self.path}: not a tvbasis masks file (write one with `tvbasis localize`)")
        if meta.get("format_version") != str(MASKS_VERSION):
            raise CheckpointError(f"{self.path}: masks format version {quote(meta.get('format_version'))}; this "
                                  f"tvbasis reads version {MASKS_VERSION}")
        def field(key: str, kind: type, default: str | None = None) -> Any:
            if key not in meta and default is None:
                raise CheckpointError(f"{self.path}: corrupt masks metadata (no {key!r})")
            v = load_json(meta.get(key, default or ""), f"{self.path}: masks metadata {key!r}", CheckpointError,
                          MAX_META_CHARS)
            if not isinstance(v, kind):
                raise CheckpointError(f"{self.path}: corrupt masks metadata ({key!r} must be a {kind.__name__})")
            return v

        self.tasks: list[str] = field("tasks", list)
        self.masks: list[str] = field("masks", list)
        mask_of = field("mask_of", dict)
        tensors = field("tensors", dict)
        self.settings: dict[str, Any] = field("settings", dict, "{}")
        self.stats: dict[str, Any] = field("stats", dict, "{}")
        if not all(isinstance(x, str) for x in [*self.tasks, *self.masks]) or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in mask_of.values()):
            raise CheckpointError(f"{self.path}: corrupt masks metadata (task and mask names must be strings, "
                                  "mask_of must map tasks to mask indices)")
        self.mask_of: dict[str, int] = dict(mask_of)
        self.values_dtype = meta.get("values_dtype", "none")
        if self.values_dtype != "none" and self.values_dtype not in VALUE_DTYPES:
            raise CheckpointError(f"{self.path}: corrupt masks metadata (values_dtype {quote(self.values_dtype)})")
        self.has_values = self.values_dtype != "none"
        self.specs = {}
        for n, entry in tensors.items():
            ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and \
                all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**40 for x in entry[0]) and \
                len(entry[0]) <= 8 and entry[1] in FLOAT_DTYPES
            if not ok:
                raise CheckpointError(f"{self.path}: corrupt masks metadata (tensors[{quote(n)}] must be [shape, "
                                      f"float dtype], got {quote(entry)})")
            self.specs[n] = TensorSpec(n, tuple(entry[0]), getattr(torch, entry[1]))
        self.rule: str = str(self.settings.get("rule", "stitch"))
        self._check()

    def _check(self) -> None:
        if set(self.mask_of) != set(self.tasks) or any(not 0 <= i < len(self.masks) for i in self.mask_of.values()):
            raise CheckpointError(f"{self.path}: mask_of does not map every task to a mask")
        for name, s in self.specs.items():
            for i in range(len(self.masks)):
                k = mask_key(i, name)
                want = (-(-s.numel // 8),)
                if k not in self.ckpt or self.ckpt.spec(k).shape != want or self.ckpt.spec(k).dtype != torch.uint8:
                    raise CheckpointError(f"{self.path}: mask tensor {k!r} missing or not uint8 of shape {want}")
            if self.has_values:
                for t in range(len(self.tasks)):
                    k = value_key(t, name)
                    if k not in self.ckpt or len(self.ckpt.spec(k).shape) != 1 or \
                            self.ckpt.spec(k).dtype != VALUE_DTYPES[self.values_dtype] or \
                            self.ckpt.spec(k).shape[0] > s.numel:
                        raise CheckpointError(f"{self.path}: value tensor {quote(k)} missing or not a 1-d "
                                              f"{self.values_dtype} tensor of at most {s.numel} values")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (MaskSet, (str(self.path),))

    # -- facts --------------------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Number of tasks the masks file covers."""
        return len(self.tasks)

    @property
    def num_parameters(self) -> int:
        """Elements of the localized tensors (what the sparsity is a fraction of)."""
        return sum(s.numel for s in self.specs.values())

    @property
    def nbytes(self) -> int:
        """Bytes on disk (the whole file: header, masks and values)."""
        return self.path.stat().st_size

    @property
    def mask_bytes(self) -> int:
        """Bytes of the stored masks."""
        return sum(self.ckpt.spec(mask_key(i, n)).nbytes for i in range(len(self.masks)) for n in self.specs)

    @property
    def value_bytes(self) -> int:
        """Bytes of the task-vector values stored on the masks (0 for masks only)."""
        if not self.has_values:
            return 0
        return sum(self.ckpt.spec(value_key(t, n)).nbytes for t in range(self.T) for n in self.specs)

    def task_index(self, task: str) -> int:
        """Position of ``task``; ConfigError naming the tasks if there is none."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ConfigError(f"{self.path}: no task {task!r}; tasks: {', '.join(self.tasks)}") from None

    def support(self, task: str) -> int:
        """Coordinates set in the task's mask."""
        i = self.mask_of[task]
        return sum(popcount(self.ckpt.get(mask_key(i, n))) for n in self.specs)

    def density(self, task: str) -> float:
        """Fraction of the parameters ``task``'s mask keeps."""
        return self.support(task) / max(1, self.num_parameters)

    # -- reads --------------------------------------------------------------------------------------------
    def _elements(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
        s = self.specs[name]
        if rows is None or not s.shape:
            return 0, s.numel, s.shape
        per_row = s.numel // s.shape[0] if s.shape[0] else 0
        return rows[0] * per_row, rows[1] * per_row, (rows[1] - rows[0], *s.shape[1:])

    def mask(self, i: int, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask ``i`` over tensor ``name`` (or rows [a, b) of it): bool, the tensor's (row range's) shape."""
        a, b, shape = self._elements(name, rows)
        lo, hi = a // 8, -(-b // 8)
        return unpack_range(self.ckpt.get_rows(mask_key(i, name), lo, hi), a, b, lo).reshape(shape)

    def task_mask(self, task: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The mask of ``task`` over tensor ``name`` (or rows of it), as stored (shared masks: its group's)."""
        return self.mask(self.mask_of[task], name, rows)

    def stacked_masks(self, tasks: Sequence[str], name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(len(tasks), ...) bool: each task's mask (a mask shared by several tasks is read once)."""
        cache: dict[int, torch.Tensor] = {}
        for t in tasks:
            i = self.mask_of[t]
            if i not in cache:
                cache[i] = self.mask(i, name, rows)
        return torch.stack([cache[self.mask_of[t]] for t in tasks])

    def _set_before(self, i: int, name: str, a: int) -> int:
        """Set bits of mask ``i`` over ``name`` before element ``a`` (where the values of a row range start)."""
        key, full = mask_key(i, name), a // 8
        count = popcount(self.ckpt.get_rows(key, 0, full)) if full else 0
        if a % 8:
            count += int(unpack_bits(self.ckpt.get_rows(key, full, full + 1), 8)[: a % 8].sum())
        return count

    def values(self, task: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Task ``task``'s stored τ over tensor ``name`` (or rows of it) as a dense float32 tensor: its values on
        its mask's support, 0 elsewhere."""
        if not self.has_values:
            raise ConfigError(f"{self.path}: holds masks only (no task-vector values); pass the fine-tunes")
        t, i = self.task_index(task), self.mask_of[task]
        a, b, shape = self._elements(name, rows)
        m = self.mask(i, name, rows).reshape(-1)
        start = self._set_before(i, name, a) if a else 0
        k = int(m.sum())
        out = torch.zeros(b - a, dtype=torch.float32)
        if k:
            out[m] = self.ckpt.get_rows(value_key(t, name), start, start + k).to(torch.float32)
        return out.reshape(shape)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description: tasks, masks and which task uses which, rule, sizes, densities, settings."""
        return {"path": str(self.path), "tasks": self.tasks, "masks": self.masks, "mask_of": self.mask_of,
                "rule": self.rule, "tensors": len(self.specs), "parameters": self.num_parameters,
                "density": {t: self.density(t) for t in self.tasks}, "bytes": self.nbytes,
                "mask_bytes": self.mask_bytes, "value_bytes": self.value_bytes, "values_dtype": self.values_dtype,
                "settings": self.settings}


def open_masks(path: str | Path) -> MaskSet:
    """Open (and validate) a masks file."""
    return MaskSet(path)


def tensors_meta(specs: Mapping[str, TensorSpec]) -> dict[str, list[Any]]:
    return {n: [list(s.shape), dtype_name(s.dtype)] for n, s in specs.items()}


def base_settings() -> dict[str, Any]:
    return {"tvbasis_version": __version__}
