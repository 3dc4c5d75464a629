"""How many cores this process may use, and how many other processes keep busy right now: the thread counts of
the local engine's workers and of the benchmark's measurements come from them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def available_cores() -> int:
    """The cores this process may use: ``OMP_NUM_THREADS`` where it is a positive integer (the knob schedulers,
    containers and test runners set, which torch's own default also follows), else the CPU affinity mask."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _proc_stat_times(stat: str) -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) from the ``cpu`` line of /proc/stat's text."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            vals = [int(v) for v in line.split()[1:]]
            return sum(vals[:8]), vals[3] + (vals[4] if len(vals) > 4 else 0)
    raise ValueError("no cpu line in /proc/stat")


def busy_cores_elsewhere(window: float = 1.0, read: Callable[[str], str] | None = None,
                         sleep: Callable[[float], None] = time.sleep) -> float | None:
    """How many cores other processes keep busy, measured over ``window`` seconds while this one sleeps (from
    /proc/stat, less this process's own CPU time); None where /proc/stat is not readable (not Linux). Unlike the
    load average this sees only the present and not this process's own past work (the bench's fine-tuning had
    the 1-minute load average at the core count for minutes afterwards)."""
    read = read or (lambda path: Path(path).read_text())
    try:
        total0, idle0 = _proc_stat_times(read("/proc/stat"))
        own0 = sum(os.times()[:2])
        sleep(window)
        total1, idle1 = _proc_stat_times(read("/proc/stat"))
        own1 = sum(os.times()[:2])
    except (OSError, ValueError):
        return None
    jiffies = total1 - total0
    if jiffies <= 0:
        return None
    busy = (jiffies - (idle1 - idle0)) / jiffies * (os.cpu_count() or 1)  # cores busy, the whole machine
    own = (own1 - own0) / max(window, 1e-9)  # cores this process used (its other threads may still run)
    return max(0.0, busy - own)


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None


def cores_left(cores: int, others: float) -> int:
    """Of ``cores``, how many ``others`` busy cores leave, rounded to the nearest, between 1 and ``cores``."""
    return max(1, min(cores, int(cores - others + 0.5)))


def free_cores(window: float = 0.2) -> int:
    """The cores this process may use less those other processes keep busy now (``busy_cores_elsewhere`` over
    ``window`` seconds, rounded), at least 1; every core it may use where that cannot be measured. Skips the
    measurement when the 1-minute load average is below half a core (an idle machine: one busy process brings it
    to 1 only after minutes)."""
    cores = available_cores()
    if cores <= 1:
        return 1
    load = load_average()
    if load is not None and load < 0.5:
        return cores
    busy = busy_cores_elsewhere(window)
    return cores if busy is None else cores_left(cores, busy)


__all__ = ["available_cores", "busy_cores_elsewhere", "cores_left", "free_cores", "load_average"]
