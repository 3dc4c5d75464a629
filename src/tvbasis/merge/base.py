"""The one interface every merge method implements.

``BaseMerger`` binds and validates a method's parameters (each declared with a default whose type is the
parameter's type) and carries the method's traits, so passes ask the class, not a list of names. A merge method
combines the T task-vector slices of ONE tensor (stacked as ``deltas`` of shape (T, *shape),
float32) into one merged slice of shape ``shape``. Methods never see more than one tensor (or one chunk of a
tensor along dim 0) at a time, so a merge over K checkpoints holds about K slices of one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError


@dataclass(frozen=True)
class MergeContext:
    """What a merge may need besides the deltas.

    name: the tensor's name (seeds per-tensor randomness so results do not depend on walk order or chunking
        offset; see ``offset``).
    offset: index along dim 0 where this chunk starts (0 when the whole tensor is passed).
    thresholds: (T,) float32 per-task magnitude thresholds when trimming has global scope, else None.
    fisher: (T, *shape) float32 diagonal Fisher weights for this tensor (fisher merge only), else None.
    base: the pretrained slice θ₀ (float32, shape of one slice) for methods that interpolate whole weights
        (``needs_base``: slerp), else None.
    per_task: per-task values of parameters that may differ between tasks (e.g. mergekit's per-model
        ``density``, ``gamma``, ``epsilon``): name -> T floats, overriding the merger's one value.
    """

    name: str = ""
    offset: int = 0
    thresholds: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    base: torch.Tensor | None = None
    per_task: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeSpec:
    """A merge method by name plus its parameters, as given on the command line or in a store manifest."""

    method: str = "task_arithmetic"
    params: dict[str, object] = field(default_factory=dict)


#: mergekit's names for the TIES sign-election rules, accepted as aliases
SIGN_ALIASES = {"sum": "total", "mass": "total", "count": "frequency"}


class BaseMerger:
    """Binds and validates parameters; subclasses implement ``_merge`` on float32 deltas."""

    name: ClassVar[str] = ""
    #: accepted parameters and their defaults (the default's type is the parameter's type)
    defaults: ClassVar[dict[str, Any]] = {}
    #: string parameters: the accepted values
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"sign": ("total", "frequency"),
                                                     "trim_scope": ("tensor", "global")}
    # -- traits: what a pass must know about a method without running it ------------------------------------
    #: True when ``density`` is a kept fraction in (0, 1]
    trims: ClassVar[bool] = False
    #: True when the trim ranks magnitudes within a tensor (so a tensor merged in row chunks first needs each
    #: task's exact per-tensor threshold); DARE's random drops are chunk-invariant and do not
    ranks_per_tensor: ClassVar[bool] = False
    #: True when the merged tensor is Σ_t c_t·δ_t for coefficients fixed by the weights (task_arithmetic, mean):
    #: such a merge is a linear map B of the task vectors, so a basis made by it needs no merge pass
    linear: ClassVar[bool] = False
    #: True when the method needs the whole tensor at once (an SVD of the matrix): never merged in row chunks
    whole_tensor: ClassVar[bool] = False
    #: True when the method needs ctx.fisher
    needs_fisher: ClassVar[bool] = False
    #: True when the method needs the pretrained slice in ctx.base (it interpolates whole weights: slerp)
    needs_base: ClassVar[bool] = False
    #: parameters a caller may give per task in ctx.per_task (each a float parameter of ``defaults``)
    per_task_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        params = dict(params or {})
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"merge method {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                              f"accepted: {self.accepted()}")
        if "sign" in params and isinstance(params["sign"], str):
            params["sign"] = SIGN_ALIASES.get(params["sign"], params["sign"])
        self.params: dict[str, Any] = {k: self._typed(k, v) for k, v in {**self.defaults, **params}.items()}
        self.density: float | None = None
        if self.trims:
            d = self.params["density"]
            if not 0 < d <= 1:
                raise ConfigError(f"merge method {self.name!r}: density must be in (0, 1], got {d!r}")
            self.density = d
        self.needs_global_thresholds: bool = self.trims and self.params.get("trim_scope") == "global"
        self._check()

    @classmethod
    def accepted(cls) -> str:
        """The method's parameters and their defaults as one line (for error messages and --help)."""
        return ", ".join(f"{k}={v!r}" for k, v in sorted(cls.defaults.items())) or "none"

    def _typed(self, key: str, value: Any) -> Any:
        default = self.defaults[key]
        bad = ConfigError(f"merge method {self.name!r}: {key} must be {type(default).__name__}"
                          f"{' in ' + str(self.choices[key]) if key in self.choices else ''}, got {value!r}")
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise bad
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            return float(value)
        if key in self.choices and value not in self.choices[key]:
            raise bad
        return value

    @property
    def normalizes(self) -> bool:
        """True when the merge divides by the sum of the weights (a weighted mean)."""
        return bool(self.params.get("normalize", False))

    def _check(self) -> None:
        """Range checks beyond the type (subclasses)."""

    def task_values(self, key: str, ctx: MergeContext, T: int) -> list[float]:
        """The T per-task values of parameter ``key``: ``ctx.per_task[key]`` when given, else the one value."""
        given = ctx.per_task.get(key)
        if given is None:
            return [float(self.params[key])] * T
        if len(given) != T:
            raise ConfigError(f"merge {self.name!r} of {ctx.name!r}: {len(given)} per-task values of {key} for "
                              f"{T} task slices")
        return [float(v) for v in given]

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        """Merge the stacked task-vector slices ``deltas`` (T, ...) of one tensor with per-task ``weights`` (T,)
        into one slice; ``ctx`` carries the tensor's name, global thresholds, Fisher rows and per-task values the
        method may need. Checks shapes, then calls the method's own ``_merge``."""
        if deltas.dim() < 1 or weights.dim() != 1 or deltas.shape[0] != weights.shape[0]:
            raise ConfigError(f"merge {self.name!r} of {ctx.name!r}: deltas of shape {tuple(deltas.shape)} need "
                              f"one weight per task slice, got weights of shape {tuple(weights.shape)}")
        if self.needs_global_thresholds:
            if ctx.thresholds is None:
                raise ConfigError(f"merge {self.name!r} with trim_scope=global needs per-task thresholds "
                                  f"(tvbasis.merge.global_thresholds) in MergeContext.thresholds")
            if ctx.thresholds.numel() != deltas.shape[0]:
                raise ConfigError(f"merge {self.name!r}: {ctx.thresholds.numel()} thresholds for "
                                  f"{deltas.shape[0]} task slices")
        fixed = sorted(set(ctx.per_task) - set(self.per_task_params))
        if fixed:
            raise ConfigError(f"merge method {self.name!r}: {', '.join(fixed)} cannot differ between tasks "
                              f"(per-task values accepted for: {list(self.per_task_params) or 'none'})")
        x = deltas if deltas.dtype == torch.float32 else deltas.to(torch.float32)
        return self._merge(x, weights.to(x.device, torch.float32), ctx)

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError
