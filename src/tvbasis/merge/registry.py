"""The registry of merge methods by name (mergekit's names) and the factory that binds parameters."""

from __future__ import annotations

from tvbasis.errors import ConfigError
from tvbasis.merge.arcee_fusion import ArceeFusion
from tvbasis.merge.awd import AWD
from tvbasis.merge.base import BaseMerger, MergeSpec
from tvbasis.merge.consensus import Consensus
from tvbasis.merge.dare import DareLinear, DareTies
from tvbasis.merge.federated import CClip, FedGMA, FedNova, Median
from tvbasis.merge.fisher import Fisher
from tvbasis.merge.karcher import Karcher
from tvbasis.merge.linear import Mean, TaskArithmetic
from tvbasis.merge.model_stock import ModelStock
from tvbasis.merge.nearswap import NearSwap
from tvbasis.merge.sce import SCE
from tvbasis.merge.slerp import MultiSlerp, NuSlerp, Slerp
from tvbasis.merge.sparse_gta import Breadcrumbs, BreadcrumbsTies, Della, DellaLinear
from tvbasis.merge.svd import IsoC, IsoCTS, TSVMerge
from tvbasis.merge.ties import Ties, TopK

MERGE_METHODS: dict[str, type[BaseMerger]] = {
    cls.name: cls for cls in (TaskArithmetic, Mean, Ties, TopK, DareLinear, DareTies, Fisher, Consensus,
                              TSVMerge, IsoC, IsoCTS)
} | {
    cls.name: cls for cls in (Slerp, NuSlerp, Della, DellaLinear, Breadcrumbs, BreadcrumbsTies,
                              ModelStock, ArceeFusion, SCE, MultiSlerp, NearSwap,
                              Karcher)  # issue 25: mergekit's
} | {
    cls.name: cls for cls in (AWD, FedNova, FedGMA, Median, CClip)  # issue 29: AWD, one-shot FL rules
}


def available_methods() -> list[str]:
    """The names of every registered merge method, sorted."""
    return sorted(MERGE_METHODS)


def get_merger(spec: MergeSpec) -> BaseMerger:
    """The configured merger for ``spec``; ConfigError for an unknown method or a bad parameter."""
    cls = MERGE_METHODS.get(spec.method)
    if cls is None:
        raise ConfigError(f"unknown merge method {spec.method!r}; expected one of {available_methods()}")
    return cls(spec.params)
