"""Merge methods over the T task-vector slices of one tensor: one signature, one registry, mergekit's names.

``get_merger(MergeSpec("ties", {"density": 0.2}))`` returns a configured merger whose
``merge(deltas (T, *shape), weights (T,), ctx)`` gives the merged slice (float32). Methods (parameters,
defaults):

- task_arithmetic (normalize=False) and mean (normalize=True): Σ w_t·δ_t, / Σ w_t when normalizing.
- ties (density=0.2, sign=total|frequency, normalize=True, trim_scope=tensor|global).
- topk (density=0.2, normalize=True, trim_scope=tensor|global).
- dare_linear (density=0.5, seed=0, rescale=True, normalize=False), dare_ties (… sign=total, normalize=True).
- fisher (fisher_floor=0.0), needs ``ctx.fisher``.
- consensus (k=2, mask_lambda=0.4): TALL-mask consensus.
- tsv_merge (rank_fraction=0.0, i.e. 1/T): Task Singular Vectors merge (TSV-M); whole 2-D tensors only.
- iso_c: Iso-C, the summed task matrix with a flat (isotropic) singular spectrum; whole 2-D tensors only.
- iso_cts (common_fraction=0.8): Iso-CTS, common + task-specific subspaces, flat spectrum; whole 2-D tensors only.
- slerp (t=0.5), nuslerp (nuslerp_flatten=True, nuslerp_row_wise=False, on_weights=False): mergekit's spherical
  interpolations (slerp of θ₀ and θ₀ + τ, or of two fine-tunes: needs ``ctx.base``); whole tensors.
- model_stock (filter_wise=False): Model Stock's t·mean(τ) from the mean pairwise cosine; whole tensors.
- sce (select_topk=1.0): SCE's select (cross-task variance), calculate (mean-square task weights), erase (minority
  signs); whole tensors.
- multislerp (normalize_weights=True, on_weights=False): mergekit's barycentric interpolation of T ≥ 2 vectors on
  the hypersphere; nearswap (t=0.001): τ·clamp(t/|τ|, 0, 1) of one fine-tune.
- karcher (max_iter=10, tol=1e-5, include_base=False): mergekit's Karcher mean of the whole weights on the sphere.
- arcee_fusion: mergekit's Arcee Fusion of one fine-tune (τ kept where |τ|·KL ≥ median + 1.5·IQR); needs
  ``ctx.base``; whole tensors.
- della, della_linear (density=0.5, epsilon=0.15, seed=0, rescale=l1|inverse|none, normalize) and breadcrumbs,
  breadcrumbs_ties (density=0.9, gamma=0.01, rescale, normalize=False): mergekit's sparsifiers, then TIES or a sum.

Per-task values of ``density`` (and ``gamma``, ``epsilon``) may come in ``MergeContext.per_task`` (mergekit's
per-model densities); ``ties``/``topk`` take ``rounding=floor`` to keep mergekit's int(density·n) entries.

Per-tensor trims (``trim_scope=tensor``) rank the whole tensor: pass whole tensors. ``trim_scope=global`` ranks
each task over the whole vector: the caller computes ``global_thresholds`` (two streaming passes) and passes
them in ``MergeContext.thresholds``; these merges, DARE and the linear ones may be given chunks along dim 0.
"""

from __future__ import annotations

from tvbasis.merge.base import BaseMerger, MergeContext, MergeSpec
from tvbasis.merge.params import parse_merge_params
from tvbasis.merge.registry import MERGE_METHODS, available_methods, get_merger
from tvbasis.merge.threshold import global_thresholds

__all__ = ["MERGE_METHODS", "MergeContext", "MergeSpec", "BaseMerger", "available_methods", "get_merger",
           "global_thresholds", "parse_merge_params"]
