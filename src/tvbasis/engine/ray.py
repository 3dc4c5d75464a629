"""The ``ray`` engine: the same per-tensor passes as ``local``, run as Ray tasks (one machine or a cluster).

Every pass in tvbasis is ``engine.map(fn, items)`` with a picklable ``fn`` whose checkpoints and stores pickle
as their paths, so a Ray worker reopens them and reads its tensors itself from storage every worker can see
(a shared file system on a cluster). This engine

* puts ``fn`` into the object store once; each worker process unpickles it once per pass and keeps it (a
  small per-process cache keyed by the object id), so checkpoints are not reopened for every task;
* batches consecutive items into one Ray task (about ``group_bytes`` of input each when the pass gives
  ``sizes``, else a fixed count), so the per-task overhead (~ms) is negligible next to the reads;
* keeps at most ``max_in_flight`` tasks (default 2 × workers) submitted, so neither the driver nor the object
  store ever holds more than that many groups' results;
* yields results in item order, with the same progress bar as ``LocalEngine``;
* re-raises a worker's exception as the original exception (type and message; the remote traceback is added
  as a note), so ``tvbasis`` errors reach the CLI as the usual one-line messages;
* records, per task, where it ran and what it read (``RayEngine.records``, ``GroupRecord``): the Ray node id,
  the worker's host and pid, its items, the input bytes the pass planned for them and the bytes the worker
  thread actually read (``rchar`` of ``/proc/thread-self/io``: every ``read``/``pread`` of that thread, so the
  checkpoint reads; None off Linux) — two small reads of ``/proc`` per task, nothing per item.

Passes that return whole tensors (``TaskVector.save``, ``apply_to``) send them back to the driver, which
writes the output; the Gram and materialisation passes return only small float64 arrays (the bases are written
by the workers with positional writes into preallocated shard files).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
from ray.exceptions import RayTaskError

from tvbasis.engine.base import Engine, progress_bar
from tvbasis.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

#: default input bytes per Ray task when the pass gives item sizes
DEFAULT_GROUP_BYTES = 128 * 2**20
#: items per Ray task when the pass gives no sizes (upper bound; small passes get smaller groups)
DEFAULT_GROUP_ITEMS = 32

# ---------------------------------------------------------------------------------------------- worker side
#: per worker process: object id -> unpickled work function (a pass's tasks share one fn)
_FN_CACHE: OrderedDict[str, Any] = OrderedDict()
_FN_CACHE_SIZE = 2


def _worker_fn(box: list[ray.ObjectRef]) -> Any:
    ref = box[0]  # boxed in a list so Ray does not resolve (= unpickle) it for every task
    key = ref.hex()
    fn = _FN_CACHE.get(key)
    if fn is None:
        fn = ray.get(ref)
        _FN_CACHE[key] = fn
        while len(_FN_CACHE) > _FN_CACHE_SIZE:
            _FN_CACHE.popitem(last=False)  # drops the oldest pass's fn (closes its mmaps)
    else:
        _FN_CACHE.move_to_end(key)
    return fn


def thread_read_bytes() -> int | None:
    """Bytes this thread has read through read/pread system calls (``rchar``), or None where /proc lacks it."""
    try:
        with open("/proc/thread-self/io", "rb") as fh:
            for line in fh:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class GroupRecord:
    """Where one Ray task (a group of consecutive items) ran and what it read."""

    node_id: str
    host: str
    pid: int
    items: int
    planned_bytes: int | None  # the pass's sizes for these items (None: the pass gave none)
    read_bytes: int | None  # bytes the worker thread read while running them (None: not measurable here)
    seconds: float


def _run_group(box: list[ray.ObjectRef], items: list[Any]) -> tuple[list[Any], tuple[str, str, int, int | None, float]]:
    t0, r0 = time.perf_counter(), thread_read_bytes()  # before the fn is fetched: its first use opens checkpoints
    fn = _worker_fn(box)
    out = [fn(item) for item in items]
    r1 = thread_read_bytes()
    read = r1 - r0 if r0 is not None and r1 is not None else None
    where = (ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid(), read, time.perf_counter() - t0)
    return out, where


# ---------------------------------------------------------------------------------------------- driver side
def unwrap_ray_error(e: BaseException) -> BaseException:
    """The exception raised in the worker (same type and message), or ``e`` when Ray has none to give."""
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(cause, BaseException) and not isinstance(cause, RayTaskError):
        tb = getattr(e, "traceback_str", "")
        if tb and hasattr(cause, "add_note"):
            cause.add_note(f"raised in a Ray worker (pid {getattr(e, 'pid', '?')}):\n{tb.rstrip()}")
        return cause
    return e


def plan_groups(n: int, sizes: Sequence[int] | None, group_bytes: int, group_items: int,
                workers: int) -> list[range]:
    """Consecutive index ranges covering ``range(n)``: about ``group_bytes`` of input each (given sizes), but
    small enough that every worker gets a few groups; otherwise up to ``group_items`` items each."""
    if n == 0:
        return []
    spread = 4 * max(1, workers)  # groups per worker we aim for at least, so the pool stays busy
    if sizes is None:
        per = max(1, min(group_items, math.ceil(n / spread)))
        return [range(a, min(n, a + per)) for a in range(0, n, per)]
    total = int(sum(sizes))
    target = max(1, min(group_bytes, math.ceil(total / spread)))
    groups: list[range] = []
    start, acc = 0, 0
    for i, s in enumerate(sizes):
        if i > start and acc + s > target:
            groups.append(range(start, i))
            start, acc = i, 0
        acc += int(s)
    groups.append(range(start, n))
    return groups


class RayEngine(Engine):
    """Runs each pass as Ray tasks over groups of consecutive items, at most ``max_in_flight`` at a time.

    ``address``: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); ``None`` starts a local Ray
    with ``workers`` CPUs (default all cores) — or reuses the Ray already initialised in this process. Only a
    Ray this engine started is shut down by ``close()``. Every node must have tvbasis installed and see the
    checkpoints (and the store's output directory) at the same paths.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, progress: bool = True,
                 max_in_flight: int | None = None, group_bytes: int = DEFAULT_GROUP_BYTES,
                 group_items: int = DEFAULT_GROUP_ITEMS, cpus_per_task: float = 1.0,
                 object_store_memory: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {workers})")
        self._owns = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = workers or os.cpu_count() or 1
                if object_store_memory is not None:
                    kwargs["object_store_memory"] = int(object_store_memory)
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray"
                raise ConfigError(f"--engine ray: cannot start or reach {where} ({e})") from None
            self._owns = True
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers or max(1, int(cluster_cpus // max(cpus_per_task, 1e-9))))
        self.max_in_flight = max(1, max_in_flight or 2 * self.workers)
        self.group_bytes = max(1, int(group_bytes))
        self.group_items = max(1, int(group_items))
        self.progress = progress
        #: one record per Ray task of every pass so far, in item order (see ``GroupRecord``)
        self.records: list[GroupRecord] = []
        # system failures (a lost node or worker) are retried by Ray: every pass is idempotent (the same bytes are
        # written to the same places); exceptions raised by ``fn`` are not retried and reach the caller.
        # SPREAD: the groups go round the nodes that can run them. Ray's default (fill the driver's node first,
        # spill over when it is busy) put every group of a pass on one node whenever that node's CPU came free
        # before the other node's worker had started, so a cluster of idle nodes could read everything on one
        self._remote = ray.remote(num_cpus=cpus_per_task, scheduling_strategy="SPREAD")(_run_group)

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str | None = None,
            sizes: Sequence[int] | None = None) -> Iterator[R]:
        items = list(items)
        if sizes is not None and len(sizes) != len(items):
            raise ValueError(f"{len(sizes)} sizes for {len(items)} items")
        total = int(sum(sizes)) if sizes is not None else len(items)
        bar = progress_bar(total, desc, self.progress, sizes is not None, "B" if sizes is not None else "it")
        groups = iter(plan_groups(len(items), sizes, self.group_bytes, self.group_items, self.workers))
        pending: deque[tuple[range, ray.ObjectRef]] = deque()
        box: list[ray.ObjectRef] | None = None

        def submit() -> None:
            nonlocal box
            g = next(groups, None)
            if g is None:
                return
            if box is None:
                box = [ray.put(fn)]  # once per pass, shared by every task
            pending.append((g, self._remote.remote(box, [items[i] for i in g])))

        try:
            for _ in range(self.max_in_flight):
                submit()
            while pending:
                g, ref = pending.popleft()
                try:
                    results, (node, host, pid, read, secs) = ray.get(ref)
                except RayTaskError as e:
                    raise unwrap_ray_error(e) from None
                del ref
                planned = int(sum(sizes[i] for i in g)) if sizes is not None else None
                self.records.append(GroupRecord(node, host, pid, len(g), planned, read, secs))
                submit()  # keep the workers busy while the caller consumes this group
                if len(results) != len(g):
                    raise RuntimeError(f"Ray task returned {len(results)} results for {len(g)} items")
                for i, r in zip(g, results):
                    bar.update(sizes[i] if sizes is not None else 1)
                    yield r
                del results
        finally:
            for _, ref in pending:  # an error or an abandoned generator: stop what is still queued
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            pending.clear()
            bar.close()

    def worker_bytes(self) -> dict[tuple[str, int], dict[str, int]]:
        """Per worker process (node id, pid): tasks, items, planned and read bytes summed over ``records``."""
        out: dict[tuple[str, int], dict[str, int]] = {}
        for r in self.records:
            w = out.setdefault((r.node_id, r.pid), {"tasks": 0, "items": 0, "planned_bytes": 0, "read_bytes": 0})
            w["tasks"] += 1
            w["items"] += r.items
            w["planned_bytes"] += r.planned_bytes or 0
            w["read_bytes"] += r.read_bytes or 0
        return out

    def close(self) -> None:
        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RayEngine(workers={self.workers}, max_in_flight={self.max_in_flight}, owns_ray={self._owns})"



