"""The interface of a store method (one ``--method`` of ``tvbasis build``): its typed options, the build flags it
takes, what it stores (``StorePlan``) and its part of a manifest's validation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tvbasis.bases import BasisFit, BasisMethod
from tvbasis.compress import Coder
from tvbasis.errors import ConfigError

#: how a store's per-task coded entries combine with its bases (``store.format.CODED_MODES``)
ADD, MASK, JOINT = "add", "mask", "joint"
#: how a method's store is written: ``streamed`` — ``store.build.build_store`` (a Gram pass, a fit, a
#: materialisation pass); ``statistics-first`` — statistics passes fill options first, then ``build_store``;
#: ``factor-space`` — from LoRA adapters' factors, no ΔW expanded (``store.lora_factor_space``)
STREAMED, STATISTICS_FIRST, FACTOR_SPACE = "streamed", "statistics-first", "factor-space"
#: ``tvbasis build`` flags (argparse dests) that say what to store, and how each is shown in a message; every
#: other flag of ``build`` (inputs, --out, --force, engine, …) applies to every method
METHOD_FLAGS: dict[str, str] = {
    "M": "-M",
    "residual": "--residual",
    "codec": "--codec",
    "layerwise": "--layerwise",
    "inner": "--inner",
    "inner_param": "--inner-param",
    "density": "--density",
    "fisher": "--fisher",
    "seed": "--seed",
    "steps": "--steps",
    "option": "--option",
    "dtype": "--dtype",
    "include": "--include",
    "exclude": "--exclude",
    "k": "-k",
    "cores": "--cores",
    "clusters": "--clusters",
    "affinity": "--affinity",
    "refine": "--refine",
    "factor_codec": "--factor-codec",
}


def zero_fit(T: int) -> BasisFit:
    """M = 0: no stored vectors; every v̂_t = 0, so each task lies in its per-task entries alone."""
    return BasisFit(M=0, B=np.zeros((T, 0)), W=np.zeros((0, T)))


@dataclass(frozen=True)
class StorePlan:
    """What a store method stores, for its checked options and the tasks.

    ``basis`` fits the bases from the Gram matrix (basis methods); else ``fit(T)`` is the fixed fit (per-task
    compressors: none, TALL's τ_MTL, RTVQ's mean). ``M``: the number of stored bases (None: from -M or the basis
    method's choice). ``residual`` / ``codec``: the coders of the per-task entries and of the bases. ``mode``: how
    the per-task entries combine with the bases. ``mask_lambdas``: TALL's λ_t per task (mode ``mask``).
    ``factor_space``: the tasks are kept as their LoRA adapters' low-rank factors."""

    options: dict[str, Any]
    task_like: bool
    M: int | None = None
    basis: BasisMethod | None = None
    fit: Callable[[int], BasisFit] | None = None
    residual: str | Coder | None = None
    codec: str | None = None
    mode: str = ADD
    mask_lambdas: list[float] | None = None
    factor_space: bool = False

    @property
    def coded(self) -> bool:
        """Whether the store has a coded section (per-task entries or coded bases)."""
        return self.residual is not None or self.codec is not None or self.mode != ADD or self.factor_space

    @property
    def per_task_entries(self) -> bool:
        """Whether every task has coded entries (residuals, masks, factors)."""
        return self.residual is not None or self.mode != ADD or self.factor_space


@dataclass(frozen=True)
class StoredFacts:
    """What a manifest says about a store, as far as its method's own checks need (``StoreMethod.problem``)."""

    options: Mapping[str, Any]
    M: int
    has_mean: bool
    mode: str | None  # the coded section's mode, None without one
    bases_coded: bool


class StoreMethod:
    """One ``--method`` of ``tvbasis build``. Subclasses (or configured instances) set the fields and override
    ``check``, ``plan`` and, where they have rules of their own, ``problem``."""

    #: the ``--method`` name
    name: str = ""
    #: one line for ``--help`` and the docs
    summary: str = ""
    #: options and their defaults; ``choices``: string options and their accepted values
    defaults: Mapping[str, Any] = {}
    choices: Mapping[str, tuple[Any, ...]] = {}
    #: the method-specific flags of ``tvbasis build`` it takes (keys of ``METHOD_FLAGS``)
    flags: frozenset[str] = frozenset()
    #: why every other method-specific flag does not apply (None: each refusal names the methods that take it)
    flags_refused_because: str | None = None
    #: how its store is written (``STREAMED``, ``STATISTICS_FIRST`` or ``FACTOR_SPACE``)
    builder: str = STREAMED
    #: the modes of coded per-task entries its stores may have
    coded_modes: tuple[str, ...] = (ADD,)
    #: whether it fits -M bases from the Gram matrix (a basis method), and whether it stores their mean too
    fits_bases: bool = False
    stores_mean: bool = False
    #: whether each basis is made from one cluster of tasks (an inner merge of its members: cluster)
    merges_clusters: bool = False
    #: why a task can come back further from its vector than zero is, when this method is the reason
    error_above_one: str | None = None

    def check(self, options: Mapping[str, Any], tasks: Sequence[str] | None = None) -> dict[str, Any]:
        """The options, defaults filled in and validated (ConfigError naming the option)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ConfigError(
                f"--method {self.name}: unknown option(s) {sorted(unknown)}; expected "
                f"{', '.join(self.defaults) or 'none'}"
            )
        out = {**self.defaults, **options}
        for k, accepted in self.choices.items():
            if out[k] not in accepted:
                raise ConfigError(f"--method {self.name}: option {k} must be one of {list(accepted)}, got {out[k]!r}")
        return out

    def plan(
        self,
        options: Mapping[str, Any],
        tasks: Sequence[str],
        M: int | None = None,
        residual: str | Coder | None = None,
        codec: str | None = None,
        layerwise: bool = False,
    ) -> StorePlan:
        """What a store of ``tasks`` with these (checked) ``options`` stores; ``M``, ``residual``, ``codec`` and
        ``layerwise`` as given to the build (ConfigError when this method does not take them)."""
        raise NotImplementedError

    def check_build(self, M: int | None, residual: str | Coder | None, codec: str | None, layerwise: bool) -> None:
        """ConfigError when this method does not take what a build gives it besides its options (``plan`` checks
        it too; a builder that runs passes first checks it before them)."""

    def cluster_count(self, options: Mapping[str, Any], M: int) -> tuple[int, str]:
        """How many clusters a task's ``cluster`` may index, and the manifest field that says so."""
        return M, "M"

    def requires_clusters(self) -> bool:
        """Whether every task of its stores names a cluster."""
        return False

    def problem(self, facts: StoredFacts) -> tuple[str, str] | None:
        """The method-specific part of a manifest's validation: (field, what is wrong) or None."""
        return None


@dataclass
class _Registry:
    methods: dict[str, StoreMethod] = field(default_factory=dict)


REGISTRY = _Registry()


def register(method: StoreMethod, *, replace: bool = False) -> StoreMethod:
    """Add ``method`` to the registry of ``tvbasis build --method`` (one line next to each method)."""
    if not method.name:
        raise ValueError("a store method needs a name")
    if method.name in REGISTRY.methods and not replace:
        raise ValueError(f"store method {method.name!r} is registered already")
    unknown = set(method.flags) - set(METHOD_FLAGS)
    if unknown:
        raise ValueError(f"store method {method.name!r}: unknown build flag(s) {sorted(unknown)}")
    REGISTRY.methods[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a store method (tests that register a toy one)."""
    REGISTRY.methods.pop(name, None)


def get_store_method(name: str) -> StoreMethod:
    """The store method registered as ``name``; ConfigError naming the methods when there is none."""
    try:
        return REGISTRY.methods[name]
    except KeyError:
        raise ConfigError(f"unknown store method {name!r}; expected one of {store_method_names()}") from None


def store_method_names() -> list[str]:
    """Every ``--method`` of ``tvbasis build``, in registration order."""
    return list(REGISTRY.methods)


def methods_taking(flag: str) -> list[str]:
    """The store methods that take build flag ``flag``."""
    return [m.name for m in REGISTRY.methods.values() if flag in m.flags]
