"""Every ``--method`` of ``tvbasis build``, in one registry of ``StoreMethod`` s.

* ``registry`` — the interface (``StoreMethod``: name, typed defaults/choices, ``check``, ``plan`` → ``StorePlan``,
  the build flags it takes, its part of a manifest's validation) and the registry (``register``,
  ``get_store_method``).
* ``basis`` — one store method per basis method of ``tvbasis.bases`` (pca, autoencoder, cluster, random,
  random-sample).
* ``per_task`` — the per-task compressors (tall, tsvc, tvq, rtvq, bitdelta, deltacome, ultradelta), each a
  configured ``PerTaskMethod`` registered by one line.
* ``lora`` — the LoRA stores (lora-factors, lora-joint); ``lora_factor_space`` builds them from the adapters'
  factors (imported on use: it writes stores, so it sits above ``store.format``).

Nothing outside this package compares a method's name: ask its ``StoreMethod`` (``tests/test_store_methods.py``
greps for it).
"""

from tvbasis.store.methods import basis, lora, per_task  # noqa: F401  (each registers its methods)
from tvbasis.store.methods.registry import (
    ADD,
    FACTOR_SPACE,
    JOINT,
    MASK,
    METHOD_FLAGS,
    STATISTICS_FIRST,
    STREAMED,
    StoredFacts,
    StoreMethod,
    StorePlan,
    get_store_method,
    methods_taking,
    register,
    store_method_names,
    unregister,
    zero_fit,
)

__all__ = [
    "ADD",
    "FACTOR_SPACE",
    "JOINT",
    "MASK",
    "METHOD_FLAGS",
    "STATISTICS_FIRST",
    "STREAMED",
    "StoreMethod",
    "StorePlan",
    "StoredFacts",
    "get_store_method",
    "methods_taking",
    "register",
    "store_method_names",
    "unregister",
    "zero_fit",
]
