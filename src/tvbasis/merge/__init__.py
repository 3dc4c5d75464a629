"""Merge methods over the T task-vector slices of one tensor: one signature, one registry, mergekit's names.

``get_merger(MergeSpec("ties", {"density": 0.2}))`` returns a configured merger whose ``merge(deltas (T, *shape),
weights (T,), ctx)`` gives the merged slice. Methods: task_arithmetic, mean, ties, topk, dare_linear, dare_ties,
fisher, consensus. Trimming is per tensor unless ``trim_scope="global"``: then the caller passes each task's
exact threshold over the whole vector (``global_thresholds``, two streaming passes).
"""

from __future__ import annotations

from typing import Any

from tvbasis.errors import ConfigError
from tvbasis.merge.base import MergeContext, Merger, MergeSpec
from tvbasis.merge.methods import MERGE_METHODS
from tvbasis.merge.threshold import global_thresholds


def available_methods() -> list[str]:
    return sorted(MERGE_METHODS)


def get_merger(spec: MergeSpec) -> Merger:
    try:
        cls = MERGE_METHODS[spec.method]
    except KeyError:
        raise ConfigError(f"unknown merge method {spec.method!r}; expected one of {available_methods()}") from None
    return cls(dict(spec.params))  # type: ignore[return-value]


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_merge_params(items: list[str]) -> dict[str, Any]:
    """['density=0.2', 'sign=frequency'] -> {'density': 0.2, 'sign': 'frequency'} (numbers, booleans parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _value(v)
    return out


__all__ = ["MERGE_METHODS", "MergeContext", "MergeSpec", "Merger", "available_methods", "get_merger",
           "global_thresholds", "parse_merge_params"]
