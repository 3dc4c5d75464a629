"""The generator of random bases: rows of M seeded Gaussian basis tensors, regenerated on demand (never stored)."""

from __future__ import annotations

import math
import zlib

import torch

#: rows of a random basis are generated in blocks of about this many elements
RANDOM_BLOCK = 1 << 20


def _seed(seed: int, name: str, start: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7919 + int(start)) % (2**63 - 1)


def random_rows(seed: int, name: str, shape: tuple[int, ...], M: int, total_params: int, a: int,
                b: int) -> torch.Tensor:
    """Rows [a, b) of the M random basis tensors of parameter ``name``: (M, b − a, *shape[1:]) float32.

    Generated in fixed row blocks seeded by (seed, crc32(name), block start), so the same rows come out
    whatever chunking a pass uses; entries ~ N(0, 1/D) so each basis vector has about unit norm."""
    if not shape:
        gen = torch.Generator().manual_seed(_seed(seed, name, 0))
        return torch.randn((M,), generator=gen) / math.sqrt(total_params)
    numel = math.prod(shape)
    row = max(1, numel // shape[0])
    block = max(1, RANDOM_BLOCK // row)
    parts = []
    start = (a // block) * block
    while start < b:
        stop = min(shape[0], start + block)
        gen = torch.Generator().manual_seed(_seed(seed, name, start))
        blk = torch.randn((M, stop - start, *shape[1:]), generator=gen)
        parts.append(blk[:, max(a, start) - start: min(b, stop) - start])
        start = stop
    return torch.cat(parts, dim=1) / math.sqrt(total_params)
