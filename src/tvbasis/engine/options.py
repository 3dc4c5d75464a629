"""Run options resolved once per command: which engine runs the per-tensor work, with how many workers, and on
which torch device the arithmetic runs. Library entry points take ``run: RunOptions | Engine | str | None``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tvbasis.engine.base import Engine
from tvbasis.engine.local import LocalEngine
from tvbasis.errors import ConfigError

_ENGINES: dict[str, Callable[..., Engine]] = {"local": LocalEngine}


def register_engine(name: str, factory: Callable[..., Engine]) -> None:
    """Make ``--engine NAME`` available (factory(workers=, address=, progress=) -> Engine)."""
    _ENGINES[name] = factory


def _ray_factory(**kwargs: object) -> Engine:
    try:
        from tvbasis.engine.ray import RayEngine  # optional dependency: imported only when asked for
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray: pip install 'tvbasis[ray]' ({e})") from None
    return RayEngine(**kwargs)  # type: ignore[arg-type]


register_engine("ray", _ray_factory)


def get_engine(name: str | Engine | None = "local", workers: int | None = None, address: str | None = None,
               progress: bool = True) -> Engine:
    """``local`` (default) or ``ray`` (needs the ``tvbasis[ray]`` extra); an Engine is returned as it is."""
    if isinstance(name, Engine):
        return name
    name = name or "local"
    try:
        factory = _ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; expected one of {sorted(_ENGINES)}") from None
    if name == "local":
        return factory(workers=workers, progress=progress)
    return factory(workers=workers, address=address, progress=progress)


def resolve_device(device: str | None) -> str:
    """Validate a torch device string for the arithmetic ('cpu', 'cuda', 'cuda:1', 'mps')."""
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


@dataclass
class RunOptions:
    """Where a command's work runs. The engine is created on first use and reused by every pass of the command.

    engine: ``local``, ``ray`` or an Engine instance; workers/address: passed to the engine; device: torch
    device of the Gram, merge and materialisation arithmetic (validated here); progress: progress bars."""

    engine: str | Engine = "local"
    workers: int | None = None
    address: str | None = None
    device: str = "cpu"
    progress: bool = True
    _engine: Engine | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")

    def get_engine(self) -> Engine:
        """The engine these options describe (created on first use, then reused): local threads or Ray."""
        if self._engine is None:
            self._engine = get_engine(self.engine, self.workers, self.address, self.progress)
        return self._engine

    def quiet(self) -> RunOptions:
        """The same engine without progress bars (for small reductions such as dot products)."""
        if isinstance(self.engine, Engine) or self._engine is not None:
            return self
        return RunOptions(self.engine, self.workers, self.address, self.device, progress=False)

    def close(self) -> None:
        """Close the engine if this object created it."""
        if self._engine is not None and not isinstance(self.engine, Engine):
            self._engine.close()
        self._engine = None


Run = RunOptions | Engine | str | None


def as_run(run: Run) -> RunOptions:
    """RunOptions for an engine name, an Engine instance, RunOptions, or None (local, CPU)."""
    if isinstance(run, RunOptions):
        return run
    return RunOptions(engine=run or "local")
