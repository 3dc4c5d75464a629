"""Merge parameters: binding and validating them (``BaseMerger``) and parsing CLI strings (``KEY=VALUE``).

Every method declares its accepted parameters with defaults; the default's type is the parameter's type (bool,
int, float, or a string from ``choices``). Anything else raises ``ConfigError`` naming the method and what it
accepts, so a typo in a manifest or on the command line fails before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from tvbasis.errors import ConfigError
from tvbasis.merge.base import MergeContext

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
    #: True when ``density`` is a kept fraction in (0, 1]
    trims: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False

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

    def _check(self) -> None:
        """Range checks beyond the type (subclasses)."""

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
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
        x = deltas if deltas.dtype == torch.float32 else deltas.to(torch.float32)
        return self._merge(x, weights.to(x.device, torch.float32), ctx)

    def _merge(self, x: torch.Tensor, w: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError


def bcast(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T,) weights viewed to broadcast against (T, *shape)."""
    return w.view(-1, *([1] * (x.dim() - 1)))


def weighted_sum(x: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_t w_t·x_t, divided by Σ_t w_t when ``normalize`` (mergekit: a divisor with |Σ w| < 1e-8 counts as 1)."""
    out = torch.tensordot(w, x, dims=1)
    if normalize:
        s = float(w.sum())
        if abs(s) >= 1e-8:
            out /= s
    return out


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low == "true":
        return True
    if low == "false":
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_merge_params(items: list[str]) -> dict[str, Any]:
    """['density=0.2', 'sign=frequency', 'normalize=false'] -> {'density': 0.2, 'sign': 'frequency',
    'normalize': False}: ints and floats parsed as numbers, true/false as booleans, the rest kept as strings;
    dashes in keys become underscores."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"merge parameter: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise ConfigError(f"merge parameter: empty key in {item!r}")
        out[k] = _value(v)
    return out
