"""What to build (``StoreSpec``) and how to write it (``WriteOptions``): ``build_store(pretrained, finetuned, spec,
out, run=None, write=None)``. Where it runs is ``tvbasis.engine.RunOptions`` (``run``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tvbasis.compress import Coder
from tvbasis.store.commit import DEFAULT_LOCK_TIMEOUT
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds: the ``method`` (a ``tvbasis build --method``, see ``tvbasis.methods``) with its
    ``options``; ``M`` bases (None: the method's own or its choice); ``layerwise`` fits; every task's residual
    through ``residual`` and the bases through ``codec``; the bases' ``dtype``; the tensors kept (``include`` /
    ``exclude`` globs); ``fisher`` (task -> diagonal Fisher safetensors) for a cluster basis with
    ``inner="fisher"``."""

    method: str
    M: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    layerwise: bool = False
    residual: str | Coder | None = None
    codec: str | None = None
    dtype: str | torch.dtype | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    fisher: Mapping[str, str | Path] | None = None

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, _globs(v))

    def with_(self, **changes: Any) -> StoreSpec:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)


def _globs(v: str | Iterable[str]) -> tuple[str, ...]:
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True)
class WriteOptions:
    """How a store is written: data files of at most ``max_shard_size``; ``force`` replaces an existing output
    (a store as a new generation inside it); row chunks of ``chunk_elements`` for the digests and the streaming
    reads; ``lock_timeout`` seconds to wait for another writer of an existing store."""

    max_shard_size: int | str = "5GB"
    force: bool = False
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT
