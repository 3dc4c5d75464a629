"""Store methods that are not basis methods: the peers' per-task compressors as stores, and M = 0.

* ``tall`` — TALL masks (Wang et al., ICML 2024): one stored vector, the multi-task vector τ_MTL = Σ_t τ_t
  (a basis with B = 1, so the paper's addition Σ_m s_m is task arithmetic), and per task a bit mask
  m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|] (coded entries of mode ``mask``); task t comes back as m_t ∘ τ_MTL. λ_t:
  option ``lambda`` (one for all, default 0.4, the middle of the paper's grid {0.2, …, 0.6}) or ``lambdas``
  (per task; the benchmark chooses them on dev data).
* ``tsvc`` — TSV-C (Gargiulo et al., CVPR 2025): no bases (M = 0); per task and 2-D tensor the top
  ⌊min(m, n)/T⌋ singular triplets (``lowrank:fraction=1/T``), every other tensor kept in float32.
* ``tvq`` — TVQ (Kim et al., ICCV 2025): M = 0, every tensor of every task at ``bits`` bits (option, default
  4) by per-tensor asymmetric min–max quantisation (``minmax:bits=b``).
* ``rtvq`` — RTVQ: one shared base, the mean task vector (a basis with B = 1/T, W = 1), through
  ``minmax:bits=base_bits`` (default 3), and per-task offsets against the *quantised* base through
  ``minmax:bits=offset_bits`` (default 2) — the residuals of a mean basis coded with the base's error folded in.
* ``bitdelta`` — BitDelta (Liu et al., 2024): M = 0, block linear weights as sign bits × one mean-|Δ| scale per
  matrix, every other tensor float16 (no scale distillation).
* ``deltacome`` — Delta-CoMe (Ping et al., NeurIPS 2024), data-free: M = 0, block linear weights through
  ``mixed-svd`` (2 / 32 / rest-of-α singular triplets at 8 / 3 / 2 bits, α = 1/16 of the float16 delta; options
  ``alpha``, ``r8``, ``r3``, ``group``, ``rest``), every other tensor float16 (``tvbasis.compress.deltacome``).
* ``ultradelta`` — UltraDelta (Wang et al., NeurIPS 2025): M = 0, block linear weights through ``ultra`` (4-bit
  levels pruned per level to a variance-allocated density around 0.03, rescaled, trace-norm ratio per task;
  options ``density``, ``bits``, ``step``, ``factor``, ``trace_norm``, ``seed``, ``rest``), the rest not stored
  (``tvbasis.compress.ultradelta``). Its allocation needs statistics passes first: build it with
  ``tvbasis.store.ultradelta.build_ultradelta_store`` (what ``tvbasis build --method ultradelta`` runs), which
  records the per-task densities and scales as the options ``allocation`` and ``scales``.
* ``-M 0`` with any basis method and ``--residual``: no bases; every task through the residual codec alone.
* ``lora-factors`` / ``lora-joint`` — stores built from LoRA adapters in factor space (``store.factor``):
  every adapter's own factors as low-rank entries, or shared per-tensor bases with per-adapter cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tvbasis.bases import BasisFit
from tvbasis.codecs import parse_codec
from tvbasis.compress import Coder
from tvbasis.compress.deltacome import DELTACOME_DEFAULTS, DeltaComeRule, check_deltacome_options
from tvbasis.compress.ultradelta import ULTRADELTA_DEFAULTS, UltraDeltaRule, check_ultradelta_options
from tvbasis.errors import ConfigError

TALL_DEFAULT_LAMBDA = 0.4

PEER_METHODS = ("tall", "tsvc", "tvq", "rtvq", "bitdelta", "deltacome", "ultradelta")
#: store methods built from LoRA adapters in factor space (``store.factor.build_lora_store``)
LORA_METHODS = ("lora-factors", "lora-joint")
#: core forms of a lora-joint store (``diagonal`` is ``tvbasis.lora.joint``'s ``diag``)
LORA_CORES = ("full", "diagonal")
LORA_AFFINITIES = ("cosine", "subspace")
#: options of each peer method and their defaults
PEER_OPTIONS: dict[str, dict[str, Any]] = {"tall": {"lambda": TALL_DEFAULT_LAMBDA}, "tsvc": {}, "tvq": {"bits": 4},
                                           "rtvq": {"base_bits": 3, "offset_bits": 2}, "bitdelta": {},
                                           "deltacome": dict(DELTACOME_DEFAULTS),
                                           "ultradelta": dict(ULTRADELTA_DEFAULTS)}
#: the coders a TSV-C and a BitDelta store record (``tvbasis.compress.Coder``'s named rules)
TSVC_CODER = "tsvc"
BITDELTA_CODER = "bitdelta"


def check_peer_options(method: str, options: Mapping[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """The options of a peer method, validated (ConfigError naming the option)."""
    opts = dict(options)
    if method in LORA_METHODS:
        return check_lora_options(method, opts)
    if method not in PEER_OPTIONS:
        raise ConfigError(f"unknown store method {method!r}")
    if method == "deltacome":
        return check_deltacome_options(opts)
    if method == "ultradelta":
        return check_ultradelta_options(opts, tasks)
    if method != "tall":
        known = PEER_OPTIONS[method]
        unknown = set(opts) - set(known)
        if unknown:
            raise ConfigError(f"--method {method}: unknown option(s) {sorted(unknown)}; expected "
                              f"{', '.join(known) or 'none'}")
        out = {**known, **opts}
        for k, v in out.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8:
                raise ConfigError(f"--method {method}: option {k} must be an integer in 1..8, got {v!r}")
        return out
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


def _int(v: Any, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def check_lora_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options of a LoRA store: ``lora-factors`` — ``factor_codec`` (a codec spec or null); ``lora-joint`` — ``k``
    (an integer, or [k_out, k_in] for full cores), ``cores``, ``clusters``, ``affinity``, ``refine``, ``iters``
    (null: the default rounds). Every key is required (a store records them all)."""
    opts = dict(options)
    want = {"factor_codec"} if method == "lora-factors" else {"k", "cores", "clusters", "affinity", "refine", "iters"}
    if set(opts) != want:
        raise ConfigError(f"--method {method}: options must be exactly {sorted(want)}, got {sorted(opts)}")
    if method == "lora-factors":
        fc = opts["factor_codec"]
        if fc is not None and not isinstance(fc, str):
            raise ConfigError(f"--method lora-factors: factor_codec must be a codec spec or null, got {fc!r}")
        if fc is not None:
            parse_codec(fc)  # ConfigError naming what is wrong
        return opts
    k = opts["k"]
    ks = [k] if isinstance(k, int) and not isinstance(k, bool) else k
    if not isinstance(ks, list) or len(ks) not in (1, 2):
        raise ConfigError(f"--method lora-joint: k must be an integer or [k_out, k_in], got {k!r}")
    for x in ks:
        _int(x, "--method lora-joint: k", 1)
    if opts["cores"] not in LORA_CORES:
        raise ConfigError(f"--method lora-joint: cores must be one of {LORA_CORES}, got {opts['cores']!r}")
    if len(ks) == 2 and opts["cores"] != "full":
        raise ConfigError("--method lora-joint: k = [k_out, k_in] needs full cores")
    if opts["affinity"] not in LORA_AFFINITIES:
        raise ConfigError(f"--method lora-joint: affinity must be one of {LORA_AFFINITIES}, got {opts['affinity']!r}")
    _int(opts["clusters"], "--method lora-joint: clusters", 1)
    _int(opts["refine"], "--method lora-joint: refine", 0)
    if opts["iters"] is not None:
        _int(opts["iters"], "--method lora-joint: iters", 0)
    return opts


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


