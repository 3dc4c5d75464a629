"""Streaming, atomic writers for safetensors files and Hugging Face model directories.

Shapes and dtypes of every output tensor are known before any data is computed (they come from the pretrained
model), so the safetensors header is written first and tensor bytes are streamed after it one tensor at a time:
writing never holds more than one tensor, however large the shard. Outputs appear atomically (``io.atomic``):
everything is written under a temporary sibling and swapped into place at the end; on error, or when a tensor
turns out NaN/Inf once cast to its output dtype (``NonFiniteError``), the temporary is removed and the previous
output, if any, is left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import torch

from tvbasis.errors import CheckpointError, ConfigError
from tvbasis.io.atomic import (  # check_output, replace_atomically: re-exported, other modules import them from here
    AtomicOutput,
    atomic_output,
    check_output,
    replace_atomically,
)
from tvbasis.io.finite import check_finite
from tvbasis.io.hfconfig import set_config_dtype, written_dtype
from tvbasis.io.paths import allowed_roots, confined_file, within
from tvbasis.io.specs import TORCH_TO_ST, TensorSpec, parse_size

__all__ = [
    "COPY_DIRS", "COPY_FILES", "MAX_COPY_DEPTH", "ModelWriter", "PositionalShard", "SafetensorsStreamWriter",
    "card_tags", "check_output", "copy_model_files", "header_for", "model_card", "plan_shards", "replace_atomically",
    "shard_names", "write_index", "write_safetensors_file", "write_single_file_atomic",
]

log = logging.getLogger(__name__)

#: files copied from the pretrained model directory into every written model
COPY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
COPY_DIRS = ("1_Pooling", "2_Normalize")
#: folder levels copied below a COPY_DIRS folder (sentence-transformers modules are flat; deeper trees are skipped)
MAX_COPY_DEPTH = 4


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

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None,
                 label: str | Path | None = None) -> None:
        self.path = path
        #: the name errors give (the final output, not the temporary being written)
        self.label = str(label if label is not None else path)
        self.specs = list(specs)
        self._next = 0
        self._fh: BinaryIO = path.open("wb")
        self._fh.write(header_for(self.specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor, cast to its planned dtype; NonFiniteError if it holds NaN/Inf once cast (e.g. a
        float32 value beyond 65504 written as float16)."""
        if self._next >= len(self.specs):
            raise CheckpointError(f"{self.label}: unexpected extra tensor {name!r}")
        spec = self.specs[self._next]
        if name != spec.name:
            raise CheckpointError(f"{self.label}: expected tensor {spec.name!r} next, got {name!r}")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{self.label}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"planned {spec.shape}")
        if tensor.dtype != spec.dtype:
            tensor = tensor.to(spec.dtype)
        check_finite(tensor, self.label, name)
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
            raise CheckpointError(f"{self.label}: closed before all tensors were written (next: {missing})")

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def write_safetensors_file(path: Path, specs: Sequence[TensorSpec],
                           tensors: Iterable[tuple[str, torch.Tensor]],
                           metadata: dict[str, str] | None = None, label: str | Path | None = None) -> None:
    """Stream (name, tensor) pairs, in the order of specs, into a new safetensors file at path (not atomic: see
    write_single_file_atomic). Every tensor is checked finite once cast to its planned dtype."""
    w = SafetensorsStreamWriter(path, specs, metadata, label)
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


def _regular_source(path: Path, roots: list[Path]) -> Path | None:
    """The regular file to copy for ``path``: itself, or for a symlink its target when that resolves (no loop) to a
    regular file inside ``roots``; None for anything else (a symlink out of the tree, dangling or looping, a FIFO,
    a device, a directory)."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISLNK(mode):
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if within(target, roots) and stat.S_ISREG(target.lstat().st_mode):
            return target
    return None


def _copy_tree(src: Path, dst: Path, roots: list[Path], depth: int, skipped: list[str]) -> None:
    dst.mkdir()
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if depth < MAX_COPY_DEPTH:
                _copy_tree(path, dst / entry.name, roots, depth + 1, skipped)
            else:
                skipped.append(f"{path} (deeper than {MAX_COPY_DEPTH} levels)")
            continue
        source = _regular_source(path, roots)
        if source is None:
            skipped.append(f"{path} (a symlinked folder, a symlink out of the model directory, or not a file)")
            continue
        shutil.copy2(source, dst / entry.name)


def copy_model_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config/tokenizer/generation files (COPY_FILES) and sentence-transformers folders (COPY_DIRS) from the
    pretrained model directory, when present. Returns the names copied.

    The source is untrusted, so symlinks are never followed out of it: a symlinked file is copied (as a regular
    file holding its content) only when it resolves to a regular file inside ``src`` (or, for a Hugging Face
    cache snapshot, inside that repository's ``blobs/``); a symlinked folder is skipped whatever its target, so a
    symlink loop is never entered; folders deeper than MAX_COPY_DEPTH and special files are skipped. Skipped
    entries are logged."""
    copied: list[str] = []
    if src is None or not src.is_dir():
        return copied
    roots = allowed_roots(src)
    skipped: list[str] = []
    for name in COPY_FILES:
        f = src / name
        if not os.path.lexists(f):
            continue
        source = _regular_source(f, roots)
        if source is None:
            skipped.append(f"{f} (a symlink out of the model directory, or not a regular file)")
            continue
        shutil.copy2(source, dst / name)
        copied.append(name)
    for name in COPY_DIRS:
        d = src / name
        if d.is_symlink():
            skipped.append(f"{d} (a symlinked folder)")
        elif d.is_dir():
            _copy_tree(d, dst / name, roots, 1, skipped)
            copied.append(name)
    for what in skipped:
        log.warning("not copying %s", what)
    return copied


