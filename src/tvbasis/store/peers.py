"""Store methods that are not basis methods: the peers' per-task compressors as stores, and M = 0.

* ``tall`` — TALL masks (Wang et al., ICML 2024): one stored vector, the multi-task vector τ_MTL = Σ_t τ_t
  (a basis with B = 1, so the paper's addition Σ_m s_m is task arithmetic), and per task a bit mask
  m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|] (coded entries of mode ``mask``); task t comes back as m_t ∘ τ_MTL. λ_t:
  option ``lambda`` (one for all, default 0.4, the middle of the paper's grid {0.2, …, 0.6}) or ``lambdas``
  (per task; the benchmark chooses them on dev data).
* ``tsvc`` — TSV-C (Gargiulo et al., CVPR 2025): no bases (M = 0); per task and 2-D tensor the top
  ⌊min(m, n)/T⌋ singular triplets (``lowrank:fraction=1/T``), every other tensor kept in float32.
* ``-M 0`` with any basis method and ``--residual``: no bases; every task through the residual codec alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from tvbasis.bases import BasisFit
from tvbasis.errors import ConfigError

PEER_METHODS = ("tall", "tsvc")
TALL_DEFAULT_LAMBDA = 0.4
#: the coder a TSV-C store records (``tvbasis.compress.Coder("tsvc", T)``)
TSVC_CODER = "tsvc"


def check_peer_options(method: str, options: Mapping[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """The options of a peer method, validated (ConfigError naming the option)."""
    opts = dict(options)
    if method == "tsvc":
        if opts:
            raise ConfigError(f"--method tsvc takes no options, got {sorted(opts)}")
        return {}
    if method != "tall":
        raise ConfigError(f"unknown store method {method!r}")
    unknown = set(opts) - {"lambda", "lambdas"}
    if unknown:
        raise ConfigError(f"--method tall: unknown option(s) {sorted(unknown)}; expected lambda or lambdas")
    lam = opts.get("lambda", TALL_DEFAULT_LAMBDA)
    _check_lambda(lam, "lambda")
    out: dict[str, Any] = {"lambda": float(lam)}
    lambdas = opts.get("lambdas")
    if lambdas is not None:
        if not isinstance(lambdas, Mapping):
            raise ConfigError(f"--method tall: option lambdas must map task names to numbers, got {lambdas!r}")
        for t, v in lambdas.items():
            _check_lambda(v, f"lambdas.{t}")
            if tasks is not None and t not in tasks:
                raise ConfigError(f"--method tall: option lambdas names an unknown task {t!r}")
        out["lambdas"] = {str(t): float(v) for t, v in lambdas.items()}
    return out


def _check_lambda(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"--method tall: option {what} must be a number >= 0, got {v!r}")


def tall_lambdas(options: Mapping[str, Any], tasks: list[str]) -> list[float]:
    per = dict(options.get("lambdas") or {})
    return [float(per.get(t, options.get("lambda", TALL_DEFAULT_LAMBDA))) for t in tasks]


def zero_fit(T: int) -> BasisFit:
    """M = 0: no stored vectors; every v̂_t = 0, so each task lies in its residual alone."""
    return BasisFit(M=0, B=np.zeros((T, 0)), W=np.zeros((0, T)))


def tall_fit(T: int) -> BasisFit:
    """TALL: one stored vector s_0 = Σ_t τ_t (B = 1); the linear reconstruction is 0 (W = 0): the masks do it."""
    return BasisFit(M=1, B=np.ones((T, 1)), W=np.zeros((1, T)))
