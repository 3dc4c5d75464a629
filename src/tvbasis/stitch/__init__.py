"""Localize-and-Stitch (He et al. 2024) and its pairing with clustering bases.

Localize keeps a tiny region of each task vector (a binary mask at sparsity s, 1 % by default): dataless, the top-s
magnitudes (``localize``), or trained on few-shot data (``train_mask`` here for any torch module;
``tvbasis.eval.localize`` for the harness's encoder). Stitch adds the regions to θ₀ with overlap averaging,
θ = θ₀ + Σ_t (m_t / n) ⊙ τ_t (``stitch``). With clusters (of a cluster basis store): SharedMask — one majority-vote
mask per cluster, M masks stored instead of T — and StitchTwice — within each cluster only the coordinates exactly
one member claims, then overlap averaging across all tasks. A masks file stores the masks bit-packed and the task
vector's values on their supports (``MaskSet``)::

    from tvbasis.stitch import localize, stitch
    masks = localize("base/", {"a": "ft-a/", "b": "ft-b/"}, "masks.safetensors", sparsity=0.01)
    stitch("base/", {"a": "ft-a/", "b": "ft-b/"}, masks).apply_to("base/", out="stitched/")
"""

from tvbasis.stitch.format import MASKS_FORMAT, MaskSet, open_masks
from tvbasis.stitch.localize import DEFAULT_SPARSITY, derive, localize, write_mask_set
from tvbasis.stitch.rules import (
    cluster_labels,
    effective_masks,
    exactly_one_masks,
    majority_masks,
    parse_clusters,
    stitch_weights,
)
from tvbasis.stitch.stitch import StitchProducer, localized_vector, stitch
from tvbasis.stitch.train import MaskTraining, train_mask

__all__ = ["DEFAULT_SPARSITY", "MASKS_FORMAT", "MaskSet", "MaskTraining", "StitchProducer", "cluster_labels",
           "derive", "effective_masks", "exactly_one_masks", "localize", "localized_vector", "majority_masks",
           "open_masks", "parse_clusters", "stitch", "stitch_weights", "train_mask", "write_mask_set"]
