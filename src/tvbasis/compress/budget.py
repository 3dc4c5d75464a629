"""Rate–distortion allocation of one byte budget across the tasks and tensors of a store (``build --budget``).

Every (task, tensor) pair has a ladder of candidate codecs (``ladder``): low rank at many ranks with the factors
at 2, 4 or 8 bits, dense 2/4/8-bit quantisation and float16 for matrices; sparse rows, alone or low rank, for
embedding tables; Delta-CoMe's mixed precision over singular vectors (8/3/2 bits); 8/16-bit for biases and norms;
for a sparse matrix or table (a sparse fine-tune's), its largest entries kept at 2–8 bits or float16 (``sparse_ladder``). ``measure`` encodes the pair with each candidate and records
what it costs and what it loses: the bytes exactly — the stored tensors plus the bytes the entry adds to the
manifest's packed coded section (``entry_overhead``); the loss ‖x − x̂‖² exactly by decoding,
except for low-rank candidates with quantised factors, whose loss comes from one shared SVD and the factors'
rounding errors (``_lowrank_candidate``: exact up to second-order terms, at O(r(m + n)) instead of a decode's
O(m n r)). The build then records the exact error of what it stores.

``allocate`` then picks one candidate per pair. Its objective is the one the tool promises — *every* task back,
not the average: it minimises the largest relative error over tasks, ε = max_t ‖v_t − ṽ_t‖ / ‖v_t‖, under the byte
budget. Within a task the squared errors of its tensors add up to the task's, so for a given task the cheapest
way to reach an error is found on the lower convex hulls of each pair's (bytes, error) points, taking hull steps in
order of error removed per byte (the Lagrangian / equal-slope solution of rate–distortion theory); across tasks,
one common error target is searched by bisection so the per-task costs add up to the budget, and what is left is
spent step by step on the task that is then worst. A task whose delta is harder to compress gets more bytes;
a tensor that buys more error per byte gets more bits.

Data-free: the loss is the Frobenius error of the task vector, the same measure ``rel_errors`` reports. Equal
relative error *per tensor* (``auto:rel_error=…``) is not what this does: bytes go where they remove the most
error of the task as a whole.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from tvbasis.codecs import Codec, ColScale, Encoded, LowRank, MixedSVD, SparseRows, as_matrix, parse_codec
from tvbasis.codecs.base import sq_dist64, to_fp16
from tvbasis.codecs.cast import Float16
from tvbasis.codecs.quant import Int2, Int3, Int4, Int8
from tvbasis.codecs.topk import TopK, keep_count
from tvbasis.compress.kinds import tensor_kind
from tvbasis.compress.svd import Factors, KeptFactors, SVDCache, encode_with_svd
from tvbasis.errors import ConfigError
from tvbasis.io.specs import parse_size

#: ranks tried for a matrix's low-rank candidates (capped where dense quantisation is cheaper)
RANKS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192)
#: Delta-CoMe's mixed precision over singular vectors (codecs/mixed_svd.py): the leading triplets at 8 bits, the
#: next at 3, the tail at 2 — a few total ranks (2 + r3 + r2)
MIXED_SVD: tuple[str, ...] = ("mixed-svd:ranks=2/30/96,bits=8/3/2,group=64",)
#: how the low-rank factors (and dense matrices) are quantised, cheapest first (bits per value with the fp16
#: scale and offset of each group, measured: 3, 3.5, 4.25, 5, 8.125). int3/64 and int4/128 lie on the lower hull of (bytes,
#: error) of a MiniLM delta's rank/bits/group grid between the int2/32 and int4/32 points, 1–3 % less error at
#: equal bytes (benchmarks/results/frontier-budget/v3/README.md)
FACTOR_CODECS: tuple[str, ...] = ("int2:group=32,scheme=affine", "int3:group=64,scheme=affine",
                                  "int4:group=128,scheme=affine", "int4:group=32,scheme=affine",
                                  "int8:group=128,scheme=symmetric")
#: embedding tables: the rows a fine-tune touched, then these
EMBEDDING_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128)
VECTOR_LADDER: tuple[str, ...] = ("int8:group=128,scheme=symmetric", "float16")
#: a matrix or embedding table at most this dense (fraction of nonzero entries) also gets magnitude-sparse
#: candidates (``sparse_ladder``): a sparse fine-tune's task vector (diff pruning, ``finetune --sparse-diff``) is
#: full rank, so low rank cannot follow it, while ``topk`` keeps its support at ~10 bits per entry (varint gaps)
SPARSE_MAX_DENSITY = 0.25
#: fractions of a sparse tensor's nonzeros its candidates keep (the largest |x|)
SPARSE_KEEP: tuple[float, ...] = (1.0, 0.5, 0.25)
#: how the kept values are coded: 2, 3, 4 or 8 bits, or float16 ('')
SPARSE_VALUE_CODECS: tuple[str, ...] = ("int2:group=32,scheme=affine", "int3:group=64,scheme=affine",
                                        "int4:group=32,scheme=affine", "int8:group=128,scheme=symmetric", "")
#: one truncated SVD per (task, tensor) at this rank serves every low-rank candidate (and the chosen one's encode)
SVD_RANK = max(RANKS)

_RATIO_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*[x×]\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A byte budget: a compression ratio against float32 task vectors (``128x``) or a size (``20MB``)."""

    ratio: float | None = None
    nbytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"--budget: expected a ratio such as 128x or a size such as 20MB, got {text!r}")
        m = _RATIO_RE.match(text)
        if m:
            ratio = float(m.group(1))
            if not math.isfinite(ratio) or ratio < 1.0 or ratio > 1e6:
                raise ConfigError(f"--budget {text.strip()[:40]}: a ratio must lie in 1x .. 1000000x")
            return cls(ratio=ratio)
        try:
            return cls(nbytes=parse_size(text.strip()))
        except ConfigError:
            raise ConfigError(f"--budget: expected a ratio such as 128x or a size such as 20MB, got "
                              f"{text.strip()[:40]!r}") from None

    def target(self, fp32_bytes: int) -> int:
        """The budget in bytes for task vectors that take ``fp32_bytes`` as float32."""
        return int(fp32_bytes / self.ratio) if self.ratio is not None else int(self.nbytes or 0)

    @property
    def text(self) -> str:
        return f"{self.ratio:g}x" if self.ratio is not None else f"{self.nbytes}B"


