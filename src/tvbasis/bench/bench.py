"""``tvbasis bench``: real fine-tunes → task vectors → merges and basis stores → accuracy, end to end.

Rows: zero-shot, the fine-tuned models, task arithmetic (sum of all task vectors), TIES (density 0.2), the SVD
merges TSV-M, Iso-C and Iso-CTS (``MERGE_ROWS``), and the basis methods (autoencoder, PCA, clustering with a
mean and with a TIES inner merge, random orthogonal, random sample) at each M. For each row: bytes stored, addition (absolute and normalized test accuracy at the
λ chosen on dev) and negation of target/control pairs from unrelated domains — through the store
(reconstruct the target, negate it) next to negating the true task vector.

Two sizes (both follow the protocol in docs/benchmark.md; they differ in how much data and how many λ):

* default (quick, ~4 min cold on 2 cores): 6 tasks (DBPedia, stackoverflow, banking, clinc, hwu, mcid),
  500 training examples per task, 32 dev / 128 test examples per task, λ grid 0.2 … 1.0 step 0.2,
  negation grid 0.25 … 1.0 step 0.25.
* ``--full`` (the paper's protocol, issue 15): all 8 tasks, 2000 training examples, 200 dev / 500 test examples
  per task, addition over every point of the 21-point λ grid 0, 0.05, …, 1.0 (``search="grid"``), negation over
  every point of 0.05 … 1.0 without early stopping and, reported separately (``negation_extended``), over
  0.1 … 3.0 step 0.1 (stores' reconstructions are shorter than the task vectors, so λ ≤ 1 can be the limit);
  the basis methods include ``pca-paper`` (PCA with the paper's addition Σ_m s_m).

Default negation walks λ upwards and stops at the first λ where the control falls below 95 % of its pretrained dev
accuracy (``neg_early_stop``). Fine-tunes are cached in the work directory (``tvbasis finetune``; one directory per
fine-tuning seed), so later runs skip them.

The paper's experiments (docs/benchmark.md, "The paper's experiments in the bench"): ``--m T/2,T/4,T/8`` sizes as
fractions of the task count; ``--ks 2,4,8,16,eigengap`` the cluster rows' k, with ``cluster-random-<inner>`` rows
as the random-cluster control and every cluster row's addition at coefficient 1 (``extra.addition_at_1``); every
other store's addition both as Σ_m s_m and as Σ_t v̂_t (``extra.addition_modes``); ``--continual`` the continual
add-task experiment (bench/continual.py, ``result["continual"]``). ``--tasks many`` drops sub-tasks whose fine-tune does not beat the
majority-label baseline on dev (``bench/task_filter.py``); ``--seeds K`` repeats the run over K seeds
(``bench/seeds.py``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from tvbasis.bench.method_rows import atlas_rows, linearized_rows, merge_rows
from tvbasis.bench.plots import make_plots
from tvbasis.bench.spread import compare, fmt, is_stat, mean_of, means_view, values_of
from tvbasis.bench.states import float_state as _state
from tvbasis.bench.states import sum_states, vector_bytes
from tvbasis.bench.stitch_rows import stitch_markdown, stitch_rows
from tvbasis.bench.task_filter import TaskFilterReport, filter_tasks
from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import EVAL_DTYPES, Encoder
from tvbasis.eval.evalcache import CACHE_NAME, EvalCache
from tvbasis.eval.finetune import FinetuneSettings, ensure_writable, finetune, pretrained_encoder
from tvbasis.eval.metrics import (
    DEFAULT_GRID,
    AdditionResult,
    Evaluator,
    NegationResult,
    lambda_grid,
    mean,
    normalized_accuracy,
)
from tvbasis.eval.tasks import DOMAINS, MANY, TASK_NAMES, Task, canonical_name, expand_task_names, load_task
from tvbasis.methods import get_store_method
from tvbasis.store.store import RECONSTRUCTIONS, SUM_OF_BASES

log = logging.getLogger(__name__)

QUICK_TASKS = ("DBPedia", "stackoverflow", "banking", "clinc", "hwu", "mcid")
#: preferred negation pairs (target, control): different domains, short control texts where possible
#: (negation evaluates target and control on dev at every λ, so short-text tasks keep it cheap)
PREFERRED_PAIRS = (("banking", "stackoverflow"), ("stackoverflow", "clinc"), ("DBPedia", "mcid"),
                   ("banking", "Yahoo"), ("20NG", "hwu"), ("Yahoo", "banking"), ("mcid", "DBPedia"))
#: the bench's basis-store rows (--methods): row label -> (basis method of bases/, its options)
STORE_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "autoencoder": ("autoencoder", {}),
    "pca": ("pca", {}),
    "cluster-mean": ("cluster", {"inner": "mean"}),
    "cluster-ties": ("cluster", {"inner": "ties", "inner_params": {"density": 0.2}}),
    "random": ("random", {}),
    "random-sample": ("random-sample", {}),
    "pca-paper": ("pca", {"addition": "paper"}),  # the paper's PCA addition Σ_m s_m (docs/paper-options.md)
    "cluster-topk": ("cluster", {"inner": "topk", "inner_params": {"density": 0.2}}),
    # the v1 control: the spectral clusters' sizes with members drawn at random (bases/cluster.py, assignment)
    "cluster-random-mean": ("cluster", {"inner": "mean", "assignment": "random"}),
    "cluster-random-ties": ("cluster", {"inner": "ties", "inner_params": {"density": 0.2}, "assignment": "random"}),
    "cluster-random-topk": ("cluster", {"inner": "topk", "inner_params": {"density": 0.2}, "assignment": "random"}),
}
#: a cluster k that lets the eigengap rule choose (``--ks 2,4,eigengap``); such rows have M = "eigengap" and
#: the chosen k in ``extra["k"]``
EIGENGAP = "eigengap"
#: the paper's basis rows: --all-rows and --full (which adds pca-paper)
DEFAULT_METHODS: tuple[str, ...] = ("autoencoder", "pca", "cluster-mean", "cluster-ties", "random", "random-sample")
#: the basis rows of the quick default bench (a newcomer's first run: the paper's two main bases, both sizes)
QUICK_METHODS: tuple[str, ...] = ("pca", "cluster-mean")
#: the name the bench's results record an addition mode by (the sum of bases is the paper's addition)
_MODE_RECORDED = {SUM_OF_BASES: "paper"}
#: basis methods whose ``seed`` option is the run's basis seed
SEEDED_METHODS = ("autoencoder", "random", "random-sample", "cluster")
#: the --full grids: addition over all 21 points 0 … 1, negation over 0.05 … 1 and, separately, up to λ = 3
FULL_GRID: tuple[float, ...] = lambda_grid(0.05, 1.0, start=0.0)
FULL_NEG_GRID: tuple[float, ...] = DEFAULT_GRID
EXTENDED_NEG_GRID: tuple[float, ...] = lambda_grid(0.1, 3.0)
FULL_DEV = 200
#: the many-task protocol (``BenchConfig.many_protocol``): the sum of 36 vectors wants a small λ, the sum of 2
#: cluster means a large one
MANY_GRID: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
MANY_METHODS: tuple[str, ...] = ("autoencoder", "pca", "random-sample", "cluster-mean", "cluster-random-mean")

#: merge rows next to task arithmetic and TIES: label -> (merge method, params). The SVD merges' scale is picked
#: on dev over the bench grid extended to their papers' range (up to 3.0; both codebases search 0.1 … 3.0)
MERGE_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "TSV-M": ("tsv_merge", {}), "Iso-C": ("iso_c", {}), "Iso-CTS": ("iso_cts", {})}
SVD_MERGE_LAMBDAS = (1.25, 1.5, 2.0, 2.5, 3.0)
#: the SVD-merge rows of the quick default bench (the best of the three on the committed runs); --all-rows and
#: --full run every one of MERGE_ROWS
QUICK_SVD_MERGES: tuple[str, ...] = ("Iso-C",)


@dataclass
class BenchConfig:
    tasks: tuple[str, ...] = QUICK_TASKS
    work: str = "tvbasis-work"
    out: str | None = None  # JSON + plots; default <work>/bench
    model_dir: str | None = None
    num_layers: int | None = None
    freeze_embeddings: bool = False  # fine-tune with the input embeddings frozen (--model mpnet; eval/models.py)
    max_train: int = 500
    max_dev: int = 32
    max_test: int = 128
    max_length: int = 64
    grid: tuple[float, ...] = lambda_grid(0.2, 1.0)
    search: str = "grid"
    neg_grid: tuple[float, ...] = lambda_grid(0.25, 1.0)
    Ms: tuple[int, ...] = (2, 4)
    methods: tuple[str, ...] = QUICK_METHODS
    pairs: tuple[tuple[str, str], ...] | None = None
    ties_density: float = 0.2
    seed: int = 0  # fine-tuning seed and basis seed (options["seed"]); data subsets too unless data_seed is set
    data_seed: int | None = None  # seed of the train/dev/test subsets (None = seed); --seeds keeps it fixed
    seeds: int = 1  # --seeds K: the run repeated for seeds seed, seed+1, …, seed+K−1 (bench/seeds.py)
    neg_early_stop: bool = True  # stop the negation walk at the first λ that breaks the control
    neg_grid_extended: tuple[float, ...] | None = None  # a second negation search, reported as negation_extended
    task_filter: bool | None = None  # the bad-task filter (bench/task_filter.py); None = on for --tasks many
    plots: bool = True
    keep_stores: bool = False
    resume: bool = False  # scores kept in <out>/eval-cache.jsonl and read back (eval/evalcache.py)
    eval_dtype: str = "float32"  # inference precision of every score (Encoder.eval_dtype; --eval-dtype)
    progress: bool = True
    full: bool = False
    stitch: bool = False  # the Localize-and-Stitch rows (bench/stitch_rows.py): --stitch, --all-rows, --full
    m_spec: tuple[str, ...] | None = None  # Ms as fractions of T ("T/2", "T/4", "6"), re-read after the task filter
    ks: tuple[int | str, ...] | None = None  # cluster methods' k (ints and/or "eigengap"); None = Ms
    merges: bool = True  # the TIES and SVD-merge rows (off: task arithmetic is the only merge row)
    svd_merges: tuple[str, ...] = QUICK_SVD_MERGES  # which of MERGE_ROWS (--all-rows / --full: all)
    both_additions: bool = True  # each v4 store's addition as Σ_m s_m and as Σ_t v̂_t (extra.addition_modes)
    continual: bool = False  # the continual add-task experiment (bench/continual.py), result["continual"]
    continual_method: str = "cluster-mean"  # the store of the continual experiment (a STORE_ROWS label)
    continual_M: int | None = None  # its M; None: the largest of Ms below the first half's task count
    continual_first: int | None = None  # tasks in the initial store; None: T // 2
    continual_checkpoints: int = 4  # evaluated task counts, evenly spaced from the first half to T
    # issue 29 (bench/method_rows.py): AWD and the one-shot-FL merges; aTLAS addition and few-shot; tangent TA
    fl_merges: bool = False
    atlas: bool = False
    atlas_shots: tuple[int, ...] = (4, 16, 64)
    atlas_epochs: int = 10
    linearized: bool = False
    # issue 29 item 4: how every task is fine-tuned (FinetuneSettings; cached under <work>/finetuned/<mode tag>):
    # a sparse diff of this density (0 = dense), only the parameters matching this pattern ('' = all)
    sparse_diff: float = 0.0
    train_layers: str = ""

    @classmethod
    def full_protocol(cls, **overrides: Any) -> BenchConfig:
        base = cls(tasks=TASK_NAMES, max_train=2000, max_dev=FULL_DEV, max_test=500, grid=FULL_GRID, search="grid",
                   neg_grid=FULL_NEG_GRID, neg_early_stop=False, neg_grid_extended=EXTENDED_NEG_GRID,
                   methods=DEFAULT_METHODS + ("pca-paper",), full=True, stitch=True, svd_merges=tuple(MERGE_ROWS))
        return replace(base, **overrides)

    @classmethod
    def many_protocol(cls, **overrides: Any) -> BenchConfig:
        """``tvbasis bench --tasks many`` (docs/benchmark.md, "The many-task benchmark"): the 36 sub-tasks with a
        lighter evaluation (8 dev / 32 test examples per sub-task, a 7-point λ grid 0.05 … 3.2), M = T/2, T/4, T/8,
        cluster k ∈ {2, 4, 8, 16, eigengap} against random clusters, the continual experiment; no
        Localize-and-Stitch, TIES or SVD-merge rows."""
        base = cls(tasks=(MANY,), max_dev=8, max_test=32, grid=MANY_GRID, m_spec=("T/2", "T/4", "T/8"),
                   ks=(2, 4, 8, 16, EIGENGAP), methods=MANY_METHODS, stitch=False, merges=False, continual=True,
                   continual_checkpoints=3)
        if "Ms" in overrides and "m_spec" not in overrides:
            overrides = dict(overrides, m_spec=None)  # integer sizes given: they replace the fractions of T
        return replace(base, **overrides)

    def resolved(self) -> BenchConfig:
        many = any(str(t).lower() == MANY for t in self.tasks)
        tasks = expand_task_names(self.tasks)  # 'many': the 36 sub-tasks of the many-task benchmark
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {self.seeds}")
        if self.neg_grid_extended is not None and not self.neg_grid_extended:
            raise ConfigError("the extended negation grid is empty")
        if len(tasks) < 2:
            raise ConfigError("the benchmark needs at least 2 tasks")
        if self.eval_dtype not in EVAL_DTYPES:
            raise ConfigError(f"--eval-dtype {self.eval_dtype!r}: expected one of {', '.join(EVAL_DTYPES)}")
        Ms = sizes_for(self.m_spec, len(tasks)) if self.m_spec else self.Ms
        unknown = [m for m in self.methods if m not in STORE_ROWS]
        if unknown:
            raise ConfigError(f"unknown basis method(s) {unknown}; expected some of {', '.join(STORE_ROWS)}")
        bad_m = [m for m in Ms if not 1 <= m < len(tasks)]
        if bad_m:
            raise ConfigError(f"M must satisfy 1 <= M < T = {len(tasks)} tasks; got {bad_m}")
        bad_k = [k for k in self.ks or () if k != EIGENGAP and not (isinstance(k, int) and 1 <= k < len(tasks))]
        if bad_k:
            raise ConfigError(f"--ks: each k must be an integer 1 <= k < T = {len(tasks)} or '{EIGENGAP}'; got {bad_k}")
        if self.continual_method not in STORE_ROWS:
            raise ConfigError(f"--continual-method {self.continual_method!r}: expected one of {', '.join(STORE_ROWS)}")
        pairs = self.pairs if self.pairs is not None else default_pairs(tasks)
        pairs = tuple((canonical_name(a), canonical_name(b)) for a, b in pairs)
        for a, b in pairs:
            if a not in tasks or b not in tasks:
                raise ConfigError(f"negation pair {a}/{b}: both tasks must be among the benchmark tasks")
            if a == b:
                raise ConfigError(f"negation pair {a}/{b}: target and control must differ")
        unknown_merges = [m for m in self.svd_merges if m not in MERGE_ROWS]
        if unknown_merges:
            raise ConfigError(f"unknown SVD merge row(s) {unknown_merges}; expected some of {', '.join(MERGE_ROWS)}")
        self.finetune_settings().check()  # --sparse-diff / --train-layers refused before any model is loaded
        task_filter = many if self.task_filter is None else self.task_filter
        return replace(self, tasks=tasks, pairs=pairs, task_filter=task_filter, Ms=Ms)

    @property
    def subset_seed(self) -> int:
        """The seed of the data subsets."""
        return self.seed if self.data_seed is None else self.data_seed

    def finetune_settings(self) -> FinetuneSettings:
        return FinetuneSettings(model_dir=self.model_dir, num_layers=self.num_layers, max_train=self.max_train,
                                max_length=self.max_length, seed=self.seed, data_seed=self.subset_seed,
                                freeze_embeddings=self.freeze_embeddings, sparse_diff=self.sparse_diff,
                                train_layers=self.train_layers)

    def load_tasks(self) -> dict[str, Task]:
        return {n: load_task(n, max_train=self.max_train, max_dev=self.max_dev, max_test=self.max_test,
                             seed=self.subset_seed) for n in self.tasks}

    def keep_tasks(self, kept: Sequence[str], pairs_given: bool) -> BenchConfig:
        """This (resolved) config on the tasks ``kept`` by the task filter: default negation pairs are chosen
        again among them; a given pair or an M that no longer fits is a ConfigError."""
        kept = tuple(t for t in self.tasks if t in set(kept))
        if len(kept) < 2:
            raise ConfigError(f"the task filter kept {len(kept)} task(s); the benchmark needs at least 2")
        Ms = sizes_for(self.m_spec, len(kept)) if self.m_spec else self.Ms
        bad_m = [m for m in Ms if not 1 <= m < len(kept)]
        bad_m += [k for k in self.ks or () if k != EIGENGAP and not 1 <= int(k) < len(kept)]
        if bad_m:
            raise ConfigError(f"the task filter kept {len(kept)} tasks, so M must be < {len(kept)} (and every k); got {bad_m}")
        pairs = self.pairs or ()
        if not pairs_given:
            pairs = default_pairs(kept)
        missing = [f"{a}/{b}" for a, b in pairs if a not in kept or b not in kept]
        if missing:
            raise ConfigError(f"negation pair(s) {', '.join(missing)}: dropped by the task filter "
                              "(choose other --pairs or use --no-task-filter)")
        return replace(self, tasks=kept, pairs=tuple(pairs), Ms=Ms)


def sizes_for(spec: Sequence[str], T: int) -> tuple[int, ...]:
    """Basis sizes from a spec of integers and fractions of the task count: "T/4" at T = 36 is 9 (floor, at
    least 1); duplicates dropped, order kept. A malformed entry is a ConfigError."""
    out: list[int] = []
    for item in spec:
        text = str(item).strip().replace(" ", "")
        try:
            M = max(1, T // int(text[2:])) if text.upper().startswith("T/") else int(text)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--m: expected integers or fractions of T such as T/4, got {item!r}") from None
        if M not in out:
            out.append(M)
    return tuple(out)


def sizes_of(cfg: BenchConfig, method: str) -> tuple[int | str, ...]:
    """The basis sizes a method's rows are built at: ``ks`` for cluster methods when given, else ``Ms``."""
    return tuple(cfg.ks) if get_store_method(method).merges_clusters and cfg.ks else tuple(cfg.Ms)


