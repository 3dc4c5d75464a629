"""Where a store keeps what: the names of its data files per generation, the bytes of their headers, and the
chunks its per-chunk digests cover.

Data files are safetensors files written by ``PositionalShard``: the header is ``header_for`` of the tensors in
file order with metadata ``{"format": "pt"}``, the data follow in the same order. A bases file holds per
parameter one tensor of shape (M, *shape) — basis after basis —, a mean file one of the parameter's own shape.
A digest chunk is rows [a, b) (``row_chunks`` of the parameter's shape with ``chunk_elements``) of one basis:
chunk (m, k) of a bases tensor covers rows ``chunks[k]`` of basis m, chunks are ordered m-major. Row-chunk reads
with the same chunking (add-task's) therefore read exactly whole chunks.

A coded file (``coded…``) holds codec-encoded tensors of many entries, each tensor one digest chunk (its layout
is recorded tensor by tensor in the manifest's ``coded`` section: ``store.coded``).

File names: generation 1 (a fresh build) uses ``bases.safetensors`` / ``bases-00001-of-0000N.safetensors`` (and
``mean…``, ``coded…``); a later generation g writes new files as ``bases.g{g}.safetensors`` / ``bases.g{g}-00001-of-…``.
Names of this pattern (and ``*.safetensors.index.json`` of version-1 stores) are tvbasis's; anything else in a
store directory is left alone.
"""

from __future__ import annotations

import re

import torch

from tvbasis.io import TensorSpec, row_chunks
from tvbasis.io.writer import header_for, shard_names

SHARD_METADATA = {"format": "pt"}
SHARD_RE = re.compile(r"^(?P<part>bases|mean|coded)(?:\.g(?P<gen>[1-9][0-9]{0,8}))?(?P<shard>-[0-9]{5}-of-[0-9]{5})?"
                      r"\.safetensors$")
INDEX_RE = re.compile(r"^(?P<part>bases|mean)(?:\.g(?P<gen>[1-9][0-9]{0,8}))?\.safetensors\.index\.json$")


def is_store_file(name: str) -> bool:
    """A data or index file name of tvbasis's pattern (any generation)."""
    return SHARD_RE.match(name) is not None or INDEX_RE.match(name) is not None


def generation_of(name: str) -> int:
    """The generation a tvbasis file name belongs to (1 for unsuffixed names); 0 for other names."""
    m = SHARD_RE.match(name) or INDEX_RE.match(name)
    if m is None:
        return 0
    return int(m["gen"]) if m["gen"] else 1


def file_names(part: str, n: int, generation: int = 1) -> list[str]:
    return shard_names(part if generation <= 1 else f"{part}.g{generation}", n)


def renamed(name: str, generation: int) -> str:
    """``name`` (a data file of any generation) as the same shard of ``generation``."""
    m = SHARD_RE.match(name)
    if m is None:
        raise ValueError(f"not a store data file name: {name!r}")
    gen = "" if generation <= 1 else f".g{generation}"
    return f"{m['part']}{gen}{m['shard'] or ''}.safetensors"


def stacked_spec(part: str, spec: TensorSpec, M: int, dtype: torch.dtype) -> TensorSpec:
    """The tensor a data file holds for parameter ``spec``: (M, *shape) bases, or the mean of its own shape."""
    return TensorSpec(spec.name, (M, *spec.shape) if part == "bases" else spec.shape, dtype)


def chunks_of(spec: TensorSpec, chunk_elements: int) -> list[tuple[int, int]]:
    """Row chunks [a, b) of one basis (or mean) of parameter ``spec``."""
    return list(row_chunks(spec, chunk_elements))


def chunk_count(spec: TensorSpec, chunk_elements: int) -> int:
    """len(chunks_of(spec, chunk_elements)), computed without listing them (a manifest may claim absurd shapes)."""
    if not spec.shape or spec.numel <= chunk_elements:
        return 1
    step = max(1, chunk_elements // max(1, row_elements(spec)))
    return -(-spec.shape[0] // step)


def row_elements(spec: TensorSpec) -> int:
    return spec.numel // spec.shape[0] if spec.shape else 1


def expected_header(specs: list[TensorSpec]) -> bytes:
    """The exact header bytes tvbasis writes for a data file holding ``specs`` (stacked) in this order."""
    return header_for(specs, SHARD_METADATA)
