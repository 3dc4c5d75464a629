"""``tvbasis build --budget X`` / ``--quality Q``: the store that fits a byte budget, every choice made by the tool.

1. **Measure** (one streaming read of the inputs): per tensor, the T task slices are read together (as the coded
   materialisation pass reads them) and every (task, tensor) is encoded with every candidate of its ladder
   (``tvbasis.compress.budget.ladder``): exact stored bytes plus the bytes its entry adds to the manifest's packed
   coded section (an estimate), exact squared error. Only these numbers are kept.
2. **Allocate** (``compress.budget.allocate``): one codec per (task, tensor), minimising the largest relative error
   over tasks under the budget (``--budget``), or the fewest bytes with every task within a relative error
   (``--quality Q``: Q = 1 − ε², the fraction of each task vector's energy kept).
3. **Write**: an ordinary M = 0 store whose residual coder is the allocation (``build_store`` with the Gram and
   materialisation passes: two more reads), so it opens, verifies, edits and takes new tasks like any coded store.
   The budget's bytes are those of the whole store directory (manifest and headers included): the store's size is
   measured after writing and, when it lies outside the 2 % window below the budget, the allocation is redone
   once for the difference and the store written again.

Whether bases help (M): a budget store is M = 0, every task coded on its own. A dense basis costs a whole model
(4 bytes per parameter), i.e. ratio/T budgets for one basis — 16 budgets at 128× for T = 8 — so dense bases never
fit the stores users ask for (T ≲ 100, ratio ≥ 16); coded bases could, but they are not among the allocator's
choices yet, and the measured frontier has M = 0 plans ahead of PCA + residual rows at ≥ 64× (README).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvbasis.codecs import as_matrix
from tvbasis.codecs.base import sq_dist64
from tvbasis.codecs.colscale import stored_scale
from tvbasis.compress import Coder
from tvbasis.compress.budget import (
    Allocation,
    Budget,
    BudgetRule,
    Candidate,
    TaskCalibration,
    allocate,
    fit_damage,
    measure,
    quality_to_error,
    weighted,
)
from tvbasis.compress.kinds import tensor_kind
from tvbasis.compress.svd import KeptFactors
from tvbasis.engine import Run, as_run
from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint
from tvbasis.io.atomic import temp_path
from tvbasis.store.build import build_store, output_path
from tvbasis.store.residual_pass import stacked_deltas
from tvbasis.store.spec import StoreSpec, WriteOptions
from tvbasis.store.store import BasisStore
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, TaskSet

log = logging.getLogger(__name__)

#: the store must land within this fraction below the budget (and never above it)
TOLERANCE = 0.02
#: re-allocations after the first probe of a probed budget build (each: one write and one probe of every task)
PROBE_ROUNDS = 2
#: memory for the measuring pass's truncated SVDs kept for the write pass (6 MiniLM tasks at 128x: 195 MB kept,
#: measured; past it, the write pass computes the rest again)
KEPT_SVD_BYTES = 256 << 20
#: damage below this counts as this (a task its store does not move at all still gets a finite curve)
DAMAGE_FLOOR = 1e-6
#: ``probe(task, delta) -> damage`` (≥ 0, growing with the harm ``delta``'s error does to the task)
Probe = Callable[[str, Mapping[str, torch.Tensor]], float]


def fixed_overhead_guess(T: int, n_tensors: int) -> int:
    """Bytes of a budget store besides its entries, before the first write measures them: the manifest's fixed
    part (tasks, Gram matrix, tensor list, pretrained fingerprint) and the coded file's one-tensor header;
    measured at 17 KB for MiniLM (T = 6, 101 tensors; format version 3). Corrected from the written store's
    size."""
    return 4096 + 120 * n_tensors + 30 * T * T + 400 * T


#: what the measuring pass keeps: ``cands[task][tensor]``, ``norms2[task][tensor]``, ``pre2[task][tensor]``,
#: ``wnorms2[task][tensor]``
Measured = tuple[dict[str, dict[str, list[Candidate]]], dict[str, dict[str, float]], dict[str, dict[str, float]],
                 dict[str, dict[str, float]]]
#: how a (task, tensor)'s error counts: ``frobenius`` (‖x − x̂‖², the task vector's error) or ``relative`` (‖x − x̂‖²
#: against the pretrained weights it perturbs, ``pretrained_scale``)
LOSSES = ("frobenius", "relative")


@dataclass
class BudgetReport:
    """What a budget build chose and what it measured."""

    budget: str | None
    budget_bytes: int | None
    max_error: float | None
    store_bytes: int
    fp32_bytes: int
    allocation: Allocation
    M: int
    seconds: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    #: the measuring pass's candidates and task norms (for ``build_budget_store(measured=…)``)
    measured: Measured | None = None
    #: whether the loss was calibrated (then ``allocation.rel_errors`` are relative output errors)
    calibrated: bool = False
    #: with a probe: per round, each task's measured damage and relative error, the store's bytes, the worst damage
    #: and which round was kept
    probe_rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.store_bytes if self.store_bytes else math.inf

    def to_json(self) -> dict[str, Any]:
        a = self.allocation
        return {"budget": self.budget, "budget_bytes": self.budget_bytes, "max_error": self.max_error,
                "store_bytes": self.store_bytes, "fp32_bytes": self.fp32_bytes, "ratio": self.ratio, "M": self.M,
                "target_error": a.target_error, "feasible": a.feasible, "notes": a.notes,
                "tasks": a.summary(), "plan": a.specs, "seconds": self.seconds, "attempts": self.attempts,
                "loss": "calibrated output error" if self.calibrated else "task-vector error",
                "probe_rounds": self.probe_rounds}


class MeasureTask:
    """Work unit (one whole tensor) of the measuring pass: every candidate on every task's slice. With
    calibration, each task's candidates are measured in its weighted loss (``TaskCalibration.weigh``): the
    squared errors (and the task's ``wnorms2``) are output errors, the matrices' candidates ``colscale+…``."""

    def __init__(self, taskset: TaskSet, chunk_elements: int, stage: Path,
                 calibration: Mapping[str, TaskCalibration] | None = None, keep: KeptFactors | None = None) -> None:
        self.taskset, self.chunk_elements, self.stage = taskset, chunk_elements, stage
        self.calibration = calibration
        self.keep = keep

    def __call__(self, name: str) -> tuple[str, dict[str, list[Candidate]], dict[str, float], dict[str, float],
                                           dict[str, float]]:
        shape = self.taskset.specs[name].shape
        W0_rows = torch.empty(shape[0] if shape else 1, dtype=torch.float64)  # Σ over each row of W₀²
        X, scratch = stacked_deltas(self.taskset, name, self.chunk_elements, self.stage, pretrained_rows_sq=W0_rows)
        try:
            cands, norms2, pre2, wnorms2 = {}, {}, {}, {}
            w2 = float(W0_rows.sum())  # ‖W₀‖², the same for every task
            for t, task in enumerate(self.taskset.names):
                x = X[t]
                norms2[task] = sq_dist64(x.reshape(-1), 0.0)
                pre2[task] = pretrained_scale(name, W0_rows, x, norms2[task], w2)
                cal = (self.calibration or {}).get(task)
                if cal is None:
                    cands[task] = measure(name, x, f"residual/{name}/{task}", keep=self.keep)
                    wnorms2[task] = norms2[task]
                    continue
                scale, w = cal.weigh(name, x)
                measured = measure(name, x, f"residual/{name}/{task}", scale=scale)
                cands[task] = [Candidate(c.spec, c.nbytes, c.sqerr * w) for c in measured]
                xs = x if scale is None else as_matrix(x) * scale.float()
                wnorms2[task] = w * sq_dist64(xs.reshape(-1), 0.0)
            return name, cands, norms2, pre2, wnorms2
        finally:
            del X
            if scratch is not None:
                os.unlink(scratch)


def pretrained_scale(name: str, W0_rows: torch.Tensor, x: torch.Tensor, x2: float | None = None,
                     w2: float | None = None) -> float:
    """‖W₀‖² of what the task changes — the whole tensor, or for an embedding table only the rows the task touched
    — floored at the change's own ‖x‖² (a tensor that starts near zero, such as a bias); the ``relative`` loss
    weighs each tensor's squared error by its inverse, i.e. measures a tensor's error against the weights it
    perturbs: for a layer fed normalised inputs, ‖ΔW·x‖/‖W·x‖ ≈ ‖ΔW‖/‖W‖. ``W0_rows``: Σ W₀² of each row (float64,
    ``stacked_deltas``' ``pretrained_rows_sq``); ``x2`` (‖x‖²) and ``w2`` (‖W₀‖², used for every kind but
    embeddings) when the caller has them already."""
    if tensor_kind(name, tuple(x.shape)) == "embedding":
        m = x.reshape(x.shape[0], -1)
        step = max(1, SQ_ROWS_ELEMENTS // max(1, m.shape[1]))  # the touched rows found a block at a time
        rows = torch.cat([(m[a:a + step] != 0).any(dim=1) for a in range(0, m.shape[0], step)])
        w2 = float(W0_rows[rows].sum())
    elif w2 is None:
        w2 = float(W0_rows.sum())
    return max(w2, sq_dist64(x.reshape(-1), 0.0) if x2 is None else x2, 1e-30)


#: elements per block of rows when ``pretrained_scale`` looks for the rows an embedding's change touched
SQ_ROWS_ELEMENTS = 1 << 22


def measure_pass(taskset: TaskSet, run: Run, stage: Path, chunk_elements: int,
                 calibration: Mapping[str, TaskCalibration] | None = None, keep: KeptFactors | None = None
                 ) -> Measured:
    """``cands[task][tensor]``, ``norms2[task][tensor]`` (‖x‖²), ``pre2[task][tensor]`` (``pretrained_scale``) and
    ``wnorms2[task][tensor]`` (‖x‖² in the calibrated loss; = norms2 without calibration) for the whole task set
    (one read of the inputs). ``keep``: where the SVDs computed are left for the write pass (it does not pickle: give
    it only with the local engine, as ``build_budget_store`` does)."""
    eng = as_run(run).get_engine()
    names = list(taskset.specs)
    cands: dict[str, dict[str, list[Candidate]]] = {t: {} for t in taskset.names}
    norms2: dict[str, dict[str, float]] = {t: {} for t in taskset.names}
    pre2: dict[str, dict[str, float]] = {t: {} for t in taskset.names}
    wnorms2: dict[str, dict[str, float]] = {t: {} for t in taskset.names}
    task = MeasureTask(taskset, chunk_elements, stage, calibration, keep)
    sizes = [taskset.T * taskset.specs[n].numel * 4 for n in names]
    for name, per_task, n2, p2, w2 in eng.map(task, names, desc="measure codecs", sizes=sizes):
        for t in taskset.names:
            cands[t][name] = per_task[t]
            norms2[t][name] = n2[t]
            pre2[t][name] = p2[t]
            wnorms2[t][name] = w2[t]
    return cands, norms2, pre2, wnorms2


def _scales(cal: Mapping[str, TaskCalibration] | None, taskset: TaskSet,
            specs: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The stored column scales of the entries allocated a ``colscale+…`` codec (what the measuring pass used)."""
    if cal is None:
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t, per in specs.items():
        for name, spec in per.items():
            if spec.startswith("colscale+"):
                shape = tuple(taskset.specs[name].shape)
                cols = math.prod(shape[1:]) if len(shape) >= 2 else shape[0]
                out.setdefault(t, {})[name] = stored_scale(cal[t].col_rms[name], cols)
    return out


def store_size(path: Path) -> int:
    """Bytes of every file of a store directory (the manifest, data files, lock and generation files)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build_budget_store(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                       out: str | Path, budget: str | Budget | None = None, quality: float | None = None,
                       include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                       max_shard_size: int | str = "5GB", force: bool = False, run: Run = None,
                       chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
                       measured: Measured | None = None, loss: str = "frobenius",
                       calibration: Mapping[str, TaskCalibration] | None = None,
                       probe: Probe | None = None, probe_rounds: int = PROBE_ROUNDS
                       ) -> tuple[BasisStore, BudgetReport]:
    """Build the store at ``out`` that fits ``budget`` (``"128x"``, ``"20MB"`` or a ``Budget``), or the smallest
    whose every task keeps ``quality`` of its energy; returns the store and what was chosen and measured.
    ``measured``: the measuring pass of an earlier budget build of the same inputs and calibration
    (``report.measured``), so a sweep over budgets measures once.

    ``calibration``: per task (all of them, or none), what its own text does in its model
    (``tvbasis.eval.calibration``); then the loss is each task's output error — matrices coded in their
    input-weighted space (``colscale``), embeddings weighed by how often the changed rows are looked up — and
    ``loss`` must stay ``frobenius``.

    ``probe`` (with ``budget``): ``probe(task, delta) -> damage``, what a reconstructed task vector costs that task
    (e.g. ``tvbasis.eval.probe``: how far its predictions move from its fine-tune's on its own unlabelled text). The
    written store is probed, each task's damage curve over relative error fitted (``fit_damage``) and the bytes
    re-allocated so every task reaches the same predicted damage, ``probe_rounds`` times; the round with the
    smallest worst measured damage is the store kept (``report.probe_rounds``)."""
    if (budget is None) == (quality is None):
        raise ConfigError("give exactly one of --budget and --quality")
    if loss not in LOSSES:
        raise ConfigError(f"budget loss must be one of {LOSSES}, got {str(loss)[:40]!r}")
    if probe is not None and budget is None:
        raise ConfigError("a probe re-allocates a byte budget: give --budget, not --quality")
    if probe is not None and loss != "frobenius":
        raise ConfigError("a probe fits damage against the task vectors' relative errors: leave the loss at frobenius")
    if probe_rounds < 0 or probe_rounds > 10:
        raise ConfigError(f"probe rounds must be 0..10, got {probe_rounds}")
    if calibration is not None and loss != "frobenius":
        raise ConfigError("--calibration sets the loss itself (output error): leave the loss at frobenius")
    b = Budget.parse(budget) if isinstance(budget, str) else budget
    max_error = quality_to_error(quality) if quality is not None else None
    out = output_path(out)
    taskset = TaskSet.open(pretrained, finetuned, include, exclude)
    cal: dict[str, TaskCalibration] | None = None
    if calibration is not None:
        missing = [t for t in taskset.names if t not in calibration]
        unknown = [t for t in calibration if t not in taskset.names]
        if missing or unknown:
            raise ConfigError(f"--calibration: give one file per task; missing {missing[:5]}, unknown {unknown[:5]}")
        cal = {t: calibration[t].matched(list(taskset.specs)) for t in taskset.names}
        for t, c in cal.items():
            if not c.col_rms:
                raise ConfigError(f"--calibration {t}: no statistics match a tensor of the checkpoint (the model "
                                  "that made them is not this one)")
    fp32 = taskset.T * sum(s.numel for s in taskset.specs.values()) * 4
    budget_bytes = b.target(fp32) if b is not None else None
    if budget_bytes is not None and budget_bytes < 1024:
        raise ConfigError(f"--budget {b.text if b else ''}: {budget_bytes} bytes cannot hold a store")
    M = 0  # see the module docstring: bases are not among the allocator's choices
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run = as_run(run)  # one engine for every pass
    # the measuring pass's SVDs, for the write pass (in this process only: not across Ray workers)
    kept = KeptFactors(KEPT_SVD_BYTES) if run.get_engine().name == "local" else None
    if measured is not None and set(measured[1]) == set(taskset.names) and \
            all(set(c) == set(taskset.specs) for c in measured[0].values()):
        cands, by_tensor, pre2, wn2 = measured
    else:
        stage = temp_path(out.parent / f".{out.name}-measure")
        stage.mkdir(parents=True)
        try:
            cands, by_tensor, pre2, wn2 = measure_pass(taskset, run, stage, chunk_elements or (1 << 24), cal, kept)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    seconds["measure"] = time.perf_counter() - t0
    norms2 = {t: sum(v.values()) for t, v in by_tensor.items()}
    if any(v == 0.0 for v in norms2.values()):
        zero = [t for t, v in norms2.items() if v == 0.0]
        raise ConfigError(f"fine-tune(s) {zero} equal the pretrained model (zero task vector)")
    alloc_cands, alloc_norms2 = cands, {t: sum(v.values()) for t, v in wn2.items()}
    if loss == "relative":
        alloc_cands, alloc_norms2 = weighted(cands, {t: {n: 1.0 / p for n, p in pre2[t].items()} for t in pre2},
                                             by_tensor)
    overhead = fixed_overhead_guess(taskset.T, len(taskset.specs))
    attempts = 0
    spec = StoreSpec("pca", 0, include=tuple(include) if include is not None else None,
                     exclude=tuple(exclude) if exclude is not None else None)

    def write_fitting(curves: Mapping[str, tuple[float, float]] | None) -> tuple[BasisStore, Allocation, int]:
        """Allocate (with ``curves``: equal predicted damage), write, and re-allocate for the measured overhead
        until the store lies in the budget's window (at most 3 writes)."""
        nonlocal overhead, attempts
        previous: dict[str, dict[str, str]] | None = None
        for tries in range(1, 4):
            attempts += 1
            t1 = time.perf_counter()
            alloc = (allocate(alloc_cands, alloc_norms2, budget_bytes=max(budget_bytes - overhead, 0),
                              damage=curves)
                     if budget_bytes is not None else allocate(alloc_cands, alloc_norms2, max_error=max_error))
            if loss != "frobenius" and cal is None:  # report the task vectors' own relative errors
                alloc.rel_errors = {t: math.sqrt(sum(next(c.sqerr for c in cands[t][n] if c.spec == sp)
                                                     for n, sp in alloc.specs[t].items()) / norms2[t])
                                    for t in cands}
            seconds["allocate"] = seconds.get("allocate", 0.0) + time.perf_counter() - t1
            if budget_bytes is not None and not alloc.feasible and attempts == 1:
                smallest = sum(min(c.nbytes for c in per) for per in
                               (cands[t][n] for t in cands for n in cands[t])) + overhead
                raise ConfigError(f"--budget {b.text if b else ''} ({budget_bytes} B): the smallest store tvbasis "
                                  f"can make of these {taskset.T} tasks takes about {smallest} B "
                                  f"({fp32 / smallest:.1f}x); give a larger budget")
            rule = BudgetRule(alloc.target_error, b.text if b is not None else f"q{quality:g}", alloc.specs,
                              scales=_scales(cal, taskset, alloc.specs), kept=kept)
            t2 = time.perf_counter()
            store = build_store(pretrained, finetuned, spec.with_(residual=Coder.allocated(rule)), out, run,
                                WriteOptions(max_shard_size=max_shard_size, force=force or attempts > 1,
                                             chunk_elements=chunk_elements))
            seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - t2
            size = store_size(out)
            log.info("budget build write %d: entries %d B (estimated), store %d B, budget %s B", attempts,
                     alloc.total_bytes, size, budget_bytes)
            if budget_bytes is None or tries >= 3:
                break
            fixed = size - alloc.total_bytes  # what the store holds besides the entries' estimated bytes
            if (1 - TOLERANCE) * budget_bytes <= size <= budget_bytes:
                break
            if not alloc.feasible or alloc.specs == previous:
                break
            previous = alloc.specs
            # aim a little inside the window; a negative ``fixed`` corrects entries estimated above what they took
            overhead = max(fixed, -budget_bytes // 4) + int(0.002 * budget_bytes)
        return store, alloc, size

    store, alloc, size = write_fitting(None)
    rounds: list[dict[str, Any]] = []
    if probe is not None and budget_bytes is not None:
        # probe the written store, fit each task's damage curve, re-allocate for equal damage; keep the best round
        history: dict[str, list[tuple[float, float]]] = {t: [] for t in taskset.names}
        best: tuple[float, int, Allocation] | None = None
        for r in range(probe_rounds + 1):
            t3 = time.perf_counter()
            dmg = {t: max(float(probe(t, dict(store.reconstruct(t).items()))), DAMAGE_FLOOR)
                   for t in taskset.names}
            seconds["probe"] = seconds.get("probe", 0.0) + time.perf_counter() - t3
            for t in taskset.names:
                history[t].append((alloc.rel_errors[t], dmg[t]))
            worst = max(dmg.values())
            rounds.append({"damage": dmg, "rel_errors": dict(alloc.rel_errors), "store_bytes": size,
                           "worst": worst})
            if size <= budget_bytes and (best is None or worst < best[0]):
                best = (worst, r, alloc)
            if r == probe_rounds:
                break
            curves = {t: fit_damage(history[t]) for t in taskset.names}
            before = alloc.specs
            store, alloc, size = write_fitting(curves)
            if alloc.specs == before:
                rounds[-1]["converged"] = True
                break
        if best is not None and best[2] is not alloc:
            best_alloc = best[2]
            rule = BudgetRule(best_alloc.target_error, b.text if b is not None else "", best_alloc.specs,
                              scales=_scales(cal, taskset, best_alloc.specs), kept=kept)
            t2 = time.perf_counter()
            store = build_store(pretrained, finetuned, spec.with_(residual=Coder.allocated(rule)), out, run,
                                WriteOptions(max_shard_size=max_shard_size, force=True,
                                             chunk_elements=chunk_elements))
            seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - t2
            attempts += 1
            alloc, size = best_alloc, store_size(out)
        if best is not None:
            for i, rd in enumerate(rounds):
                rd["kept"] = i == best[1]
    seconds["total"] = time.perf_counter() - t0
    if kept is not None:
        kept.clear()
    report = BudgetReport(b.text if b is not None else None, budget_bytes, max_error, size, fp32, alloc, M,
                          seconds, attempts, (cands, by_tensor, pre2, wn2), calibrated=cal is not None,
                          probe_rounds=rounds)
    if budget_bytes is not None and size > budget_bytes:
        alloc.notes.append(f"the store takes {size} B, above the budget of {budget_bytes} B")
    return store, report

