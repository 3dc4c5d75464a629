"""The ``local`` engine: a small thread pool that overlaps reads with compute, a bounded number of items in flight."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from tvbasis.engine.base import Engine, progress_bar

T = TypeVar("T")
R = TypeVar("R")


class LocalEngine(Engine):
    """A small thread pool: torch kernels and safetensors reads release the GIL, so reading the next tensors
    overlaps computing the current ones. At most ``max_in_flight`` items are pending, which bounds memory to
    that many work items' tensors."""

    name = "local"

    def __init__(self, workers: int | None = None, max_in_flight: int | None = None, progress: bool = True) -> None:
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self.max_in_flight = max(1, max_in_flight or self.workers + 1)
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str | None = None,
            sizes: Sequence[int] | None = None) -> Iterator[R]:
        """``fn`` over ``items`` on a thread pool, results yielded in the order of the items (at most
        ``max_in_flight`` pending); ``sizes`` (bytes per item) drive a byte progress bar, else it counts items."""
        total = int(sum(sizes)) if sizes is not None else len(items)
        bar = progress_bar(total, desc, self.progress, sizes is not None, "B" if sizes is not None else "it")
        try:
            if self.workers == 1:
                for i, item in enumerate(items):
                    yield fn(item)
                    bar.update(sizes[i] if sizes is not None else 1)
                return
            # each pool thread runs torch with its share of the cores: W workers x all-core OpenMP teams would
            # oversubscribe them, and OpenMP's spinning barriers then make a pass's many small products many
            # times slower (torch.set_num_threads in a pool thread applies to that thread only)
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            with ThreadPoolExecutor(self.workers, thread_name_prefix="tvbasis", initializer=torch.set_num_threads,
                                    initargs=(threads,)) as pool:
                pending: deque[tuple[int, Future[R]]] = deque()
                it = iter(enumerate(items))
                for i, item in it:
                    pending.append((i, pool.submit(fn, item)))
                    if len(pending) >= self.max_in_flight:
                        break
                while pending:
                    i, fut = pending.popleft()
                    result = fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt[0], pool.submit(fn, nxt[1])))
                    bar.update(sizes[i] if sizes is not None else 1)
                    yield result
        finally:
            bar.close()


