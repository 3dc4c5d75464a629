"""Basis methods: one interface (``BasisMethod.fit(G, M) -> BasisFit``), one registry."""

from __future__ import annotations

from typing import Any

from tvbasis.bases.autoencoder import AutoencoderBasis
from tvbasis.bases.base import (
    BasisFit,
    BasisMethod,
    addition_weights,
    check_M,
    cosine_from_gram,
    eckart_young_bound,
    least_squares_W,
    reconstruction_loss,
    ridge_solve,
)
from tvbasis.bases.cluster import ClusterBasis, eigengap_k, paper_eigengap_k, spectral_clusters
from tvbasis.bases.pca import PCABasis
from tvbasis.bases.random import RandomBasis, RandomSampleBasis, orthonormal_sum_coefficients
from tvbasis.bases.random_rows import random_rows
from tvbasis.errors import ConfigError

BASIS_METHODS: dict[str, type[BasisMethod]] = {
    cls.name: cls for cls in (AutoencoderBasis, PCABasis, ClusterBasis, RandomBasis, RandomSampleBasis)
}


def get_basis_method(name: str, **options: Any) -> BasisMethod:
    """The basis method registered as ``name``, configured with ``options``; ConfigError naming the methods
    when there is none."""
    try:
        cls = BASIS_METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown basis method {name!r}; expected one of {sorted(BASIS_METHODS)}") from None
    return cls(**options)


__all__ = ["BASIS_METHODS", "BasisFit", "BasisMethod", "addition_weights", "check_M", "cosine_from_gram",
           "eckart_young_bound", "eigengap_k", "get_basis_method", "least_squares_W", "orthonormal_sum_coefficients",
           "paper_eigengap_k", "random_rows", "reconstruction_loss", "ridge_solve", "spectral_clusters"]
