"""Per-task compressors: each of T task vectors kept (lossily) on its own, so every task can be given back.

Pure per-tensor functions — a caller streams a model tensor by tensor (or row slice by row slice, where the
method is elementwise) and sums the byte counts:

==============  ===============================================================================================
``plan``        ``CodecPlan``: a ``tvbasis.codecs`` codec per tensor kind (embedding → sparse rows, matrix → low
                rank / quantisation, vector → float16); ``tensor_kind``, ``plan_roundtrip``; ``Coder``: a codec,
                a plan or TSV-C's rule, as a store's ``--residual`` / ``--codec`` take them
``residual``    bases (a store's, possibly through a plan) + per-task residuals coded with a plan
``svd``         truncated SVDs via a float64 Gram (fast on CPUs), a cache shared by plans, ``lowrank_encode``
``tall``        TALL masks: τ_MTL and one bit mask per task (Wang et al. 2024)
``tsvc``        TSV-C: per 2-D tensor and task, the top 1/T singular triplets (Gargiulo et al. 2025)
``tvq``         TVQ / RTVQ: b-bit task vectors; shared base + low-bit offsets (Kim et al. 2025)
``bitdelta``    BitDelta: sign bits + one scale per block linear weight, the rest float16 (Liu et al. 2024)
``deltacome``   Delta-CoMe: block weights through ``mixed-svd`` under an α budget (Ping et al. 2024), data-free
``ultradelta``  UltraDelta: variance-allocated densities, ``ultra`` codes, trace-norm ratios (Wang et al. 2025)
``blocks``      which tensors those two compress (block linear weights, OpenCLIP ``resblocks`` included)
==============  ===============================================================================================

Each peer module's docstring states where it follows the paper, where the reference code differs, and what is
not reproduced. ``tvbasis bench --frontier`` (``tvbasis.bench.frontier``) measures them all on real fine-tunes.
"""

from tvbasis.compress.bitdelta import bitdelta_codec, bitdelta_tensor, is_block_linear
from tvbasis.compress.kinds import EMBEDDING_MARKERS, KINDS, tensor_kind
from tvbasis.compress.plan import CodecPlan, Coder, plan_roundtrip
from tvbasis.compress.residual import code_bases, combine_bases, residual_roundtrip
from tvbasis.compress.svd import SVDCache, lowrank_encode, truncated_svd
from tvbasis.compress.tall import (
    TALL_LAMBDAS,
    multi_task_vector,
    tall_mask,
    tall_masks,
    tall_nbytes,
    tall_reconstruct,
)
from tvbasis.compress.tsvc import tsvc_codec, tsvc_compress, tsvc_factors, tsvc_rank, tsvc_tensor
from tvbasis.compress.tvq import rtvq_tensor, tvq_dequantize, tvq_nbytes, tvq_quantize, tvq_tensor

__all__ = ["EMBEDDING_MARKERS", "KINDS", "TALL_LAMBDAS", "CodecPlan", "bitdelta_codec", "Coder", "SVDCache", "bitdelta_tensor", "code_bases",
           "combine_bases", "is_block_linear", "lowrank_encode", "multi_task_vector", "plan_roundtrip",
           "residual_roundtrip", "truncated_svd",
           "rtvq_tensor", "tall_mask", "tall_masks", "tall_nbytes", "tall_reconstruct", "tensor_kind",
           "tsvc_codec", "tsvc_compress", "tsvc_factors", "tsvc_rank", "tsvc_tensor", "tvq_dequantize", "tvq_nbytes",
           "tvq_quantize", "tvq_tensor"]
