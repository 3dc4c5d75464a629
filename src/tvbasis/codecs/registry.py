"""The codec registry and spec parsing: ``CODECS``, ``parse_codec``, ``get_codec``, ``decode``."""

from __future__ import annotations

from typing import Any

import torch

from tvbasis.codecs.base import Codec
from tvbasis.codecs.cast import BFloat16, Float16, Float32
from tvbasis.codecs.colscale import ColScale
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.lowrank import LowRank
from tvbasis.codecs.mask import Mask
from tvbasis.codecs.minmax import MinMax
from tvbasis.codecs.mixed_svd import MixedSVD
from tvbasis.codecs.params import split_spec
from tvbasis.codecs.quant import Int2, Int3, Int4, Int8
from tvbasis.codecs.sign import Sign
from tvbasis.codecs.sparse_rows import SparseRows
from tvbasis.codecs.topk import Ternary, TopK
from tvbasis.codecs.ultra import Ultra
from tvbasis.codecs.zstd import Zstd
from tvbasis.errors import ConfigError

#: codec name -> class
CODECS: dict[str, type[Codec]] = {
    cls.name: cls
    for cls in (Float32, Float16, BFloat16, Int8, Int4, Int3, Int2, Sign, LowRank, SparseRows, TopK, Ternary, Mask,
                MinMax, MixedSVD, Ultra, Zstd, ColScale)
}
# ``auto`` picks among the codecs above through ``parse_codec``: it sits one level up and adds itself with
# ``register_codec`` when ``tvbasis.codecs.auto`` is imported (``tvbasis.codecs`` imports it).


def register_codec(cls: type[Codec]) -> None:
    """Make codec ``cls`` available by its name in specs."""
    CODECS[cls.name] = cls


def get_codec(name: str, next: Codec | str | None = None, **params: Any) -> Codec:
    """Codec ``name`` with typed (or text) parameters; ``next`` a codec or a spec. ConfigError if invalid."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}") from None
    if isinstance(next, str):
        next = parse_codec(next)
    return cls(next=next, **params)


def parse_codec(spec: str) -> Codec:
    """Parse ``NAME[:key=value,...][+NEXT]`` (see ``tvbasis.codecs.params``); ConfigError if invalid."""
    codec: Codec | None = None
    for name, kv in reversed(split_spec(spec)):
        codec = get_codec(name, codec, **kv)
    assert codec is not None
    return codec


def decode(enc: Encoded) -> torch.Tensor:
    """Decode with the codec recorded in ``enc.codec`` (no codec object needed)."""
    return parse_codec(enc.codec).decode(enc)
