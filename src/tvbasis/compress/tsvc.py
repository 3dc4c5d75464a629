"""TSV-C (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

For every 2-D tensor of a task vector (word and position embeddings included) keep the top k singular triplets
of its own SVD, with k = ⌊min(m, n) · 1/T⌋ — "1/T of the singular components per task", so T compressed task
vectors cost about what one full one does; every other tensor (biases, norms; n-d ≠ 2) is kept as it is.
Reconstruction U_k·diag(s_k)·V_kᵀ is the best rank-k approximation (Eckart–Young).

As the reference code (``TSVC_utils.compress_tv``): ``k = int(s.shape[0] * (1 / T))``, every ``len(shape) == 2``
tensor, U, s and V stored separately — bytes 4·k·(m + n + 1), float32 — and the rest in float32 (4·numel).
A k of 0 (a matrix with fewer than T rows or columns) keeps nothing: the tensor comes back as zeros.

As a store (``tvbasis build --method tsvc``, ``tsvc_codec``): the ``lowrank:fraction=1/T`` codec, which keeps
U_k·diag(s_k) and V_k — 4·k·(m + n) bytes, k·4 fewer per matrix than the reference code's separate s.
"""

from __future__ import annotations

import torch

from tvbasis.codecs import Codec, parse_codec
from tvbasis.compress.svd import SVD


def tsvc_rank(shape: tuple[int, ...] | torch.Size, T: int) -> int:
    """k = int(min(m, n) · (1/T)) for a 2-D shape, as the reference code computes it."""
    if len(shape) != 2:
        raise ValueError(f"tsvc_rank: TSV-C truncates 2-D tensors only, got shape {tuple(shape)}")
    return int(min(shape) * (1 / T))


def tsvc_factors(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k (m, k), s_k (k,), V_kᵀ (k, n)) of the thin SVD of a 2-D ``x``."""
    u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank].clone(), vh[:rank].contiguous()


def tsvc_tensor(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-k truncation U_k·diag(s_k)·V_kᵀ of a 2-D ``x`` (zeros for k = 0)."""
    u, s, vh = tsvc_factors(x, rank)
    return (u * s) @ vh


def tsvc_compress(x: torch.Tensor, T: int, svd: SVD | None = None) -> tuple[torch.Tensor, int]:
    """One tensor of one task vector as TSV-C stores it: (reconstruction, stored bytes). ``svd``: where the
    factors come from (default ``torch.linalg.svd``; ``tvbasis.compress.svd`` has a faster, shareable one)."""
    if x.ndim != 2:
        return x.float().clone(), 4 * x.numel()
    k = tsvc_rank(tuple(x.shape), T)
    if svd is None:
        xhat = tsvc_tensor(x, k)
    else:
        u, s, vh, _ = svd(x.float(), k)
        xhat = (u * s) @ vh
    return xhat, 4 * k * (x.shape[0] + x.shape[1] + 1)


def tsvc_codec(shape: tuple[int, ...], T: int) -> Codec:
    """TSV-C as a codec of one tensor: 2-D -> ``lowrank:fraction=1/T`` (the top int(min(m, n)·(1/T)) triplets, 0
    for a matrix with fewer than T rows or columns); anything else float32."""
    return parse_codec(f"lowrank:fraction={1 / T!r}" if len(shape) == 2 else "float32")
