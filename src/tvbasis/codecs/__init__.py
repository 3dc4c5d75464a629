"""Codecs: how ONE stored tensor is encoded.

A codec is named by a spec string ``NAME[:key=value,...][+NEXT]`` — e.g. ``int8``, ``int4:group=64,scheme=affine``,
``lowrank:rank=8+int8`` (the low-rank factors coded with int8), ``sparse-rows+int8``, ``topk:density=0.05``,
``ternary:density=0.1``, ``sign:scale=row``, ``auto:rel_error=0.05``. ``parse_codec(spec)`` builds it,
``codec.spec`` gives the canonical spec back (every parameter, defaults included) for a manifest, and
``codec.encode(x) -> Encoded`` / ``codec.decode(enc) -> x̂`` map a float32 tensor of any shape to stored tensors
and back. ``Encoded.nbytes`` is the exact stored byte count; ``Encoded.to_tensors(prefix)`` /
``Encoded.from_tensors(tensors, description, prefix)`` round-trip through a flat tensor dict (safetensors).

=============  =====================================================================================
float32/16     cast (bfloat16 too)
int8/4/3/2     group-wise round-to-nearest quantisation, float16 scales, symmetric or affine
sign           1 bit per element + float16 mean-|x| scale per row or tensor (BitDelta)
lowrank        truncated SVD at a rank or an energy fraction (TSV-C); factors via +NEXT
sparse-rows    only the nonzero rows + int32 row indices; rows via +NEXT
topk           largest-|x| density fraction; support as int32 indices or bit mask, whichever is smaller
ternary        top-k support as signs × one mean-|x| scale (ComPEFT)
mask           1 bit per element: nonzero or not (TALL's per-task masks); decodes to 0/1
minmax         per-tensor asymmetric min-max at 1..8 bits, integer zero point (TVQ), one dense bit stream
mixed-svd      singular triplets in blocks at decreasing bits, σ in float16, tail dropped (Delta-CoMe)
ultra          uniform b-bit levels, each level pruned at random to a density, rescaled (UltraDelta)
zstd           lossless Zstandard over the integer codes of its NEXT codec (optional ``zstandard``)
colscale       NEXT codec on X·diag(s), s from calibration (activation-aware coding); decode divides by s
auto           cheapest rung of a fixed ladder meeting a relative-error target
=============  =====================================================================================
"""

from tvbasis.codecs.auto import AUTO_LADDER, Auto
from tvbasis.codecs.base import Codec, as_matrix, relative_error
from tvbasis.codecs.bits import (
    pack_bits,
    pack_uint,
    packed_size,
    unpack_bits,
    unpack_uint,
)
from tvbasis.codecs.cast import BFloat16, Float16, Float32
from tvbasis.codecs.colscale import ColScale
from tvbasis.codecs.encoded import Encoded
from tvbasis.codecs.lowrank import LowRank, energy_rank
from tvbasis.codecs.mask import Mask
from tvbasis.codecs.minmax import MinMax, minmax_dequantize, minmax_quantize
from tvbasis.codecs.mixed_svd import MixedSVD
from tvbasis.codecs.params import Param, split_spec
from tvbasis.codecs.quant import Int2, Int3, Int4, Int8
from tvbasis.codecs.registry import CODECS, decode, get_codec, parse_codec
from tvbasis.codecs.sign import Sign
from tvbasis.codecs.sparse_rows import SparseRows
from tvbasis.codecs.topk import Ternary, TopK, keep_count
from tvbasis.codecs.ultra import Ultra
from tvbasis.codecs.zstd import Zstd

__all__ = ["AUTO_LADDER", "CODECS", "Auto", "BFloat16", "Codec", "ColScale", "Encoded", "Float16", "Float32", "Int2", "Int4",
           "Int3", "Int8", "LowRank", "Mask", "MinMax", "MixedSVD", "Ultra", "Zstd", "Param", "Sign", "SparseRows", "Ternary", "TopK", "as_matrix", "decode",
           "energy_rank", "get_codec", "keep_count", "minmax_dequantize", "minmax_quantize", "pack_bits", "pack_uint", "packed_size", "parse_codec",
           "relative_error", "split_spec", "unpack_bits", "unpack_uint"]
