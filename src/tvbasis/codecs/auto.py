"""``auto``: per tensor, the cheapest codec of a fixed ladder that meets a relative-error target.

Every candidate of :data:`AUTO_LADDER` is tried on x; among those with ‖x − x̂‖/‖x‖ ≤ ``rel_error`` the one
with the fewest stored bytes wins (ties: lower error, then ladder order). The ladder ends with ``float32``
(error 0), so a target is always met and never exceeded. Low-rank candidates are skipped for 0-d/1-d tensors
(they would only repeat their NEXT codec), and candidates that cannot represent x (float16 overflow) are
skipped. Stored: the winner's encoding as child ``value``; meta records its spec (``chosen``) and error.

Cost: one encode per candidate (three SVDs for the low-rank rungs) and one decode per candidate that could still
win. Memory: x, the best encoding so far, one candidate and its decode.
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, relative_error
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param
from tvbasis.codecs.registry import parse_codec, register_codec
from tvbasis.errors import NonFiniteError

#: the candidates, in canonical-enough spec form (each is parsed; ``chosen`` records the canonical spec)
AUTO_LADDER: tuple[str, ...] = (
    "sign:scale=row",
    "ternary:density=0.05",
    "ternary:density=0.1",
    "ternary:density=0.25",
    "int2:group=32,scheme=affine",
    "int4:group=128,scheme=symmetric",
    "int4:group=32,scheme=affine",
    "int8:group=128,scheme=symmetric",
    "lowrank:rank=4+int8",
    "lowrank:rank=16+int8",
    "lowrank:rank=64+int8",
    "topk:density=0.01+int8",
    "topk:density=0.05+int8",
    "topk:density=0.2+int8",
    "sparse-rows+int4",
    "sparse-rows+int8",
    "sparse-rows+float16",
    "sparse-rows",
    "bfloat16",
    "float16",
    "float32",
)


def _parse(spec: str) -> Codec:
    return parse_codec(spec)


class Auto(Codec):
    """Cheapest ladder codec with relative error ≤ rel_error."""

    name = "auto"
    params = (Param("rel_error", float, 0.05, "a number >= 0", lambda v: v >= 0.0),)

    def candidates(self, ndim: int) -> list[Codec]:
        """The ladder codecs tried for a tensor with ``ndim`` dimensions."""
        out = [_parse(s) for s in AUTO_LADDER]
        return [c for c in out if ndim >= 2 or c.name != "lowrank"]

    def _encode(self, x: torch.Tensor) -> Encoded:
        target = float(self.values["rel_error"])
        best: tuple[int, float, Codec, Encoded] | None = None
        tried = 0
        for codec in self.candidates(x.ndim):
            try:
                enc = codec.encode(x)
            except NonFiniteError:
                continue
            tried += 1
            if best is not None and enc.nbytes > best[0]:
                continue
            err = relative_error(x, codec.decode(enc))
            if err <= target and (best is None or (enc.nbytes, err) < (best[0], best[1])):
                best = (enc.nbytes, err, codec, enc)
        assert best is not None  # float32 is lossless
        _, err, codec, enc = best
        return self._make(x, meta={"chosen": codec.spec, "rel_error": err, "tried": tried},
                          children={"value": enc})

    def _decode(self, enc: Encoded) -> torch.Tensor:
        child = enc.children["value"]
        return _parse(child.codec).decode(child)


register_codec(Auto)
