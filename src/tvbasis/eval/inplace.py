"""In-place weight edits of a loaded model, θ + scale·delta, undone by the next edit: shared by the scorers that
keep their own heads (``userdata.SequenceClassifier``, ``causal_lm.CausalLMScorer``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from tvbasis.errors import TensorMismatchError


class InPlaceEdit:
    """Mixin: ``self.model`` (a torch module), ``self.model_dir``, ``self._params`` (its state dict with
    ``keep_vars=True``) and ``self._base`` (the saved originals of the tensors the last edit touched)."""

    model: torch.nn.Module
    model_dir: Path
    _params: dict[str, torch.Tensor]
    _base: dict[str, torch.Tensor]

    def resolve(self, name: str) -> str | None:
        """The parameter a tensor name refers to (with or without the base-model prefix), or None."""
        if name in self._params:
            return name
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        for cand in (f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None):
            if cand and cand in self._params:
                return cand
        return None

    @torch.no_grad()
    def set_delta(self, delta: Mapping[str, torch.Tensor] | None, scale: float = 1.0) -> None:
        """Restore the tensors of the previous edit, then set θ + scale·delta (shapes checked)."""
        for key, base in self._base.items():
            self._params[key].copy_(base)
        self._base = {}
        for name, d in (delta or {}).items():
            key = self.resolve(name)
            if key is None:
                raise TensorMismatchError(f"tensor {name!r} is not a parameter of {self.model_dir}")
            p = self._params[key]
            if tuple(d.shape) != tuple(p.shape):
                raise TensorMismatchError(f"{name}: delta shape {tuple(d.shape)} != parameter shape {tuple(p.shape)}")
            if key not in self._base:
                self._base[key] = p.detach().clone()
            p.copy_((p.float() + scale * d.float()).to(p.dtype))

    def reset(self) -> None:
        """Back to the loaded weights."""
        self.set_delta(None)

    @property
    def edited(self) -> bool:
        """Whether an edit is in place."""
        return bool(self._base)
