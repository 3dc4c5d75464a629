"""``lowrank``: truncated SVD of the 2-D view, at a fixed ``rank``, at the smallest rank keeping ``energy``, or at
a ``fraction`` of the full rank.

With X = U·diag(σ)·Vᵀ (σ₁ ≥ σ₂ ≥ …), keeping r components gives the best rank-r approximation (Eckart–Young)
X̂ = Σ_{i≤r} σᵢuᵢvᵢᵀ with ‖X − X̂‖_F² = Σ_{i>r} σᵢ². Energy mode (TSV-C's form) picks the smallest r with
Σ_{i≤r} σᵢ² ≥ energy · Σᵢ σᵢ². Fraction mode keeps r = ⌊min(m, n) · fraction⌋ (TSV-C's 1/T of the singular
components; r may be 0: the tensor then decodes to zeros). A ``rank`` above min(m, n) is clamped to it.

Stored: ``us`` = (U_r·diag(σ_r))ᵀ, shape (r, m), and ``vt`` = V_rᵀ, shape (r, n), each row one component (so
group-wise quantisation by a chained codec never mixes components of very different size). Without a NEXT codec
they are float32 (bytes 4·r·(m + n)); with one (``lowrank:rank=8+int8``) each factor is an ``Encoded`` child
``us`` / ``vt`` of that codec. 0-d and 1-d tensors have no useful SVD: they go to the NEXT codec (float32 without
one) as child ``value`` and meta records ``fallback``.

Memory: the SVD needs the whole matrix plus its thin factors, about 3 times the tensor (float32, LAPACK via
``torch.linalg.svd``; deterministic, no randomness). It is not chunked.
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, as_matrix
from tvbasis.codecs.cast import Float32
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param
from tvbasis.errors import ConfigError

DEFAULT_RANK = 16


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σᵢ² ≥ energy·Σσᵢ² (sums in float64); 0 for a zero matrix."""
    e = sigma.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0)
    r = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=torch.float64, device=cum.device))) + 1
    return min(r, sigma.numel())


class LowRank(Codec):
    """Truncated SVD; factors raw float32 or through the NEXT codec."""

    name = "lowrank"
    params = (Param("rank", int, None, "an integer >= 1", lambda v: v >= 1, optional=True),
              Param("energy", float, None, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0, optional=True),
              Param("fraction", float, None, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0, optional=True))
    takes_next = True

    def _validate(self) -> None:
        given = [k for k in ("rank", "energy", "fraction") if self.values[k] is not None]
        if len(given) > 1:
            raise ConfigError(f"codec {self.name!r}: give one of rank, energy or fraction, not {' and '.join(given)}")
        if not given:
            self.values["rank"] = DEFAULT_RANK

    def _inner(self) -> Codec:
        return self.next if self.next is not None else Float32()

    def _encode(self, x: torch.Tensor) -> Encoded:
        if x.ndim < 2:
            inner = self._inner()
            return self._make(x, meta={"fallback": inner.spec}, children={"value": inner.encode(x)})
        m = as_matrix(x)
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        if self.values["energy"] is not None:
            r = energy_rank(S, float(self.values["energy"]))
        elif self.values["fraction"] is not None:
            r = int(S.numel() * float(self.values["fraction"]))  # as TSV-C's int(len(s) * (1 / T))
        else:
            r = min(int(self.values["rank"]), S.numel())
        e = S.double() ** 2
        total = float(e.sum())
        kept = float(e[:r].sum())
        us = (U[:, :r] * S[:r]).T.contiguous()
        vt = Vh[:r].clone()  # a copy, so the full Vh is not kept alive by a view
        del U, Vh
        meta = {"rank": r, "energy_kept": kept / total if total else 1.0,
                "rel_error": (max(total - kept, 0.0) / total) ** 0.5 if total else 0.0}
        if self.next is None:
            return self._make(x, {"us": us, "vt": vt}, meta)
        return self._make(x, meta=meta, children={"us": self.next.encode(us), "vt": self.next.encode(vt)})

    def factors(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decoded factors (P, Q) = (usᵀ (m × r), vt (r × n)), float32, with P·Q the decoded 2-D view; None for
        a 0-d/1-d tensor stored through the fallback (or an empty one)."""
        if enc.codec != self.spec:
            raise ConfigError(f"codec {self.spec!r}: cannot decode a tensor encoded with {enc.codec!r}")
        if "fallback" in enc.meta or enc.meta.get("empty"):
            return None
        if self.next is None:
            us, vt = enc.tensors["us"].float(), enc.tensors["vt"].float()
        else:
            us, vt = self.next.decode(enc.children["us"]), self.next.decode(enc.children["vt"])
        return us.T, vt

    def _decode(self, enc: Encoded) -> torch.Tensor:
        if "fallback" in enc.meta:
            return self._inner().decode(enc.children["value"])
        P, Q = self.factors(enc)  # type: ignore[misc]
        return P @ Q
