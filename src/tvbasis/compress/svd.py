"""Truncated SVDs for the low-rank compressors, fast on CPUs, and shareable between them.

``truncated_svd(x, r)`` eigendecomposes the Gram matrix of the smaller side in float64 (X·Xᵀ when m ≤ n, else
Xᵀ·X): σᵢ² are its eigenvalues, and the other side's singular vectors follow as Xᵀuᵢ/σᵢ (or X·vᵢ/σᵢ). For the
leading components this is the SVD to float64 accuracy (the Gram squares the condition number; in float64 that
leaves ~8 significant digits down to σᵢ/σ₁ = 10⁻⁴, far past any rank a compressor keeps) and, for the
384 × 1536 matrices of MiniLM on two cores, about 5× faster than LAPACK's ``gesdd`` on the matrix itself.
Components with σᵢ = 0 get zero vectors (they carry nothing).

For large matrices at a small rank (smaller side ≥ ``RANDOMIZED_MIN_SIDE`` and r + oversampling ≤ that side / 10,
e.g. rank 16–64 of Llama's 4096 × 11008 MLP matrices) ``truncated_svd`` uses a randomized SVD instead (Halko,
Martinsson & Tropp 2011, Alg. 4.4, the algorithm of ``torch.svd_lowrank``, with a seeded Gaussian sketch so builds
stay deterministic): a sketch of q = r + ``OVERSAMPLE`` columns, ``POWER_ITERATIONS`` power iterations with
re-orthonormalisation, then the exact SVD of the small q × n projection. It costs O(m·n·q) instead of the Gram's
O(m·n·k + k³). Its rank-r error is accepted because tests/test_svd_randomized.py measures it at ≤ 1.02× the exact
truncated SVD's on Gaussian, low-rank-plus-noise and power-law spectra at these shapes; outside the gate (small
matrices, ranks near the full rank) the exact path runs. The returned spectrum is then the q leading singular
values followed by one entry √(‖X‖² − Σ sᵢ²) that carries the tail's energy, so Σ s_all² = ‖X‖_F² and the
leading-r sums used by ``lowrank_encode`` and the budget's error model stay exact for what is stored.

``lowrank_encode(codec, x, svd)`` produces exactly the ``Encoded`` of a ``lowrank:rank=r[+NEXT]`` codec (its
documented layout: ``us`` = (U_r·diag(σ_r))ᵀ, ``vt`` = V_rᵀ, raw or as children of NEXT; meta rank, energy kept,
relative error) from factors given by ``svd`` — so several plans and TSV-C can share one decomposition of a task
matrix (``SVDCache``) and the codec still decodes it. Byte counts are the codec's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

import torch

from tvbasis.codecs import Codec, Encoded, LowRank, SparseRows, as_matrix
from tvbasis.codecs.base import check_input, sq_dist64
from tvbasis.io.checksum import tensor_digest

#: (u (m, r), s (r,), vh (r, n), all singular values (min(m, n),)) of a 2-D matrix at rank r
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
SVD = Callable[[torch.Tensor, int], Factors]


#: smallest min(m, n) at which ``truncated_svd`` may take the randomized path
RANDOMIZED_MIN_SIDE = 512
#: sketch columns beyond the rank
OVERSAMPLE = 16
#: power iterations of the randomized range finder
POWER_ITERATIONS = 4
#: the randomized path needs (r + OVERSAMPLE) · RANDOMIZED_SIDE_RATIO ≤ min(m, n): its 2·POWER_ITERATIONS + 2
#: products with q = r + OVERSAMPLE columns must cost less than the Gram's product with the smaller side (measured:
#: rank 64 of a 30522 × 512 embedding is slower randomized, 1.88 s vs 1.44 s; benchmarks/results/codec_levers.md)
RANDOMIZED_SIDE_RATIO = 2 * POWER_ITERATIONS + 2


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    """Whether ``truncated_svd`` takes the randomized path for a matrix of ``shape`` at ``rank`` (the gate the
    accuracy tests cover: a large smaller side and a sketch well below it)."""
    k = min(shape)
    return k >= RANDOMIZED_MIN_SIDE and rank >= 1 and (rank + OVERSAMPLE) * RANDOMIZED_SIDE_RATIO <= k


def randomized_svd(x: torch.Tensor, rank: int, oversample: int = OVERSAMPLE, niter: int = POWER_ITERATIONS,
                   seed: int = 0) -> Factors:
    """The top-``rank`` singular triplets of a 2-D ``x`` by a randomized range finder with power iterations (float32
    arithmetic, a Gaussian sketch from ``seed``). The fourth factor is the q = rank + oversample computed singular
    values followed by √(‖x‖² − Σ sᵢ²): squares summing to ‖x‖_F² (see the module's docstring)."""
    m, n = x.shape
    q = min(int(rank) + int(oversample), min(m, n))
    X = x.float()
    wide = m <= n
    A = X if not wide else X.T                       # tall: rows ≥ columns, so the sketch is (cols, q)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((A.shape[1], q), generator=g, dtype=torch.float32).to(A.device)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    B = Q.T @ A                                      # (q, cols)
    Ub, s_q, Vh = torch.linalg.svd(B.double(), full_matrices=False)
    U = Q.double() @ Ub                              # (rows, q)
    total = sq_dist64(X.reshape(-1), 0.0)  # a piece at a time: no float64 copy of a big matrix (1 GB at 32 000 × 4096)
    tail = max(total - float(torch.sum(s_q**2)), 0.0) ** 0.5
    s_all = torch.cat([s_q, torch.tensor([tail], dtype=torch.float64, device=s_q.device)])
    r = min(int(rank), q)
    u, s, vh = U[:, :r], s_q[:r], Vh[:r]
    if wide:                                         # A = Xᵀ = U S Vh  ⇒  X = Vhᵀ S Uᵀ
        u, vh = vh.T, u.T
    return u.float().contiguous(), s.float(), vh.float().contiguous(), s_all.float()


def exact_truncated_svd(x: torch.Tensor, rank: int) -> Factors:
    """``truncated_svd`` without the randomized path: the float64 Gram of the smaller side, all singular values."""
    if x.ndim != 2:
        raise ValueError(f"truncated_svd: expected a 2-D tensor, got shape {tuple(x.shape)}")
    m, n = x.shape
    k = min(m, n)
    r = max(0, min(int(rank), k))
    X = x.double()
    wide = m <= n
    G = X @ X.T if wide else X.T @ X
    w, Q = torch.linalg.eigh(G)                      # ascending
    w, Q = w.flip(0).clamp_min(0.0), Q.flip(1)
    s_all = w.sqrt()
    s = s_all[:r]
    P = Q[:, :r]                                     # u (wide) or v (tall)
    other = (X.T @ P if wide else X @ P)             # Xᵀu_i = σ_i v_i  /  X v_i = σ_i u_i
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    other = other * inv
    if wide:
        u, vh = P, other.T
    else:
        u, vh = other, P.T
    return u.float().contiguous(), s.float(), vh.float().contiguous(), s_all.float()


def truncated_svd(x: torch.Tensor, rank: int) -> Factors:
    """The top-``rank`` singular triplets of a 2-D ``x`` (float32 out): randomized for a large matrix at a small
    rank (``use_randomized``), else via the float64 Gram of its smaller side."""
    if x.ndim != 2:
        raise ValueError(f"truncated_svd: expected a 2-D tensor, got shape {tuple(x.shape)}")
    if use_randomized(tuple(x.shape), int(rank)):
        return randomized_svd(x, int(rank))
    return exact_truncated_svd(x, rank)


class SVDCache:
    """Truncated SVDs by key (e.g. (task, tensor name)), kept at the largest rank asked so far (at least
    ``min_rank``), so lower ranks are slices of one decomposition."""

    def __init__(self, min_rank: int = 64) -> None:
        self.min_rank = min_rank
        self._store: dict[Hashable, Factors] = {}
        self._energy: dict[Hashable, dict[int, tuple[float, float]]] = {}

    def get(self, key: Hashable, x: torch.Tensor, rank: int) -> Factors:
        """The rank-``rank`` truncated SVD factors of ``x``, computed once per ``key`` (at ``min_rank`` or more) and
        cut from the cached factors afterwards."""
        have = self._store.get(key)
        if have is None or (have[1].numel() < rank and have[1].numel() < min(x.shape)):
            have = truncated_svd(x, max(rank, self.min_rank))
            self._store[key] = have
            self._energy.pop(key, None)
        u, s, vh, s_all = have
        r = min(rank, s.numel())
        return u[:, :r], s[:r], vh[:r], s_all

    def peek(self, key: Hashable) -> Factors | None:
        """The factors cached under ``key`` (at the largest rank computed), or None."""
        return self._store.get(key)

    def put(self, key: Hashable, factors: Factors) -> None:
        """Seed ``key`` with factors computed elsewhere (``KeptFactors``)."""
        self._store[key] = factors

    def energy(self, key: Hashable, r: int) -> tuple[float, float]:
        """(Σ s², Σ_{i<r} s²) in float64 of the spectrum cached under ``key``, memoised per r (the many candidates
        of one matrix share a few ranks)."""
        memo = self._energy.setdefault(key, {})
        if r not in memo:
            e = self._store[key][3].double() ** 2
            memo[r] = (float(e.sum()), float(e[:r].sum()))
        return memo[r]

    def source(self, key: Hashable) -> SVD:
        """An ``SVD`` callable bound to one key."""
        return lambda x, rank: self.get(key, x, rank)

    def clear(self) -> None:
        """Forget every cached SVD."""
        self._store.clear()
        self._energy.clear()


class KeptFactors:
    """Truncated SVDs one pass computed, kept for a later pass over the same matrices (the budget build's measuring
    pass → its write pass), keyed by (task, tensor) with the digest of the matrix they came from
    (``io.checksum.tensor_digest``), up to
    ``max_bytes`` in all: past that a later pass computes its own. Thread-safe; local to one process (it does not
    pickle: a Ray build computes again)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._kept: dict[Hashable, tuple[bytes, Factors]] = {}
        self._lock = threading.Lock()

    def offer(self, key: Hashable, x: torch.Tensor, factors: Factors) -> bool:
        """Keep ``factors`` of matrix ``x`` under ``key`` if they fit; returns whether they were kept."""
        if x.device.type != "cpu":
            return False
        size = sum(t.numel() * t.element_size() for t in factors)
        with self._lock:
            if key in self._kept or self.nbytes + size > self.max_bytes:
                return False
            self.nbytes += size
        fp = tensor_digest(str(key), x)
        with self._lock:
            self._kept[key] = (fp, tuple(t.contiguous() for t in factors))  # type: ignore[assignment]
        return True

    def get(self, key: Hashable, x: torch.Tensor) -> Factors | None:
        """The factors kept under ``key``, only if ``x`` is the very matrix they were computed from."""
        with self._lock:
            have = self._kept.get(key)
        if have is None or x.device.type != "cpu" or tensor_digest(str(key), x) != have[0]:
            return None
        return have[1]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self.nbytes = 0

    def __getstate__(self) -> dict:
        raise TypeError("KeptFactors stays in the process that computed them")


def lowrank_encode(codec: LowRank, x: torch.Tensor, svd: SVD = truncated_svd) -> Encoded:
    """``codec.encode(x)`` for a fixed-rank ``lowrank`` codec and a ≥ 2-D ``x``, from the factors ``svd`` gives."""
    if not isinstance(codec, LowRank) or codec.values["rank"] is None:
        raise ValueError(f"lowrank_encode: needs a fixed-rank lowrank codec, got {codec.spec}")
    x = check_input(x, codec.name)
    if x.ndim < 2 or x.numel() == 0:
        return codec.encode(x)
    m = as_matrix(x)
    r = min(int(codec.values["rank"]), min(m.shape))
    u, s, vh, s_all = svd(m, r)
    e = s_all.double() ** 2
    total, kept = float(e.sum()), float(e[:r].sum())
    meta = {"rank": r, "energy_kept": kept / total if total else 1.0,
            "rel_error": (max(total - kept, 0.0) / total) ** 0.5 if total else 0.0}
    us = (u * s).T.contiguous()
    vt = vh.contiguous()
    if codec.next is None:
        return Encoded(codec.spec, tuple(x.shape), {"us": us, "vt": vt}, meta)
    return Encoded(codec.spec, tuple(x.shape), {}, meta, {"us": codec.next.encode(us), "vt": codec.next.encode(vt)})


def encode_with_svd(codec: Codec, x: torch.Tensor, svd: SVD = truncated_svd, rows_svd: SVD = truncated_svd) -> Encoded:
    """``codec.encode(x)`` with each fixed-rank low-rank stage taking its factors from a truncated SVD: a top-level
    ``lowrank:rank=r+…`` from ``svd`` (which may be bound to a cache key of ``x``), the rows of a
    ``sparse-rows+lowrank:rank=r+…`` from ``rows_svd`` (a different matrix: the rows ``x`` touches). The codecs'
    own encode takes a full LAPACK SVD, which for a 32 000 × 4096 embedding table is minutes per task where the
    truncated one is seconds; the ``Encoded`` has the codec's layout either way."""
    if isinstance(codec, LowRank) and codec.values["rank"] is not None and x.ndim >= 2:
        return lowrank_encode(codec, x, svd)
    if isinstance(codec, SparseRows) and isinstance(codec.next, LowRank) and codec.next.values["rank"] is not None \
            and x.ndim >= 2 and x.numel():
        index, kept, meta = codec.split(check_input(x, codec.name), copy=False)  # only read by the SVD
        return codec.assemble(x, index, meta, lowrank_encode(codec.next, kept, rows_svd))
    return codec.encode(x)
