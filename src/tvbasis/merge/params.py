"""Parsing merge parameters given as ``KEY=VALUE`` strings on the command line."""

from __future__ import annotations

from typing import Any

from tvbasis.errors import ConfigError


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
