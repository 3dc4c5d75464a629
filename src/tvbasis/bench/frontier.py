"""``tvbasis bench --frontier``: the storage–accuracy frontier of compressors that give every task back.

The same fine-tunes, evaluator and protocol as ``tvbasis bench`` (``bench.py``; docs/benchmark.md). Every
configuration is a store on disk, built from the fine-tunes with ``build_store`` exactly as ``tvbasis build``
would (``--method tall|tsvc|tvq|rtvq|bitdelta``, ``-M 0 --residual PLAN``, ``--codec PLAN --residual PLAN``), and
read back task by task with ``reconstruct`` (``store_args`` maps a row to its build), then:

* **bytes stored** — exact: every stored tensor of the store (dense and coded: τ_MTL, bases, masks, residuals)
  plus 4 per coefficient, and × = T float32 task vectors / that; the store's size on disk (manifest and
  safetensors headers included) is in each row's ``extra.store_bytes_on_disk``;
* **per-task** normalized accuracy — each task's compressed vector alone, applied at λ = 1 on its own task:
  acc(θ₀ + ṽ_t on t) / acc(θ_t on t); mean and min over tasks;
* **addition** — θ₀ + λ·Σ_t ṽ_t, λ chosen on dev (``Evaluator.search_addition``), mean normalized test accuracy
  (TALL: its stored τ_MTL = Σ_t τ_t, i.e. task arithmetic, as the paper — the masks only localise tasks);
* **negation** — θ₀ − λ·ṽ_target for the two (target, control) pairs (``Evaluator.search_negation``);
* the relative reconstruction error ‖ṽ_t − v_t‖ / ‖v_t‖ per task.

Configurations (``default_configs``): the full float32 task vectors; the peers as store methods — TALL masks
(λ_t from the paper's grid, chosen per task on dev), TSV-C (1/T of the singular triplets per 2-D tensor), TVQ
int4/int3/int2, RTVQ B3O2, BitDelta (``tvbasis.methods.per_task``); tvbasis at M = 0 — each task through a per-kind
codec plan at several budgets (``PLANS``) — and at M ∈ {1, 2, 4} — a PCA store for the shared part, its bases
through a codec plan (``--codec``), plus per-task residuals r_t = v_t − v̂_t against those coded bases, through a
plan (``--residual``); and one PCA store alone (no residual). Families get a Pareto front each in the plots.

Outputs in ``<out>`` (default ``<work>/frontier``): ``frontier.json``, ``frontier.md`` (the table and the goals
check), ``frontier_per_task.png`` and ``frontier_addition.png`` (accuracy vs bytes, log x, Pareto fronts).

``--lora`` (``run_frontier(extra=LoraRows(...))``): also one PEFT LoRA adapter per task and the rows of ``frontier_lora``
(the adapters as they are and the stores that read them), normalized by each adapter's own accuracy: key
``"lora"`` of frontier.json, their own table in frontier.md, ``frontier_lora.png``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from tvbasis.bench.bench import BenchConfig, _bar, _fmt_bytes, _jsonable, _pct
from tvbasis.bench.states import float_state as _state
from tvbasis.bench.states import vector_bytes
from tvbasis.compress import (
    TALL_LAMBDAS,
    CodecPlan,
    tall_mask,
    tall_reconstruct,
)
from tvbasis.engine.cores import available_cores, busy_cores_elsewhere, cores_left, load_average
from tvbasis.errors import ConfigError, TvbasisError
from tvbasis.eval.encoder import EVAL_DTYPES
from tvbasis.eval.evalcache import CACHE_NAME, EvalCache
from tvbasis.eval.finetune import ensure_writable, finetune, pretrained_encoder
from tvbasis.eval.metrics import DEFAULT_GRID, AdditionResult, Evaluator, NegationResult, lambda_grid, mean
from tvbasis.eval.tasks import TASK_NAMES, load_task
from tvbasis.methods import get_store_method, store_method_names

State = dict[str, torch.Tensor]

#: tvbasis per-task codec plans (M = 0 budgets, and the residual plans of the bases rows), cheapest last
PLANS: dict[str, str] = {
    "int4": "embedding=sparse-rows+int8;matrix=int4:group=64;vector=float16",
    "int2": "embedding=sparse-rows+int4;matrix=int2:group=64,scheme=affine;vector=float16",
    "lr48-int8": "embedding=sparse-rows+int8;matrix=lowrank:rank=48+int8;vector=float16",
    "sign": "embedding=sparse-rows+int4;matrix=sign;vector=float16",
    "lr32-int4": "embedding=sparse-rows+lowrank:rank=64+int4;matrix=lowrank:rank=32+int4;vector=float16",
    "lr24-int2": ("embedding=sparse-rows+lowrank:rank=64+int4;matrix=lowrank:rank=24+int2:group=32,scheme=affine;"
                  "vector=float16"),
    "lr16-int2": ("embedding=sparse-rows+lowrank:rank=32+int4;matrix=lowrank:rank=16+int2:group=32,scheme=affine;"
                  "vector=float16"),
}
#: how the bases of the M ≥ 1 rows are coded: embeddings left to the residuals (a basis is not row-sparse)
BASES_PLAN = "embedding=none;matrix=lowrank:rank=64+int4;vector=float16"
#: residual plans crossed with M ∈ FRONTIER_MS
RESIDUAL_PLANS = ("lr32-int4", "lr24-int2")
FRONTIER_MS = (1, 2, 4)
#: the per-task goal of the issue: normalized accuracy ≥ 0.99 at ≥ 64× less storage
GOAL_ACCURACY, GOAL_COMPRESSION = 0.99, 64.0
NEGATION_POINTS, CONTROL_FLOOR = 0.02, 0.95


@dataclass(frozen=True)
class Config:
    """One point of the frontier: how the T task vectors are compressed."""

    label: str
    family: str       # plot / Pareto group
    method: str       # full | tall | tsvc | tvq | rtvq | bitdelta | plan | bases
    params: Mapping[str, Any] = field(default_factory=dict)
    M: int = 0

    @property
    def is_tvbasis(self) -> bool:
        return self.family.startswith("tvbasis")

    @property
    def is_peer(self) -> bool:
        return self.family in PEER_FAMILIES


PEER_FAMILIES = ("TALL", "TSV-C", "TVQ / RTVQ", "BitDelta", "Delta-CoMe", "UltraDelta")
#: the budget sweep (``tvbasis build --budget``): ratios against float32 task vectors, store on disk
BUDGETS: tuple[str, ...] = ("16x", "32x", "64x", "128x", "256x")
#: calibrated and probed budget rows: this many of each task's training texts (``build --budget --calibration`` /
#: ``--probe``)
CAL_TEXTS = 128
#: the budgets that also get a calibrated and a probed row (``build --budget --calibration`` / ``--probe``; the
#: 16x and 32x stores already keep every task near 0.99, so the data-aware rows are measured where it is lost)
PROBED_BUDGETS: tuple[str, ...] = ("64x", "128x", "256x")
#: the budget issue's goals: every task ≥ 0.99 at ≥ 128× on disk, negation fidelity ≥ 0.9 on every pair
GOAL_MIN_ACCURACY, GOAL_BUDGET_COMPRESSION, GOAL_NEGATION_FIDELITY = 0.99, 128.0, 0.9


def default_configs(T: int, Ms: Sequence[int] = FRONTIER_MS, basis: str = "pca") -> list[Config]:
    """The frontier's configurations for T tasks (bases rows only for M < T)."""
    out = [Config("task vectors (fp32)", "task vectors", "full"),
           Config("TALL masks", "TALL", "tall"),
           Config("TSV-C (1/T)", "TSV-C", "tsvc"),
           Config("TVQ int4", "TVQ / RTVQ", "tvq", {"bits": 4}),
           Config("TVQ int3", "TVQ / RTVQ", "tvq", {"bits": 3}),
           Config("TVQ int2", "TVQ / RTVQ", "tvq", {"bits": 2}),
           Config("RTVQ B3O2", "TVQ / RTVQ", "rtvq", {"base_bits": 3, "offset_bits": 2}),
           Config("BitDelta", "BitDelta", "bitdelta")]
    out += [Config("Delta-CoMe (1/16 fp16)", "Delta-CoMe", "deltacome"),
            Config("Delta-CoMe (1/64 fp16)", "Delta-CoMe", "deltacome", {"alpha": 0.015625}),
            Config("UltraDelta (paper)", "UltraDelta", "ultradelta"),
            Config("UltraDelta density 0.01", "UltraDelta", "ultradelta", {"density": 0.01})]
    out += [Config(f"plan {name}", "tvbasis M=0", "plan", {"plan": spec}) for name, spec in PLANS.items()]
    out += [Config(f"budget {b}", "tvbasis --budget", "budget", {"budget": b}) for b in BUDGETS]
    out += [Config(f"budget {b} calibrated", "tvbasis --budget", "budget", {"budget": b, "calibration": CAL_TEXTS})
            for b in PROBED_BUDGETS]
    out += [Config(f"budget {b} probed", "tvbasis --budget", "budget", {"budget": b, "probe": CAL_TEXTS})
            for b in PROBED_BUDGETS]
    Ms = [M for M in Ms if 1 <= M < T]
    if Ms:
        M0 = 2 if 2 in Ms else Ms[0]
        out.append(Config(f"{basis} M={M0} store alone", "basis store", "bases",
                          {"basis": basis, "bases_plan": None, "residual": None}, M0))
    out += [Config(f"{basis} M={M} + res {r}", f"tvbasis M={M}", "bases",
                   {"basis": basis, "bases_plan": BASES_PLAN, "residual": PLANS[r]}, M)
            for M in Ms for r in RESIDUAL_PLANS]
    return out