def quality_to_error(quality: float) -> float:
    """``--quality Q`` (the fraction of every task vector's energy kept, 1 − ε²) as the relative error ε."""
    if not isinstance(quality, (int, float)) or not math.isfinite(quality) or not 0.0 < quality <= 1.0:
        raise ConfigError(f"--quality: expected a number in (0, 1], got {quality!r}")
    return math.sqrt(max(0.0, 1.0 - float(quality)))


# ----------------------------------------------------------------------------------------------- calibration
@dataclass
class TaskCalibration:
    """What one task's calibration text does inside its model (``tvbasis.eval.calibration.collect``):
    ``col_rms[tensor]`` the root mean square of each input feature of a linear layer (the column scales of
    ``colscale``), ``row_freq[tensor]`` how often each row of an embedding table is looked up (sums to 1),
    over ``tokens`` non-padding tokens of ``texts`` texts. Keys are tensor names (``matched`` renames them to a
    checkpoint's)."""

    col_rms: dict[str, torch.Tensor]
    row_freq: dict[str, torch.Tensor]
    tokens: int = 0
    texts: int = 0

    def matched(self, names: Sequence[str]) -> TaskCalibration:
        """The statistics keyed by the checkpoint's tensor ``names``: a key matches a name equal to it or one
        ending in ``.key`` (a model saved with a prefix such as ``bert.``), or the reverse; ambiguous or
        unmatched keys are dropped."""
        def rename(stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for n in names:
                hits = [k for k in stats if k == n or n.endswith("." + k) or k.endswith("." + n)]
                exact = [k for k in hits if k == n]
                if exact or len(hits) == 1:
                    out[n] = stats[(exact or hits)[0]]
            return out
        return TaskCalibration(rename(self.col_rms), rename(self.row_freq), self.tokens, self.texts)

    def weigh(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """How (task, ``name``)'s coding error counts: ``(scale, weight)`` with the loss ``weight · ‖(x − x̂)·
        diag(scale)‖²`` — the mean square output error per token it causes.

        A matrix with input statistics: its column scales (``colscale``'s stored form, root mean square 1) and
        the scales' mean square as weight. An embedding table with row frequencies: no scale, and as weight the
        mean lookup frequency of the rows the task changed (an error in a row perturbs only the tokens that look
        it up; frequencies smoothed by half a count so a changed row the text never uses still counts). Anything
        else (vectors: a norm's or bias's error adds to every token's output as it is): weight 1."""
        from tvbasis.codecs.colscale import stored_scale

        kind = tensor_kind(name, tuple(x.shape))
        if kind == "matrix" and name in self.col_rms and x.ndim >= 2:
            rms = self.col_rms[name].reshape(-1).float()
            cols = as_matrix(x).shape[1]
            if rms.numel() == cols and bool(torch.isfinite(rms).all()):
                w = float(rms.double().pow(2).mean())
                if w > 0:
                    return stored_scale(rms, cols), w
        if kind == "embedding" and name in self.row_freq:
            freq = self.row_freq[name].reshape(-1).double()
            m = as_matrix(x)
            if freq.numel() == m.shape[0]:
                touched = (m != 0).any(dim=1)
                k = int(touched.sum())
                if k:
                    n = max(self.tokens, 1)
                    p = (freq * n + 0.5) / (n + 0.5 * freq.numel())
                    return None, float(p[touched].sum()) / k
        return None, 1.0


# ------------------------------------------------------------------------------------------------ candidates
def ladder(name: str, shape: Sequence[int]) -> list[str]:
    """The candidate codec specs of one tensor (by its kind: see ``tvbasis.compress.kinds``)."""
    kind = tensor_kind(name, tuple(shape))
    if kind == "vector":
        return list(VECTOR_LADDER)
    rows = int(shape[0])
    cols = math.prod(int(s) for s in shape[1:])
    if kind == "embedding":
        out = [f"sparse-rows+{q}" for q in FACTOR_CODECS]
        out += [f"sparse-rows+lowrank:rank={r}+{q}" for r in EMBEDDING_RANKS if r < min(rows, cols)
                for q in FACTOR_CODECS[1:]]
        return out + ["sparse-rows+float16"]
    out = []
    for r in RANKS:
        if r * (rows + cols) >= rows * cols:  # no cheaper than the dense matrix at the same bits
            break
        out += [f"lowrank:rank={r}+{q}" for q in FACTOR_CODECS if r <= 32 or not q.startswith("int8")]
    out += [m for m, total in zip(MIXED_SVD, (128,)) if total * (rows + cols) < rows * cols]
    return out + list(FACTOR_CODECS) + ["float16"]


def _density_text(k: int, n: int) -> str:
    """The shortest decimal d with ⌈d·n⌉ = k (``topk``'s kept count), so exactly the k largest are kept: one more
    would keep a zero, which a quantiser of the values need not decode as 0."""
    lo, hi = Fraction(k - 1, n), Fraction(k, n)
    if hi == 1:
        return "1"
    digits = 1
    while Fraction(math.floor(hi * 10**digits), 10**digits) <= lo:
        digits += 1
    m = math.floor(hi * 10**digits)  # d = m / 10^digits, 0 < d < 1
    return ("0." + str(m).rjust(digits, "0")).rstrip("0")


def sparse_ladder(name: str, x: torch.Tensor) -> list[str]:
    """Magnitude-sparse candidates of a sparse matrix or embedding (at most ``SPARSE_MAX_DENSITY`` nonzero within
    the rows it touches, so a dense fine-tune's embedding table, whose touched rows are dense, gets none):
    ``topk`` keeping each fraction of ``SPARSE_KEEP`` of its nonzeros, values through each of
    ``SPARSE_VALUE_CODECS`` ('' = float16). None for a dense tensor, a vector or an empty one."""
    if tensor_kind(name, tuple(x.shape)) == "vector" or x.numel() == 0:
        return []
    n = x.numel()
    nnz = int(torch.count_nonzero(x))
    if nnz == 0 or nnz > SPARSE_MAX_DENSITY * n:  # dense over the whole tensor, so over its touched rows too
        return []
    nz = as_matrix(x) != 0
    # dense within the rows it touches (a dense fine-tune's embedding table): sparse rows win; no candidates
    if nnz > SPARSE_MAX_DENSITY * int(nz.any(dim=1).sum()) * nz.shape[1]:
        return []
    out = []
    for frac in SPARSE_KEEP:
        k = max(1, round(nnz * frac))
        if frac < 1 and k == nnz:
            continue
        density = _density_text(k, n)
        out += [f"topk:density={density}" + (f"+{q}" if q else "") for q in SPARSE_VALUE_CODECS]
    return out


#: how much zstd shrinks the JSON of a packed coded section (format version 3), measured at 34x on a 128x MiniLM
#: budget store (618 entries, 2183 stored tensors); taken a little low so the estimate errs towards more bytes
PACKED_JSON_RATIO = 30.0
#: compressed bytes of one stored tensor's XXH3-64 digest (16 hex digits: 8 bytes of entropy, measured 8.4)
PACKED_DIGEST_BYTES = 8.5


def entry_overhead(key: str, desc: Mapping[str, object], tensor_keys: Sequence[str]) -> int:
    """Bytes an entry adds besides its data: its JSON description and per stored tensor its line in the file
    listing ([key, dtype, shape, 16-hex digest]), both inside the manifest's packed coded section (zstd, then
    base64: the JSON shrinks ~30x, each digest stays ~8.5 bytes), and nothing in the coded file's header (one blob
    tensor per file). An estimate of a few tens of bytes; the store's size is measured after writing and the
    allocation corrected for the difference."""
    n = len(json.dumps({"file": "coded-00001-of-00001.safetensors", "encoded": desc}, separators=(",", ":")))
    n += len(key) + 8
    for t in tensor_keys:
        n += len(key) + 1 + len(t) + 48
    raw = n / PACKED_JSON_RATIO + PACKED_DIGEST_BYTES * len(tensor_keys)
    return math.ceil(raw * 4 / 3)


@dataclass
class Candidate:
    """One codec for one (task, tensor): exact stored bytes + overhead, exact squared error."""

    spec: str
    nbytes: int
    sqerr: float


#: elements per piece when a float16 candidate's error is summed (no whole-tensor decode is formed)
SQ_ERR_CHUNK = 1 << 22


def _sq_err(x: torch.Tensor, xhat: torch.Tensor) -> float:
    return sq_dist64(x.reshape(-1), xhat.reshape(-1).to(x.dtype))


#: the stored form of one codec on one shape, without its values: (spec, shape) -> an ``Encoded`` of zeros, whose
#: tensors have the sizes (and whose description the keys) of any encoding of that shape by that codec
_SHAPE_FORMS: dict[tuple[str, tuple[int, ...]], Encoded] = {}


#: forms of shapes up to this many elements are kept (a big table's forms would hold its codes: ~0.35 GB for the
#: five quantisers of a 32 000 × 4096 embedding, for the life of the process)
FORM_CACHE_ELEMENTS = 1 << 22


def _form(codec: Codec, shape: tuple[int, ...]) -> Encoded:
    key = (codec.spec, shape)
    if key in _SHAPE_FORMS:
        return _SHAPE_FORMS[key]
    if type(codec) is Float16:  # its form is one float16 tensor of the shape: a zero-stride view holds no memory
        form = Encoded(codec.spec, tuple(shape), {"value": torch.zeros((), dtype=torch.float16).expand(shape)}, {})
    else:
        form = codec.encode(torch.zeros(shape))
    if math.prod(shape) <= FORM_CACHE_ELEMENTS:
        if len(_SHAPE_FORMS) > 4096:
            _SHAPE_FORMS.clear()
        _SHAPE_FORMS[key] = form
    return form


def _fp16_sq_err(x: torch.Tensor) -> float:
    """A ``float16`` candidate's ‖x − decode(encode(x))‖² in float64, a piece at a time, without its decode (the
    same rounding and the same error past the float16 range as the codec)."""
    flat = x.reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), SQ_ERR_CHUNK):
        part = flat[i:i + SQ_ERR_CHUNK]
        d = to_fp16(part, Float16.name, "a value").to(torch.float32).sub_(part)
        total += float(torch.sum(d * d, dtype=torch.float64))
    return total


