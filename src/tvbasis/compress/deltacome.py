"""Delta-CoMe (Ping et al., NeurIPS 2024, arXiv 2406.08903, "Training-Free Delta-Compression with Mixed-Precision
for Large Language Models"), data-free form, as a per-tensor rule.

Every linear weight of the transformer blocks (``tvbasis.compress.blocks.is_block_weight``: query/key/value/
output and the feed-forward matrices) goes through ``mixed-svd`` (``tvbasis.codecs.mixed_svd``): its singular
triplets in three blocks, the first ``r8`` at 8 bits, the next ``r3`` at 3 bits and the rest of a bit budget at
2 bits, the tail dropped. The budget is the paper's α: Σ_k b_k·r_k·(m + n) ≤ α·16·m·n, a fraction α of the
float16 delta's bits (the reference's LLaMA-7B setting, 2 / 32 / 968 triplets at 8 / 3 / 2 bits of a 4096 × 4096
matrix, is exactly α = 1/16; ``deltacome_ranks`` scales it to any shape: r2 = ⌊(α·16·m·n − (8·r8 + 3·r3)(m + n)) /
(2(m + n))⌋, at least 0, all three capped at min(m, n)). Factors are quantised per output channel in groups of
``group`` (128, the reference's ``--groupsize``), asymmetric; σ is kept in float16. The group scales and σ are
stored on top of α (the reference does not count them either; ``Encoded.nbytes`` does).

Every other tensor — embeddings, norms, biases, heads — is kept as ``rest`` (float16, as the reference keeps those
parameters of the fine-tuned model; ``none`` drops their deltas; ``sparse-rows+float16`` / ``sparse-rows+int8``
keep only the rows a fine-tune changed — not the paper's, but what makes the method comparable on a model whose
embedding table is half its parameters, as MiniLM's: there ``rest=float16`` caps the store at 3.5×,
``benchmarks/results/peer_stores.md``).

Where it differs from the reference: the factors are rounded to nearest (data-free) instead of GPTQ on
calibration text, so a delta is coded from its weights alone; the paper reports GPTQ ahead of round-to-nearest at
the same bits. Options: ``alpha``, ``r8``, ``r3``, ``group``, ``rest`` (``tvbasis build --method deltacome
--option alpha=0.03125``), and ``zstd`` (false; true wraps each matrix's codes in the lossless ``zstd`` stage: not
the paper's, 13 % fewer bytes on MiniLM deltas, ``benchmarks/results/codec_rd.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tvbasis.codecs import Codec, Encoded, parse_codec
from tvbasis.compress.blocks import is_block_weight, parse_rule_options
from tvbasis.errors import ConfigError

#: the paper's setting: α = 1/16 of the float16 delta, 2 triplets at 8 bits, 32 at 3 bits, the rest at 2 bits
DELTACOME_DEFAULTS: dict[str, Any] = {"alpha": 0.0625, "r8": 2, "r3": 32, "group": 128, "rest": "float16",
                                      "zstd": False}
#: codecs for the tensors the method does not compress (sparse rows: an embedding table's touched rows)
REST_CODECS = ("float16", "bfloat16", "float32", "none", "sparse-rows+float16", "sparse-rows+int8")
BLOCK_BITS = (8, 3, 2)


def check_deltacome_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with defaults filled in, validated (ConfigError naming the option)."""
    unknown = set(options) - set(DELTACOME_DEFAULTS)
    if unknown:
        raise ConfigError(f"--method deltacome: unknown option(s) {sorted(unknown)}; expected "
                          f"{', '.join(DELTACOME_DEFAULTS)}")
    out = {**DELTACOME_DEFAULTS, **options}
    a = out["alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 < a <= 1.0:
        raise ConfigError(f"--method deltacome: option alpha must be a number in (0, 1], got {a!r}")
    out["alpha"] = float(a)
    for k, lo in (("r8", 0), ("r3", 0), ("group", 1)):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"--method deltacome: option {k} must be an integer >= {lo}, got {v!r}")
    if not isinstance(out["zstd"], bool):
        raise ConfigError(f"--method deltacome: option zstd must be true or false, got {out['zstd']!r}")
    if out["rest"] not in REST_CODECS:
        raise ConfigError(f"--method deltacome: option rest must be one of {', '.join(REST_CODECS)}, "
                          f"got {out['rest']!r}")
    return out


def deltacome_ranks(shape: tuple[int, ...], alpha: float, r8: int, r3: int) -> tuple[int, int, int]:
    """(r8, r3, r2) of an m × n matrix under the bit budget α·16·m·n (see the module docstring)."""
    m, n = int(shape[0]), math.prod(int(d) for d in shape[1:])
    cap = min(m, n)
    a8 = min(r8, cap)
    a3 = min(r3, cap - a8)
    budget = alpha * 16 * m * n - (8 * a8 + 3 * a3) * (m + n)
    a2 = max(0, min(int(budget // (2 * (m + n))), cap - a8 - a3))
    return a8, a3, a2


def deltacome_codec(name: str, shape: tuple[int, ...] | torch.Size, options: Mapping[str, Any]) -> Codec | None:
    """The codec of one tensor: ``mixed-svd`` for a block linear weight, ``rest`` otherwise (None: not stored)."""
    shape = tuple(shape)
    if is_block_weight(name, shape):
        a8, a3, a2 = deltacome_ranks(shape, float(options["alpha"]), int(options["r8"]), int(options["r3"]))
        spec = f"mixed-svd:ranks={a8}/{a3}/{a2},bits=8/3/2,group={int(options['group'])},scheme=affine"
        return parse_codec(("zstd+" if options.get("zstd") else "") + spec)
    rest = str(options["rest"])
    return None if rest == "none" else parse_codec(rest)


@dataclass(frozen=True)
class DeltaComeRule:
    """Delta-CoMe as a store coder (``tvbasis.compress.Coder``): a codec per tensor, the same for every task."""

    options: dict[str, Any]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> DeltaComeRule:
        return cls(check_deltacome_options(options))

    @property
    def spec(self) -> str:
        o = self.options
        return (f"deltacome:alpha={o['alpha']!r},r8={o['r8']},r3={o['r3']},group={o['group']},"
                f"rest={o['rest']},zstd={str(o['zstd']).lower()}")

    @classmethod
    def parse(cls, text: str) -> DeltaComeRule:
        """Inverse of ``spec`` (what a store records as its residual coder)."""
        return cls.from_options(parse_rule_options(text, "deltacome"))

    def codec_for(self, name: str, shape: tuple[int, ...] | torch.Size) -> Codec | None:
        return deltacome_codec(name, shape, self.options)

    def encode(self, name: str, x: torch.Tensor, task: str | None = None) -> Encoded | None:
        codec = self.codec_for(name, tuple(x.shape))
        return None if codec is None else codec.encode(x)