def select_configs(configs: Sequence[Config], patterns: Sequence[str]) -> list[Config]:
    """The configurations whose label or family contains one of ``patterns``, or whose method is one
    (case-insensitive); ConfigError when a pattern matches none."""
    pats = [p.strip().lower() for p in patterns if p.strip()]

    def hit(p: str, c: Config) -> bool:
        return p in c.label.lower() or p in c.family.lower() or p == c.method

    for p in pats:
        if not any(hit(p, c) for c in configs):
            raise ConfigError(f"--rows: {p!r} matches no frontier row; rows: "
                              + ", ".join(c.label for c in configs)[:400])
    return [c for c in configs if any(hit(p, c) for p in pats)]


@dataclass
class Compressed:
    """The T compressed task vectors of one configuration, their stored bytes and facts about them."""

    vectors: dict[str, State]
    nbytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    exact: bool = False  # the vectors are the task vectors themselves (per-task accuracy is 1 by definition)
    #: the stored multi-task vector where the method keeps one (TALL's τ_MTL); None: addition sums the ṽ_t
    addition: State | None = None


@dataclass
class Context:
    tasks: list[str]
    tvs: dict[str, State]
    pre_dir: Path
    ft_dirs: dict[str, str]
    stores: Path
    keep_stores: bool
    dev_accuracy: Callable[[State, str], float]  # θ₀ + v on the dev split of one task
    progress: bool = False
    #: each task's training texts, for the calibrated budget rows (``--calibration``: what a user would give)
    train_texts: dict[str, list[str]] | None = None
    max_length: int = 64
    #: each task's label names (its head), for the probed budget rows
    label_texts: dict[str, tuple[str, ...]] | None = None


# --------------------------------------------------------------------------------------------- compressors
def tall_lambdas_on_dev(ctx: Context, lambdas: Sequence[float] = TALL_LAMBDAS) -> dict[str, Any]:
    """TALL's λ_t per task, chosen on dev from ``lambdas`` (ties: the smaller λ, as ``max`` over the paper's
    λ-ordered dict): the dev curves of m_t ∘ τ_MTL, computed in memory, and the choice."""
    names = list(ctx.tvs[ctx.tasks[0]])
    mtl = {n: sum(ctx.tvs[t][n] for t in ctx.tasks) for n in names}

    def recon(t: str, lam: float) -> State:
        return {n: tall_reconstruct(tall_mask(ctx.tvs[t][n], mtl[n], lam), mtl[n]) for n in names}

    curves: dict[str, dict[float, float]] = {t: {} for t in ctx.tasks}
    for lam in sorted(lambdas):
        for t in ctx.tasks:
            curves[t][lam] = ctx.dev_accuracy(recon(t, lam), t)
    chosen = {t: max(sorted(c), key=lambda lam, c=c: (c[lam], -lam)) for t, c in curves.items()}
    return {"lambda": chosen, "dev_curve": curves}