def default_pairs(tasks: Sequence[str], n: int = 2) -> tuple[tuple[str, str], ...]:
    """Up to n (target, control) pairs from different domains, preferring PREFERRED_PAIRS, distinct targets."""
    chosen: list[tuple[str, str]] = []
    for a, b in PREFERRED_PAIRS:
        if a in tasks and b in tasks and a not in {p[0] for p in chosen} and len(chosen) < n:
            chosen.append((a, b))
    for a in tasks:
        if len(chosen) >= n:
            break
        if a in {p[0] for p in chosen}:
            continue
        other = [b for b in tasks if DOMAINS.get(b) != DOMAINS.get(a)]
        if other:
            chosen.append((a, other[0]))
    return tuple(chosen)


@dataclass
class Row:
    """One line of the table."""

    method: str
    M: int | None
    bytes_stored: int
    addition: AdditionResult | None = None
    negation: list[NegationResult] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    negation_extended: list[NegationResult] = field(default_factory=list)  # over the extended grid (up to λ = 3)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "M": self.M, "bytes_stored": self.bytes_stored,
                "addition": self.addition.to_dict() if self.addition else None,
                "negation": [n.to_dict() for n in self.negation],
                "negation_extended": [n.to_dict() for n in self.negation_extended], "extra": self.extra,
                "seconds": round(self.seconds, 2)}


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled)