@dataclass(frozen=True)
class PeerPlan:
    """How a peer method is built: its M, its fit, and the coders of its bases and per-task entries."""

    M: int
    mode: str  # "add" | "mask"
    residual: str | Coder | None
    codec: str | None
    task_like: bool


def peer_fit(method: str, T: int) -> BasisFit:
    """The fit of peer ``method``: TALL's τ_MTL, RTVQ's mean base, or no bases (M = 0)."""
    if method == "tall":
        return tall_fit(T)
    if method == "rtvq":
        return mean_fit(T)
    return zero_fit(T)


def peer_plan(method: str, options: Mapping[str, Any]) -> PeerPlan:
    """The build of peer ``method`` with its (checked) ``options``."""
    if method == "tall":
        return PeerPlan(1, "mask", None, None, True)
    if method == "tsvc":
        return PeerPlan(0, "add", TSVC_CODER, None, False)
    if method == "tvq":
        return PeerPlan(0, "add", f"minmax:bits={options['bits']}", None, False)
    if method == "rtvq":
        return PeerPlan(1, "add", f"minmax:bits={options['offset_bits']}", f"minmax:bits={options['base_bits']}",
                        False)
    if method == "bitdelta":
        return PeerPlan(0, "add", BITDELTA_CODER, None, False)
    if method == "deltacome":
        return PeerPlan(0, "add", DeltaComeRule.from_options(options).spec, None, False)
    if method == "ultradelta":
        if options.get("allocation") is None:
            raise ConfigError("--method ultradelta allocates each task's sparsity from statistics of its tensors: "
                              "build it with tvbasis build --method ultradelta (the Python API: "
                              "tvbasis.store.ultradelta.build_ultradelta_store), which runs those passes first")
        return PeerPlan(0, "add", Coder.with_rule(UltraDeltaRule.from_options(options)), None, False)
    raise ConfigError(f"unknown store method {method!r}")


def mean_fit(T: int) -> BasisFit:
    """RTVQ's base: one stored vector, the mean task vector (B = 1/T), in every reconstruction with weight 1."""
    return BasisFit(M=1, B=np.full((T, 1), 1.0 / T), W=np.ones((1, T)))