#: basis rows built with the run's seed (the autoencoder keeps its default seed, as the frontier's results were)
SEEDED_BASES = ("random", "random-sample", "cluster")
#: store methods whose options the frontier chooses on dev data first (TALL's λ_t per task)
DEV_TUNED: dict[str, Callable[[Context, Mapping[str, Any]], tuple[dict[str, Any], dict[str, Any]]]] = {
    "tall": lambda ctx, p: _tall_on_dev(ctx, p),
}


def _tall_on_dev(ctx: Context, p: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    chosen = tall_lambdas_on_dev(ctx, p.get("lambdas", TALL_LAMBDAS))
    return {"lambdas": chosen["lambda"]}, chosen


def store_args(config: Config, ctx: Context, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the store's ``StoreSpec`` fields, facts for the row) of a configuration: every compressor of the frontier
    is a store on disk, built and read back as a user would (``tvbasis build ... / reconstruct``). A row named
    after a store method (``tvbasis.methods``) builds that method with the row's options."""
    p = dict(config.params)
    if config.method in store_method_names():
        tune = DEV_TUNED.get(config.method)
        if tune is not None:
            options, chosen = tune(ctx, p)
            return {"method": config.method, "M": None, "options": options}, chosen
        has_options = bool(get_store_method(config.method).defaults)
        return {"method": config.method, "M": None, **({"options": p} if has_options else {})}, {}
    if config.method == "plan":
        return {"method": "pca", "M": 0, "residual": p["plan"]}, {"plan": CodecPlan.parse(p["plan"]).spec}
    if config.method == "budget":
        return {"budget": str(p["budget"]), "loss": str(p.get("loss", "frobenius")),
                "calibration": int(p.get("calibration", 0)), "probe": int(p.get("probe", 0))}, {}
    if config.method == "bases":
        basis = p.get("basis", "pca")
        options = {"seed": seed} if basis in SEEDED_BASES else {}
        return {"method": basis, "M": config.M, "options": options, "codec": p.get("bases_plan"),
                "residual": p.get("residual")}, {}
    raise ConfigError(f"unknown frontier method {config.method!r}")


#: the last budget build's measuring pass, by (pretrained, fine-tunes): one pass serves the whole sweep
_MEASURED: dict[Any, Any] = {}


#: calibration statistics by (fine-tune directory, number of texts): one forward pass per task per run
_CALIBRATION: dict[Any, Any] = {}


def calibration_of(ctx: Context, n_texts: int) -> dict[str, Any]:
    """Each task's calibration statistics from its first ``n_texts`` training texts, run through its fine-tune
    (``tvbasis.eval.calibration``; cached for the run)."""
    from tvbasis.eval.calibration import calibrate_model

    if ctx.train_texts is None:
        raise ConfigError("calibrated budget rows need the tasks' training texts")
    out = {}
    for t in ctx.tasks:
        key = (ctx.ft_dirs[t], n_texts)
        if key not in _CALIBRATION:
            _CALIBRATION[key] = calibrate_model(ctx.ft_dirs[t], ctx.train_texts[t][:n_texts], ctx.max_length)
        out[t] = _CALIBRATION[key]
    return out


#: prediction probes by (pretrained, fine-tunes, number of texts): the fine-tunes' reference probabilities once
_PROBE: dict[Any, Any] = {}


def probe_of(ctx: Context, n_texts: int) -> Any:
    """The tasks' prediction probe (``tvbasis.eval.probe``) over their first ``n_texts`` training texts and their
    heads' label names (cached for the run)."""
    from tvbasis.eval.probe import PredictionProbe

    if ctx.train_texts is None or ctx.label_texts is None:
        raise ConfigError("probed budget rows need the tasks' training texts and label names")
    key = (str(ctx.pre_dir), tuple(sorted(ctx.ft_dirs.items())), n_texts)
    if key not in _PROBE:
        _PROBE.clear()
        _PROBE[key] = PredictionProbe(ctx.pre_dir, ctx.ft_dirs, {t: ctx.train_texts[t][:n_texts] for t in ctx.tasks},
                                      ctx.label_texts, max_length=ctx.max_length)
    return _PROBE[key]


def compress_store(config: Config, ctx: Context, seed: int = 0) -> Compressed:
    """Build the configuration's store (``build_store``), read every task back (``reconstruct``) and, for TALL,
    its stored multi-task vector (``addition``). Bytes: the store's data (dense and coded tensors) plus 4 per
    coefficient; the store on disk (manifest and safetensors headers included) is in ``extra``."""
    from tvbasis.engine import RunOptions
    from tvbasis.store import StoreSpec, WriteOptions
    from tvbasis.store.builders import builder_of

    kwargs, facts = store_args(config, ctx, seed)
    run = RunOptions(progress=ctx.progress)
    if config.method == "budget":
        from tvbasis.store.budget import build_budget_store

        def budget_build(path: Path) -> Any:
            n_cal = kwargs.get("calibration", 0)
            key = (str(ctx.pre_dir), tuple(sorted(ctx.ft_dirs.items())), n_cal)
            cal = calibration_of(ctx, n_cal) if n_cal else None
            n_probe = kwargs.get("probe", 0)
            store, report = build_budget_store(ctx.pre_dir, ctx.ft_dirs, path, budget=kwargs["budget"], force=True,
                                               run=run, measured=_MEASURED.get(key), loss=kwargs["loss"],
                                               calibration=cal, probe=probe_of(ctx, n_probe) if n_probe else None)
            _MEASURED.clear()
            _MEASURED[key] = report.measured  # the sweep's other budgets reuse the measuring pass
            facts_out.update({"budget": report.to_json()})
            return store

        facts_out: dict[str, Any] = dict(facts)
        return read_store(config, ctx, budget_build, kwargs, facts_out)
    spec = StoreSpec(**kwargs)
    build = builder_of(spec.method)  # ultradelta: its statistics passes first
    return read_store(config, ctx, lambda path: build(ctx.pre_dir, ctx.ft_dirs, spec, path, run,
                                                      WriteOptions(force=True)), kwargs, facts)


def read_store(config: Config, ctx: Context, build: Callable[[Path], Any], kwargs: Mapping[str, Any],
               facts: Mapping[str, Any]) -> Compressed:
    """``build(path)`` a store at ``<ctx.stores>/frontier-<label>`` (timed), read every task back and, for TALL,
    its stored multi-task vector; removed afterwards unless ``ctx.keep_stores``. ``kwargs``: the build's
    arguments, recorded in the row."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in config.label.lower()).strip("-")
    path = ctx.stores / f"frontier-{slug}"
    t0 = time.time()
    store = build(path)
    build_s = time.time() - t0
    try:
        vectors = {t: _state(store.reconstruct(t)) for t in ctx.tasks}
        addition = _state(store.addition()) if store.masks else None
        s = store.summary()
        n_stored = next(iter(store.fits.values())).n_stored
        # the peers' coefficients are implicit (TALL: the masks; RTVQ: 1), a basis store's are real numbers
        coef_bytes = 0 if store.M == 0 or config.method != "bases" else 4 * store.T * n_stored
        coded = s["coded"] or {}
        extra = {**facts, "store": {k: v for k, v in kwargs.items() if v is not None}, "M": store.M,
                 "bases_codec": coded.get("bases_codec"), "residual_codec": coded.get("residual_codec"),
                 "dense_bytes": store.dense_bytes, "coded_bases_bytes": coded.get("bases_bytes", 0),
                 "per_task_bytes": coded.get("per_task_bytes", 0), "coefficient_bytes": coef_bytes,
                 "store_bytes_on_disk": store.nbytes, "store_rel_errors": _jsonable(store.rel_errors),
                 "build_seconds": round(build_s, 2)}
        nbytes = store.data_bytes + coef_bytes
    finally:
        store.close()
        if not ctx.keep_stores:
            shutil.rmtree(path, ignore_errors=True)
    return Compressed(vectors, nbytes, extra, addition=addition)


def compress(config: Config, ctx: Context, seed: int = 0) -> Compressed:
    """The T compressed task vectors of one configuration."""
    T = len(ctx.tasks)
    if config.method == "full":
        return Compressed(dict(ctx.tvs), T * vector_bytes(ctx.tvs[ctx.tasks[0]]), exact=True)
    return compress_store(config, ctx, seed)


def rel_error(v: Mapping[str, torch.Tensor], vhat: Mapping[str, torch.Tensor]) -> float:
    num = sum(float((vhat[n].double() - x.double()).pow(2).sum()) for n, x in v.items())
    den = sum(float(x.double().pow(2).sum()) for x in v.values())
    return math.sqrt(num / den) if den > 0 else 0.0


# --------------------------------------------------------------------------------------------- the run
def _load() -> float | None:
    load = load_average()
    return None if load is None else round(load, 2)


def measure_threads(busy: Callable[[], float | None] | None = None) -> int:
    """Torch threads for the measurements: ``TVBASIS_THREADS`` if set; else the cores the machine has free now —
    the cores this process may use less those other processes keep busy (``busy``, default
    ``busy_cores_elsewhere``: measured over a second), rounded, at least 1 (oversubscribed OpenMP threads spin and
    wait: one thread measured 3–4× faster on a busy machine, for forward passes and SVDs alike). Where the busy
    cores cannot be measured, 1 thread when the load average reaches the core count, else every core."""
    env = os.environ.get("TVBASIS_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"TVBASIS_THREADS must be an integer, got {env!r}") from None
    cores = available_cores()
    if cores <= 1:
        return 1
    others = (busy or busy_cores_elsewhere)()
    if others is not None:
        return cores_left(cores, others)
    load = _load()
    return 1 if load is not None and load >= cores else cores


def frontier_full_protocol(**overrides: Any) -> BenchConfig:
    """``--frontier --full``: the 8 tasks under the protocol of the committed frontier-full result — 2000 training,
    32 dev and 500 test examples per task, addition λ coarse-to-fine on 0.05 … 1, negation 0.1 … 1 with early stop.
    (The paper's protocol that ``bench --full`` now follows — 21 points searched whole, 200 dev examples, negation
    without early stop — would take the frontier's 22 configurations far past its 40-minute budget.)"""
    base = BenchConfig(tasks=TASK_NAMES, max_train=2000, max_dev=32, max_test=500, grid=DEFAULT_GRID,
                       search="refine", neg_grid=lambda_grid(0.1, 1.0), full=True)
    return replace(base, **overrides)


class FrontierRows(Protocol):
    """Extra rows measured after the frontier's own with the same evaluator (``frontier_lora.LoraRows``): prepared
    after the fine-tunes, measured, then written under ``key`` with their own table and plot."""

    key: str

    def prepare(self, tasks: Mapping[str, Any], work: Path, settings: Any, encoder: Any, progress: bool) -> None: ...

    def measure(self, pre_dir: Path, names: Sequence[str], ev: Any, cfg: BenchConfig,
                stores: Path) -> dict[str, Any]: ...

    def markdown(self, result: Mapping[str, Any]) -> str: ...

    def plot(self, result: Mapping[str, Any], out: Path) -> Path: ...


def run_frontier(config: BenchConfig, configs: Sequence[Config] | None = None,
                 Ms: Sequence[int] | None = None, extra: FrontierRows | None = None) -> dict[str, Any]:
    """Run the frontier; returns the JSON-able result (also written to <out>/frontier.json, .md, plots).

    ``extra``: more rows after the frontier's own (``--lora``: ``frontier_lora.LoraRows``, one PEFT LoRA adapter
    per task and the stores that read them; result key ``"lora"``, their own table and frontier_lora.png)."""
    from tvbasis.vectors import TaskVector

    n_tasks = len(dict.fromkeys(config.tasks))
    if Ms is not None:
        bad = [M for M in Ms if not 1 <= M < n_tasks]
        if bad:
            raise ConfigError(f"M must satisfy 1 <= M < T = {n_tasks} tasks; got {bad}")
    # the bench's own M check is for its basis rows; the frontier's Ms are checked above
    cfg = replace(config, Ms=(1,)).resolved()
    t_start = time.time()
    work = ensure_writable(cfg.work)
    out = ensure_writable(cfg.out or work / "frontier")
    settings = cfg.finetune_settings()
    tasks = {n: load_task(n, max_train=cfg.max_train, max_dev=cfg.max_dev, max_test=cfg.max_test, seed=cfg.seed)
             for n in cfg.tasks}
    encoder = pretrained_encoder(work, settings)
    results = {n: finetune(t, work, settings, encoder=encoder, progress=cfg.progress) for n, t in tasks.items()}
    t_finetune = time.time() - t_start
    if cfg.resume:
        encoder.eval_cache = EvalCache(out / CACHE_NAME)
    if extra is not None:
        extra.prepare(tasks, work, settings, encoder, cfg.progress)
    encoder.eval_dtype = EVAL_DTYPES[cfg.eval_dtype]  # after every fine-tune: they never see it
    threads_before = torch.get_num_threads()
    threads = measure_threads()
    torch.set_num_threads(threads)
    try:
        pre_dir = work / "pretrained"
        ft_dirs = {n: str(r.path) for n, r in results.items()}
        ev = Evaluator(encoder, tasks, progress=False)
        names = list(cfg.tasks)
        zs_dev, zs_test = ev.zero_shot("dev"), ev.zero_shot("test")
        tvs = {n: _state(TaskVector.from_checkpoints(pre_dir, d)) for n, d in ft_dirs.items()}
        ft_dev = {n: ev.with_delta(tvs[n], 1.0, "dev", [n])[n] for n in names}
        ft_test = {n: ev.with_delta(tvs[n], 1.0, "test", [n])[n] for n in names}
        one_vector = vector_bytes(tvs[names[0]])
        all_vectors = one_vector * len(names)
        ctx = Context(names, tvs, pre_dir, ft_dirs, work / "stores", cfg.keep_stores,
                      lambda v, t: ev.with_delta(v, 1.0, "dev", [t])[t], progress=cfg.progress,
                      train_texts={n: list(tasks[n]["train"].texts) for n in names}, max_length=cfg.max_length,
                      label_texts={n: tuple(tasks[n].label_texts) for n in names})
        Ms = tuple(Ms) if Ms is not None else tuple(M for M in FRONTIER_MS if M < len(names))
        todo = list(configs) if configs is not None else default_configs(len(names), Ms)

        rows = annotate(measure(todo, ctx, ev, ft_dev, ft_test, cfg), all_vectors)
        extra_result = None
        if extra is not None:
            extra_result = extra.measure(pre_dir, names, ev, cfg, work / "stores" / extra.key)
    finally:
        torch.set_num_threads(threads_before)
    settings_out = {k: v for k, v in asdict(cfg).items() if k not in ("Ms", "methods")}
    result = {
        "config": _jsonable({**settings_out, "Ms": list(Ms)}),
        "tasks": {n: {"classes": t.num_classes, "domain": t.domain, **{s: len(t[s]) for s in ("train", "dev", "test")}}
                  for n, t in tasks.items()},
        "model": encoder.describe(), "vector_bytes": one_vector, "all_vectors_bytes": all_vectors,
        "zero_shot": {"dev": zs_dev, "test": zs_test,
                      "normalized_test": {t: zs_test[t] / ft_test[t] for t in names}},
        "finetuned": {"dev": ft_dev, "test": ft_test},
        "rows": rows,
        "timings": {"finetune": round(t_finetune, 1), "total": round(time.time() - t_start, 1),
                    "threads": threads, "load_average": _load()},
    }
    result["goals"] = goals(result)
    if extra is not None and extra_result is not None:
        result[extra.key] = extra_result
        result["timings"][extra.key] = extra_result["seconds"]
    (out / "frontier.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["markdown"] = markdown_table(result)
    if extra is not None and extra_result is not None:
        result["markdown"] += "\n\n" + extra.markdown(result)
    (out / "frontier.md").write_text(result["markdown"] + "\n")
    if cfg.plots:
        result["plots"] = [str(p) for p in make_plots(result, out)]
        if extra is not None and extra_result is not None:
            result["plots"].append(str(extra.plot(result, out)))
    result["out"] = str(out)
    return result


#: the phases of one row, in the order ``measure`` runs them
PHASES = ("compress", "per_task", "addition", "negation")


def measure(todo: Sequence[Config], ctx: Context, ev: Any, ft_dev: Mapping[str, float],
            ft_test: Mapping[str, float], cfg: BenchConfig,
            compressor: Callable[[Config, Context, int], Compressed] | None = None,
            reference_bytes: int | None = None) -> list[dict[str, Any]]:
    """One row per configuration: compress (``compressor``, default ``compress``), then per-task / addition /
    negation through ``ev`` (an ``Evaluator``: ``with_delta``, ``search_addition``, ``search_negation``), normalized
    by ``ft_dev`` / ``ft_test``; ``compression`` = ``reference_bytes`` (default: T float32 task vectors) / stored."""
    names, tvs = ctx.tasks, ctx.tvs
    all_vectors = reference_bytes if reference_bytes is not None else len(names) * vector_bytes(tvs[names[0]])
    compressor = compressor or compress
    rows: list[dict[str, Any]] = []
    bar = _bar(len(todo), "frontier", cfg.progress)
    for c in todo:
        bar.set_postfix_str(c.label)
        t0 = time.time()
        laps = [t0]  # the end of each phase of PHASES, in order
        try:
            comp = compressor(c, ctx, cfg.seed)
        except TvbasisError as e:  # name the row; the scores already computed survive in --resume's cache
            hint = ("; the same command again reads the finished rows' scores back from the cache" if cfg.resume
                    else "; with --resume a rerun would have kept the finished rows' scores")
            raise type(e)(f"frontier row {c.label!r} ({len(rows)} of {len(todo)} rows done): {e}{hint}") from e
        laps.append(time.time())
        if comp.exact:
            per_task_acc = dict(ft_test)
        else:
            per_task_acc = {t: ev.with_delta(comp.vectors[t], 1.0, "test", [t])[t] for t in names}
        laps.append(time.time())
        per_task = {t: per_task_acc[t] / ft_test[t] if ft_test[t] > 0 else float("nan") for t in names}
        total = (comp.addition if comp.addition is not None
                 else {k: sum(comp.vectors[t][k] for t in names) for k in comp.vectors[names[0]]})
        add: AdditionResult = ev.search_addition(total, cfg.grid, finetuned_dev=ft_dev, finetuned_test=ft_test,
                                                 search=cfg.search)
        del total
        laps.append(time.time())
        neg: list[NegationResult] = [ev.search_negation(comp.vectors[t], t, ctrl, cfg.neg_grid, early_stop=True)
                                     for t, ctrl in cfg.pairs]
        laps.append(time.time())
        phase_seconds = {p: round(b - a, 2) for p, a, b in zip(PHASES, laps[:-1], laps[1:], strict=True)}
        rows.append({
            "label": c.label, "family": c.family, "method": c.method, "M": c.M, "params": _jsonable(dict(c.params)),
            "tvbasis": c.is_tvbasis, "peer": c.is_peer, "bytes_stored": int(comp.nbytes),
            "compression": all_vectors / max(1, comp.nbytes), "per_task": per_task,
            "per_task_accuracy": per_task_acc, "per_task_mean": mean(per_task.values()),
            "per_task_min": min(per_task.values()), "addition": add.to_dict(),
            "addition_vector": "stored multi-task vector" if comp.addition is not None else "sum of the ṽ_t",
            "negation": [n.to_dict() for n in neg],
            "rel_errors": {t: 0.0 if comp.exact else rel_error(tvs[t], comp.vectors[t]) for t in names},
            "extra": _jsonable(comp.extra), "compress_seconds": phase_seconds["compress"],
            "phase_seconds": phase_seconds, "seconds": round(laps[-1] - t0, 2)})
        del comp
        bar.update(1)
    bar.close()
    return rows


# --------------------------------------------------------------------------------------------- analysis
def negation_fidelity(row: Mapping[str, Any], full: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Per negation pair: (target accuracy drop through the row's vector) ÷ (drop through the true vector), both at
    the λ each chose on dev with the control ≥ 95 % of zero-shot; None where the true vector's drop is ≤ 0 or no
    λ kept the row's control (a failed negation counts as fidelity 0)."""
    if full is None:
        return {}
    true = {(n["target"], n["control"]): n for n in full["negation"]}
    out: dict[str, float | None] = {}
    for n in row["negation"]:
        ref = true.get((n["target"], n["control"]))
        key = f"{n['target']}/{n['control']}"
        if ref is None:
            out[key] = None
            continue
        drop_true = ref["pretrained_target_test"] - ref["target_test"]
        if drop_true <= 0:
            out[key] = None
        elif not n["feasible"]:
            out[key] = 0.0
        else:
            out[key] = (n["pretrained_target_test"] - n["target_test"]) / drop_true
    return out


def annotate(rows: list[dict[str, Any]], all_vectors: int) -> list[dict[str, Any]]:
    """Add what every row is compared on besides its data bytes: the store on disk (manifest and headers included;
    the float32 task vectors count as their bytes), × on disk, and negation fidelity per pair and its minimum."""
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        disk = (r.get("extra") or {}).get("store_bytes_on_disk") or r["bytes_stored"]
        r["bytes_on_disk"] = int(disk)
        r["compression_on_disk"] = all_vectors / max(1, int(disk))
        fid = negation_fidelity(r, full)
        r["negation_fidelity"] = fid
        known = [v for v in fid.values() if v is not None]
        r["negation_fidelity_min"] = min(known) if known else None
    return rows


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (bytes, accuracy) not beaten by a point with ≤ bytes and ≥ accuracy (one strictly), by bytes."""
    out: list[tuple[float, float]] = []
    for b, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if math.isnan(a):
            continue
        if not out or a > out[-1][1]:
            out.append((b, a))
    return out


def _add(r: Mapping[str, Any]) -> float:
    return float(r["addition"]["mean_normalized_test"])


def dominating(peer: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """tvbasis rows at most as big as ``peer`` with per-task and addition accuracy at least as high."""
    return [r for r in rows if r["tvbasis"] and r["bytes_stored"] <= peer["bytes_stored"]
            and r["per_task_mean"] >= peer["per_task_mean"] and _add(r) >= _add(peer)]


def dominating_on_disk(peer: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The budget issue's domination: tvbasis rows with ≤ bytes on disk, ≥ per-task minimum, ≥ addition and ≥
    negation fidelity (where the peer has one) than ``peer``."""
    pf = peer.get("negation_fidelity_min")
    return [r for r in rows if r["tvbasis"] and r["bytes_on_disk"] <= peer["bytes_on_disk"]
            and r["per_task_min"] >= peer["per_task_min"] and _add(r) >= _add(peer)
            and (pf is None or (r.get("negation_fidelity_min") is not None and r["negation_fidelity_min"] >= pf))]


def goals(result: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's goals, checked on this run's rows."""
    rows = result["rows"]
    tv = [r for r in rows if r["tvbasis"]]
    full = next((r for r in rows if r["method"] == "full"), None)
    hit = [r["label"] for r in tv if r["per_task_mean"] >= GOAL_ACCURACY and r["compression"] >= GOAL_COMPRESSION]
    dom = {}
    for p in (r for r in rows if r["peer"]):
        d = dominating(p, rows)
        dom[p["label"]] = min(d, key=lambda r: r["bytes_stored"])["label"] if d else None
    out: dict[str, Any] = {"per_task_at_64x": hit, "peers_dominated_by": dom}
    if rows and "compression_on_disk" in rows[0]:
        out["every_task_at_128x_on_disk"] = [
            r["label"] for r in tv if r["per_task_min"] >= GOAL_MIN_ACCURACY
            and r["compression_on_disk"] >= GOAL_BUDGET_COMPRESSION]
        out["negation_fidelity_at_least_0.9"] = [
            r["label"] for r in tv if r.get("negation_fidelity_min") is not None
            and r["negation_fidelity_min"] >= GOAL_NEGATION_FIDELITY]
        out["peers_dominated_on_disk_by"] = {
            p["label"]: (min(d, key=lambda r: r["bytes_on_disk"])["label"] if d else None)
            for p in rows if p["peer"] for d in [dominating_on_disk(p, rows)]}
    if full is not None:
        ta = _add(full)
        out["addition_at_least_task_arithmetic"] = [r["label"] for r in tv if _add(r) >= ta]
        true = {(n["target"], n["control"]): n for n in full["negation"]}
        ok = []
        for r in tv:
            good = True
            for n in r["negation"]:
                ref = true.get((n["target"], n["control"]))
                if ref is None or n["target_test"] > ref["target_test"] + NEGATION_POINTS or \
                        not n["control_retained"] >= CONTROL_FLOOR:
                    good = False
            if good and r["negation"]:
                ok.append(r["label"])
        out["negation_within_2_points"] = ok
    return out


def markdown_table(result: Mapping[str, Any]) -> str:
    rows = result["rows"]
    pairs = [(n["target"], n["control"]) for n in next((r["negation"] for r in rows if r["negation"]), [])]
    head = ["config", "family", "stored", "×", "× on disk", "per-task norm (mean / min)", "rel. err (max)", "λ add",
            "add norm", "neg. fidelity (min)"]
    head += [f"neg {t} (ctrl {c} %)" for t, c in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        add = r["addition"]
        errs = list(r["rel_errors"].values())
        fid = r.get("negation_fidelity_min")
        cells = [r["label"], r["family"], _fmt_bytes(r["bytes_stored"]), f"{r['compression']:.1f}",
                 f"{r['compression_on_disk']:.1f}" if "compression_on_disk" in r else "",
                 f"{_pct(r['per_task_mean'])} / {_pct(r['per_task_min'])}", f"{mean(errs):.3f} ({max(errs):.3f})",
                 f"{add['lam']:.2f}", _pct(add["mean_normalized_test"]), "" if fid is None else f"{fid:.2f}"]
        for n in r["negation"]:
            flag = "" if n["feasible"] else "*"
            cells.append(f"{_pct(n['target_test'])} ({_pct(n['control_retained'])}) λ={n['lam']:.2f}{flag}")
        lines.append("| " + " | ".join(cells) + " |")
    zs = result["zero_shot"]
    tasks = list(zs["test"])
    per_task = ["", "| task | zero-shot | fine-tuned | zero-shot norm |", "|---|---|---|---|"]
    for t in tasks:
        per_task.append(f"| {t} | {_pct(zs['test'][t])} | {_pct(result['finetuned']['test'][t])} | "
                        f"{_pct(zs['normalized_test'][t])} |")
    g = result.get("goals") or goals(result)
    goal_lines = ["", "Goals (this run):",
                  f"- per-task ≥ {GOAL_ACCURACY:.2f} at ≥ {GOAL_COMPRESSION:.0f}×: "
                  + (", ".join(g["per_task_at_64x"]) or "not met")]
    for peer, by in g["peers_dominated_by"].items():
        goal_lines.append(f"- {peer}: " + (f"dominated by {by} (≤ bytes, ≥ per-task and addition)" if by
                                           else "not dominated by a tvbasis point"))
    if "every_task_at_128x_on_disk" in g:
        goal_lines.append(f"- every task ≥ {GOAL_MIN_ACCURACY:.2f} (the minimum) at ≥ {GOAL_BUDGET_COMPRESSION:.0f}× "
                          "on disk: " + (", ".join(g["every_task_at_128x_on_disk"]) or "not met"))
        goal_lines.append(f"- negation fidelity ≥ {GOAL_NEGATION_FIDELITY} on every pair: "
                          + (", ".join(g["negation_fidelity_at_least_0.9"]) or "none"))
        for peer, by in g["peers_dominated_on_disk_by"].items():
            goal_lines.append(f"- {peer}: " + (f"dominated on disk by {by} (≤ bytes on disk, ≥ per-task minimum, "
                                               "≥ addition, ≥ negation fidelity)" if by else
                                               "not dominated on disk by a tvbasis point"))
    if "addition_at_least_task_arithmetic" in g:
        goal_lines.append("- addition ≥ task arithmetic: " + (", ".join(g["addition_at_least_task_arithmetic"])
                                                              or "none"))
        goal_lines.append(f"- negation within {100 * NEGATION_POINTS:.0f} points of the true vector, control ≥ "
                          f"{100 * CONTROL_FLOOR:.0f} %: " + (", ".join(g["negation_within_2_points"]) or "none"))
    notes = ("", "per-task norm = acc(θ₀ + ṽ_t on t) / acc(fine-tuned t on t) at λ = 1, mean / min over tasks (%); "
             "rel. err = mean ‖ṽ_t − v_t‖/‖v_t‖; add norm = mean normalized test accuracy of θ₀ + λ·Σ_t ṽ_t (TALL: its "
             "stored τ_MTL) at the λ chosen on dev; neg = target test accuracy after θ₀ − λ·ṽ_target (control as % of pretrained), "
             "* = no λ kept the control ≥ 95 %; stored = exact bytes of everything stored; × = T float32 task "
             "vectors / stored; × on disk = the same against the store directory (manifest and headers included); "
             "neg. fidelity = target accuracy drop through the row's vector ÷ drop through the true vector "
             "(minimum over pairs; 0 when no λ kept the control).")
    return "\n".join(lines + per_task + goal_lines + list(notes) + timing_lines(result))


def timing_breakdown(result: Mapping[str, Any]) -> dict[str, float]:
    """Seconds of the run by phase: fine-tuning, the set-up evaluations (zero-shot, fine-tuned, the true task
    vectors), then each row phase summed over the rows (rows from before phases were recorded count whole under
    ``rows (unsplit)``), and the total."""
    t = result["timings"]
    rows = result["rows"]
    phases = {p: sum(r["phase_seconds"][p] for r in rows if "phase_seconds" in r) for p in PHASES}
    unsplit = sum(r["seconds"] for r in rows if "phase_seconds" not in r)
    in_rows = sum(r["seconds"] for r in rows)
    out = {"fine-tuning": float(t["finetune"]),
           "set-up evaluations": max(0.0, float(t["total"]) - float(t["finetune"]) - in_rows
                                     - float(t.get("lora", 0.0)))}
    out.update({f"rows: {p}": v for p, v in phases.items()})
    if unsplit:
        out["rows (unsplit)"] = unsplit
    if "lora" in t:
        out["LoRA rows"] = float(t["lora"])
    out["total"] = float(t["total"])
    return out


def timing_lines(result: Mapping[str, Any]) -> list[str]:
    """The run's time by phase and the five slowest rows, as markdown."""
    if "timings" not in result or not result.get("rows"):
        return []
    b = timing_breakdown(result)
    lines = ["", f"Time ({len(result['rows'])} rows, {result['timings'].get('threads', '?')} threads, load average "
             f"{result['timings'].get('load_average', '?')} at the end):", "", "| phase | min | % |", "|---|---|---|"]
    total = b["total"] or 1.0
    lines += [f"| {k} | {v / 60:.1f} | {100 * v / total:.0f} |" for k, v in b.items()]
    slow = sorted(result["rows"], key=lambda r: -r["seconds"])[:5]
    lines += ["", "Slowest rows: " + "; ".join(f"{r['label']} {r['seconds']:.0f} s" for r in slow) + "."]
    return lines


def _short(label: str) -> str:
    """Plot label: ``plan lr24-int2`` -> ``lr24-int2``, ``pca M=2 + res lr24-int2`` -> ``M2+lr24-int2``."""
    if label.startswith("plan "):
        return label[5:]
    if " + res " in label and " M=" in label:
        head, res = label.split(" + res ")
        return f"M{head.split('M=')[1]}+{res}"
    return label


def _x(r: Mapping[str, Any]) -> float:
    """A row's bytes for the plots: on disk where measured (every byte counted), else the stored data bytes."""
    return float(r.get("bytes_on_disk") or r["bytes_stored"])


def make_plots(result: Mapping[str, Any], out: Path) -> list[Path]:
    """frontier_per_task.png, frontier_addition.png, frontier_per_task_min.png and frontier_negation.png: each metric
    vs bytes on disk (log x), a Pareto front per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    color = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    marker = {f: ("*" if f == "task vectors" else "o" if f.startswith("tvbasis") else "s" if f == "basis store"
                  else "D") for f in families}
    zs = mean(result["zero_shot"]["normalized_test"].values())
    paths = []
    for key, ylabel, fname, value in (
            ("per_task", "per-task normalized accuracy (each task alone, λ = 1)", "frontier_per_task.png",
             lambda r: r["per_task_mean"]),
            ("addition", "addition: mean normalized accuracy (λ on dev)", "frontier_addition.png", _add),
            ("per_task_min", "worst task's normalized accuracy (each task alone, λ = 1)", "frontier_per_task_min.png",
             lambda r: r["per_task_min"]),
            ("negation", "negation fidelity (worst pair; drop through ṽ ÷ drop through v)",
             "frontier_negation.png",
             lambda r: math.nan if r.get("negation_fidelity_min") is None else r["negation_fidelity_min"])):
        if key == "negation" and not any(r.get("negation_fidelity_min") is not None for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(10, 5.6))
        shown = [value(r) for r in rows if _x(r) > 0 and not math.isnan(value(r))]
        lo, hi = min(shown) - 0.01, max(1.0, max(shown)) + 0.008
        for f in families:
            pts = [(_x(r) / 1e6, value(r), r["label"]) for r in rows
                   if r["family"] == f and _x(r) > 0 and not math.isnan(value(r))]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color[f], marker=marker[f],
                       s=80 if marker[f] == "*" else 36, label=f, zorder=3)
            front = pareto_front((p[0], p[1]) for p in pts)
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color[f], lw=1.2,
                        alpha=0.8, zorder=2)
            on_front = set(front)
            for x, y, lab in pts:  # tvbasis: label the front only (the rest would pile up)
                if f.startswith("tvbasis") and (x, y) not in on_front:
                    continue
                ax.annotate(_short(lab), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                            color=color[f])
        ax.axhline(1.0, color="black", ls=":", lw=1, label="fine-tuned")
        if key in ("per_task", "per_task_min"):
            ratio = GOAL_COMPRESSION if key == "per_task" else GOAL_BUDGET_COMPRESSION
            ax.axhline(GOAL_ACCURACY, color="green", ls="--", lw=0.8, label=f"goal {GOAL_ACCURACY:.2f}")
            ax.axvline(result["all_vectors_bytes"] / ratio / 1e6, color="green", ls="-.", lw=0.8,
                       label=f"{ratio:.0f}× less storage")
        if key == "negation":
            ax.axhline(GOAL_NEGATION_FIDELITY, color="green", ls="--", lw=0.8, label=f"goal {GOAL_NEGATION_FIDELITY}")
        if key == "negation":
            lo, hi = min(lo, 0.0), max(hi, 1.1)
        elif zs >= lo:
            ax.axhline(zs, color="grey", ls="--", lw=1, label="zero-shot")
        else:
            ax.plot([], [], " ", label=f"zero-shot: {zs:.3f} (below)")
        ax.set_xscale("log")
        xs = [_x(r) / 1e6 for r in rows if _x(r) > 0]
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.9)  # room for the labels of the extreme points
        ax.set_xlabel("bytes on disk for all T tasks (store directory; MB, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        T = len(result["zero_shot"]["test"])
        what = {"per_task": "per-task accuracy", "addition": "addition accuracy",
                "per_task_min": "worst-task accuracy", "negation": "negation fidelity"}[key]
        ax.set_title(f"storage vs {what}, T = {T} tasks (lines: each family's Pareto front)", fontsize=10)
        fig.tight_layout()
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=130)
        plt.close(fig)
    return paths


def summary_line(result: Mapping[str, Any]) -> str:
    t = result["timings"]
    lora = f", LoRA rows {t['lora'] / 60:.1f} min" if "lora" in t else ""
    return (f"wrote {result['out']}/frontier.json, frontier.md" + (", plots" if result.get("plots") else "")
            + f"; total {t['total'] / 60:.1f} min (fine-tuning {t['finetune'] / 60:.1f} min{lora})")


__all__ = ["BASES_PLAN", "PLANS", "Compressed", "Config", "compress", "default_configs", "dominating", "goals",
           "make_plots", "markdown_table", "pareto_front", "run_frontier", "summary_line", "timing_breakdown"]