def finetuned_dev_accuracies(config: BenchConfig) -> tuple[dict[str, Task], dict[str, float]]:
    """The tasks of ``config`` and each fine-tune's dev accuracy on its own task (fine-tuned or reused from the
    cache): what the bad-task filter needs, before a multi-seed run (``bench/seeds.py``)."""
    from tvbasis.vectors import TaskVector

    cfg = config.resolved()
    work = ensure_writable(cfg.work)
    settings = cfg.finetune_settings()
    tasks = cfg.load_tasks()
    encoder = pretrained_encoder(work, settings)
    ev = Evaluator(encoder, tasks, splits=("dev",))
    dev = {}
    for n, t in tasks.items():
        r = finetune(t, work, settings, encoder=encoder, progress=cfg.progress)
        dev[n] = ev.with_delta(_state(TaskVector.from_checkpoints(work / "pretrained", r.path)), 1.0, "dev", [n])[n]
    return tasks, dev


def _svd_merges(cfg: BenchConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """The SVD-merge rows this run makes: ``cfg.svd_merges`` among ``MERGE_ROWS``, in its order."""
    return {label: spec for label, spec in MERGE_ROWS.items() if label in cfg.svd_merges}


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON-able result (also written to <out>/bench.json)."""
    from tvbasis.engine import RunOptions
    from tvbasis.merge import MergeSpec
    from tvbasis.passes import merge_task_vectors
    from tvbasis.store import StoreSpec, WriteOptions, build_store
    from tvbasis.vectors import TaskVector

    cfg = config.resolved()
    t_start = time.time()
    timings: dict[str, float] = {}
    work = ensure_writable(cfg.work)
    out = ensure_writable(cfg.out or work / "bench")
    settings = cfg.finetune_settings()

    # 1. fine-tunes (cached), the bad-task filter and the evaluator
    t0 = time.time()
    tasks = cfg.load_tasks()
    encoder: Encoder = pretrained_encoder(work, settings)  # θ₀, shared by the fine-tunes and the evaluation
    results = {n: finetune(t, work, settings, encoder=encoder, progress=cfg.progress) for n, t in tasks.items()}
    timings["finetune"] = time.time() - t0
    if cfg.resume:
        encoder.eval_cache = EvalCache(out / CACHE_NAME)
    encoder.eval_dtype = EVAL_DTYPES[cfg.eval_dtype]  # after the fine-tunes: they never see it
    pre_dir = work / "pretrained"
    ft_dirs = {n: str(r.path) for n, r in results.items()}
    ev = Evaluator(encoder, tasks, progress=False)

    t0 = time.time()
    tvs = {n: _state(TaskVector.from_checkpoints(pre_dir, d)) for n, d in ft_dirs.items()}
    ft_dev = {n: ev.with_delta(tvs[n], 1.0, "dev", [n])[n] for n in cfg.tasks}
    filt: TaskFilterReport | None = None
    if cfg.task_filter:
        filt = filter_tasks(tasks, ft_dev)
        for line in filt.lines():
            log.info(line)
        if filt.dropped:
            cfg = cfg.keep_tasks(list(filt.kept), pairs_given=config.pairs is not None)
            tasks, ft_dirs = {n: tasks[n] for n in cfg.tasks}, {n: ft_dirs[n] for n in cfg.tasks}
            tvs, ft_dev = {n: tvs[n] for n in cfg.tasks}, {n: ft_dev[n] for n in cfg.tasks}
            ev = Evaluator(encoder, tasks, progress=False)

    quiet = None if cfg.progress else RunOptions(progress=False)  # -q: no progress bars from builds and merges
    n_steps = (2 + sum(len(sizes_of(cfg, STORE_ROWS[m][0])) for m in cfg.methods) + 1
               + (len(_svd_merges(cfg)) if cfg.merges else 0))
    bar = _bar(n_steps, "bench", cfg.progress)
    zs_dev, zs_test = ev.zero_shot("dev"), ev.zero_shot("test")
    ft_test = {n: ev.with_delta(tvs[n], 1.0, "test", [n])[n] for n in cfg.tasks}
    one_vector = vector_bytes(tvs[cfg.tasks[0]])
    all_vectors = one_vector * len(cfg.tasks)
    timings["zero_shot_and_finetuned_eval"] = time.time() - t0
    bar.update(1)

    def addition(delta: Mapping[str, torch.Tensor]) -> AdditionResult:
        return ev.search_addition(delta, cfg.grid, finetuned_dev=ft_dev, finetuned_test=ft_test, search=cfg.search)

    def at_one(delta: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Test accuracy of θ₀ + 1·delta (no λ search), absolute and normalized, per task and mean."""
        test = ev.with_delta(delta, 1.0, "test")
        norm = {t: normalized_accuracy(test[t], ft_test[t]) for t in test}
        return {"lam": 1.0, "test": test, "normalized_test": norm, "mean_test": mean(test.values()),
                "mean_normalized_test": mean(norm.values())}

    def negations(vector_of: Any) -> tuple[list[NegationResult], list[NegationResult]]:
        """(negation over neg_grid, negation over the extended grid or []) for every pair; the two searches share
        their dev evaluations (``cache``)."""
        main: list[NegationResult] = []
        ext: list[NegationResult] = []
        for t, c in cfg.pairs:
            vector, cache = vector_of(t), {}
            main.append(ev.search_negation(vector, t, c, cfg.neg_grid, early_stop=cfg.neg_early_stop, cache=cache))
            if cfg.neg_grid_extended:
                ext.append(ev.search_negation(vector, t, c, cfg.neg_grid_extended, early_stop=False, cache=cache))
        return main, ext

    rows: list[Row] = []
    zs_row = Row("zero-shot", None, 0, extra={"test": zs_test, "dev": zs_dev})
    zs_row.addition = AdditionResult(lam=0.0, dev=zs_dev, test=zs_test,
                                     normalized_test={t: normalized_accuracy(zs_test[t], ft_test[t]) for t in zs_test})
    ft_row = Row("fine-tuned (one model per task)", None, all_vectors, extra={"test": ft_test, "dev": ft_dev})
    ft_row.addition = AdditionResult(lam=1.0, dev=ft_dev, test=ft_test,
                                     normalized_test={t: 1.0 for t in ft_test}, criterion="own task")
    rows += [zs_row, ft_row]

    # 2. task arithmetic and TIES over the true task vectors; negation of the true task vectors
    t0 = time.time()
    true_neg, true_ext = negations(lambda t: tvs[t])
    total = sum_states(tvs)
    ta = Row("task arithmetic (sum)", None, all_vectors, addition(total), true_neg,
             extra={"negation_vector": "true task vector", "addition_at_1": at_one(total)},
             negation_extended=true_ext)
    del total
    ta.seconds = time.time() - t0
    rows.append(ta)
    bar.update(1)
    if cfg.merges:
        t0 = time.time()
        ties = _state(merge_task_vectors(pre_dir, ft_dirs, MergeSpec("ties", {"density": cfg.ties_density}),
                                         run=quiet))
        rows.append(Row(f"TIES (density {cfg.ties_density})", None, all_vectors, addition(ties), true_neg,
                        extra={"negation_vector": "true task vector"}, seconds=time.time() - t0,
                        negation_extended=true_ext))
        del ties
    bar.update(1)
    for label, (method, params) in _svd_merges(cfg).items() if cfg.merges else ():  # SVD merges, negation as TA/TIES
        t0 = time.time()
        merged = _state(merge_task_vectors(pre_dir, ft_dirs, MergeSpec(method, params), run=quiet))
        add = ev.search_addition(merged, sorted(set(cfg.grid) | set(SVD_MERGE_LAMBDAS)), finetuned_dev=ft_dev,
                                 finetuned_test=ft_test, search=cfg.search)
        rows.append(Row(label, None, all_vectors, add, true_neg, extra={"negation_vector": "true task vector",
                                                                        "merge": method}, seconds=time.time() - t0,
                        negation_extended=true_ext))
        bar.update(1)

    if cfg.fl_merges:  # AWD and the one-shot-FL aggregation rules (bench/method_rows.py)
        rows += [Row(**r) for r in merge_rows(pre_dir, ft_dirs, tvs, results, lambda d: ev.search_addition(
            d, sorted(set(cfg.grid) | set(SVD_MERGE_LAMBDAS)), finetuned_dev=ft_dev, finetuned_test=ft_test,
            search=cfg.search), true_neg, true_ext, all_vectors, quiet)]
    if cfg.atlas:
        rows += [Row(**r) for r in atlas_rows(work, pre_dir, ft_dirs, encoder, ev, tasks, tvs, ft_test, all_vectors,
                                              cfg.atlas_shots, min(cfg.Ms), cfg.max_length, cfg.seed, quiet,
                                              cfg.atlas_epochs)]
    if cfg.linearized:
        rows += [Row(**r) for r in linearized_rows(work, settings, encoder, ev, tasks, cfg.grid, cfg.search,
                                                   negations, all_vectors, cfg.progress)]

    # 3. basis stores
    cosine = None
    labels = None
    for label in cfg.methods:
        method, options = STORE_ROWS[label]
        options = dict(options)
        if method in SEEDED_METHODS:
            options["seed"] = cfg.seed
        for M in sizes_of(cfg, method):
            t0 = time.time()
            bar.set_postfix_str(f"{label} M={M}")
            path = work / "stores" / f"{label}-M{M}"
            spec = StoreSpec(method, M=None if M == EIGENGAP else int(M), options=options)
            store = build_store(pre_dir, ft_dirs, spec, path, quiet, WriteOptions(force=True))
            t_build = time.time() - t0
            mode = store.default_addition_mode()
            delta = _state(store.addition(mode=mode))
            add = addition(delta)
            extra: dict[str, Any] = {"store": str(path), "addition_mode": _MODE_RECORDED.get(mode, mode)}
            clusters = get_store_method(method).merges_clusters
            if clusters:  # the v1 experiment: the outer merge (Σ_m s_m) at coefficient 1 as well
                extra["addition_at_1"] = at_one(delta)
            del delta
            if cfg.both_additions and store.M > 0 and not clusters:  # v4 stores (cluster rows: v1, λ=1)
                other = RECONSTRUCTIONS if mode == SUM_OF_BASES else SUM_OF_BASES
                extra["addition_modes"] = {_MODE_RECORDED.get(mode, mode): add.to_dict(),
                                           _MODE_RECORDED.get(other, other):
                                           addition(_state(store.addition(mode=other))).to_dict()}
            t_add = time.time() - t0 - t_build
            neg, neg_ext = negations(lambda t, s=store: _state(s.reconstruct(t)))
            t_neg = time.time() - t0 - t_build - t_add
            extra.update({"build_seconds": round(t_build, 2), "addition_seconds": round(t_add, 2),
                          "negation_seconds": round(t_neg, 2),
                          "rel_errors": _jsonable(getattr(store, "rel_errors", None)),
                          "compression": all_vectors / max(1, store.nbytes)})
            if M == EIGENGAP:
                extra["k"] = store.M
            if clusters:
                extra["labels"] = _jsonable(store.labels)
                if cosine is None or M == 2:
                    cosine, labels = store.cosine, store.labels
            if cosine is None:
                cosine = store.cosine
            rows.append(Row(label, M, int(store.nbytes), add, neg, extra, seconds=time.time() - t0,
                            negation_extended=neg_ext))
            del store
            if not cfg.keep_stores:
                shutil.rmtree(path, ignore_errors=True)
            bar.update(1)
    continual = run_continual_rows(cfg, work, pre_dir, ft_dirs, encoder, ev, tasks, tvs, ft_dev, ft_test) \
        if cfg.continual else None
    if cfg.stitch:
        rows += [Row(**r) for r in stitch_rows(work, pre_dir, ft_dirs, encoder, ev, tasks, tvs, ft_dev, ft_test,
                                               all_vectors, cfg.Ms, cfg.full, cfg.max_length, cfg.seed)]
    bar.close()
    if quiet is not None:
        quiet.close()
    timings["total"] = time.time() - t_start

    result = {
        "config": _jsonable(asdict(cfg)),
        "tasks": {n: {"classes": t.num_classes, "domain": t.domain, **{s: len(t[s]) for s in ("train", "dev", "test")}}
                  for n, t in tasks.items()},
        "model": encoder.describe(),
        "vector_bytes": one_vector,
        "zero_shot": {"dev": zs_dev, "test": zs_test},
        "finetuned": {"dev": ft_dev, "test": ft_test},
        "rows": [r.to_dict() for r in rows],
        "cosine": {"tasks": list(cfg.tasks), "matrix": _jsonable(cosine), "cluster_labels": _jsonable(labels)},
        "task_filter": filt.to_dict() if filt else None,
        "continual": continual,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["markdown"] = markdown_table(result) + stitch_markdown(result)
    (out / "bench.md").write_text(result["markdown"] + "\n")
    if cfg.plots:
        result["plots"] = [str(p) for p in make_plots(result, out)]
    result["out"] = str(out)
    return result


def continual_M(cfg: BenchConfig, first: int) -> int:
    """The continual store's M: ``continual_M``, else the largest of the bench's Ms below ``first``."""
    if cfg.continual_M is not None:
        return cfg.continual_M
    below = [m for m in cfg.Ms if m < first]
    if not below:
        raise ConfigError(f"--continual: no --m below the first {first} tasks; give --continual-m")
    return max(below)


def run_continual_rows(cfg: BenchConfig, work: Any, pre_dir: Any, ft_dirs: Mapping[str, str], encoder: Encoder,
                       ev: Evaluator, tasks: Mapping[str, Task], tvs: Mapping[str, Any], ft_dev: Mapping[str, float],
                       ft_test: Mapping[str, float]) -> dict[str, Any]:
    """The continual experiment (bench/continual.py) on the bench's fine-tunes, arriving in an order shuffled with
    the run's seed (so seeds differ in order as well as in fine-tunes)."""
    import random

    from tvbasis.bench.continual import evaluator_scorer, run_continual

    method, options = STORE_ROWS[cfg.continual_method]
    options = dict(options)
    if method in SEEDED_METHODS:
        options["seed"] = cfg.seed
    order = list(ft_dirs)
    random.Random(cfg.seed).shuffle(order)
    T = len(order)
    first = cfg.continual_first if cfg.continual_first is not None else T // 2
    M = continual_M(cfg, first)  # run_continual checks M < first <= T - 1
    return run_continual(work=work, pre_dir=pre_dir, ft_dirs={n: ft_dirs[n] for n in order}, encoder=encoder,
                         tasks=tasks, tvs=tvs, ft_dev=ft_dev, ft_test=ft_test, grid=cfg.grid, search=cfg.search,
                         method=method, options=options, M=M, first=first, label=cfg.continual_method,
                         checkpoints=cfg.continual_checkpoints,
                         progress=False, keep_stores=cfg.keep_stores,
                         score=evaluator_scorer(ev, cfg.grid, cfg.search, ft_dev, ft_test))


def _jsonable(x: Any) -> Any:
    if x is None:
        return None
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# --------------------------------------------------------------------------- reporting
def _fmt_bytes(n: int) -> str:
    if n <= 0:
        return "0"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.1f} MB"


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _lam(x: Any) -> str:
    return fmt(x, scale=1.0, digits=2)


def _neg_cell(n: Mapping[str, Any]) -> str:
    flag = "" if means_view(n["feasible"]) else "*"
    return f"{fmt(n['target_test'])} ({fmt(n['control_retained'])}) λ={_lam(n['lam'])}{flag}"


def markdown_table(result: Mapping[str, Any]) -> str:
    """The benchmark table (Markdown) from a result dict; a multi-seed result's numbers as mean ± std."""
    rows = result["rows"]
    pairs = [(n["target"], n["control"]) for n in next((r["negation"] for r in rows if r["negation"]), [])]
    extended = any(r.get("negation_extended") for r in rows)
    tasks = list(result["zero_shot"]["test"])
    head = ["method", "M", "stored", "×", "λ add", "add acc", "add norm"]
    for t, c in pairs:
        head += [f"neg {t} (ctrl {c} %)"]
    if extended:
        head += [f"neg λ≤3 {t} (ctrl {c} %)" for t, c in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    all_bytes = result["vector_bytes"] * len(tasks)
    zs = result["zero_shot"]["test"]
    for r in rows:
        add = r["addition"] or {}
        stored = int(means_view(r["bytes_stored"]))
        cells = [r["method"], "" if r["M"] is None else str(r["M"]), _fmt_bytes(stored),
                 f"{all_bytes / stored:.1f}" if stored else "–",
                 "" if not add or r["method"].startswith(("zero", "fine")) else _lam(add["lam"]),
                 fmt(add.get("mean_test")), fmt(add.get("mean_normalized_test"))]
        for key in ("negation", "negation_extended") if extended else ("negation",):
            negs = {(n["target"], n["control"]): n for n in r.get(key) or []}
            for p in pairs:
                n = negs.get(p)
                if n is not None:
                    cells.append(_neg_cell(n))
                else:
                    cells.append(f"{fmt(zs[p[0]])} (100)" if r["method"] == "zero-shot" else "")
        lines.append("| " + " | ".join(cells) + " |")
    per_task = ["", "| task | zero-shot | fine-tuned |", "|---|---|---|"]
    for t in tasks:
        per_task.append(f"| {t} | {fmt(zs[t])} | {fmt(result['finetuned']['test'][t])} |")
    notes = ["", "Accuracies in % on the test subsets; add norm = mean over tasks of acc(edited)/acc(fine-tuned); "
             "stored = bytes kept on disk (task vectors in float32, or the basis store); × = compression against "
             "all task vectors; neg = target test accuracy after negation (control accuracy as % of its "
             "pretrained accuracy), * = no λ kept the control ≥ 95 %. Basis rows negate the reconstructed "
             "vector; task arithmetic / TIES rows the true task vector."]
    if extended:
        notes.append("neg λ≤3: the same negation searched over the extended grid up to λ = 3 (reconstructions are "
                     "shorter than the task vectors, so λ ≤ 1 may stop a store's negation early).")
    notes += addition_modes_markdown(result) + continual_markdown(result)
    seeds = result.get("seeds")
    if seeds and len(seeds) > 1:
        notes.append(f"Every number: mean ± sample std over {len(seeds)} seeds {list(seeds)} (fine-tuning seed for "
                     "the task vectors, basis seed for the stores); per-seed values in bench.json.")
    return "\n".join(lines + per_task + notes)


def addition_modes_markdown(result: Mapping[str, Any]) -> list[str]:
    """The stores' addition measured both ways (paper Σ_m s_m, reconstructions Σ_t v̂_t = S·W·1) and at
    coefficient 1, as Markdown lines ([] when the run measured neither)."""
    rows = [r for r in result["rows"] if (r.get("extra") or {}).get("addition_modes")
            or (r.get("extra") or {}).get("addition_at_1")]
    if not rows:
        return []
    out = ["", "Addition two ways (add norm %, λ searched on dev): the paper's sum of bases Σ_m s_m and the sum of "
           "the reconstructions Σ_t v̂_t = S·W·1 (every task weighted by its decoder); 'default' is the store's "
           "own addition (the row above); λ=1: the default addition at coefficient 1, no search.", "",
           "| method | M | default | Σ_m s_m (paper) | Σ_t v̂_t (S·W·1) | at λ=1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["extra"]
        modes = extra.get("addition_modes") or {}
        at1 = (extra.get("addition_at_1") or {}).get("mean_normalized_test")
        mode = means_view(extra.get("addition_mode")) or ""
        cells = [r["method"], "" if r["M"] is None else str(r["M"]), str(mode),
                 fmt((modes.get("paper") or {}).get("mean_normalized_test")),
                 fmt((modes.get("reconstructions") or {}).get("mean_normalized_test")), fmt(at1)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def continual_markdown(result: Mapping[str, Any]) -> list[str]:
    """The continual experiment's steps as Markdown lines ([] without one)."""
    c = result.get("continual")
    if not c or not c.get("steps"):
        return []
    c = dict(c)
    out = ["", f"Continual ({means_view(c.get('method'))}, M = {means_view(c.get('M'))}, first "
           f"{means_view(c.get('first'))} tasks, then add-task one at a time): add norm % over the tasks so far, "
           "bytes stored.", "",
           "| T | add-task | rebuild | task arithmetic | add-task bytes | rebuild bytes |", "|---|---|---|---|---|---|"]
    for st in c["steps"]:
        a, b, ta = st.get("add_task") or {}, st.get("rebuild") or {}, st.get("task_arithmetic") or {}
        out.append(f"| {means_view(st.get('T'))} | {fmt(a.get('mean_normalized_test'))} | "
                   f"{fmt(b.get('mean_normalized_test'))} | {fmt(ta.get('mean_normalized_test'))} | "
                   f"{_fmt_bytes(int(means_view(a.get('bytes')) or 0))} | {_fmt_bytes(int(means_view(b.get('bytes')) or 0))} |")
    return out


def _best_store(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    stores = [r for r in rows if r["M"] is not None and r.get("addition")]
    return max(stores, key=lambda r: mean_of(r["addition"]["mean_normalized_test"]), default=None)


def addition_call(result: Mapping[str, Any]) -> str:
    """The best store's addition against task arithmetic's, called with ``spread.separated`` (via ``compare``):
    'above' / 'below' only when the difference exceeds the spread."""
    rows = result["rows"]
    ta = next((r for r in rows if r["method"].startswith("task arithmetic") and r.get("addition")), None)
    best = _best_store(rows)
    if ta is None or best is None:
        return ""
    a, b = best["addition"]["mean_normalized_test"], ta["addition"]["mean_normalized_test"]
    verdict = compare(values_of(a), values_of(b))
    n = len(values_of(a))
    note = "1 seed, no spread" if n <= 1 else f"{n} seeds"
    return (f"best store {best['method']} M={best['M']} {fmt(a)} vs task arithmetic {fmt(b)} "
            f"(add norm): {verdict} ({note})")


def summary_line(result: Mapping[str, Any]) -> str:
    t = means_view(result["timings"])
    call = addition_call(result)
    return (f"wrote {result['out']}/bench.json, bench.md" + (", plots" if result.get("plots") else "")
            + f"; total {t['total'] / 60:.1f} min (fine-tuning {t['finetune'] / 60:.1f} min)"
            + (f"; {call}" if call else ""))


__all__ = ["STORE_ROWS", "BenchConfig", "default_pairs", "is_stat", "make_plots", "markdown_table", "run_bench",
           "mean"]
