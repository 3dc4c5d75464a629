"""Tensor kinds of a task vector: ``embedding`` (a 2-D tensor whose name marks an embedding table: fine-tuning
changes only the rows of the tokens it saw), ``matrix`` (any other tensor of ≥ 2 dimensions) and ``vector``
(0-d/1-d: biases, norms)."""

from __future__ import annotations

import torch

KINDS: tuple[str, ...] = ("embedding", "matrix", "vector")
#: lower-case name fragments that mark a 2-D tensor as an embedding table (rows = tokens or positions)
EMBEDDING_MARKERS: tuple[str, ...] = ("embed", "wte", "wpe", "lm_head")


def tensor_kind(name: str, shape: tuple[int, ...] | torch.Size) -> str:
    """``embedding``, ``matrix`` or ``vector`` (see the module docstring)."""
    if len(shape) <= 1:
        return "vector"
    if len(shape) == 2 and any(m in name.lower() for m in EMBEDDING_MARKERS):
        return "embedding"
    return "matrix"
