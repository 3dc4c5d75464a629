"""BitDelta (Liu et al., 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit").

Each weight matrix of the transformer blocks' linear layers keeps its delta as one sign bit per weight times
one scale per matrix, α = mean |Δ| (``sign:scale=tensor``; sign(0) = +1 as in the reference code, whose mask is
``diff >= 0``). Everything else — embeddings, norms, biases, heads — is kept at 16 bits (the reference
``save_diff`` stores those parameters of the fine-tuned model whole; we store their delta as float16).

A block linear weight is a 2-D ``*.weight`` inside a numbered block (``….layer.3.…``, ``….layers.3.…``,
``h.3``), not an embedding table. The reference code picks ``*proj`` modules under ``mlp``/``self_attn`` (Llama
names); in a BERT those are the attention query/key/value/output and the two feed-forward matrices.

Not reproduced: scale distillation, BitDelta's second stage, which trains the α on generic text to match the
fine-tuned model's logits (100 steps of C4 in the paper). With it the paper's numbers improve a little; without
it α is the L2-optimal scale for the sign pattern, the paper's initialisation.
"""

from __future__ import annotations

import re

import torch

from tvbasis.codecs import Codec, parse_codec
from tvbasis.compress.kinds import tensor_kind

SIGN_SPEC = "sign:scale=tensor"
KEEP_SPEC = "float16"
_BLOCK = re.compile(r"(^|\.)(layer|layers|h|blocks|block)\.\d+\.")


def is_block_linear(name: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """True for a 2-D weight of a linear layer inside a numbered transformer block."""
    return (len(shape) == 2 and name.endswith("weight") and tensor_kind(name, shape) == "matrix"
            and _BLOCK.search(name) is not None)


def bitdelta_codec(name: str, shape: tuple[int, ...] | torch.Size) -> Codec:
    """BitDelta's codec of one tensor: signs × one scale for block linear weights, float16 otherwise."""
    return parse_codec(SIGN_SPEC if is_block_linear(name, tuple(shape)) else KEEP_SPEC)


def bitdelta_tensor(name: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One tensor of one task vector as BitDelta stores it: (reconstruction, stored bytes)."""
    codec = bitdelta_codec(name, x.shape)
    enc = codec.encode(x)
    return codec.decode(enc), enc.nbytes
