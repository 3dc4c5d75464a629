"""Which tensors the delta-compression peers (Delta-CoMe, UltraDelta) compress: the linear weights of the
transformer blocks.

``is_block_weight`` is BitDelta's rule (``tvbasis.compress.bitdelta.is_block_linear``: a 2-D ``*.weight`` inside a
numbered ``layer``/``layers``/``h``/``blocks``/``block``, not an embedding table) plus OpenCLIP's block names —
``….resblocks.N.attn.in_proj_weight``, ``….resblocks.N.mlp.c_fc.weight`` — the ViT checkpoints UltraDelta's
reference code compresses (its ``attn.in_proj``, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj`` weights).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tvbasis.compress.bitdelta import is_block_linear
from tvbasis.compress.kinds import tensor_kind
from tvbasis.errors import ConfigError

_RESBLOCK = re.compile(r"(^|\.)resblocks\.\d+\.")


def is_block_weight(name: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """True for a 2-D linear weight of a transformer block (see the module docstring)."""
    shape = tuple(shape)
    if is_block_linear(name, shape):
        return True
    return (len(shape) == 2 and name.endswith("weight") and tensor_kind(name, shape) == "matrix"
            and _RESBLOCK.search(name) is not None)


def parse_rule_options(text: str, name: str, lower_strings: bool = False) -> dict[str, Any]:
    """The options of a peer rule's recorded coder spec ``NAME:key=value,...`` (Delta-CoMe's, UltraDelta's):
    booleans, ints and floats typed, other values kept as text (lower-cased with ``lower_strings``)."""
    head, _, rest = text.strip().partition(":")
    if head.strip().lower() != name:
        raise ConfigError(f"not a{'n' if name[0] in 'aeiou' else ''} {name} coder spec: {text.strip()[:80]!r}")
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"{name} coder: expected key=value, got {item[:40]!r}")
        opts[k.strip()] = _option_value(v.strip(), lower_strings)
    return opts


def _option_value(v: str, lower_strings: bool) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v.lower() if lower_strings else v
