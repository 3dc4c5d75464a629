"""LoRA collections in factor space: the Gram matrix from the factors and joint compression into shared
per-tensor bases with small per-adapter cores (Compress then Serve), never expanding ΔW = s·B·A.

==============  ================================================================================================
``factors``     ``AdapterFactors`` (an adapter held as factors), ``open_adapters``, ``factor_gram`` (T×T Gram,
                float64, from r×r products; dense deltas for tensors replaced whole)
``joint``       ``joint_compress`` → ``JointCompression``: per tensor (and cluster) U, V shared, Σ_i full or
                diagonal per adapter; exact bytes, per-adapter errors, reconstruction and residuals as factors
==============  ================================================================================================
"""

from tvbasis.lora.factors import (
    AdapterFactors,
    AdapterLike,
    FactorGram,
    Source,
    TensorDeltas,
    as_source,
    factor_gram,
    iter_tensors,
    open_adapters,
    tensor_gram,
    tensor_names,
)
from tvbasis.lora.joint import (
    AFFINITIES,
    CORES,
    DEFAULT_ITERS,
    JointCompression,
    JointFit,
    cosine_clusters,
    fit_reduced,
    fit_tensor,
    joint_compress,
    kernel_clusters,
    subspace_kernel,
)

__all__ = ["AFFINITIES", "CORES", "DEFAULT_ITERS", "AdapterFactors", "AdapterLike", "FactorGram", "JointCompression",
           "JointFit", "Source", "TensorDeltas", "as_source", "cosine_clusters", "factor_gram", "fit_reduced",
           "fit_tensor", "iter_tensors", "joint_compress", "kernel_clusters", "open_adapters", "subspace_kernel",
           "tensor_gram", "tensor_names"]
