"""Codec parameters and the spec-string grammar.

Grammar (whitespace around tokens is ignored, names and keys are case-insensitive)::

    spec  := link ("+" link)*          the codec after "+" encodes what the codec before it hands on
    link  := NAME [":" key "=" value ("," key "=" value)*]

e.g. ``int4:group=64,scheme=affine`` or ``lowrank:rank=8+int8``. A "+" only separates links when a letter
follows it, so numbers such as ``1e+3`` stay intact. Optional parameters take the value ``none``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvbasis.errors import ConfigError

_INT_RE = re.compile(r"^[+-]?\d+$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_LINK_SPLIT = re.compile(r"\+(?=\s*[A-Za-z])")


@dataclass(frozen=True)
class Param:
    """One declared codec parameter: its type (int, float or str), default and what values are valid."""

    name: str
    kind: type
    default: Any
    #: human description of valid values, used in error messages ("an integer >= 1")
    expected: str = ""
    check: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] = ()
    #: whether None ("none") is a valid value
    optional: bool = False

    def describe(self) -> str:
        """What the parameter accepts, for error messages (e.g. 'an int (or none)')."""
        base = self.expected or (" or ".join(self.choices) if self.choices else f"a {self.kind.__name__}")
        return base + (" (or none)" if self.optional else "")

    def coerce(self, codec: str, value: Any) -> Any:
        """Validate ``value`` (a python value or its spec text) and return it typed; ConfigError if invalid."""
        def bad() -> ConfigError:
            return ConfigError(f"codec {codec!r}: parameter {self.name!r} must be {self.describe()}, got {value!r}")

        v: Any = value
        if isinstance(v, str):
            text = v.strip()
            if text.lower() == "none":
                v = None
            elif self.kind is int:
                if not _INT_RE.match(text):
                    raise bad()
                v = int(text)
            elif self.kind is float:
                try:
                    v = float(text)
                except ValueError:
                    raise bad() from None
            else:
                v = text.lower()
        if v is None:
            if not self.optional:
                raise bad()
            return None
        if isinstance(v, bool):
            raise bad()
        if self.kind is int:
            if not isinstance(v, int) or abs(v) > MAX_INT_PARAM:  # no size or count here exceeds it
                raise bad()
        elif self.kind is float:
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise bad()
            v = float(v)
        elif not isinstance(v, str):
            raise bad()
        if self.choices and v not in self.choices:
            raise bad()
        if self.check is not None and not self.check(v):
            raise bad()
        return v

    @staticmethod
    def format(value: Any) -> str:
        """Canonical text of a value: ``repr`` for floats (exact round trip), ``none`` for None."""
        if value is None:
            return "none"
        if isinstance(value, float):
            return repr(value)
        return str(value)


#: largest integer codec parameter (a rank, a group size, a count: 2^40 exceeds any tensor dimension)
MAX_INT_PARAM = 2**40
#: most characters of one codec spec, and most codecs in one chain (the store manifest's nesting limit)
MAX_SPEC_CHARS = 1000
MAX_CHAIN = 7


def split_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec into ``[(name, {key: value text}), ...]``, outermost codec first; ConfigError on bad syntax."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"bad codec spec {str(spec)[:80]!r}: expected NAME[:key=value,...][+NEXT]")
    if len(spec) > MAX_SPEC_CHARS:
        raise ConfigError(f"bad codec spec {spec[:80]!r}…: {len(spec)} characters (at most {MAX_SPEC_CHARS})")
    links: list[tuple[str, dict[str, str]]] = []
    if len(_LINK_SPLIT.split(spec)) > MAX_CHAIN:  # a store's reader refuses deeper chains (store/format.py)
        raise ConfigError(f"bad codec spec {spec[:80]!r}: a chain of more than {MAX_CHAIN} codecs")
    for link in _LINK_SPLIT.split(spec):
        name, sep, rest = link.partition(":")
        name = name.strip().lower()
        if not _NAME_RE.match(name):
            raise ConfigError(f"bad codec spec {spec!r}: {name!r} is not a codec name")
        kv: dict[str, str] = {}
        if sep:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip().lower()
                if not eq or not key or not value.strip():
                    raise ConfigError(f"bad codec spec {spec!r}: codec {name!r} expects key=value, "
                                      f"got {item.strip()!r}")
                if key in kv:
                    raise ConfigError(f"bad codec spec {spec!r}: codec {name!r} repeats parameter {key!r}")
                kv[key] = value.strip()
        links.append((name, kv))
    return links
