"""Basis methods as store methods: one ``BasisStoreMethod`` per entry of the ``tvbasis.bases`` registry (pca,
autoencoder, cluster, random, random-sample). The bases are fitted from the Gram matrix; ``--residual`` adds a
coded per-task residual, ``--codec`` codes the bases, ``-M 0`` with ``--residual`` stores no bases at all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tvbasis.bases import BASIS_METHODS, BasisMethod, get_basis_method
from tvbasis.compress import Coder
from tvbasis.methods.registry import StoreMethod, StorePlan, register

#: build flags every basis method takes
_FLAGS = frozenset({"M", "residual", "codec", "layerwise", "option", "dtype", "include", "exclude"})
#: build flags that set one option, taken by the methods that have that option
_OPTION_FLAGS = {"seed": ("seed",), "steps": ("steps",), "inner": ("inner", "inner_param", "density", "fisher")}
#: basis methods that store the tasks' mean μ beside their bases
_WITH_MEAN = ("pca",)
#: why a basis method's reconstruction can be further from the task than zero is
_ABOVE_ONE = {
    "pca": "PCA reconstructs the tasks' mean plus M components; a task far from the others (or one folded "
    "in by add-task, which keeps the old mean and bases) can end further from its vector than zero"
}


class BasisStoreMethod(StoreMethod):
    """A store of M bases fitted from the Gram matrix by basis method ``cls`` (``tvbasis.bases``)."""

    def __init__(self, cls: type[BasisMethod]) -> None:
        self.cls = cls
        self.name = cls.name
        self.summary = f"basis method {cls.name} (tvbasis.bases)"
        self.defaults = dict(cls.options)
        self.choices = dict(cls.choices)
        self.flags = _FLAGS | {f for opt, fs in _OPTION_FLAGS.items() if opt in cls.options for f in fs}
        self.error_above_one = _ABOVE_ONE.get(cls.name)
        self.fits_bases = True
        self.stores_mean = cls.name in _WITH_MEAN
        self.merges_clusters = "inner" in cls.options

    def basis(self, options: Mapping[str, Any]) -> BasisMethod:
        return get_basis_method(self.name, **dict(options))

    def check(self, options: Mapping[str, Any], tasks: Sequence[str] | None = None) -> dict[str, Any]:
        return dict(self.basis(options).params)

    def plan(
        self,
        options: Mapping[str, Any],
        tasks: Sequence[str],
        M: int | None = None,
        residual: str | Coder | None = None,
        codec: str | None = None,
        layerwise: bool = False,
    ) -> StorePlan:
        basis = self.basis(options)
        return StorePlan(
            options=dict(basis.params),
            task_like=bool(basis.task_like),
            M=M,
            basis=basis,
            residual=residual,
            codec=codec,
        )


for _cls in BASIS_METHODS.values():
    register(BasisStoreMethod(_cls))
