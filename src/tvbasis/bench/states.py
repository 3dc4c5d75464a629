"""Task vectors as the evaluator takes them: float32 state dicts, their sums and their byte counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def float_state(tv: Any) -> dict[str, torch.Tensor]:
    """A TaskVector (anything with ``to_state_dict()``) as a float32 state dict."""
    return {k: v.float() for k, v in tv.to_state_dict().items()}


def vector_bytes(tv: Mapping[str, torch.Tensor]) -> int:
    """Bytes of one task vector's tensors (numel × element size)."""
    return sum(v.numel() * v.element_size() for v in tv.values())


def sum_states(tvs: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str] | None = None
               ) -> dict[str, torch.Tensor]:
    """Σ_t τ_t over ``names`` (default: all, in order), tensor by tensor, in float32."""
    names = list(tvs) if names is None else list(names)
    out: dict[str, torch.Tensor] = {k: v.float().clone() for k, v in tvs[names[0]].items()}
    for n in names[1:]:
        for k, v in tvs[n].items():
            out[k] += v.float()
    return out
