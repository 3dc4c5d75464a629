"""Per-task compressors as store methods: each a configured ``PerTaskMethod`` (its options, its fixed fit and the
coders of its per-task entries and bases), registered by one line.

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
  (``tvbasis.compress.ultradelta``). Its allocation needs statistics passes first (builder ``statistics-first``:
  ``tvbasis.store.ultradelta.build_ultradelta_store``, what ``tvbasis build --method ultradelta`` runs), which
  records the per-task densities and scales as the options ``allocation`` and ``scales``.

Adding a per-task compressor is one ``register(PerTaskMethod(...))`` line here (its coder a codec spec or a
``tvbasis.compress`` rule): see ``docs/architecture.md``, "Add a store method".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tvbasis.bases import BasisFit
from tvbasis.compress import Coder
from tvbasis.compress.deltacome import DELTACOME_DEFAULTS, DeltaComeRule, check_deltacome_options
from tvbasis.compress.ultradelta import ULTRADELTA_DEFAULTS, UltraDeltaRule, check_ultradelta_options
from tvbasis.errors import ConfigError
from tvbasis.methods.registry import (
    ADD,
    MASK,
    STATISTICS_FIRST,
    StoredFacts,
    StoreMethod,
    StorePlan,
    register,
    zero_fit,
)

TALL_DEFAULT_LAMBDA = 0.4
#: the coders a TSV-C and a BitDelta store record (``tvbasis.compress.Coder``'s named rules)
TSVC_CODER = "tsvc"
BITDELTA_CODER = "bitdelta"
#: build flags every per-task compressor takes (-M only as the M it stores)
_FLAGS = frozenset({"M", "option", "dtype", "include", "exclude"})

#: (checked options) -> a coder: a codec spec, a codec plan ``KIND=SPEC;…``, a named rule or a ``Coder``
CoderOf = Callable[[Mapping[str, Any]], "str | Coder | None"]


def tall_fit(T: int) -> BasisFit:
    """TALL: one stored vector s_0 = Σ_t τ_t (B = 1); the linear reconstruction is 0 (W = 0): the masks do it."""
    return BasisFit(M=1, B=np.ones((T, 1)), W=np.zeros((1, T)))


def mean_fit(T: int) -> BasisFit:
    """RTVQ's base: one stored vector, the mean task vector (B = 1/T), in every reconstruction with weight 1."""
    return BasisFit(M=1, B=np.full((T, 1), 1.0 / T), W=np.ones((1, T)))


def _int_bits(name: str, options: Mapping[str, Any]) -> None:
    for k, v in options.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8:
            raise ConfigError(f"--method {name}: option {k} must be an integer in 1..8, got {v!r}")


class PerTaskMethod(StoreMethod):
    """A per-task compressor as a store: ``fit(T)`` fixes what is shared (nothing, τ_MTL, the mean), ``residual``
    codes each task's entries and ``codec`` the shared vector, both from the checked options."""

    def __init__(
        self,
        name: str,
        summary: str,
        *,
        residual: CoderOf | None = None,
        codec: CoderOf | None = None,
        fit: Callable[[int], BasisFit] = zero_fit,
        defaults: Mapping[str, Any] | None = None,
        choices: Mapping[str, tuple[Any, ...]] | None = None,
        validate: Callable[[str, dict[str, Any], Sequence[str] | None], dict[str, Any]] | None = None,
        mode: str = ADD,
        task_like: bool = False,
        builder: str | None = None,
        flags: frozenset[str] = frozenset(),
        error_above_one: str | None = None,
    ) -> None:
        self.name, self.summary = name, summary
        self.residual, self.codec, self.fit, self.mode, self.task_like = residual, codec, fit, mode, task_like
        self.defaults = dict(defaults or {})
        self.choices = dict(choices or {})
        self.validate = validate
        self.coded_modes = (mode,)
        self.flags = _FLAGS | flags
        self.error_above_one = error_above_one
        if builder is not None:
            self.builder = builder

    @property
    def M(self) -> int:
        return self.fit(1).M

    def check(self, options: Mapping[str, Any], tasks: Sequence[str] | None = None) -> dict[str, Any]:
        if self.validate is not None:
            return self.validate(self.name, dict(options), tasks)
        return super().check(options, tasks)

    def plan(
        self,
        options: Mapping[str, Any],
        tasks: Sequence[str],
        M: int | None = None,
        residual: str | Coder | None = None,
        codec: str | None = None,
        layerwise: bool = False,
    ) -> StorePlan:
        self.check_build(M, residual, codec, layerwise)
        return StorePlan(
            options=dict(options),
            task_like=self.task_like,
            M=self.M,
            fit=self.fit,
            residual=None if self.residual is None else self.residual(options),
            codec=None if self.codec is None else self.codec(options),
            mode=self.mode,
            mask_lambdas=tall_lambdas(options, list(tasks)) if self.mode == MASK else None,
        )

    def check_build(self, M: int | None, residual: str | Coder | None, codec: str | None, layerwise: bool) -> None:
        if layerwise:
            raise ConfigError(f"--method {self.name} is not layer-wise")
        if residual is not None or codec is not None:
            raise ConfigError(f"--method {self.name} codes every task its own way; --residual and --codec do not apply")
        if M is not None and M != self.M:
            raise ConfigError(
                f"--method {self.name} stores {self.M} shared vector(s) (M = {self.M}); -M must be {self.M} or omitted"
            )

    def problem(self, facts: StoredFacts) -> tuple[str, str] | None:
        if self.mode == MASK and (facts.M != 1 or facts.mode != MASK or facts.has_mean):
            return "coded", f"of a {self.name} store must be per-task masks (mode 'mask') over M = 1 stored vector"
        return None


