"""TVQ and RTVQ (Kim et al., ICCV 2025, "Task Vector Quantization for Memory-Efficient Model Merging").

TVQ quantizes each tensor of a task vector — not of the fine-tuned model: its range is about ten times narrower —
with b-bit asymmetric min–max quantization, one scale and zero point per tensor (the reference code's
``asymmetric_quantization``)::

    s = (2^b − 1) / (max x − min x),   z = −round(s · min x),   q = clamp(round(s·x + z), 0, 2^b − 1),
    x̂ = (q − z) / s.

The zero point is an integer, so x = 0 comes back exactly (q = z) whenever min x ≤ 0 ≤ max x — which keeps the
untouched rows of an embedding table at zero. A constant tensor (max = min, e.g. an untouched pooler) has no
finite s: it is stored as its one value (the reference code would divide by zero there).

RTVQ splits the T task vectors into a shared base and per-task offsets: base β = (1/T)·Σ_t τ_t (the average
fine-tuned weights minus θ₀), quantized with b_base bits; offsets against the *quantized* base (the paper's error
correction, so the base's rounding error is absorbed by the offsets) o_t = τ_t − β̂, quantized with b_off bits;
τ̂_t = β̂ + ô_t. "B3O2" (3-bit base, 2-bit offsets) costs (3 + 2T)/T bits per element and task.

As stores: ``--method tvq`` is M = 0 with every tensor through the ``minmax:bits=b`` codec (the same maths);
``--method rtvq`` a mean basis (W = 1) through ``minmax:bits=b_base`` with ``minmax:bits=b_off`` residuals.

Bytes: ⌈n·b/8⌉ for the codes (a dense bit stream) plus 8 per tensor for s and z as float32 (the reference code
keeps codes in uint8 tensors in memory; its reported sizes count b bits per element, as we do). Not
reproduced: the paper's bit allocation by layer sensitivity — one bit width serves every tensor here.
"""

from __future__ import annotations

import torch

from tvbasis.codecs import minmax_dequantize, minmax_quantize

#: bytes of one quantized tensor's parameters: scale and zero point, float32
PARAM_BYTES = 8


def tvq_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
    """(codes as int16, scale s, zero point z) of ``x`` at ``bits`` bits (``tvbasis.codecs.minmax``)."""
    return minmax_quantize(x, bits)


def tvq_dequantize(q: torch.Tensor, scale: float, zero: float) -> torch.Tensor:
    """x̂ = (q − z)/s; a constant tensor (s = 0) decodes to z everywhere."""
    return minmax_dequantize(q, scale, zero)


def tvq_nbytes(numel: int, bits: int) -> int:
    """Codes as a dense bit stream plus the float32 scale and zero point."""
    return -(-numel * bits // 8) + PARAM_BYTES


def tvq_tensor(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """One tensor through TVQ: (x̂, stored bytes)."""
    q, s, z = tvq_quantize(x, bits)
    return tvq_dequantize(q, s, z), tvq_nbytes(x.numel(), bits)


def rtvq_tensor(tau: torch.Tensor, base_bits: int = 3, offset_bits: int = 2) -> tuple[torch.Tensor, int]:
    """Stacked slices ``tau`` (T, ...) of one tensor through RTVQ: (τ̂ (T, ...), stored bytes of the tensor)."""
    T = tau.shape[0]
    base_hat, nbytes = tvq_tensor(tau.float().mean(0), base_bits)
    out = torch.empty(tau.shape, dtype=torch.float32)
    for t in range(T):
        off_hat, nb = tvq_tensor(tau[t].float() - base_hat, offset_bits)
        out[t] = base_hat + off_hat
        nbytes += nb
    return out, nbytes
