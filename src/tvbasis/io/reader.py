"""Lazy, per-tensor checkpoint readers.

``open_checkpoint(path)`` accepts a ``.safetensors`` file, a Hugging Face model directory (single or sharded
safetensors with ``model.safetensors.index.json``), or ``pytorch_model.bin`` / ``.pt`` / ``.pth`` state dicts
(single, or sharded with ``pytorch_model.bin.index.json``). Safetensors are read one tensor (or a row range of
one tensor) at a time with positional reads; torch pickles are loaded with ``weights_only=True`` and
memory-mapped when their format allows it. A walk over K checkpoints therefore holds about K slices of one
tensor, never K models.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch

from tvbasis.errors import CheckpointError
from tvbasis.io.fdpool import FdPool
from tvbasis.io.hub import resolve_model_path
from tvbasis.io.paths import confined_file
from tvbasis.io.specs import ST_TO_TORCH, TensorSpec
from tvbasis.untrusted import load_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class Checkpoint(ABC):
    """A read-only, lazily loaded set of named tensors."""

    def __init__(self, path: Path, root_dir: Path | None) -> None:
        self.path = path
        #: directory holding config/tokenizer files to copy into outputs (None for a bare file)
        self.root_dir = root_dir
        self._specs: dict[str, TensorSpec] = {}

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> TensorSpec:
        """Name, shape and dtype of tensor ``name`` (from the header, nothing read); CheckpointError if absent."""
        try:
            return self._specs[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def specs(self) -> list[TensorSpec]:
        """Every tensor's spec, in the checkpoint's order."""
        return list(self._specs.values())

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(s.numel for s in self._specs.values())

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors in their stored dtypes."""
        return sum(s.nbytes for s in self._specs.values())

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        self.spec(name)
        return self._get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (a 0-d tensor is returned whole)."""
        spec = self.spec(name)
        if not spec.shape:
            return self._get(name)
        return self._get_rows(name, start, stop)

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (safetensors ``__metadata__``); empty where the layout has none."""
        return {}

    def changed_tensors(self) -> frozenset[str] | None:
        """For a fine-tune defined over a base model (a LoRA adapter): the names of the tensors it can change,
        every other one being the base's exactly. None when unknown (a full checkpoint: any tensor may differ)."""
        return None

    @abstractmethod
    def _get(self, name: str) -> torch.Tensor: ...

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._get(name)[start:stop]

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release open files (memory maps); a no-op for layouts that hold none."""
        pass

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # pickles as its path: a worker process (Ray) reopens the checkpoint from shared storage
        return (open_checkpoint, (str(self.path),))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


#: the official safetensors library refuses headers above this size (safetensors/src/tensor.rs MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000


def _uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_safetensors_header(f: Path) -> tuple[list[tuple[TensorSpec, int]], dict[str, str], int]:
    """Read and validate the header of the safetensors file ``f``, by the rules of the official library
    (``Metadata::validate`` and ``read_metadata`` in safetensors/src/tensor.rs) plus a refusal of duplicate keys:

    - the header length is at most 100 MB and fits in the file; the header is UTF-8 JSON, an object;
    - ``__metadata__``, when present, maps strings to strings;
    - every tensor has a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` [start, end] of
      two non-negative integers with end >= start and end - start = numel * itemsize;
    - sorted by offsets (the header's own order is free), the tensors tile the data region exactly: the first starts
      at 0, each starts where the previous ends (no gap, no overlap), and the last ends at the end of the file.

    Returns ([(spec, start offset within the data region)] in file order, metadata, data region start). Any
    violation is one CheckpointError naming the file (and the tensor, when one is at fault)."""
    if not f.is_file():
        raise CheckpointError(f"{f}: shard file does not exist")
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{f}: not a valid safetensors file (header length {n} bytes exceeds the format's "
                                  f"limit of {MAX_HEADER_BYTES}; corrupt or not safetensors)")
        if n > size - 8:
            raise CheckpointError(f"{f}: not a valid safetensors file (header length {n} exceeds the file size; "
                                  "truncated or not safetensors)")
        raw = fh.read(n)
    header = load_json(raw, f"{f}: not a valid safetensors file (corrupt header)", CheckpointError,
                       MAX_HEADER_BYTES, what="header JSON")  # caps on size, depth, numbers; no repeated keys
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: not a valid safetensors file (corrupt header: header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{f}: not a valid safetensors file (__metadata__ must map strings to strings)")
    entries: list[tuple[int, int, TensorSpec]] = []
    for name, info in header.items():
        where = f"{f}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        code = info.get("dtype")
        if not isinstance(code, str) or code not in ST_TO_TORCH:
            raise CheckpointError(f"{where} has unsupported dtype {code!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        offsets = info.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(x) for x in offsets):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
        a, b = offsets
        if b < a:
            raise CheckpointError(f"{where}: data_offsets [{a}, {b}] end before they start")
        spec = TensorSpec(name, tuple(shape), ST_TO_TORCH[code])
        if b - a != spec.nbytes:
            raise CheckpointError(f"{where} spans {b - a} bytes, its shape and dtype need {spec.nbytes}")
        entries.append((a, b, spec))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos, prev = 0, None
    for a, b, spec in entries:
        if a != pos:
            if a < pos:
                problem = f"overlap tensor {prev!r} (which ends at byte {pos})"
            elif prev is None:
                problem = "leave a gap: the first tensor must start at byte 0"
            else:
                problem = f"leave a gap after tensor {prev!r} (which ends at byte {pos})"
            raise CheckpointError(f"{f}: tensor {spec.name!r}: data_offsets [{a}, {b}] {problem}; the offsets must "
                                  "tile the data region contiguously")
        pos, prev = b, spec.name
    data_start = 8 + n
    if data_start + pos > size:
        where = f" (tensor {prev!r} ends past the end of the file)" if prev is not None else ""
        raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, header promises "
                              f"{data_start + pos}){where}")
    if data_start + pos < size:
        raise CheckpointError(f"{f}: not a valid safetensors file ({size - data_start - pos} byte(s) after the last "
                              "tensor's data; the offsets must cover the data region exactly)")
    return [(spec, a) for a, _b, spec in entries], meta, data_start


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (shards), read with positional reads (``pread``) of exactly the bytes asked
    for: a tensor or a row range of it goes straight into a fresh buffer. Unlike a memory map, nothing of the
    file stays resident after a read, so a walk over K checkpoints really holds K slices of one tensor."""

    def __init__(self, path: Path, files: list[Path], root_dir: Path | None,
                 weight_map: dict[str, str] | None = None) -> None:
        super().__init__(path, root_dir)
        self._where: dict[str, Path] = {}
        self._offset: dict[str, int] = {}  # absolute byte offset of each tensor's data
        self._meta: dict[str, str] = {}
        self._fds: FdPool[Path] = FdPool()
        for f in files:
            entries, meta, data_start = parse_safetensors_header(f)
            self._meta.update(meta)
            for spec, start in entries:
                if spec.name in self._specs:
                    raise CheckpointError(f"{f}: tensor {spec.name!r} is also in shard {self._where[spec.name]}")
                self._specs[spec.name] = spec
                self._where[spec.name] = f
                self._offset[spec.name] = data_start + start
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._specs))
            if missing:
                raise CheckpointError(
                    f"{path}: index lists {len(missing)} tensor(s) absent from the shards, e.g. {missing[:3]}")

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def _pread(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        f = self._where[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        got = 0
        fd = self._fds.open(f, f)
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise CheckpointError(f"{f}: unexpected end of file reading tensor {name!r} (file truncated?)")
            got += n
        return buf

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        spec = self._specs[name]
        if rows is None or not spec.shape:
            a, b, shape = 0, spec.nbytes, spec.shape
        else:
            lo, hi = max(0, rows[0]), min(spec.shape[0], rows[1])
            row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
            a, b, shape = lo * row_bytes, max(lo, hi) * row_bytes, (max(0, hi - lo), *spec.shape[1:])
        raw = self._pread(name, self._offset[name] + a, b - a)
        return _from_bytes(raw, spec.dtype, shape)

    def _get(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, (start, stop))

    def close(self) -> None:
        self._fds.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _from_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return raw.view(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def safe_torch_load(f: Path, what: str = "torch checkpoint") -> Any:
    """The one ``torch.load`` of untrusted files: ``weights_only=True`` (tensors, containers, numbers, strings,
    torch.Size only), memory-mapped when the file has the zip format. A pickle holding anything else, or a file
    that does not read as ``what``, is a CheckpointError naming ``f``."""
    try:
        try:
            return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            return torch.load(str(f), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{f}: refused to load: the pickle holds objects other than tensors and weights_only=True "
            f"does not allow them ({first})") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{f}: not a readable {what} ({type(e).__name__}: {e})") from None


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise CheckpointError(f"{f}: file does not exist")
    obj = safe_torch_load(f)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{f}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{f}: holds no tensors")
    return tensors


class TorchCheckpoint(Checkpoint):
    """``pytorch_model.bin`` / ``.pt`` / ``.pth`` state dicts, single or sharded; shards load on first use."""

    def __init__(self, path: Path, files: list[Path], root_dir: Path | None,
                 weight_map: dict[str, str] | None = None) -> None:
        super().__init__(path, root_dir)
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._where: dict[str, Path] = {}
        self._lock = threading.Lock()
        if weight_map is None:
            state = self._load(files[0])
            for name, t in state.items():
                self._specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
                self._where[name] = files[0]
        else:
            # specs need the shard contents; load each shard (mmap) once to read shapes
            for f in files:
                for name, t in self._load(f).items():
                    self._specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
                    self._where[name] = f
            missing = sorted(set(weight_map) - set(self._specs))
            if missing:
                raise CheckpointError(
                    f"{path}: index lists {len(missing)} tensor(s) absent from the shards, e.g. {missing[:3]}")

    def _load(self, f: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if f not in self._loaded:
                self._loaded[f] = _torch_load(f)
            return self._loaded[f]

    def _get(self, name: str) -> torch.Tensor:
        return self._load(self._where[name])[name]

    def close(self) -> None:
        self._loaded.clear()


def _read_index(index: Path) -> dict[str, str]:
    if index.stat().st_size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{index}: not a valid shard index (over {MAX_HEADER_BYTES} bytes)")
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        for k, v in weight_map.items():
            if not isinstance(v, str):
                raise TypeError(f"weight_map entry {k!r} -> {v!r} is not a file name")
        return dict(weight_map)
    except Exception as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None


def _from_index(path: Path, index: Path, kind: str) -> Checkpoint:
    weight_map = _read_index(index)
    first_tensor = {}
    for tensor, fname in weight_map.items():
        first_tensor.setdefault(fname, tensor)
    # every shard must be a plain file name in the index's directory (or a symlink resolving inside it)
    files = [confined_file(index.parent, fname, f"{index}: weight_map entry {tensor!r} -> shard")
             for fname, tensor in first_tensor.items()]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: shard {f.name} listed in the index does not exist")
    if kind == "safetensors":
        return SafetensorsCheckpoint(path, files, index.parent, weight_map)
    return TorchCheckpoint(path, files, index.parent, weight_map)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open any supported checkpoint layout lazily. Raises CheckpointError with the path on failure. A string
    ``ORG/NAME[@REV]`` that is no local path is looked up in the local Hugging Face cache (``io.hub``)."""
    p = resolve_model_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.name.endswith(".index.json"):
            kind = "safetensors" if ".safetensors" in p.name else "torch"
            return _from_index(p, p, kind)
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(p, [p], None)
        if p.suffix in TORCH_SUFFIXES:
            return TorchCheckpoint(p, [p], None)
        raise CheckpointError(
            f"{p}: unsupported checkpoint file; expected .safetensors, .bin, .pt, .pth or an .index.json")
    if (p / "tvbasis.json").is_file():
        raise CheckpointError(f"{p}: is a tvbasis basis store, not a model checkpoint (use the store commands)")
    if (p / SAFETENSORS_INDEX).is_file():
        return _from_index(p, p / SAFETENSORS_INDEX, "safetensors")
    if (p / SAFETENSORS_SINGLE).is_file():
        return SafetensorsCheckpoint(p, [p / SAFETENSORS_SINGLE], p)
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _from_index(p, indexes[0], "safetensors")
    singles = sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsCheckpoint(p, singles, p)
    if (p / TORCH_INDEX).is_file():
        return _from_index(p, p / TORCH_INDEX, "torch")
    if (p / TORCH_SINGLE).is_file():
        return TorchCheckpoint(p, [p / TORCH_SINGLE], p)
    torch_files = sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return TorchCheckpoint(p, torch_files, p)
    found = ", ".join(sorted(f.name for f in p.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{p}: no model weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, one *.safetensors, "
        f"{TORCH_INDEX}, {TORCH_SINGLE}, one .pt/.pth); the directory holds: {found}")


def row_chunks(spec: TensorSpec, max_elements: int) -> Iterator[tuple[int, int]]:
    """(start, end) row ranges of a tensor, each of at most ``max_elements`` elements (at least one row); one
    range for a scalar, a vector or a tensor that fits whole."""
    if not spec.shape or spec.numel <= max_elements:
        yield (0, spec.shape[0] if spec.shape else 1)
        return
    row = max(1, spec.numel // spec.shape[0])
    step = max(1, max_elements // row)
    for start in range(0, spec.shape[0], step):
        yield (start, min(spec.shape[0], start + step))