# ------------------------------------------------------------------------------------------------ options
def _check_lambda(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"--method tall: option {what} must be a number >= 0, got {v!r}")


def check_tall_options(name: str, opts: dict[str, Any], tasks: Sequence[str] | None) -> dict[str, Any]:
    """TALL's ``lambda`` (one λ for all tasks) and ``lambdas`` (task -> λ)."""
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


def tall_lambdas(options: Mapping[str, Any], tasks: list[str]) -> list[float]:
    """λ_t of every task: its ``lambdas`` entry, else ``lambda``."""
    per = dict(options.get("lambdas") or {})
    return [float(per.get(t, options.get("lambda", TALL_DEFAULT_LAMBDA))) for t in tasks]


def _bits_options(name: str, opts: dict[str, Any], tasks: Sequence[str] | None) -> dict[str, Any]:
    out = StoreMethod.check(_PER_TASK[name], opts, tasks)
    _int_bits(name, out)
    return out


def _ultradelta_coder(options: Mapping[str, Any]) -> Coder:
    if options.get("allocation") is None:
        raise ConfigError(
            "--method ultradelta allocates each task's sparsity from statistics of its tensors: "
            "build it with tvbasis build --method ultradelta (the Python API: "
            "tvbasis.store.ultradelta.build_ultradelta_store), which runs those passes first"
        )
    return Coder.with_rule(UltraDeltaRule.from_options(options))


_PER_TASK: dict[str, PerTaskMethod] = {}


def _add(method: PerTaskMethod) -> None:
    _PER_TASK[method.name] = method
    register(method)


# ------------------------------------------------------------------------------------------------ the methods
_add(
    PerTaskMethod(
        "tall",
        "TALL masks over the multi-task vector (--option lambda=0.4)",
        fit=tall_fit,
        mode=MASK,
        task_like=True,
        defaults={"lambda": TALL_DEFAULT_LAMBDA},
        validate=check_tall_options,
        error_above_one="a TALL store gives m_t ⊙ τ_MTL, the multi-task vector on this task's mask; "
        "where the other tasks outweigh this one on those coordinates it points away from τ_t",
    )
)
_add(PerTaskMethod("tsvc", "TSV-C: 1/T of each matrix's singular triplets", residual=lambda o: TSVC_CODER))
_add(
    PerTaskMethod(
        "tvq",
        "TVQ: every tensor at --option bits=4",
        residual=lambda o: f"minmax:bits={o['bits']}",
        defaults={"bits": 4},
        validate=_bits_options,
    )
)
_add(
    PerTaskMethod(
        "rtvq",
        "RTVQ: a quantised mean base and quantised per-task offsets",
        fit=mean_fit,
        residual=lambda o: f"minmax:bits={o['offset_bits']}",
        codec=lambda o: f"minmax:bits={o['base_bits']}",
        defaults={"base_bits": 3, "offset_bits": 2},
        validate=_bits_options,
    )
)
_add(PerTaskMethod("bitdelta", "BitDelta: sign bits and one scale per matrix", residual=lambda o: BITDELTA_CODER))
_add(
    PerTaskMethod(
        "deltacome",
        "Delta-CoMe: mixed-precision singular vectors",
        residual=lambda o: DeltaComeRule.from_options(o).spec,
        defaults=DELTACOME_DEFAULTS,
        validate=lambda n, o, t: check_deltacome_options(o),
    )
)
_add(
    PerTaskMethod(
        "ultradelta",
        "UltraDelta: variance-allocated sparse 4-bit levels",
        residual=_ultradelta_coder,
        defaults=ULTRADELTA_DEFAULTS,
        validate=lambda n, o, t: check_ultradelta_options(o, t),
        builder=STATISTICS_FIRST,
        flags=frozenset({"seed"}),
    )
)