#: the grouped integer quantisers: ``roundtrip`` gives decode(encode(x)) without packing the codes
_QUANTS = (Int2, Int3, Int4, Int8)


def _row_aligned(codec: Codec, *row_lengths: int) -> bool:
    """Whether ``codec`` codes each row of an (r, L) factor on its own for every L given: a grouped integer
    quantiser whose groups divide every row length (no group straddles two rows), so the codes of the first r rows
    of a taller factor are the codes of those r rows alone."""
    return isinstance(codec, _QUANTS) and all(L % codec.group == 0 for L in row_lengths)


class _RowErrors:
    """Per-row squared rounding errors of the factors A = (U Σ)ᵀ and B = Vᵀ at the largest rank measured with
    one codec, so every lower rank's errors are prefix sums (``_row_aligned`` codecs only): one encode and decode
    per (tensor, codec) instead of one per rank."""

    def __init__(self, codecs: Sequence[Codec]) -> None:
        #: the largest rank each factor codec is asked for by the fixed-rank low-rank candidates
        self.max_rank: dict[str, int] = {}
        for c in codecs:
            if isinstance(c, LowRank) and c.values["rank"] is not None and c.next is not None:
                self.max_rank[c.next.spec] = max(self.max_rank.get(c.next.spec, 0), int(c.values["rank"]))
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, codec: Codec, rank: int, factors: Callable[[], tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rank`` rows' errors; ``factors()`` (A, B at the largest rank) is called only to code them."""
        have = self._rows.get(codec.spec)
        if have is None or have[0].numel() < rank:
            A, B = factors()
            assert isinstance(codec, _QUANTS)  # _row_aligned
            dA = codec.roundtrip(A) - A
            dB = codec.roundtrip(B) - B
            have = (torch.sum(dA * dA, dim=1, dtype=torch.float64), torch.sum(dB * dB, dim=1, dtype=torch.float64))
            self._rows[codec.spec] = have
        return have[0][:rank], have[1][:rank]


def _lowrank_candidate(codec: LowRank, x: torch.Tensor, key: str, cache: SVDCache,
                       rows: _RowErrors | None = None) -> tuple[Encoded, float]:
    """A fixed-rank ``lowrank:rank=r+NEXT`` candidate without forming X̂: its ``Encoded`` (as ``lowrank_encode``
    makes it) and its squared error from the factors alone. With X = U Σ Vᵀ, A = (U_r Σ_r)ᵀ and B = V_rᵀ stored
    through NEXT as Â, B̂: X − ÂᵀB̂ = (X − X_r) − ΔAᵀB − AᵀΔB − ΔAᵀΔB, where X − X_r is orthogonal to the other
    terms (its rows and columns are orthogonal to V_r and U_r), ‖ΔAᵀB‖ = ‖ΔA‖ (B's rows orthonormal) and
    ‖AᵀΔB‖² = Σ_i σ_i² ‖ΔB_i‖² (A's rows orthogonal), and ‖ΔAᵀΔB‖² ≈ Σ_i ‖ΔA_i‖²‖ΔB_i‖² (independent rounding
    errors; the cross terms between the rounding terms vanish in expectation). So ‖X − X̂‖² ≈ Σ_{i>r} σ_i² +
    Σ_i (‖ΔA_i‖² + σ_i²‖ΔB_i‖² + ‖ΔA_i‖²‖ΔB_i‖²) at O(r(m + n)) instead of a decode's O(m n r) — within a few %
    of the exact error on MiniLM's deltas even at 2 bits; the build records the exact error of what it stores.

    With ``rows`` and a row-aligned NEXT (``_row_aligned``), the factors are coded once at ``rows.max_rank`` (the
    largest rank measured with NEXT) and ‖ΔA_i‖², ‖ΔB_i‖² of the first r rows are read off (the same codes as
    coding r rows); the encoding's bytes and description come from NEXT's stored form of an (r, ·) factor."""
    m = x.reshape(x.shape[0], -1)
    r = min(int(codec.values["rank"]), min(m.shape))
    assert codec.next is not None
    shared = rows if rows is not None and _row_aligned(codec.next, m.shape[0], m.shape[1]) else None
    R = min(max(shared.max_rank.get(codec.next.spec, 0), r), min(m.shape)) if shared is not None else r
    u, sv, vh, s_all = cache.get(key, m, R)
    total, kept = cache.energy(key, r)
    meta = {"rank": r, "energy_kept": kept / total if total else 1.0,
            "rel_error": (max(total - kept, 0.0) / total) ** 0.5 if total else 0.0}
    if shared is not None:
        nA, nB = shared.get(codec.next, r, lambda: ((u * sv).T.contiguous(), vh.contiguous()))
        sv = sv[:r]
        ea, eb = _form(codec.next, (r, m.shape[0])), _form(codec.next, (r, m.shape[1]))
    else:
        A = (u * sv).T.contiguous()
        B = vh.contiguous()
        if isinstance(codec.next, _QUANTS):
            ea, eb = _form(codec.next, tuple(A.shape)), _form(codec.next, tuple(B.shape))
            dA, dB = codec.next.roundtrip(A) - A, codec.next.roundtrip(B) - B
        else:
            ea, eb = codec.next.encode(A), codec.next.encode(B)
            dA = codec.next.decode(ea).reshape(A.shape) - A
            dB = codec.next.decode(eb).reshape(B.shape) - B
        nA = torch.sum(dA * dA, dim=1, dtype=torch.float64)
        nB = torch.sum(dB * dB, dim=1, dtype=torch.float64)
    err = max(total - kept, 0.0) + float(nA.sum()) + float(((sv.double() ** 2) * nB).sum()) + float((nA * nB).sum())
    return Encoded(codec.spec, tuple(x.shape), {}, meta, {"us": ea, "vt": eb}), err


def measure(name: str, x: torch.Tensor, key: str, specs: Sequence[str] | None = None,
            svd: SVDCache | None = None, scale: torch.Tensor | None = None,
            keep: KeptFactors | None = None) -> list[Candidate]:
    """Every candidate of ``ladder(name, x.shape)`` and ``sparse_ladder(name, x)`` (or ``specs``) on one tensor
    ``x``: bytes and squared error.
    Low-rank candidates share one truncated SVD of ``x`` (``svd``, a fresh cache by default).

    ``scale``: calibration's column weights of a matrix (``codecs.colscale.stored_scale``: float16, root mean
    square 1). Then every candidate codes ``X·diag(s)`` inside ``colscale``: its spec is ``colscale+SPEC``, its
    bytes include the stored scale, and its error is the weighted one, ‖(X − X̂)·diag(s)‖² (the output error);
    the dense codecs are also measured unscaled, in the same weighted error.

    ``keep``: where the SVD of ``x`` is left under ``key`` for the write pass (``BudgetRule.kept``; unscaled only)."""
    specs = ladder(name, tuple(x.shape)) + sparse_ladder(name, x) if specs is None else specs
    codecs = [parse_codec(spec) for spec in specs]
    x = x.detach().float()
    wrap = None
    out = []
    if scale is not None and x.ndim >= 2 and x.numel():
        wrap = scale.reshape(-1)
        plain = x
        x = (as_matrix(x) * wrap.float()).reshape(x.shape)
        # a uniform quantiser of the scaled matrix sets its steps by the largest scaled values, so for dense codecs
        # the unscaled candidate (measured in the weighted error) stays on the ladder beside the scaled one
        for codec in codecs:
            if isinstance(codec, (LowRank, MixedSVD)):
                continue
            enc = codec.encode(plain)
            d = as_matrix(plain - codec.decode(enc).reshape(plain.shape)) * wrap.float()
            flat, desc = enc.to_tensors("")
            out.append(Candidate(codec.spec, enc.nbytes + entry_overhead(key, desc, list(flat)),
                                 float(torch.sum(d * d, dtype=torch.float64))))
    cache = svd or SVDCache(min_rank=SVD_RANK)
    split: tuple[torch.Tensor, torch.Tensor, dict[str, int]] | None = None  # sparse-rows: the kept rows, once
    rows = _RowErrors(codecs)
    ranked: tuple[torch.Tensor, float] | None = None  # topk: the nonzeros' positions by |x|, once
    for codec in codecs:
        if isinstance(codec, LowRank) and codec.values["rank"] is not None and codec.next is not None \
                and x.ndim >= 2 and x.numel():
            enc, err = _lowrank_candidate(codec, x, key, cache, rows)
        elif isinstance(codec, SparseRows) and wrap is None and x.ndim >= 2 and x.numel():
            if split is None:
                split = codec.split(x, copy=False)  # only measured here: a table every row of which changed is x
            enc, err = _sparse_rows_candidate(codec, x, key, cache, split)
        elif isinstance(codec, TopK) and x.numel():
            if ranked is None:
                ranked = _ranked_nonzeros(x)
            enc, err = _topk_candidate(codec, x, ranked)
        elif isinstance(codec, _QUANTS) and x.numel():
            # the error from decode(encode(x)) without packing the codes; the bytes from the shape's stored form
            enc, err = _form(codec, tuple(x.shape)), codec.sq_error(x)
        elif isinstance(codec, Float16) and x.numel():
            enc, err = _form(codec, tuple(x.shape)), _fp16_sq_err(x)
        else:
            enc = _encode(codec, x, key, cache)
            err = _sq_err(x, codec.decode(enc))
        if wrap is not None:
            enc = Encoded(f"{ColScale.name}+{enc.codec}", tuple(x.shape), {"scale": wrap}, {}, {"x": enc})
        flat, desc = enc.to_tensors("")
        nbytes = enc.nbytes + entry_overhead(key, desc, list(flat))
        out.append(Candidate(enc.codec, nbytes, err))
        del enc, flat
    if keep is not None and wrap is None:
        if (factors := cache.peek(key)) is not None:
            keep.offer(key, x, factors)
        if split is not None and (factors := cache.peek(f"{key}#rows")) is not None:
            keep.offer(f"{key}#rows", split[1], factors)  # the touched rows' SVD, for a sparse-rows+lowrank choice
    return out


def _ranked_nonzeros(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Positions of the nonzero entries of ``x`` (flattened) from the largest |x| down, and ‖x‖²."""
    flat = x.reshape(-1)
    nz = torch.nonzero(flat).reshape(-1)
    order = torch.argsort(flat[nz].abs(), descending=True, stable=True)
    return nz[order], float(torch.sum(flat.double() ** 2))


def _topk_candidate(codec: TopK, x: torch.Tensor, ranked: tuple[torch.Tensor, float]) -> tuple[Encoded, float]:
    """A ``topk`` candidate from the ranked nonzeros (no top-k over the whole tensor, no decode of it): the k
    largest |x| — among the nonzeros, the same set as ``codec.encode`` keeps up to ties, with zeros never kept — and
    the squared error exactly: the dropped entries' squares plus the kept values' coding error."""
    flat = x.reshape(-1)
    order, total = ranked
    k = min(keep_count(float(codec.values["density"]), flat.numel()), order.numel())
    index = torch.sort(order[:k]).values
    enc = codec.encode_at(x, index)
    kept = flat[index].double()
    dv = codec.decode_values(enc).double().reshape(-1) - kept
    return enc, max(total - float(torch.sum(kept * kept)), 0.0) + float(torch.sum(dv * dv))


def _sparse_rows_candidate(codec: SparseRows, x: torch.Tensor, key: str, cache: SVDCache,
                           split: tuple[torch.Tensor, torch.Tensor, dict[str, int]]) -> tuple[Encoded, float]:
    """A ``sparse-rows+NEXT`` candidate without coding or decoding the whole table: the rows are split once per
    tensor (``split``: ``SparseRows.split``) and only the kept rows are coded; the rows left out are zero in ``x``
    and in the decode, so the error is the kept rows' (a fixed-rank low-rank NEXT from one SVD of the kept rows, as
    ``_lowrank_candidate``). On a MiniLM word embedding (30 522 × 384, 783 rows touched) the 26 candidates took
    0.23–0.36 s each through encode/decode of the whole table."""
    index, kept, meta = split
    inner = codec.next
    if inner is None:
        return codec.assemble(x, index, meta, kept), 0.0
    if isinstance(inner, LowRank) and inner.values["rank"] is not None and inner.next is not None \
            and kept.numel():
        rows, err = _lowrank_candidate(inner, kept, f"{key}#rows", cache)
    elif isinstance(inner, _QUANTS) and kept.numel():  # the rows' error without coding them or decoding it
        rows, err = _form(inner, tuple(kept.shape)), inner.sq_error(kept)
    elif isinstance(inner, Float16) and kept.numel():
        rows, err = _form(inner, tuple(kept.shape)), _fp16_sq_err(kept)
    else:
        rows = inner.encode(kept)
        err = _sq_err(kept, inner.decode(rows))
    return codec.assemble(x, index, meta, rows), err


def _encode(codec: Codec, x: torch.Tensor, key: str, cache: SVDCache) -> Encoded:
    """``codec.encode(x)``, with low rank and Delta-CoMe's mixed precision taking their SVD from ``cache`` (one
    truncated SVD per pair for every candidate, and the same factors when the chosen one is written)."""
    if isinstance(codec, (LowRank, SparseRows)) and x.ndim >= 2:
        return encode_with_svd(codec, x, cache.source(key), cache.source(f"{key}#rows"))
    if isinstance(codec, MixedSVD) and x.ndim >= 2 and x.numel():
        m = as_matrix(x)
        # the cache returns every triplet asked for up to min(m, n): the leading ones encode_svd needs
        return codec.encode_svd(x, *cache.get(key, m, min(codec.total_rank, min(m.shape))))
    return codec.encode(x)


def encode_chosen(spec: str, x: torch.Tensor, scale: torch.Tensor | None = None,
                  factors: Factors | None = None, row_factors: Factors | None = None) -> Encoded:
    """The ``Encoded`` of one chosen candidate (what ``measure`` measured: same codec, same factors); a
    ``colscale+…`` spec needs the ``scale`` it was measured with. ``factors``: the truncated SVD of ``x`` the
    measuring pass computed (``KeptFactors``), used instead of computing it again; ``row_factors`` the same for
    the rows a ``sparse-rows+lowrank`` candidate keeps."""
    codec = parse_codec(spec)
    x = x.detach().float()
    if isinstance(codec, ColScale):
        if scale is None:
            raise ConfigError(f"codec {spec[:60]!r} needs the calibration scale it was chosen with")
        assert codec.next is not None
        inner = _encode(codec.next, (as_matrix(x) * scale.reshape(-1).float()).reshape(x.shape), "chosen",
                        SVDCache(min_rank=SVD_RANK))
        return Encoded(codec.spec, tuple(x.shape), {"scale": scale.reshape(-1).to(torch.float16)}, {},
                       {"x": inner})
    cache = SVDCache(min_rank=SVD_RANK)
    if factors is not None:
        cache.put("chosen", factors)
    if row_factors is not None:
        cache.put("chosen#rows", row_factors)
    return _encode(codec, x, "chosen", cache)


# ------------------------------------------------------------------------------------------------ allocation
@dataclass
class _Path:
    """One task's cheapest way to each error: hull steps of all its tensors, in order of error per byte."""

    base_bytes: int
    base_err: float
    bytes: np.ndarray        # cumulative bytes after k steps (k = 0 .. K)
    err: np.ndarray          # cumulative squared error after k steps
    steps: list[tuple[str, int]]  # (tensor, candidate index) taken at step k (k = 1 .. K)
    start: dict[str, int]    # tensor -> index of its cheapest candidate


