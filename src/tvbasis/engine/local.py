"""Executes per-tensor work units: ``local`` (threads overlapping reads with compute) or ``ray`` (a cluster).

Every streaming pass in tvbasis (Gram, merges, basis materialisation, reconstruction, apply) is a map of a
pure function over work items (groups of tensor names) followed by a reduction on the driver. Work functions
and their arguments must be picklable (checkpoints pickle as their paths and are reopened by the worker), so
the same pass runs on threads or on Ray workers unchanged. Results come back in item order.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from tvbasis.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


def _progress(total: int, desc: str | None, enabled: bool, unit_scale: bool, unit: str) -> Any:
    return tqdm(total=total, desc=desc, disable=not enabled or desc is None, unit=unit,
                unit_scale=unit_scale, unit_divisor=1000, dynamic_ncols=True, leave=False)


class Engine(ABC):
    """Maps a picklable function over work items; results are yielded in item order."""

    name: str = "engine"
    workers: int = 1

    @abstractmethod
    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str | None = None,
            sizes: Sequence[int] | None = None) -> Iterator[R]:
        """Yield fn(item) for each item, in order. ``sizes`` (bytes per item) drive the progress bar."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


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
        total = int(sum(sizes)) if sizes is not None else len(items)
        bar = _progress(total, desc, self.progress, sizes is not None, "B" if sizes is not None else "it")
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


_ENGINES: dict[str, Callable[..., Engine]] = {"local": LocalEngine}


def register_engine(name: str, factory: Callable[..., Engine]) -> None:
    _ENGINES[name] = factory


def get_engine(name: str | Engine | None = "local", workers: int | None = None, address: str | None = None,
               progress: bool = True) -> Engine:
    """``local`` (default) or ``ray`` (needs the ``tvbasis[ray]`` extra)."""
    if isinstance(name, Engine):
        return name
    name = name or "local"
    if name == "ray" and "ray" not in _ENGINES:
        try:
            from tvbasis import ray_engine  # noqa: F401  (registers itself)
        except ImportError as e:
            raise ConfigError(f"--engine ray needs Ray: pip install 'tvbasis[ray]' ({e})") from None
    try:
        factory = _ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; expected one of {sorted(set(_ENGINES) | {'ray'})}") from None
    if name == "local":
        return factory(workers=workers, progress=progress)
    return factory(workers=workers, address=address, progress=progress)


def group_by_size(names: Sequence[str], sizes: Sequence[int], target: int) -> list[list[str]]:
    """Consecutive groups of tensor names of about ``target`` bytes each (one big tensor is its own group)."""
    groups: list[list[str]] = [[]]
    acc = 0
    for n, s in zip(names, sizes):
        if groups[-1] and acc + s > target:
            groups.append([])
            acc = 0
        groups[-1].append(n)
        acc += s
    return groups if groups[0] else []


def resolve_device(device: str | None) -> str:
    """Validate a torch device string for the arithmetic ('cpu', 'cuda', 'cuda:1', 'mps')."""
    import torch
    dev = (device or "cpu").strip()
    try:
        d = torch.device(dev)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {dev!r}: not a torch device (expected cpu, cuda, cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {dev}: CUDA is not available on this machine (use --device cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {dev}: MPS is not available on this machine")
    return str(d)
