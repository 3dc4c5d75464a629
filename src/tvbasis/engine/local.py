"""The ``local`` engine: a small thread pool that overlaps reads with compute, a bounded number of items in flight."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from tvbasis.engine.base import Engine, progress_bar
from tvbasis.engine.cores import available_cores, free_cores

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
        self._free: int | None = None  # the cores free when the first map starts

    def threads_per_worker(self) -> int:
        """Torch threads for each worker: the cores free now (``engine.cores.free_cores``, measured once per
        engine) shared among the workers, at least 1 — not measured where even every core would give each worker
        only one (the default on 2 cores: two workers)."""
        if available_cores() // self.workers <= 1:
            return 1
        if self._free is None:
            self._free = free_cores()
        return max(1, self._free // self.workers)

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str | None = None,
            sizes: Sequence[int] | None = None) -> Iterator[R]:
        """``fn`` over ``items`` on a thread pool, results yielded in the order of the items (at most
        ``max_in_flight`` pending); ``sizes`` (bytes per item) drive a byte progress bar, else it counts items."""
        total = int(sum(sizes)) if sizes is not None else len(items)
        bar = progress_bar(total, desc, self.progress, sizes is not None, "B" if sizes is not None else "it")
        try:
            # each worker runs torch with its share of the cores free now: W workers x all-core OpenMP teams, or
            # one all-core team on cores other processes keep busy, oversubscribe them, and OpenMP's spinning
            # barriers then make a pass's many small products many times slower (a --workers 1 residual build
            # beside one busy process: 432 CPU-s against 5.3 s at one thread). torch.set_num_threads in a pool
            # thread applies to that thread only
            threads = self.threads_per_worker()
            if self.workers == 1:
                before = torch.get_num_threads()
                torch.set_num_threads(min(before, threads))  # never more than torch's own default
                try:
                    for i, item in enumerate(items):
                        yield fn(item)
                        bar.update(sizes[i] if sizes is not None else 1)
                finally:
                    torch.set_num_threads(before)
                return
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