def _hull(cands: Sequence[Candidate]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), bytes ascending, error strictly descending."""
    order = sorted(range(len(cands)), key=lambda i: (cands[i].nbytes, cands[i].sqerr))
    pts: list[int] = []
    for i in order:
        if pts and cands[i].sqerr >= cands[pts[-1]].sqerr:
            continue  # dominated: costs at least as much, loses at least as much
        while len(pts) >= 2:
            a, b = cands[pts[-2]], cands[pts[-1]]
            c = cands[i]
            # b lies on or above the segment a–c: drop it
            if (b.sqerr - a.sqerr) * (c.nbytes - a.nbytes) >= (c.sqerr - a.sqerr) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def _task_path(items: Mapping[str, Sequence[Candidate]]) -> _Path:
    steps: list[tuple[float, int, str, int, int, float]] = []
    base_b, base_e = 0, 0.0
    start = {}
    for seq, (tensor, cands) in enumerate(items.items()):
        hull = _hull(cands)
        start[tensor] = hull[0]
        base_b += cands[hull[0]].nbytes
        base_e += cands[hull[0]].sqerr
        for a, b in zip(hull, hull[1:]):
            db = cands[b].nbytes - cands[a].nbytes
            de = cands[a].sqerr - cands[b].sqerr
            steps.append((-(de / db), seq, tensor, b, db, de))
    steps.sort(key=lambda s: (s[0], s[1]))  # steepest first; hull slopes fall within a tensor, so order holds
    nb = np.concatenate([[base_b], base_b + np.cumsum([s[4] for s in steps], dtype=np.float64)])
    ne = np.concatenate([[base_e], base_e - np.cumsum([s[5] for s in steps], dtype=np.float64)])
    return _Path(base_b, base_e, nb, np.clip(ne, 0.0, None), [(s[2], s[3]) for s in steps], start)


@dataclass
class Allocation:
    """The chosen codec per (task, tensor), and what the allocation predicts for each task."""

    specs: dict[str, dict[str, str]]
    task_bytes: dict[str, int]
    rel_errors: dict[str, float]
    #: the common relative-error target every task was brought to (before the leftover bytes were spent)
    target_error: float
    budget_bytes: int | None
    feasible: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.task_bytes.values())

    def summary(self) -> dict[str, object]:
        """Per task: bytes, predicted relative error, and how many tensors got each codec family."""
        out: dict[str, object] = {}
        for t, specs in self.specs.items():
            fam: dict[str, int] = {}
            for s in specs.values():
                f = _family(s)
                fam[f] = fam.get(f, 0) + 1
            out[t] = {"bytes": self.task_bytes[t], "rel_error": self.rel_errors[t], "codecs": fam}
        return out


def _family(spec: str) -> str:
    """A short name of a codec spec: 'lowrank r16 int4', 'int2', 'sparse-rows lowrank r64 int4' ..."""
    parts = []
    for part in spec.split("+"):
        name, _, kv = part.partition(":")
        if name == "lowrank":
            rank = dict(p.split("=") for p in kv.split(",") if "=" in p).get("rank")
            parts.append(f"lowrank r{rank}")
        else:
            parts.append(name)
    return " ".join(parts)


def weighted(cands: Mapping[str, Mapping[str, Sequence[Candidate]]], weights: Mapping[str, Mapping[str, float]],
             norms2_by_tensor: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, dict[str, list[Candidate]]],
                                                                           dict[str, float]]:
    """The candidates with each (task, tensor)'s squared error times its weight, and each task's weighted ‖v_t‖²
    (the loss ``allocate`` then equalises is Σ_i w_i ‖x_i − x̂_i‖² / Σ_i w_i ‖x_i‖²)."""
    out = {t: {n: [Candidate(c.spec, c.nbytes, c.sqerr * weights[t][n]) for c in per] for n, per in cands[t].items()}
           for t in cands}
    n2 = {t: sum(weights[t][n] * norms2_by_tensor[t][n] for n in cands[t]) for t in cands}
    return out, n2


#: the exponent b of a one-point damage curve a·ε^b: the median of the secant exponents measured between the
#: probe's first two rounds on MiniLM's 6 default tasks at 64/128/256x (1.6–4.5, median 3.3;
#: benchmarks/results/frontier-budget/probed); with b = 1 the first re-allocation overshot at every budget
DAMAGE_PRIOR_EXPONENT = 3.0


def fit_damage(points: Sequence[tuple[float, float]], exponent: float = DAMAGE_PRIOR_EXPONENT,
               bounds: tuple[float, float] = (0.5, 4.0)) -> tuple[float, float]:
    """A task's damage curve ``d(ε) = a·ε^b`` through its measured ``(relative error, damage)`` points: through the
    last point with ``b = exponent`` when it is the only one (or the last two share ε), else the power law
    through the last two, ``b`` clamped to ``bounds`` (a secant step in log–log space). Returns ``(a, b)``."""
    pts = [(float(e), float(d)) for e, d in points if e > 0 and d > 0 and math.isfinite(e) and math.isfinite(d)]
    if not pts:
        raise ValueError("fit_damage: no point with a positive error and damage")
    e2, d2 = pts[-1]
    b = float(exponent)
    if len(pts) >= 2:
        e1, d1 = pts[-2]
        if abs(math.log(e2 / e1)) > 1e-3:
            b = min(max(math.log(d2 / d1) / math.log(e2 / e1), bounds[0]), bounds[1])
    return d2 / e2 ** b, b


def allocate(cands: Mapping[str, Mapping[str, Sequence[Candidate]]], norms2: Mapping[str, float],
             budget_bytes: int | None = None, max_error: float | None = None,
             damage: Mapping[str, tuple[float, float]] | None = None) -> Allocation:
    """One candidate per (task, tensor): the smallest largest-relative-error under ``budget_bytes`` (then the
    leftover bytes spent on whichever task is worst), or — with ``max_error`` instead — the fewest bytes with
    every task's relative error ≤ ``max_error``. ``cands[task][tensor]`` from ``measure``; ``norms2`` ‖v_t‖²
    (for a weighted loss, both from ``weighted``).

    ``damage`` (with ``budget_bytes``): per task a curve ``(a, b)`` predicting what a relative error ε costs it,
    ``a·ε^b`` (``fit_damage``); the allocation then minimises the largest predicted damage instead of the largest
    relative error — every task brought to the same damage D, i.e. to ε_t = (D / a_t)^(1/b_t)."""
    if (budget_bytes is None) == (max_error is None):
        raise ValueError("allocate: give exactly one of budget_bytes and max_error")
    tasks = list(cands)
    if damage is not None:
        if budget_bytes is None:
            raise ValueError("allocate: damage curves need budget_bytes")
        if set(damage) != set(tasks) or any(not (a > 0 and b > 0) for a, b in damage.values()):
            raise ValueError("allocate: one damage curve (a > 0, b > 0) per task")
    paths = {t: _task_path(cands[t]) for t in tasks}
    n2 = {t: max(float(norms2[t]), 1e-300) for t in tasks}

    def eps_at(t: str, level: float) -> float:
        """Task t's relative error at common level ``level``: ε itself, or ε_t(D) for a damage level D."""
        if damage is None:
            return level
        a, b = damage[t]
        return (level / a) ** (1.0 / b)

    def badness(t: str, k_t: int) -> float:
        """What the allocation equalises, at step k_t of task t's path."""
        eps2 = paths[t].err[k_t] / n2[t]
        if damage is None:
            return float(eps2)
        a, b = damage[t]
        return a * math.sqrt(max(float(eps2), 0.0)) ** b

    def cost(t: str, eps: float) -> int:
        """Steps task t needs to reach relative error eps (the whole path if it cannot)."""
        p = paths[t]
        below = np.nonzero(p.err <= eps * eps * n2[t])[0]
        return int(below[0]) if below.size else len(p.err) - 1

    notes: list[str] = []
    feasible = True
    if max_error is not None:
        k = {t: cost(t, max_error) for t in tasks}
        target = max_error
        if any(paths[t].err[k[t]] > max_error ** 2 * n2[t] * (1 + 1e-9) for t in tasks):
            feasible = False
            notes.append(f"no candidate reaches relative error {max_error:.4g} on every task; each task takes "
                         "its most accurate candidates")
    else:
        assert budget_bytes is not None
        floor = sum(p.base_bytes for p in paths.values())
        if floor > budget_bytes:
            feasible = False
            notes.append(f"the budget ({budget_bytes} B) is below the cheapest candidate of every tensor "
                         f"({floor} B)")
            k = {t: 0 for t in tasks}
            target = max(math.sqrt(paths[t].err[0] / n2[t]) for t in tasks)
        else:
            worst0 = max(math.sqrt(paths[t].err[0] / n2[t]) for t in tasks) + 1e-12
            lo, hi = 0.0, (worst0 if damage is None else max(a * worst0 ** b for a, b in damage.values()))

            def spend(level: float) -> int:
                return sum(int(paths[t].bytes[cost(t, eps_at(t, level))]) for t in tasks)

            if spend(lo) <= budget_bytes:
                hi = lo
            for _ in range(100):
                if hi - lo <= 1e-7 * max(hi, 1e-12):
                    break
                mid = 0.5 * (lo + hi)
                if spend(mid) <= budget_bytes:
                    hi = mid
                else:
                    lo = mid
            target = max(eps_at(t, hi) for t in tasks)
            k = {t: cost(t, eps_at(t, hi)) for t in tasks}
            # the leftover bytes: always advance the task that is now worst, while its next step fits
            used = sum(int(paths[t].bytes[k[t]]) for t in tasks)
            blocked: set[str] = set()
            while len(blocked) < len(tasks):
                t = max((u for u in tasks if u not in blocked), key=lambda u: badness(u, k[u]))
                p = paths[t]
                if k[t] + 1 >= len(p.bytes):
                    blocked.add(t)
                    continue
                step = int(p.bytes[k[t] + 1] - p.bytes[k[t]])
                if used + step > budget_bytes:
                    blocked.add(t)
                    continue
                k[t] += 1
                used += step
    specs: dict[str, dict[str, str]] = {}
    for t in tasks:
        p = paths[t]
        choice = dict(p.start)
        for tensor, idx in p.steps[:k[t]]:
            choice[tensor] = idx
        specs[t] = {name: cands[t][name][i].spec for name, i in choice.items()}
    return Allocation(specs=specs, task_bytes={t: int(paths[t].bytes[k[t]]) for t in tasks},
                      rel_errors={t: math.sqrt(float(paths[t].err[k[t]]) / n2[t]) for t in tasks},
                      target_error=float(target), budget_bytes=budget_bytes, feasible=feasible, notes=notes)



