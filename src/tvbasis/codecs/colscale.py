"""``colscale``: code a matrix in an input-weighted space (activation-aware coding, as ASVD does for weights).

A linear layer's output error is ``E·x`` for a weight error ``E``; over inputs with per-feature second moments
``E[x_j²] = s_j²`` its mean square is ``‖E·diag(s)‖²_F`` (features taken as uncorrelated). So the NEXT codec
codes ``X·diag(s)`` — its Frobenius error *is* the output error — and decoding divides the columns by ``s``
again: a low rank of the scaled matrix is the rank that loses least output, a quantiser's rounding lands where
the inputs are small. Stored: ``scale`` (float16, one per column of the 2-D view, ``as_matrix``) and the child
``x`` of the NEXT codec. Bytes: 2·columns + the NEXT codec's bytes.

The scale comes from calibration data (``tvbasis build --budget ... --calibration``): ``encode_scaled(x, s)``.
Plain ``encode(x)`` — no data — uses unit scales, so the codec still round-trips any tensor. Scales are floored
at ``FLOOR`` × their root mean square (an input never active in the calibration text still gets a finite
weight, so its column is not amplified without bound on decoding), after the scales are normalised to a root
mean square of 1 (float16-safe; the overall size of the inputs is a per-tensor factor the caller weighs the
error by: ``‖E·diag(s)‖² = c²·‖E·diag(s/c)‖²``).
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, as_matrix, expect_numel, to_fp16
from tvbasis.codecs.encoded import Encoded

#: the smallest scale kept, as a fraction of the scales' root mean square
FLOOR = 1e-2


def stored_scale(scale: torch.Tensor, cols: int) -> torch.Tensor:
    """The float16 scale ``encode_scaled`` stores for ``scale``: normalised to root mean square 1, floored at
    ``FLOOR`` (ValueError on a wrong length or a negative or non-finite scale)."""
    s = scale.detach().reshape(-1).to(torch.float32)
    if s.numel() != cols:
        raise ValueError(f"codec 'colscale': {s.numel()} scales for a matrix of {cols} columns")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("codec 'colscale': scales must be finite and >= 0")
    rms = float(s.pow(2).mean().sqrt()) if s.numel() else 0.0
    s = (s / rms if rms > 0 else torch.ones_like(s)).clamp_min(FLOOR)
    return to_fp16(s, "colscale", "a scale")


class ColScale(Codec):
    """The NEXT codec applied to ``X·diag(s)``; decoding divides the columns by ``s`` (float16)."""

    name = "colscale"
    takes_next = True

    def _validate(self) -> None:
        if self.next is None:
            from tvbasis.errors import ConfigError
            raise ConfigError("codec 'colscale' needs a +NEXT codec for the scaled matrix (e.g. colscale+int4)")

    def encode_scaled(self, x: torch.Tensor, scale: torch.Tensor) -> Encoded:
        """Encode ``x`` with column weights ``scale`` (one per column of its 2-D view)."""
        m = as_matrix(x.detach().to(torch.float32))
        s16 = stored_scale(scale, m.shape[1])
        return self.encode_with_stored(x, s16)

    def encode_with_stored(self, x: torch.Tensor, s16: torch.Tensor) -> Encoded:
        """Encode with an already stored (float16, floored) scale — what ``encode_scaled`` does after flooring."""
        assert self.next is not None
        m = as_matrix(x.detach().to(torch.float32))
        child = self.next.encode(m * s16.to(torch.float32))
        return self._make(x, {"scale": s16.contiguous()}, {}, {"x": child})

    def _encode(self, x: torch.Tensor) -> Encoded:
        cols = as_matrix(x).shape[1]
        return self.encode_scaled(x, torch.ones(cols))

    def _decode(self, enc: Encoded) -> torch.Tensor:
        assert self.next is not None
        rows = enc.shape[0] if len(enc.shape) >= 2 else 1
        cols = enc.numel // rows
        s = expect_numel(enc.tensors["scale"], cols, self.name, "scale").reshape(1, cols).to(torch.float32)
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError("codec 'colscale': stored scales must be finite and > 0")
        y = self.next.decode(enc.children["x"]).reshape(rows, cols)
        return y / s.to(y.device)
