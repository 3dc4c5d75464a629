"""Bit packing: unsigned codes of 1 to 8 bits into ``uint8`` bytes (vectorised torch).

Layout (little-endian): for widths dividing 8 (1, 2, 4, 8), with ``p = 8 // w`` codes per byte, code ``i`` goes
to byte ``i // p`` at bit offset ``w · (i mod p)``. Other widths (3, 5, 6, 7) form one dense little-endian bit
stream: bit ``j`` of code ``i`` is stream bit ``w·i + j``, stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8``
(for the dividing widths the two descriptions agree). So ``n`` codes take exactly ``ceil(n·w / 8)`` bytes, and a
slice of codes starting at a multiple of 8 packs to the matching slice of bytes (which is what lets the codecs
pack row chunk by row chunk into one preallocated buffer).
"""

from __future__ import annotations

import torch

WIDTHS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
#: widths whose codes never straddle a byte (packed by shifts; the rest go through bit planes)
_DIVIDING = (1, 2, 4, 8)


def packed_size(n: int, width: int) -> int:
    """Bytes needed for ``n`` codes of ``width`` bits: ``ceil(n·width / 8)``."""
    _check_width(width)
    return -(-n * width // 8)


def pack_uint(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned integer codes in ``[0, 2**width)`` (any shape, read flattened) into a 1-d ``uint8`` tensor."""
    _check_width(width)
    v = codes.reshape(-1)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << width):
        raise ValueError(f"pack_uint: codes must lie in [0, {1 << width}) for width {width}")
    return pack_uint_unchecked(v, width)


def pack_uint_unchecked(codes: torch.Tensor, width: int) -> torch.Tensor:
    """:func:`pack_uint` for codes the caller guarantees lie in ``[0, 2**width)`` (no range scan)."""
    _check_width(width)
    v = codes.reshape(-1).to(torch.uint8)
    if width == 8:
        return v.clone()
    if width not in _DIVIDING:
        return _pack_planes(v, width)
    per = 8 // width
    n = v.numel()
    m = -(-n // per)
    if m * per != n:
        v = torch.cat([v, v.new_zeros(m * per - n)])
    v = v.view(m, per)
    out = v[:, 0].clone()
    for i in range(1, per):
        out |= v[:, i] << (i * width)
    return out


def unpack_uint(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: the first ``n`` codes, as a 1-d ``uint8`` tensor."""
    _check_width(width)
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        raise ValueError(f"unpack_uint: packed tensor must be uint8, got {p.dtype}")
    if p.numel() < packed_size(n, width):
        raise ValueError(f"unpack_uint: {p.numel()} bytes hold fewer than {n} codes of {width} bits")
    if width == 8:
        return p[:n].clone()
    if width not in _DIVIDING:
        return _unpack_planes(p, width, n)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=p.device)
    mask = (1 << width) - 1
    return ((p.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean (or 0/1) tensor, read flattened, into ``ceil(n/8)`` bytes."""
    return pack_uint(bits.reshape(-1).to(torch.uint8), 1)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a 1-d ``bool`` tensor of ``n`` elements."""
    return unpack_uint(packed, 1, n).bool()


def _pack_planes(v: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 codes (1-d) as one dense bit stream of ``width`` bits each (bit planes, then 1-bit packing)."""
    shifts = torch.arange(width, dtype=torch.uint8, device=v.device)
    return pack_uint(((v.unsqueeze(1) >> shifts) & 1).reshape(-1), 1)


def _unpack_planes(p: torch.Tensor, width: int, n: int) -> torch.Tensor:
    bits = unpack_uint(p, 1, n * width).reshape(n, width)
    shifts = torch.arange(width, dtype=torch.uint8, device=p.device)
    return (bits << shifts).sum(1, dtype=torch.uint8) if n else bits.new_zeros(0)


def _check_width(width: int) -> None:
    if width not in WIDTHS:
        raise ValueError(f"bit width must be one of {WIDTHS}, got {width}")