# ---------------------------------------------------------------------------------------------------- the coder
_RULE_RE = re.compile(r"^budget:error=([0-9.eE+-]+),target=([0-9A-Za-z.]+)$")


@dataclass
class BudgetRule:
    """How a ``--budget`` store codes each (task, tensor): the allocated codec (``assigned[task][tensor]``), and for
    a task added later (``add-task``, no allocation) the cheapest ladder codec with relative error ≤ ``error`` on
    each of its tensors — so the new task keeps the error every task of the store was brought to (a per-tensor
    bound, which costs more bytes than an allocation over the whole task would).

    Recorded in the store's manifest as ``budget:error=ε,target=T`` (``coded.residual_codec``); the codec each
    entry actually got is recorded with the entry."""

    error: float
    target: str
    assigned: dict[str, dict[str, str]] | None = None
    #: calibration's column scales (``scales[task][tensor]``) of the entries allocated a ``colscale+…`` codec
    scales: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    #: the measuring pass's SVDs (keys ``residual/<tensor>/<task>``), reused where the matrix is the same
    kept: KeptFactors | None = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> str:
        return f"budget:error={self.error:.6g},target={self.target}"

    @classmethod
    def parse(cls, text: str) -> BudgetRule:
        m = _RULE_RE.match(text.strip())
        if not m:
            raise ConfigError(f"not a budget coder spec (budget:error=E,target=T): {text.strip()[:80]!r}")
        try:
            error = float(m.group(1))
        except ValueError:
            raise ConfigError(f"budget coder: error {m.group(1)[:40]!r} is not a number") from None
        if not math.isfinite(error) or error < 0:
            raise ConfigError(f"budget coder: error must be a finite number >= 0, got {m.group(1)[:40]!r}")
        return cls(error, m.group(2))

    def encode(self, name: str, x: torch.Tensor, task: str | None = None) -> Encoded:
        if self.assigned is not None and task is not None:
            try:
                spec = self.assigned[task][name]
            except KeyError:
                raise ConfigError(f"budget coder: no codec allocated for task {task!r}, tensor {name!r}") from None
            scale = (self.scales or {}).get(task, {}).get(name)
            key = f"residual/{name}/{task}"
            factors = row_factors = None
            if self.kept is not None and scale is None:
                factors = self.kept.get(key, x)
                if spec.startswith(f"{SparseRows.name}+{LowRank.name}:") and x.ndim >= 2:
                    row_factors = self.kept.get(f"{key}#rows", SparseRows().split(x, copy=False)[1])
            return encode_chosen(spec, x, scale, factors, row_factors)
        cands = measure(name, x, f"residual/{name}/new")
        limit = (self.error ** 2) * float((x.double() ** 2).sum())
        ok = [c for c in cands if c.sqerr <= limit]
        best = min(ok, key=lambda c: (c.nbytes, c.sqerr)) if ok else min(cands, key=lambda c: (c.sqerr, c.nbytes))
        return encode_chosen(best.spec, x)
