"""Streaming, atomic writers for safetensors files and Hugging Face model directories.

Shapes and dtypes of every output tensor are known before any data is computed (they come from the pretrained
model), so the safetensors header is written first and tensor bytes are streamed after it one tensor at a time:
writing never holds more than one tensor, however large the shard. Outputs appear atomically: everything is
written under a temporary sibling path and renamed into place at the end; on error the temporary is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from tvbasis.errors import CheckpointError, ConfigError, OutputExistsError
from tvbasis.io.specs import TORCH_TO_ST, TensorSpec, parse_size

#: files copied from the pretrained model directory into every written model
COPY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
COPY_DIRS = ("1_Pooling", "2_Normalize")


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless force; check the parent is writable. Raises before any work."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists (pass --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{parent}: directory is not writable")


def temp_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def replace_atomically(tmp: Path, out: Path) -> None:
    """Move tmp onto out; an existing out (allowed by --force) is removed only after tmp is complete."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(tmp, out)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def header_for(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        if s.dtype not in TORCH_TO_ST:
            raise ConfigError(f"tensor {s.name!r}: dtype {s.dtype} cannot be written to safetensors")
        header[s.name] = {"dtype": TORCH_TO_ST[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors (names, shapes, dtypes, order) are fixed up front."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.specs = list(specs)
        self._next = 0
        self._fh: BinaryIO = path.open("wb")
        self._fh.write(header_for(self.specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise CheckpointError(f"{self.path}: unexpected extra tensor {name!r}")
        spec = self.specs[self._next]
        if name != spec.name:
            raise CheckpointError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        if tensor.dtype != spec.dtype:
            tensor = tensor.to(spec.dtype)
        self._fh.write(_tensor_bytes(tensor))
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.specs)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        if not self.complete:
            missing = [s.name for s in self.specs[self._next:]][:3]
            raise CheckpointError(f"{self.path}: closed before all tensors were written (next: {missing})")

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def write_safetensors_file(path: Path, specs: Sequence[TensorSpec],
                           tensors: Iterable[tuple[str, torch.Tensor]],
                           metadata: dict[str, str] | None = None) -> None:
    """Stream (name, tensor) pairs, in the order of specs, into a new safetensors file at path."""
    w = SafetensorsStreamWriter(path, specs, metadata)
    try:
        for name, t in tensors:
            w.write(name, t)
        w.close()
    except BaseException:
        w.abort()
        raise


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split into shards of at most max_shard_size bytes (a bigger tensor gets its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards if shards[0] else []


def shard_names(prefix: str, n: int) -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(directory: Path, prefix: str, shards: list[list[TensorSpec]], names: list[str],
                metadata: dict[str, object] | None = None) -> None:
    if len(shards) <= 1:
        return
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total, **(metadata or {})},
             "weight_map": {s.name: fname for shard, fname in zip(shards, names) for s in shard}}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_model_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config/tokenizer/generation files from the pretrained model directory, when present."""
    copied: list[str] = []
    if src is None or not src.is_dir():
        return copied
    for name in COPY_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, dst / name)
            copied.append(name)
    for name in COPY_DIRS:
        d = src / name
        if d.is_dir():
            shutil.copytree(d, dst / name)
            copied.append(name)
    return copied


def model_card(base_model: str, method: str, parameters: dict[str, object], extra: str = "") -> str:
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in parameters.items()) or "| – | – |"
    return (
        "---\n"
        f"base_model: {base_model}\n"
        "library_name: transformers\n"
        "tags:\n- tvbasis\n- merge\n- task-arithmetic\n"
        "---\n\n"
        f"# Model written by tvbasis\n\n"
        f"Base model: `{base_model}`\n\nMethod: `{method}`\n\n"
        "| parameter | value |\n|---|---|\n"
        f"{params}\n\n{extra}"
    )


class ModelWriter:
    """Write a Hugging Face model directory (sharded safetensors + index, copied config, model card) atomically.

    Usage::

        with ModelWriter(out, specs, max_shard_size="5GB", force=False) as w:
            for spec in specs: w.write(spec.name, tensor)
            w.finalize(copy_from=pretrained_dir, card=text)

    Tensors must be written in the order of ``specs``; ``shards``/``shard_paths`` expose the plan so that
    workers can write whole shards independently (``write_shard``).
    """

    def __init__(self, out: str | Path, specs: Sequence[TensorSpec], max_shard_size: int | str = "5GB",
                 force: bool = False, prefix: str = "model") -> None:
        self.out = Path(out)
        check_output(self.out, force)
        self.prefix = prefix
        self.shards = plan_shards(specs, max_shard_size)
        self.names = shard_names(prefix, len(self.shards))
        self.tmp = temp_sibling(self.out)
        self.tmp.mkdir(parents=True)
        self._shard_of = {s.name: i for i, shard in enumerate(self.shards) for s in shard}
        self._writers: dict[int, SafetensorsStreamWriter] = {}
        self._done = False

    @property
    def shard_paths(self) -> list[Path]:
        return [self.tmp / n for n in self.names]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            i = self._shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.out}: tensor {name!r} is not in the output plan") from None
        w = self._writers.get(i)
        if w is None:
            w = self._writers[i] = SafetensorsStreamWriter(self.shard_paths[i], self.shards[i], {"format": "pt"})
        w.write(name, tensor)
        if w.complete:
            w.close()

    def write_shard(self, i: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        write_safetensors_file(self.shard_paths[i], self.shards[i], tensors, {"format": "pt"})

    def finalize(self, copy_from: Path | None = None, card: str | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
        for i, shard in enumerate(self.shards):
            if not self.shard_paths[i].is_file():
                if shard:
                    raise CheckpointError(f"{self.out}: shard {self.names[i]} was never written")
        for w in self._writers.values():
            if not w.complete:
                w.close()  # raises with the missing tensor names
        write_index(self.tmp, self.prefix, self.shards, self.names)
        copy_model_files(copy_from, self.tmp)
        if card is not None:
            (self.tmp / "README.md").write_text(card)
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
        replace_atomically(self.tmp, self.out)
        self._done = True
        return self.out

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if not self._done:
            self.abort()


def write_single_file_atomic(out: Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                             metadata: dict[str, str] | None = None, force: bool = False) -> Path:
    """One safetensors file (e.g. a saved task vector), streamed, then renamed into place."""
    check_output(out, force)
    tmp = temp_sibling(out)
    try:
        write_safetensors_file(tmp, specs, tensors, metadata)
        replace_atomically(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


class PositionalShard:
    """A safetensors file laid out up front (header written, data region allocated) and filled by positional
    writes, in any order and from any number of threads or processes. Lets a row chunk of a stacked (M, *shape)
    tensor be written as M contiguous regions without ever holding the whole tensor."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec]) -> None:
        self.path = path
        self.specs = list(specs)
        header = header_for(self.specs, {"format": "pt"})
        self.data_start = len(header)
        self.offsets: dict[str, int] = {}
        off = 0
        for s in self.specs:
            self.offsets[s.name] = off
            off += s.nbytes
        self.size = self.data_start + off
        self._header = header

    def create(self) -> None:
        with self.path.open("wb") as fh:
            fh.write(self._header)
            fh.truncate(self.size)

    def write_elements(self, name: str, start_element: int, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        """Write ``tensor`` (cast to dtype) at element offset ``start_element`` of tensor ``name``."""
        data = _tensor_bytes(tensor.to(dtype))
        pos = self.data_start + self.offsets[name] + start_element * dtype.itemsize
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view.nbytes:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            os.close(fd)

    @staticmethod
    def fsync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
