"""Where work runs: an ``Engine`` maps a picklable per-item function over work items (``local`` threads or
``ray`` tasks); ``RunOptions`` bundles the engine, its workers and the torch device, resolved once per command."""

from tvbasis.engine.base import Engine, progress_bar
from tvbasis.engine.local import LocalEngine
from tvbasis.engine.options import Run, RunOptions, as_run, get_engine, register_engine, resolve_device

__all__ = ["Engine", "LocalEngine", "Run", "RunOptions", "as_run", "get_engine", "progress_bar", "register_engine",
           "resolve_device"]
