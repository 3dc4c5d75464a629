"""Cheap NaN/Inf checks for tensors about to be written (io may not import tvbasis.vectors)."""

from __future__ import annotations

import torch

from tvbasis.errors import NonFiniteError


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A float32 sum is NaN/Inf whenever an element is and costs far less than an elementwise
    ``isfinite``; only when the sum itself is not finite (an element is, or the sum overflowed) is the exact
    elementwise check run. Non-float tensors are always finite."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:
        t = t.float()  # float8: isfinite is not implemented for every float8 type
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, where: str, name: str) -> None:
    """Raise NonFiniteError naming ``where`` and tensor ``name`` when ``t`` holds NaN or Inf."""
    if not all_finite(t):
        bad = int((~torch.isfinite(t.float() if t.dtype.itemsize == 1 else t)).sum())
        hint = (f" (values beyond the range of {t.dtype}: e.g. float16 overflows past 65504)"
                if t.dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) else "")
        raise NonFiniteError(f"{where}: tensor {name!r} contains {bad} NaN/Inf value(s) as {t.dtype}{hint}")
