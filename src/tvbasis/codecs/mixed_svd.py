"""``mixed-svd``: Delta-CoMe's mixed-precision low rank (Ping et al., NeurIPS 2024, arXiv 2406.08903).

X = U·diag(σ)·Vᵀ (thin SVD of the 2-D view, σ₁ ≥ σ₂ ≥ …). The singular triplets are cut into consecutive blocks of
``ranks`` (e.g. ``2/32/40``) coded at ``bits`` (e.g. ``8/3/2``): the leading singular vectors at high precision,
the long tail at low precision, and everything after the last block dropped. As the reference code
(``thunlp/Delta-CoMe``, ``llama.py``): σ is kept apart in float16 (neither factor absorbs it), and each block's
U_k (m × r_k) and V_kᵀ (r_k × n) are quantised as two linear layers whose weights are U_k and V_kᵀ — per output
channel, in groups of ``group`` along the input (so V_kᵀ is grouped along each singular vector, U_k along the r_k
components of each row: a block narrower than ``group`` gets one group per row). x̂ = Σ_k Û_k·diag(σ_k)·V̂_kᵀ.

Data-free form: the reference quantises with GPTQ on calibration text (``--groupsize 128``, asymmetric); here each
group is rounded to nearest (``int8`` … ``int2`` of ``tvbasis.codecs.quant``, ``scheme=affine`` by default: a
float16 minimum and scale per group), since tvbasis has no calibration data at build time. A bit width of 16
keeps that block in float16 (the reference's ``fp16_col``).

The reference's setting for a 4096 × 4096 LLaMA matrix is 2 / 32 / 968 triplets at 8 / 3 / 2 bits: Σ_k b_k·r_k·
(m + n) = 1/16 of the float16 delta's bits (``tvbasis.compress.deltacome`` scales it to any shape).

Stored: ``s`` (float16, the r kept singular values) and per block k children ``u{k}`` and ``v{k}`` (the quantised
factors). Bytes: 2·r + Σ_k (codes and group parameters of U_k and V_kᵀ); ``Encoded.nbytes`` counts them all.
0-d and 1-d tensors have no useful SVD: they are stored as float16 (child ``value``, meta ``fallback``).
Memory: the SVD needs the whole matrix and its thin factors, about 3 times the tensor; it is not chunked.
"""

from __future__ import annotations

import torch

from tvbasis.codecs.base import Codec, as_matrix, expect_numel, to_fp16
from tvbasis.codecs.cast import Float16
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.params import Param
from tvbasis.codecs.quant import SCHEMES, Int2, Int3, Int4, Int8
from tvbasis.errors import ConfigError

#: bit widths a block may take: group-wise integer codes, or 16 (float16)
BLOCK_BITS = (2, 3, 4, 8, 16)
_QUANT = {8: Int8, 4: Int4, 3: Int3, 2: Int2}


def parse_levels(text: str, what: str, codec: str) -> list[int]:
    """``"2/32/40"`` -> [2, 32, 40]; ConfigError naming the codec and parameter."""
    parts = [p.strip() for p in str(text).split("/")]
    if not parts or not all(p.isdigit() for p in parts):
        raise ConfigError(f"codec {codec!r}: parameter {what!r} must be integers separated by '/', got {text!r}")
    return [int(p) for p in parts]


def block_codec(bits: int, group: int, scheme: str) -> Codec:
    """The codec of one factor block: ``int{bits}:group=…,scheme=…``, or float16 for 16 bits."""
    if bits == 16:
        return Float16()
    return _QUANT[bits](group=group, scheme=scheme)


def split_ranks(ranks: list[int], available: int) -> list[int]:
    """Each block's rank, cut where the matrix runs out of singular triplets (later blocks may get 0)."""
    out, left = [], available
    for r in ranks:
        take = min(r, left)
        out.append(take)
        left -= take
    return out


