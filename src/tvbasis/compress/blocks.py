"""Which tensors the delta-compression peers (Delta-CoMe, UltraDelta) compress: the linear weights of the
transformer blocks.

``is_block_weight`` is BitDelta's rule (``tvbasis.compress.bitdelta.is_block_linear``: a 2-D ``*.weight`` inside a
numbered ``layer``/``layers``/``h``/``blocks``/``block``, not an embedding table) plus OpenCLIP's block names —
``….resblocks.N.attn.in_proj_weight``, ``….resblocks.N.mlp.c_fc.weight`` — the ViT checkpoints UltraDelta's
reference code compresses (its ``attn.in_proj``, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj`` weights).
"""

from __future__ import annotations

import re

import torch

from tvbasis.compress.bitdelta import is_block_linear
from tvbasis.compress.kinds import tensor_kind

_RESBLOCK = re.compile(r"(^|\.)resblocks\.\d+\.")


def is_block_weight(name: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """True for a 2-D linear weight of a transformer block (see the module docstring)."""
    shape = tuple(shape)
    if is_block_linear(name, shape):
        return True
    return (len(shape) == 2 and name.endswith("weight") and tensor_kind(name, shape) == "matrix"
            and _RESBLOCK.search(name) is not None)
