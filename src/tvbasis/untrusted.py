"""Parsers of untrusted JSON and YAML documents, with caps: every document a user or a file gives (safetensors
headers, store manifests, the paper's method_info.json, masks-file metadata, mergekit YAML) goes through these.

- **Size**: at most ``max_bytes`` (the caller's limit) before anything is parsed.
- **Depth**: at most ``MAX_DEPTH`` nested arrays/objects (JSON) or collections (YAML); a deeper document is one
  error line, never a RecursionError.
- **Numbers**: no NaN/Infinity literals and no number that overflows to ±inf (``1e999``); integers of at most
  ``MAX_INT_DIGITS`` digits (Python refuses > 4300 digits with a ValueError, and a 4000-digit integer is not a
  size or a count anything here takes).
- **Keys**: a key repeated in one object/mapping is refused (JSON and YAML would silently keep the last).
- **YAML**: plain YAML only (``yaml.SafeLoader``: no tags that build Python objects), and no anchors or aliases:
  an alias bomb (a few hundred bytes expanding to gigabytes, "billion laughs") cannot be written without them,
  and no config tvbasis reads needs them.
- **Messages** quote at most ``QUOTE_CHARS`` characters of any offending value (``quote``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from tvbasis.errors import TvbasisError

#: most nested arrays/objects (JSON) or collections (YAML) in one document
MAX_DEPTH = 64
#: most digits of an integer literal
MAX_INT_DIGITS = 40
#: most characters of an offending value quoted in an error message
QUOTE_CHARS = 80
#: default size cap of a YAML config
MAX_YAML_BYTES = 1 << 20


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (with ``…`` when cut); a container is summarised by type and
    length before any repr is built, so quoting never expands a huge value."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 16:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value if not isinstance(value, str) else value[:limit + 1])
    return text if len(text) <= limit else text[:limit] + "…"


def depth_of(value: Any) -> int:
    """Nesting depth of lists/dicts (a scalar: 0), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            d += 1
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((x, d) for x in v)
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:QUOTE_CHARS]} overflows to infinity")
    return x


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {quote(k)} appears twice in one object")
        out[k] = v
    return out


def load_json(raw: bytes | str, where: str, error: type[TvbasisError], max_bytes: int,
              what: str = "JSON") -> Any:
    """Parse an untrusted JSON document under the caps of this module; ``error`` (one line starting with
    ``where``) for anything else."""
    if len(raw) > max_bytes:
        raise error(f"{where}: {what} of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_no_constant, parse_float=_float, parse_int=_int,
                           object_pairs_hook=_pairs)
    except RecursionError:
        raise error(f"{where}: unreadable {what} (nested deeper than Python can parse; at most {MAX_DEPTH} "
                    "levels)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{where}: unreadable {what} ({type(e).__name__}: {str(e)[:200]})") from None
    if depth_of(value) > MAX_DEPTH:
        raise error(f"{where}: unreadable {what} (nested deeper than {MAX_DEPTH} levels)")
    return value


class _Loader(yaml.SafeLoader):
    """SafeLoader without anchors, aliases or repeated keys, with a depth cap and bounded integers (a float such as
    ``.inf`` is left to the caller, which names the key that holds it)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ConstructorError(None, None, f"aliases (*{quote(event.anchor, 40)}) are not allowed here",
                                   event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise ConstructorError(None, None, f"anchors (&{quote(event.anchor, 40)}) are not allowed here",
                                   event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConstructorError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:
                raise ConstructorError(None, None, "a mapping key must be a plain value", key_node.start_mark) \
                    from None
            if repeated:
                raise ConstructorError(None, None, f"key {quote(key, 40)} appears twice in one mapping",
                                       key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = str(node.value).replace("_", "").lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"integer of {len(digits)} digits (at most {MAX_INT_DIGITS})",
                                   node.start_mark)
        return int(super().construct_yaml_int(node))


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def load_yaml(text: str, where: str, error: type[TvbasisError], max_bytes: int = MAX_YAML_BYTES,
              on_error: Callable[[yaml.YAMLError], str] | None = None) -> Any:
    """Parse one untrusted YAML document under the caps of this module; ``error`` (one line starting with
    ``where``) for anything else. ``on_error`` may turn a YAMLError into the message's tail (default: the
    problem and its line and column)."""
    if len(text) > max_bytes:
        raise error(f"{where}: YAML of {len(text)} characters exceeds the limit of {max_bytes}")
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise error(f"{where}: {on_error(e) if on_error else describe_yaml_error(e)}") from None
    except (ValueError, OverflowError, RecursionError) as e:
        raise error(f"{where}: unreadable YAML ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        loader.dispose()


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """A YAMLError as 'malformed YAML: PROBLEM (line L, column C)', the problem cut to 200 characters."""
    problem = str(getattr(e, "problem", None) or e)[:200]
    m = getattr(e, "problem_mark", None)
    return f"malformed YAML: {problem}" + (f" (line {m.line + 1}, column {m.column + 1})" if m is not None else "")