def card_tags(method: str) -> list[str]:
    """The model card's tags: ``tvbasis``, ``merge`` and the method's own tag (``ties``, ``task-arithmetic``,
    ``dare-ties``, ...: mergekit's method name with dashes) when ``method`` is a plain method name."""
    tags = ["tvbasis", "merge"]
    if re.fullmatch(r"[A-Za-z0-9_]+", method):
        tags.append(method.lower().replace("_", "-"))
    return tags


def model_card(base_model: str, method: str, parameters: dict[str, object], extra: str = "") -> str:
    """The README.md of a written model: Hugging Face front matter (base model, tags from ``card_tags``), the
    method and a table of its parameters."""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in parameters.items()) or "| – | – |"
    tags = "".join(f"- {t}\n" for t in card_tags(method))
    return (
        "---\n"
        f"base_model: {base_model}\n"
        "library_name: transformers\n"
        f"tags:\n{tags}"
        "---\n\n"
        f"# Model written by tvbasis\n\n"
        f"Base model: `{base_model}`\n\nMethod: `{method}`\n\n"
        "| parameter | value |\n|---|---|\n"
        f"{params}\n\n{extra}"
    )


class ModelWriter:
    """Write a Hugging Face model directory (sharded safetensors + index, copied config, model card) atomically.

    Usage::

        with ModelWriter(out, specs, max_shard_size="5GB", force=False, inputs=[pretrained_dir]) as w:
            for spec in specs: w.write(spec.name, tensor)
            w.finalize(copy_from=pretrained_dir, card=text)

    Tensors must be written in the order of ``specs``. Checks before any work: an existing ``out`` without force
    (OutputExistsError), ``out`` overlapping one of ``inputs`` (ConfigError). Every tensor is checked finite once
    cast to its planned dtype (NonFiniteError). Nothing appears at ``out`` until ``finalize`` succeeds; an error
    anywhere, or leaving the ``with`` block without finalize, removes the temporary directory.
    """

    def __init__(self, out: str | Path, specs: Sequence[TensorSpec], max_shard_size: int | str = "5GB",
                 force: bool = False, prefix: str = "model", inputs: Sequence[str | Path] = ()) -> None:
        self.out = Path(out)
        self.prefix = prefix
        self.shards = plan_shards(specs, max_shard_size)
        self.names = shard_names(prefix, len(self.shards))
        self._atomic = AtomicOutput(self.out, force, inputs)
        self.tmp = self._atomic.tmp
        self._shard_of = {s.name: i for i, shard in enumerate(self.shards) for s in shard}
        self._writers: dict[int, SafetensorsStreamWriter] = {}
        self._done = False

    @property
    def shard_paths(self) -> list[Path]:
        """Paths of the shards inside the temporary directory, in order."""
        return [self.tmp / n for n in self.names]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of its shard (in the order of the specs), cast to its planned dtype and checked
        finite; a shard is closed (and fsynced) as soon as its last tensor is written."""
        try:
            i = self._shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.out}: tensor {name!r} is not in the output plan") from None
        w = self._writers.get(i)
        if w is None:
            w = self._writers[i] = SafetensorsStreamWriter(self.shard_paths[i], self.shards[i], {"format": "pt"},
                                                           label=self.out / self.names[i])
        w.write(name, tensor)
        if w.complete:
            w.close()

    def finalize(self, copy_from: Path | None = None, card: str | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
        """Check every shard is complete, add the index, copied model files (``config.json`` then states the dtype
        the weights were written in: ``io.hfconfig``), card and extra files, and swap the directory into place.
        On any error the temporary is removed (and ``out`` left as it was)."""
        try:
            for i, shard in enumerate(self.shards):
                if shard and not self.shard_paths[i].is_file():
                    raise CheckpointError(f"{self.out}: shard {self.names[i]} was never written")
            for w in self._writers.values():
                if not w.complete:
                    w.close()  # raises with the missing tensor names
            write_index(self.tmp, self.prefix, self.shards, self.names)
            copied = copy_model_files(copy_from, self.tmp)
            dtype = written_dtype(s for shard in self.shards for s in shard)
            if "config.json" in copied and dtype is not None:
                set_config_dtype(self.tmp / "config.json", dtype)
            if card is not None:
                (self.tmp / "README.md").write_text(card)
            for name, text in (extra_files or {}).items():
                confined_file(self.tmp, name, f"{self.out}: extra file", ConfigError).write_text(text)
            self._atomic.commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out

    def abort(self) -> None:
        """Drop everything written so far: close the shard writers and remove the temporary directory."""
        for w in self._writers.values():
            w.abort()
        self._atomic.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if not self._done:
            self.abort()


def write_single_file_atomic(out: Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                             metadata: dict[str, str] | None = None, force: bool = False,
                             inputs: Sequence[str | Path] = ()) -> Path:
    """One safetensors file (e.g. a saved task vector), streamed under a temporary name and swapped into place
    (``atomic_output``: same checks as ModelWriter, every tensor checked finite)."""
    out = Path(out)
    with atomic_output(out, force, inputs, directory=False) as tmp:
        write_safetensors_file(tmp, specs, tensors, metadata, label=out)
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
