"""LoRA adapters as coded entries, and the factor-space arithmetic on them: nothing of size rows × cols is formed.

A *term* is one task's ΔW of one tensor in the form it is held: ``(P, Q)`` factors with ΔW.reshape(rows, -1) = P·Q,
a dense 2-D ΔW, or None (zero). Inner products and squared errors of terms use r × r products only:
⟨P₁Q₁, P₂Q₂⟩ = Σ (P₁ᵀP₂) ∘ (Q₁Q₂ᵀ), ⟨PQ, D⟩ = Σ (PᵀD) ∘ Q, and ‖P₁Q₁ − P₂Q₂‖² = ‖XY‖² with X = [P₁, −P₂],
Y = [Q₁; Q₂] (float64; no cancellation of the two squared norms).

Entries: an adapter's own factors are a ``lowrank`` ``Encoded`` (``us`` = (s·B)ᵀ, ``vt`` = A, meta ``rank``, its PEFT
``layout``; through a NEXT codec when given) — no SVD; a tensor it replaces whole is a ``float32`` one; a tensor it
leaves alone has no entry (codec ``none``). ``project`` puts a new adapter's factors on a joint store's shared
bases: the least-squares core (Uᵀ U)⁺ Uᵀ B A V (Vᵀ V)⁺ (diagonal cores: the least-squares σ) with its exact error.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tvbasis.codecs import Codec, Encoded, Float32, LowRank
from tvbasis.io import Checkpoint, TensorSpec
from tvbasis.io.checksum import chunk_digests
from tvbasis.store.coded import CodedData

f64 = torch.float64
Factors = tuple[torch.Tensor, torch.Tensor]
Term = Factors | torch.Tensor | None


def _m(x: torch.Tensor) -> torch.Tensor:
    return x.to(f64)


def inner(x: Term, y: Term) -> float:
    """⟨x, y⟩ of two terms of one tensor (float64, from the factors)."""
    if x is None or y is None:
        return 0.0
    if isinstance(x, tuple) and isinstance(y, tuple):
        return float(((_m(x[0]).T @ _m(y[0])) * (_m(x[1]) @ _m(y[1]).T)).sum())
    if isinstance(x, tuple) or isinstance(y, tuple):
        (P, Q), D = (x, y) if isinstance(x, tuple) else (y, x)  # type: ignore[misc]
        return float(((_m(P).T @ _m(D)) * _m(Q)).sum())
    return float((_m(x) * _m(y)).sum())


def sq_error(x: Term, y: Term) -> float:
    """‖x − y‖² of two terms (both factors: ‖[P₁, −P₂]·[Q₁; Q₂]‖², so an exact match gives 0 up to rounding)."""
    if isinstance(x, tuple) and isinstance(y, tuple):
        X = torch.cat([_m(x[0]), -_m(y[0])], dim=1)
        Y = torch.cat([_m(x[1]), _m(y[1])], dim=0)
        return max(inner((X, Y), (X, Y)), 0.0)
    if x is None or y is None or isinstance(x, tuple) or isinstance(y, tuple):
        return max(inner(x, x) - 2.0 * inner(x, y) + inner(y, y), 0.0)
    return float((_m(x) - _m(y)).square().sum())


def factor_entry(B: torch.Tensor, A: torch.Tensor, shape: tuple[int, ...], next_codec: Codec | None,
                 layout: str | None) -> tuple[Encoded, float]:
    """An adapter's factors (B = s·B_peft (rows × r), A (r × cols)) as a ``lowrank`` entry of rank r, and the
    squared error of what it stores (0 for float32 factors without a NEXT codec)."""
    r = B.shape[1]
    codec = LowRank(next=next_codec, rank=r)
    us, vt = B.T.to(torch.float32).contiguous(), A.to(torch.float32).contiguous()
    meta: dict[str, object] = {"rank": r, "source": "lora factors"}
    if layout is not None:
        meta["layout"] = layout
    if next_codec is None:
        enc = Encoded(codec.spec, tuple(shape), {"us": us, "vt": vt}, meta)
    else:
        enc = Encoded(codec.spec, tuple(shape), {}, meta, {"us": next_codec.encode(us),
                                                             "vt": next_codec.encode(vt)})
    stored = codec.factors(enc)
    assert stored is not None
    exact = next_codec is None and torch.equal(us.to(B.dtype).T, B) and torch.equal(vt.to(A.dtype), A)
    return enc, 0.0 if exact else sq_error((B, A), stored)


def dense_entry(D: torch.Tensor, shape: tuple[int, ...]) -> tuple[Encoded, float]:
    """A tensor replaced whole: ΔW in float32, and the squared error of the cast."""
    enc = Float32().encode(D.reshape(shape).to(torch.float32))
    return enc, float((enc.tensors["value"].to(f64).reshape(D.shape) - _m(D)).square().sum())


def project(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
            diagonal: bool) -> tuple[torch.Tensor, float]:
    """The core (float32, k_out × k_in, or k for ``diagonal``) of B·A on the shared bases U, V that minimises
    ‖B·A − U Σ Vᵀ‖, and that squared error for the stored (float32) core."""
    B, A, U, V = _m(B), _m(A), _m(U), _m(V)
    L, R = U.T @ B, A @ V  # Uᵀ ΔW V = L·R
    if diagonal:
        g = (L * R.T).sum(1)  # diag(Uᵀ ΔW V)
        core = (torch.linalg.pinv((U.T @ U) * (V.T @ V)) @ g).to(torch.float32)
        P = U * core.to(f64)
    else:
        core = (torch.linalg.pinv(U.T @ U) @ L @ R @ torch.linalg.pinv(V.T @ V)).to(torch.float32)
        P = U @ core.to(f64)
    return core, sq_error((B, A), (P, V.T))


def stored_term(coded: CodedData, key: str, spec: TensorSpec) -> Term:
    """What entry ``key`` of a store gives back, as a term (factors where it is a low-rank product)."""
    f = coded.factors(key)
    if f is not None:
        return f
    if coded.codec_of(key) == "none":
        return None
    rows = spec.shape[0] if spec.shape else 1
    return coded.decode(key).reshape(rows, -1)


def pretrained_digests(pre: Checkpoint, specs: Iterable[TensorSpec], chunk_elements: int) -> list[tuple[str, bytes]]:
    """The per-chunk digests of the pretrained tensors a store covers, chunked as the Gram pass (and ``apply``)
    chunk them: ``combine_digests`` of them is the store's ``pretrained.checksum``."""
    out: list[tuple[str, bytes]] = []
    for s in specs:
        out.extend(chunk_digests(s, pre.get(s.name), chunk_elements))
    return out
