"""Open file descriptors of one reader, by key, closed together: the checkpoint reader's shards and a store's
data and coded files all keep theirs in an ``FdPool``."""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class FdPool(Generic[K]):
    """Descriptors by key; ``open`` opens a file read-only on first use (thread-safe), ``close`` closes them all
    (a descriptor already closed is skipped) and may be called more than once."""

    def __init__(self) -> None:
        self._fds: dict[K, int] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: K) -> int:
        return self._fds[key]

    def __setitem__(self, key: K, fd: int) -> None:
        """Keep ``fd`` (opened by the caller) under ``key``; the pool closes it."""
        with self._lock:
            self._fds[key] = fd

    def open(self, key: K, path: str | Path) -> int:
        """The descriptor under ``key``, opening ``path`` read-only the first time."""
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = self._fds[key] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
