"""Which function writes a store of each method: ``builder_of(method)`` by its ``StoreMethod.builder`` —
``streamed`` (``build.build_store``), ``statistics-first`` (``ultradelta.build_statistics_first``),
``factor-space`` (``lora_factor_space.build_lora_store_from_spec``). Each takes
``(pretrained, finetuned, spec, out, run=None, write=None)``."""

from __future__ import annotations

from collections.abc import Callable

from tvbasis.methods import FACTOR_SPACE, STATISTICS_FIRST, STREAMED, get_store_method
from tvbasis.store.build import build_store
from tvbasis.store.lora_factor_space import build_lora_store_from_spec
from tvbasis.store.store import BasisStore
from tvbasis.store.ultradelta import build_statistics_first

BUILDERS: dict[str, Callable[..., BasisStore]] = {
    STREAMED: build_store,
    STATISTICS_FIRST: build_statistics_first,
    FACTOR_SPACE: build_lora_store_from_spec,
}


def builder_of(method: str) -> Callable[..., BasisStore]:
    """The build function of store method ``method`` (ConfigError naming the methods for an unknown one)."""
    return BUILDERS[get_store_method(method).builder]
