"""Fault injection for the crash tests of store writes, and deferral of interrupts during a commit.

``fault_point(step)`` is called between the steps of every store write (staging, each rename, the manifest
switch, each removal of an old file). With the environment variable ``TVBASIS_FAULT_STEP=N`` the process sends
itself SIGKILL (``TVBASIS_FAULT_SIGNAL=TERM``: SIGTERM) at the N-th such point, so a test can kill a write between
any two of its steps and check that the store is in its old state or its new one, never neither.
``TVBASIS_FAULT_TRACE=FILE`` appends every point reached (``N step``) to FILE. Unset, a point costs one
environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_count = [0]


def fault_point(step: str) -> None:
    want = os.environ.get("TVBASIS_FAULT_STEP")
    trace = os.environ.get("TVBASIS_FAULT_TRACE")
    if not want and not trace:
        return
    _count[0] += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_count[0]} {step}\n")
    if want and want.isdigit() and _count[0] == int(want):
        sig = signal.SIGTERM if os.environ.get("TVBASIS_FAULT_SIGNAL", "").upper() == "TERM" else signal.SIGKILL
        os.kill(os.getpid(), sig)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs (the few renames that switch a store to its new state) and
    deliver them after it, so an interrupt never lands between two renames of one commit. Only in the main
    thread (where Python runs signal handlers); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}

    def hold(sig: int, frame: object) -> None:
        pending.append(sig)

    for s in sigs:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            signal.raise_signal(pending[0])
