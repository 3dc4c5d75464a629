"""Every ``--method`` of ``tvbasis build``, in one registry of ``StoreMethod`` s.

* ``registry`` — the interface (``StoreMethod``: name, typed defaults/choices, ``check``, ``plan`` → ``StorePlan``,
  the build flags it takes, its part of a manifest's validation) and the registry (``register``,
  ``get_store_method``).
* ``basis`` — one store method per basis method of ``tvbasis.bases`` (pca, autoencoder, cluster, random,
  random-sample).
* ``per_task`` — the per-task compressors (tall, tsvc, tvq, rtvq, bitdelta, deltacome, ultradelta), each a
  configured ``PerTaskMethod`` registered by one line.
* ``lora`` — the LoRA stores (lora-factors, lora-joint); ``tvbasis.store.lora_factor_space`` builds them from the
  adapters' factors (it writes stores, so it lives in ``store/``).

This package sits below ``store/`` (it imports only ``bases``, ``compress``, ``codecs`` and ``errors``): the store
asks a method what to build and how to validate its manifest; the method never reaches into the store.

Nothing outside this package compares a method's name: ask its ``StoreMethod`` (``tests/test_store_methods.py``
greps for it).
"""

from tvbasis.methods import basis, lora, per_task  # noqa: F401  (each registers its methods)
from tvbasis.methods.registry import (
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