class MixedSVD(Codec):
    """Singular triplets in blocks of decreasing precision; σ in float16; the tail dropped."""

    name = "mixed-svd"
    params = (Param("ranks", str, "2/32/40", "ranks per block, e.g. 2/32/40"),
              Param("bits", str, "8/3/2", "bits per block (2, 3, 4, 8 or 16), e.g. 8/3/2"),
              Param("group", int, 128, "an integer >= 1", lambda v: v >= 1),
              Param("scheme", str, "affine", choices=SCHEMES))

    def _validate(self) -> None:
        ranks = parse_levels(self.values["ranks"], "ranks", self.name)
        bits = parse_levels(self.values["bits"], "bits", self.name)
        if len(ranks) != len(bits):
            raise ConfigError(f"codec {self.name!r}: ranks {self.values['ranks']!r} and bits {self.values['bits']!r} "
                              "need one entry per block each")
        bad = [b for b in bits if b not in BLOCK_BITS]
        if bad:
            raise ConfigError(f"codec {self.name!r}: bits must each be one of {BLOCK_BITS}, got {bad[0]}")
        self.values["ranks"] = "/".join(str(r) for r in ranks)  # canonical text
        self.values["bits"] = "/".join(str(b) for b in bits)

    @property
    def ranks(self) -> list[int]:
        """Rank of each singular-triplet block, in order (the ``ranks`` parameter, e.g. 2/32/40 -> [2, 32, 40])."""
        return [int(r) for r in self.values["ranks"].split("/")]

    @property
    def bits(self) -> list[int]:
        """Bits of each block's factors, in order (the ``bits`` parameter, e.g. 8/3/2 -> [8, 3, 2])."""
        return [int(b) for b in self.values["bits"].split("/")]

    def _codecs(self, blocks: list[int]) -> list[tuple[Codec, Codec]]:
        """(codec of U_k, codec of V_kᵀ) per block: U_k grouped along its r_k columns (one group per row when
        r_k ≤ group), V_kᵀ along its n columns."""
        group, scheme = int(self.values["group"]), str(self.values["scheme"])
        return [(block_codec(b, min(group, max(r, 1)), scheme), block_codec(b, group, scheme))
                for r, b in zip(blocks, self.bits, strict=True)]

    def _encode(self, x: torch.Tensor) -> Encoded:
        if x.ndim < 2:
            inner = Float16()
            return self._make(x, meta={"fallback": inner.spec}, children={"value": inner.encode(x)})
        m = as_matrix(x)
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return self.encode_svd(x, U, S, Vh, S)

    @property
    def total_rank(self) -> int:
        """Σ of the blocks' ranks: the leading triplets ``encode_svd`` needs."""
        return sum(self.ranks)

    def encode_svd(self, x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                   s_all: torch.Tensor) -> Encoded:
        """``encode`` of a 2-D-viewable ``x`` from its SVD computed elsewhere (a budget build's shared truncated
        SVD): U, S, Vh the leading triplets — at least ``total_rank`` of them, or all — and ``s_all`` singular values
        whose squares sum to ‖x‖² (all of them, or the leading ones and a tail term)."""
        blocks = split_ranks(self.ranks, S.numel())
        r = sum(blocks)
        s16 = to_fp16(S[:r], self.name, "a singular value")
        children: dict[str, Encoded] = {}
        a = 0
        for k, (rk, (cu, cv)) in enumerate(zip(blocks, self._codecs(blocks), strict=True)):
            if rk:
                children[f"u{k}"] = cu.encode(U[:, a:a + rk].contiguous())
                children[f"v{k}"] = cv.encode(Vh[a:a + rk].contiguous())
            a += rk
        e = s_all.double() ** 2
        total = float(e.sum())
        meta = {"blocks": blocks, "rel_error_truncation": (max(total - float(e[:r].sum()), 0.0) / total) ** 0.5
                if total else 0.0}
        return self._make(x, {"s": s16}, meta, children)

    def _decode(self, enc: Encoded) -> torch.Tensor:
        if "fallback" in enc.meta:
            return Float16().decode(enc.children["value"])
        shape = enc.shape
        rows = shape[0]
        cols = enc.numel // rows
        try:
            blocks = [int(b) for b in enc.meta["blocks"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"codec {self.spec!r}: the encoding records no valid 'blocks'") from None
        if len(blocks) != len(self.ranks) or any(b < 0 or b > r for b, r in zip(blocks, self.ranks, strict=True)):
            raise ValueError(f"codec {self.spec!r}: recorded blocks {blocks} do not fit ranks {self.values['ranks']}")
        s = expect_numel(enc.tensors["s"], sum(blocks), self.name, "singular values").float()
        out = torch.zeros(rows, cols, dtype=torch.float32, device=s.device)
        a = 0
        for k, (rk, (cu, cv)) in enumerate(zip(blocks, self._codecs(blocks), strict=True)):
            if rk:
                u = cu.decode(enc.children[f"u{k}"]).reshape(rows, rk)
                v = cv.decode(enc.children[f"v{k}"]).reshape(rk, cols)
                out.addmm_(u * s[a:a + rk], v)
            a += rk
        return out
