"""``tvbasis build --method ultradelta``: UltraDelta's statistics passes, then an ordinary per-task build.

UltraDelta (``tvbasis.compress.ultradelta``) decides per task from the whole task vector: how sparse each layer is
(from the standard deviations of every layer's quantised delta) and how much the task is scaled (from the trace
norms of its compressed layers, against the other tasks'). So the build reads the inputs twice before the usual
two passes of a coded store:

1. **Statistics**: per (task, target tensor) the element count and the standard deviation of the ``bits``-bit
   quantised delta → per task the density of every tensor (``allocate_densities``).
2. **Trace norms** (``trace_norm=true``): per (task, 2-D target tensor) the nuclear norm of the compressed,
   rescaled delta (the ``ultra`` codec at the allocated density and the base scale factor/density, decoded, its
   singular values summed) → per task the ratio min tr / tr_t (``trace_ratios``).
3. ``build_store(…, StoreSpec("ultradelta", options={…, "allocation": …, "scales": …}), …)``: the Gram and the coded
   materialisation pass, every task coded by ``Coder.with_rule(UltraDeltaRule)`` — so the store opens, verifies,
   reconstructs, edits and records its allocation like any per-task store.

Memory: both passes read one task's slice of one tensor at a time (``TaskSet.deltas(..., tasks=[t])``); pass 2
adds that tensor's encoding, its decode and an SVD (about 3 times the tensor). Time: pass 2 codes every target
tensor of every task once more than the build itself does, plus one singular-value decomposition each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tvbasis.codecs.ultra import quantized_std
from tvbasis.compress.ultradelta import UltraDeltaRule, allocate_densities, is_target, trace_ratios
from tvbasis.engine import Run, as_run
from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint
from tvbasis.methods import get_store_method
from tvbasis.store.build import build_store
from tvbasis.store.commit import DEFAULT_LOCK_TIMEOUT
from tvbasis.store.spec import StoreSpec, WriteOptions
from tvbasis.store.store import BasisStore
from tvbasis.taskset import DEFAULT_CHUNK_ELEMENTS, TaskSet


class StatsTask:
    """Work unit (one tensor): (name, numel, std of the quantised delta per task)."""

    def __init__(self, taskset: TaskSet, bits: int) -> None:
        self.taskset, self.bits = taskset, bits

    def __call__(self, name: str) -> tuple[str, int, list[float]]:
        stds = [quantized_std(self.taskset.deltas(name, None, tasks=[t])[0], self.bits)
                for t in range(self.taskset.T)]
        return name, self.taskset.specs[name].numel, stds


class TraceTask:
    """Work unit (one 2-D target tensor): its nuclear norm per task after compression at the base scale."""

    def __init__(self, taskset: TaskSet, rule: UltraDeltaRule) -> None:
        self.taskset, self.rule = taskset, rule

    def __call__(self, name: str) -> tuple[str, list[float]]:
        out = []
        for t, task in enumerate(self.taskset.names):
            x = self.taskset.deltas(name, None, tasks=[t])[0]
            codec = self.rule.codec_for(name, tuple(x.shape), task, scale=self.rule.base_scale())
            if codec is None:  # a target tensor masked whole (density 0): it adds nothing to the trace norm
                out.append(0.0)
                continue
            xhat = codec.decode(codec.encode(x))
            out.append(float(torch.linalg.svdvals(xhat.double()).sum()))
        return name, out


def ultradelta_allocation(taskset: TaskSet, options: Mapping[str, Any],
                          run: Run = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(per task {tensor: density}, per task scale ratio) of UltraDelta on ``taskset`` — passes 1 and 2 above.
    ``options``: checked ultradelta options (``get_store_method("ultradelta").check(…)``)."""
    eng = as_run(run).get_engine()
    targets = [n for n, s in taskset.specs.items() if is_target(n, s.shape)]
    if not targets:
        raise ConfigError("--method ultradelta: no linear weight of a transformer block among the tensors "
                          "(names like encoder.layer.N.….weight); nothing to compress")
    stats: dict[str, dict[str, tuple[int, float]]] = {t: {} for t in taskset.names}
    sizes = [taskset.specs[n].numel * 4 for n in targets]
    for name, numel, stds in eng.map(StatsTask(taskset, int(options["bits"])), targets, desc="ultradelta stats",
                                     sizes=sizes):
        for t, task in enumerate(taskset.names):
            stats[task][name] = (numel, stds[t])
    allocation = {task: allocate_densities(per, float(options["density"]), float(options["step"]))
                  for task, per in stats.items()}
    if not options["trace_norm"]:
        return allocation, {task: 1.0 for task in taskset.names}
    rule = UltraDeltaRule.from_options({**options, "allocation": allocation, "scales": None})
    two_d = [n for n in targets if len(taskset.specs[n].shape) == 2]
    traces = {task: 0.0 for task in taskset.names}
    for _name, per_task in eng.map(TraceTask(taskset, rule), two_d, desc="ultradelta trace norms",
                                   sizes=[taskset.specs[n].numel * 4 for n in two_d]):
        for t, task in enumerate(taskset.names):
            traces[task] += per_task[t]
    return allocation, trace_ratios(traces)


def build_ultradelta_store(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                           out: str | Path, options: Mapping[str, Any] | None = None,
                           include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                           dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB",
                           force: bool = False, run: Run = None,
                           chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
                           lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BasisStore:
    """UltraDelta's store of the fine-tunes at ``out``: the statistics passes, then ``build_store``. ``options``:
    ``density``, ``bits``, ``step``, ``factor``, ``trace_norm``, ``seed``, ``rest`` (defaults: the paper's).
    ``build_statistics_first`` takes a ``StoreSpec`` instead."""
    spec = StoreSpec("ultradelta", options=dict(options or {}), dtype=dtype,
                     include=None if include is None else tuple(include),
                     exclude=None if exclude is None else tuple(exclude))
    return build_statistics_first(pretrained, finetuned, spec, out, run,
                                  WriteOptions(max_shard_size, force, chunk_elements, lock_timeout))


def build_statistics_first(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                           spec: StoreSpec, out: str | Path, run: Run = None,
                           write: WriteOptions | None = None) -> BasisStore:
    """A store of a method whose options need statistics passes first (builder ``statistics-first``: UltraDelta's
    allocation and scales), then ``build_store`` with them."""
    given = dict(spec.options)
    for k in ("allocation", "scales"):
        if k in given:
            raise ConfigError(f"--method {spec.method}: option {k} is computed by the build, not given")
    method = get_store_method(spec.method)
    opts = method.check(given, list(finetuned))
    method.check_build(spec.M, spec.residual, spec.codec, spec.layerwise)
    taskset = TaskSet.open(pretrained, finetuned, spec.include, spec.exclude)
    allocation, scales = ultradelta_allocation(taskset, opts, run)
    return build_store(pretrained, finetuned, spec.with_(options={**opts, "allocation": allocation, "scales": scales}),
                       out, run, write)
