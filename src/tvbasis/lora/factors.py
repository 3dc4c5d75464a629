"""LoRA adapters in factor form, and their Gram matrix G = VᵀV computed from the factors.

An adapter is seen tensor by tensor (names and layouts of the pretrained model): a tensor it changes by a
low-rank product has ΔW.reshape(rows, -1) = B·A with B (rows × r) and A (r × cols) — ``LoraCheckpoint.factors``,
the scale and the layout transposes folded in — and a tensor it replaces whole (``modules_to_save``, trained
biases, ``lora_bias``) has a dense ΔW. Every other tensor has ΔW = 0.

``factor_gram``: ⟨ΔW_i, ΔW_j⟩ per tensor, summed, in float64 and without forming any product B·A:

- factors × factors: ⟨B_iA_i, B_jA_j⟩ = tr((B_iᵀB_j)(A_jA_iᵀ)) = Σ (B_iᵀB_j) ∘ (A_iA_jᵀ) — two products of
  (r_i × r_j), for all pairs at once from the stacked factors [B_1 … B_T]ᵀ[B_1 … B_T] and [A_1; …; A_T][…]ᵀ;
- factors × dense: Σ (B_iᵀD) ∘ A_i (the dense tensor is already expanded);
- dense × dense: the plain inner product.

Reads are per tensor: peak memory is the T adapters' factors of one tensor (plus the dense tensors of it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tvbasis.bases import cosine_from_gram
from tvbasis.errors import ConfigError, TensorMismatchError
from tvbasis.io.lora import LoraCheckpoint, is_adapter
from tvbasis.io.reader import Checkpoint, open_checkpoint


@dataclass
class AdapterFactors:
    """One adapter held in memory in factor form (e.g. built in a test, or a compressed adapter's factors).

    ``factors[name] = (B, A)``: ΔW[name].reshape(rows, -1) = B @ A; ``dense[name]``: ΔW of a tensor replaced
    whole (any shape); ``shapes[name]``: the tensor's shape (defaults to (rows, cols) of the factors)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (B, A) in self.factors.items():
            if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
                raise ConfigError(f"factors of {name!r}: expected B (rows × r) and A (r × cols), got "
                                  f"{tuple(B.shape)} and {tuple(A.shape)}")
            self.shapes.setdefault(name, (B.shape[0], A.shape[1]))
            if math.prod(self.shapes[name]) != B.shape[0] * A.shape[1] or self.shapes[name][0] != B.shape[0]:
                raise ConfigError(f"factors of {name!r} give {B.shape[0]} × {A.shape[1]}, not the shape "
                                  f"{self.shapes[name]}")
        for name, d in self.dense.items():
            self.shapes.setdefault(name, tuple(d.shape))
        both = set(self.factors) & set(self.dense)
        if both:
            raise ConfigError(f"tensors given both as factors and dense: {sorted(both)[:4]}")

    @classmethod
    def from_checkpoint(cls, ck: LoraCheckpoint) -> AdapterFactors:
        """A LoRA adapter checkpoint's ΔW in factor form, read into memory: (B, A) per factored tensor with the
        scale and layout applied (``LoraCheckpoint.factors``), the tensors it replaces whole in ``dense``."""
        src = as_source(ck)
        out = cls()
        for name in src.tensors():
            f = src.factors(name)
            if f is None:
                out.dense[name] = src.dense(name).to(torch.float32)
            else:
                out.factors[name] = f
            out.shapes[name] = src.shape(name)
        return out

    def changed_tensors(self) -> frozenset[str]:
        """Names of every pretrained tensor the adapter changes (through factors or whole)."""
        return frozenset(self.factors) | frozenset(self.dense)


AdapterLike = LoraCheckpoint | AdapterFactors


class Source:
    """The uniform per-tensor view of an adapter that the factor-space passes read."""

    def __init__(self, adapter: AdapterLike) -> None:
        if not isinstance(adapter, (LoraCheckpoint, AdapterFactors)):
            raise ConfigError(f"expected a LoRA adapter (LoraCheckpoint or AdapterFactors), got "
                              f"{type(adapter).__name__}: a full fine-tune has no factors")
        self.adapter = adapter

    def tensors(self) -> list[str]:
        """Names of the tensors the adapter changes, in the pretrained model's order."""
        a = self.adapter
        if isinstance(a, LoraCheckpoint):
            touched = a.changed_tensors()
            return [k for k in a.pretrained.keys() if k in touched]
        return list(a.factors) + [k for k in a.dense if k not in a.factors]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of pretrained tensor ``name``."""
        a = self.adapter
        return tuple(a.spec(name).shape) if isinstance(a, LoraCheckpoint) else tuple(a.shapes[name])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) of tensor ``name`` with the scale folded in, or None when the tensor is changed whole."""
        a = self.adapter
        return a.factors(name) if isinstance(a, LoraCheckpoint) else a.factors.get(name)

    def dense(self, name: str) -> torch.Tensor:
        """ΔW of a tensor that is not a product (float64, the tensor's shape)."""
        a = self.adapter
        if isinstance(a, LoraCheckpoint):
            return a.get(name).to(torch.float64) - a.pretrained.get(name).to(torch.float64)
        return a.dense[name].to(torch.float64)

    def nbytes(self) -> int:
        """Bytes of the adapter as it is: its saved tensors (LoRA A/B, whole tensors) at their dtypes."""
        a = self.adapter
        if isinstance(a, LoraCheckpoint):
            return a.weights.nbytes
        return (sum(B.numel() * B.element_size() + A.numel() * A.element_size() for B, A in a.factors.values())
                + sum(d.numel() * d.element_size() for d in a.dense.values()))


def as_source(adapter: AdapterLike | Source) -> Source:
    """``adapter`` wrapped as a Source (a Source passes through)."""
    return adapter if isinstance(adapter, Source) else Source(adapter)


def open_adapters(pretrained: str | Path | Checkpoint, adapters: Mapping[str, str | Path | AdapterLike]
                  ) -> dict[str, AdapterLike]:
    """{name: adapter} from PEFT adapter directories (read over ``pretrained``) or adapters already open."""
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    out: dict[str, AdapterLike] = {}
    for n, p in adapters.items():
        if isinstance(p, (LoraCheckpoint, AdapterFactors)):
            out[n] = p
        elif is_adapter(p):
            out[n] = LoraCheckpoint(Path(p).expanduser(), pre)
        else:
            raise ConfigError(f"{n}: {p} is not a PEFT LoRA adapter directory (no adapter_config.json); "
                              "factor-space methods need adapters")
    return out


@dataclass
class TensorDeltas:
    """The T adapters' ΔW of one tensor: factors (float64) of those that have them, dense ΔW (float64, 2-D
    (rows, cols)) of those that replace it whole; adapters absent from both have ΔW = 0 there."""

    name: str
    shape: tuple[int, ...]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[int, torch.Tensor]

    @property
    def rows(self) -> int:
        """Rows of the tensor (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        """Elements per row."""
        return math.prod(self.shape) // max(1, self.rows) if self.shape else 1


def tensor_names(sources: list[Source]) -> list[str]:
    """The union of the tensors the adapters change, in first-seen order."""
    return list(dict.fromkeys(n for s in sources for n in s.tensors()))


def iter_tensors(sources: list[Source], names: list[str] | None = None) -> Iterator[TensorDeltas]:
    """Per tensor, the adapters' factors and dense deltas (read lazily; one tensor in memory at a time)."""
    touched = [set(s.tensors()) for s in sources]
    for name in names if names is not None else tensor_names(sources):
        shapes = {s.shape(name) for s, t in zip(sources, touched) if name in t}
        if len(shapes) > 1:
            raise TensorMismatchError(f"adapters give tensor {name!r} different shapes: {sorted(shapes)}")
        shape = shapes.pop()
        td = TensorDeltas(name, shape, {}, {})
        for i, (s, t) in enumerate(zip(sources, touched)):
            if name not in t:
                continue
            f = s.factors(name)
            if f is None:
                td.dense[i] = s.dense(name).reshape(td.rows, td.cols)
            else:
                td.factors[i] = (f[0].to(torch.float64), f[1].to(torch.float64))
        yield td


def _segments(ranks: list[int]) -> torch.Tensor:
    """(len(ranks), Σranks) indicator of which stacked column belongs to which adapter."""
    S = torch.zeros(len(ranks), sum(ranks), dtype=torch.float64)
    o = 0
    for i, r in enumerate(ranks):
        S[i, o:o + r] = 1.0
        o += r
    return S


def tensor_gram(td: TensorDeltas, T: int) -> np.ndarray:
    """(T, T) ⟨ΔW_i, ΔW_j⟩ of one tensor from its factors (and dense deltas), float64."""
    G = torch.zeros((T, T), dtype=torch.float64)
    fi = sorted(td.factors)
    if fi:
        Bs = torch.cat([td.factors[i][0] for i in fi], dim=1)  # rows × R
        As = torch.cat([td.factors[i][1] for i in fi], dim=0)  # R × cols
        S = _segments([td.factors[i][0].shape[1] for i in fi])
        g = S @ ((Bs.T @ Bs) * (As @ As.T)) @ S.T
        idx = torch.tensor(fi)
        G[idx[:, None], idx[None, :]] = g
    di = sorted(td.dense)
    for a, i in enumerate(di):
        D = td.dense[i]
        for j in fi:
            B, A = td.factors[j]
            G[i, j] = G[j, i] = float(((B.T @ D) * A).sum())
        for j in di[a:]:
            G[i, j] = G[j, i] = float((D * td.dense[j]).sum())
    return G.numpy()


@dataclass
class FactorGram:
    """G = VᵀV of T adapters (float64), from their factors; ``per_tensor`` when asked for."""

    names: list[str]
    G: np.ndarray
    per_tensor: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def norms(self) -> np.ndarray:
        """‖ΔW_t‖ of every adapter, from the Gram diagonal."""
        return np.sqrt(np.clip(np.diag(self.G), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        """The adapters' cosine similarity matrix, from the Gram matrix."""
        return cosine_from_gram(self.G)


def factor_gram(adapters: Mapping[str, AdapterLike], per_tensor: bool = False) -> FactorGram:
    """The T×T Gram of the adapters' task vectors, ⟨ΔW_i, ΔW_j⟩ summed over tensors, in float64 from the factors
    (r_i × r_j products only; dense deltas for tensors an adapter replaces whole). ``per_tensor``: keep each
    tensor's Gram too (they sum to G), e.g. for layer-wise methods."""
    names = list(adapters)
    if not names:
        raise ConfigError("factor_gram needs at least one adapter")
    sources = [as_source(a) for a in adapters.values()]
    G = np.zeros((len(names), len(names)))
    out = FactorGram(names, G)
    for td in iter_tensors(sources):
        g = tensor_gram(td, len(names))
        G += g
        if per_tensor:
            out.per_tensor[td.name] = g
    return out


__all__ = ["AdapterFactors", "AdapterLike", "FactorGram", "Source", "TensorDeltas", "as_source", "factor_gram",
           "iter_tensors", "open_adapters", "tensor_gram", "tensor_names"]
