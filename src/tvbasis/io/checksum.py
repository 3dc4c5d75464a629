"""Content digests and structure fingerprints of checkpoints, and the checks that a store or task vector is
applied to the pretrained model it was made from.

``tensor_digest`` hashes one tensor chunk (blake2b of name, dtype and shape, CRC-32 of the bytes);
``combine_digests`` folds the per-chunk digests of a whole model into one SHA-256 hex string, in sorted key order
so the result does not depend on the order in which a pass produced them. ``structure_fingerprint`` is a free
first check: SHA-256 of tensor names, shapes and dtypes.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tvbasis.errors import StoreError
from tvbasis.io.reader import Checkpoint, row_chunks
from tvbasis.io.specs import TensorSpec


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """Content digest of one tensor: blake2b of (name, dtype, shape) and CRC-32 of its bytes.

    The checksum guards against applying a store to the wrong pretrained model, not against an adversary, so
    the bytes go through CRC-32 (~4x faster than blake2b here); a different model differs in almost every
    chunk, and the per-chunk digests are combined with SHA-256."""
    h = hashlib.blake2b(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), digest_size=12)
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    crc = zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))
    return h.digest() + crc.to_bytes(4, "little")


def chunk_key(name: str, a: int, b: int) -> str:
    return f"{name}[{a}:{b}]"


def chunk_digests(spec: TensorSpec, t: torch.Tensor, chunk_elements: int) -> list[tuple[str, bytes]]:
    """Digests of a whole tensor cut into the same row chunks the Gram pass used."""
    out = []
    for a, b in row_chunks(spec, chunk_elements):
        key = chunk_key(spec.name, a, b)
        out.append((key, tensor_digest(key, t[a:b] if spec.shape else t)))
    return out


def combine_digests(digests: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, d in sorted(digests):
        h.update(name.encode())
        h.update(d)
    return h.hexdigest()


def structure_fingerprint(ckpt: Checkpoint) -> str:
    """Hash of tensor names, shapes and dtypes: a free first check that a store matches a model."""
    h = hashlib.sha256()
    for s in sorted(ckpt.specs(), key=lambda s: s.name):
        h.update(f"{s.name}|{tuple(s.shape)}|{s.dtype};".encode())
    return h.hexdigest()


def check_pretrained_structure(ref: Mapping[str, Any], pretrained: Checkpoint, where: Path | str) -> None:
    """StoreError unless ``pretrained`` has the tensor names, shapes and dtypes recorded in ``ref``."""
    if ref.get("fingerprint") and structure_fingerprint(pretrained) != ref["fingerprint"]:
        if ref.get("what"):  # a masks file or a saved task vector: name it, and the model it was made from
            raise StoreError(f"{ref['what']}: was made from another pretrained model ({ref.get('path')}); "
                             f"{pretrained.path} has different tensor names, shapes or dtypes")
        raise StoreError(f"{where}: was built from another pretrained model ({ref.get('path')}); "
                         f"{pretrained.path} has different tensor names, shapes or dtypes")


def check_pretrained_checksum(digests: Iterable[tuple[str, bytes]], ref: Mapping[str, Any], pretrained_path: object,
                              suffix: str = "") -> None:
    """StoreError unless the combined digests equal the checksum recorded in ``ref``."""
    if combine_digests(digests) != ref["checksum"]:
        what = ref.get("what") or "the store"
        raise StoreError(f"{pretrained_path}: is not the pretrained model {what} was made from "
                         f"({ref.get('path')}): the weights differ (checksum mismatch){suffix}")
