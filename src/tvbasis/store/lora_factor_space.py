"""Stores of LoRA adapters built in factor space (no ΔW = s·B·A is ever expanded), and PEFT adapters written back.

``build_lora_store`` writes a coded store with M = 0 (see ``docs/store-format.md``):

* ``method="factors"`` (store method ``lora-factors``): every adapter's own factors as ``lowrank`` entries
  (``us`` = (s·B)ᵀ, ``vt`` = A, rank r — no SVD), optionally through a ``factor_codec`` (e.g. ``int8``) as the
  NEXT codec; tensors an adapter replaces whole (``modules_to_save``, trained biases, ``lora_bias``) as float32
  entries; tensors it does not change as ``none``. ``residual_codec`` is ``lowrank:rank=R`` (+ the factor codec),
  R the largest adapter rank, so add-task of a full fine-tune codes it at that rank.
* ``method="joint"`` (``lora-joint``): the "Compress then Serve" form of ``tvbasis.lora.joint_compress``: per
  tensor and cluster one shared entry ``shared/{c}/{param}`` (U, V) and per task a core entry (full k × k, or
  diagonal k); task t is U Σ_t Vᵀ and a combination U (Σ α_t Σ_t) Vᵀ.

The Gram matrix comes from the factors (``tvbasis.lora.tensor_gram``), every task's error is exact and computed in
factor form, and the pretrained checksum is the one a dense build records (same tensors, same row chunks), so
``edit``/``apply``/``add-task`` check the pretrained model as for every store. Reads: each adapter's factors of
one tensor at a time (plus the pretrained tensors the adapters change, once, for the checksum).

``export_peft`` writes one task of a store whose tasks are low-rank entries as a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, rank as stored, ``lora_alpha`` = r so the scale is 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.codecs import Codec, Encoded, LowRank, parse_codec
from tvbasis.engine import Run, as_run
from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint, TensorSpec, check_output, open_checkpoint
from tvbasis.io.atomic import check_not_input
from tvbasis.io.checksum import combine_digests, structure_fingerprint
from tvbasis.io.lora import LoraCheckpoint
from tvbasis.lora import Source, TensorDeltas, factor_gram, joint_compress, open_adapters, tensor_gram
from tvbasis.methods.lora import LoraStoreMethod
from tvbasis.methods.registry import JOINT, get_store_method, zero_fit
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store.coded import CodedWriter
from tvbasis.store.commit import (
    DEFAULT_LOCK_TIMEOUT,
    Staging,
    commit_new_store,
    output_kind,
    output_path,
    store_lock,
)
from tvbasis.store.format import (
    JOINT_BASES,
    JOINT_CORE,
    Cross,
    Digests,
    Manifest,
    PretrainedRef,
    StoreFiles,
    TaskEntry,
    coded_keys,
    entry_key,
    task_name_problem,
)
from tvbasis.store.lora_entries import dense_entry, factor_entry, pretrained_digests
from tvbasis.store.spec import StoreSpec, WriteOptions
from tvbasis.store.store import BasisStore
from tvbasis.taskset import chunk_for
from tvbasis.vectors import KeyFilter, changed_specs, vector_specs

Entries = dict[str, Encoded | None]


#: the ``method`` argument of ``build_lora_store`` -> its store method
_METHODS = {"factors": "lora-factors", "joint": "lora-joint"}


def _method(method: str) -> LoraStoreMethod:
    name = _METHODS.get(method, method)
    m = get_store_method(name) if name in _METHODS.values() else None
    if not isinstance(m, LoraStoreMethod):
        raise ConfigError(f"method must be 'factors' or 'joint' (lora-factors, lora-joint), got {method!r}")
    return m


def build_lora_store(pretrained: str | Path | Checkpoint, adapters: Mapping[str, str | Path | LoraCheckpoint],
                     out: str | Path, *, method: str = "factors", k: int | tuple[int, int] | None = None,
                     cores: str = "full", clusters: int = 1, affinity: str = "cosine", refine: int = 0,
                     iters: int | None = None, factor_codec: str | None = None, max_shard_size: int | str = "5GB",
                     force: bool = False, run: Run = None,
                     lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BasisStore:
    """Write a factor-space store of the LoRA ``adapters`` (name -> PEFT adapter directory) of ``pretrained`` at
    ``out`` (atomically, as ``build_store``; see the module docstring for the two methods).

    ``method="joint"``: ``k`` (an integer, or (k_out, k_in) for full cores), ``cores`` ``"full"`` or ``"diagonal"``,
    ``clusters`` of adapters (k-means on ``affinity``: ``"cosine"`` or ``"subspace"``, then ``refine`` rounds of
    reassignment), ``iters`` rounds of the alternating fit (default: ``tvbasis.lora.DEFAULT_ITERS``).
    ``method="factors"``: ``factor_codec`` codes each factor (e.g. ``"int8"``), else they are stored as float32.
    Inputs that are not adapter directories are refused (ConfigError naming the file).

    ``add_task`` on these stores stays in factor space: a lora-factors store appends the new adapter's factors (a
    full fine-tune is coded at ``lowrank:rank=R``); a lora-joint store *projects* a new adapter onto the shared U, V
    of the cluster that reconstructs it best — least-squares cores (Uᵀ U)⁺ Uᵀ B A V (Vᵀ V)⁺, or the least-squares
    diagonal — with its exact error, the bases unchanged (its own factors where that cluster has no bases of a
    tensor); it refuses a full fine-tune. ``build_lora_store_from_spec`` takes a ``StoreSpec`` instead."""
    m = _method(method)
    if m.coded_modes[0] != JOINT:
        if k is not None or cores != "full" or clusters != 1 or affinity != "cosine" or refine or iters is not None:
            raise ConfigError("method factors stores every adapter's own factors: k, cores, clusters, affinity, "
                              "refine and iters apply to method joint")
        options: dict[str, Any] = {"factor_codec": None if factor_codec is None else parse_codec(factor_codec).spec}
    else:
        if factor_codec is not None:
            raise ConfigError("factor_codec applies to method factors (a joint store keeps U, V and cores in "
                              "float32)")
        kk: Any = [int(x) for x in k] if isinstance(k, (tuple, list)) else k
        options = {"k": kk, "cores": "diagonal" if cores == "diag" else cores, "clusters": clusters,
                   "affinity": affinity, "refine": refine, "iters": iters}
    return build_lora_store_from_spec(pretrained, adapters, StoreSpec(m.name, options=options), out, run,
                                      WriteOptions(max_shard_size=max_shard_size, force=force,
                                                   lock_timeout=lock_timeout))


def build_lora_store_from_spec(pretrained: str | Path | Checkpoint,
                               adapters: Mapping[str, str | Path | LoraCheckpoint], spec: StoreSpec, out: str | Path,
                               run: Run = None, write: WriteOptions | None = None) -> BasisStore:
    """``build_lora_store`` for a ``StoreSpec`` of method lora-factors or lora-joint (its options as the manifest
    records them; the defaults filled in): what ``tvbasis build --method lora-…`` runs."""
    write = write or WriteOptions()
    m = _method(spec.method)
    given = [f for f, v in (("M", spec.M), ("residual", spec.residual), ("codec", spec.codec),
                            ("layerwise", spec.layerwise), ("dtype", spec.dtype), ("include", spec.include),
                            ("exclude", spec.exclude), ("fisher", spec.fisher)) if v not in (None, False)]
    if given:
        raise ConfigError(f"--method {m.name} builds from LoRA adapters in factor space; {given[0]} does not apply")
    options = m.complete(spec.options)
    if options.get("factor_codec") is not None:
        options["factor_codec"] = parse_codec(options["factor_codec"]).spec
    out = output_path(out)
    if not adapters:
        raise ConfigError("give at least one LoRA adapter")
    for n in adapters:
        problem = task_name_problem(n)
        if problem is not None:
            raise ConfigError(f"invalid task name: {problem}")
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    ads = open_adapters(pre, adapters)
    for n, a in ads.items():
        if not isinstance(a, LoraCheckpoint):
            raise ConfigError(f"{n}: build_lora_store reads PEFT adapter directories; got {type(a).__name__}")
    lora = {n: a for n, a in ads.items() if isinstance(a, LoraCheckpoint)}
    check_not_input(out, [Path(str(pre.path)), *([Path(str(pre.root_dir))] if pre.root_dir else []),
                          *(Path(str(a.path)) for a in lora.values())])
    kind = output_kind(out, write.force)
    check_output(out, True)
    specs: dict[str, TensorSpec] = {}
    for a in lora.values():
        specs = vector_specs(pre, a, KeyFilter.of(None, None))
    specs = changed_specs(specs, list(lora.values()))
    if not specs:
        raise ConfigError("the adapters change no floating-point tensor of the pretrained model")
    with store_lock(out, write.lock_timeout) if kind == "store" else nullcontext():
        return _build(pre, lora, specs, m, options, out, kind, write, run)


class _FactorTensor:
    """Work unit of method ``factors`` (one tensor): its T × T Gram from the factors, each adapter's entry and the
    squared error of what it stores."""

    def __init__(self, adapters: Mapping[str, LoraCheckpoint], next_codec: Codec | None) -> None:
        self.names = list(adapters)
        self.adapters = list(adapters.values())
        self.next_codec = next_codec

    def deltas(self, spec: TensorSpec) -> TensorDeltas:
        td = TensorDeltas(spec.name, spec.shape, {}, {})
        for t, a in enumerate(self.adapters):
            if spec.name not in a.changed_tensors():
                continue
            f = a.factors(spec.name)
            if f is None:
                td.dense[t] = Source(a).dense(spec.name).reshape(td.rows, td.cols)
            else:
                td.factors[t] = (f[0].to(torch.float64), f[1].to(torch.float64))
        return td

    def __call__(self, spec: TensorSpec) -> tuple[str, np.ndarray, np.ndarray, Entries]:
        T = len(self.names)
        td = self.deltas(spec)
        err2 = np.zeros(T)
        entries: Entries = {}
        for t, task in enumerate(self.names):
            key = entry_key("residual", spec.name, task)
            if t in td.factors:
                B, A = td.factors[t]
                entries[key], err2[t] = factor_entry(B, A, spec.shape, self.next_codec,
                                                     self.adapters[t].layout(spec.name))
            elif t in td.dense:
                entries[key], err2[t] = dense_entry(td.dense[t], spec.shape)
            else:
                entries[key] = None
        return spec.name, tensor_gram(td, T), err2, entries


def _factor_entries(lora: Mapping[str, LoraCheckpoint], specs: Mapping[str, TensorSpec], options: Mapping[str, Any],
                    writer: CodedWriter, run: Run) -> tuple[np.ndarray, np.ndarray, str]:
    fc = options["factor_codec"]
    next_codec = None if fc is None else parse_codec(fc)
    T = len(lora)
    G, err2 = np.zeros((T, T)), np.zeros(T)
    ranks = [1]
    items = list(specs.values())
    for name, g, e, entries in as_run(run).get_engine().map(_FactorTensor(lora, next_codec), items,
                                                             desc="adapter factors"):
        G += g
        err2 += e
        for key, enc in entries.items():
            writer.add(key, enc, specs[name].shape)
            if enc is not None and enc.codec.startswith(LowRank.name):
                ranks.append(int(enc.meta["rank"]))
    return G, err2, LowRank(next=next_codec, rank=max(ranks)).spec


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: the joint fit is many products of small (Σr × Σr) matrices, where intra-op threads
    cost more than they save (16 adapters, r = 16, k = 64: 6 s on one thread, 110 s on two of a busy 2-core
    machine). Process-wide; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _joint_entries(lora: Mapping[str, LoraCheckpoint], specs: Mapping[str, TensorSpec], options: Mapping[str, Any],
                   writer: CodedWriter) -> tuple[np.ndarray, np.ndarray, list[int], list[tuple[int, str]]]:
    k = options["k"]
    with _one_thread():
        jc = joint_compress(dict(lora), k=tuple(k) if isinstance(k, list) else k,
                            cores="diag" if options["cores"] == "diagonal" else "full", clusters=options["clusters"],
                            affinity=options["affinity"], refine=options["refine"], iters=options["iters"],
                            dtype=torch.float32, dense_dtype=torch.float32)
    names = list(lora)
    adapters = list(lora.values())
    G = factor_gram(dict(lora)).G
    shared: list[tuple[int, str]] = []
    written: set[str] = set()
    for name, fits in jc.fits.items():
        shape = specs[name].shape
        for f in fits:
            shared.append((f.cluster, name))
            meta = {"cores": options["cores"], "k": [int(f.U.shape[1]), int(f.V.shape[1])]}
            writer.add(entry_key("shared", name, f.cluster),
                       Encoded(JOINT_BASES, tuple(shape), {"u": f.U.to(torch.float32).contiguous(),
                                                           "v": f.V.to(torch.float32).contiguous()}, meta), shape)
            for j, i in enumerate(f.members):
                layout = adapters[i].layout(name)
                key = entry_key("residual", name, names[i])
                writer.add(key, Encoded(JOINT_CORE, tuple(shape), {"core": f.cores[j].to(torch.float32).contiguous()},
                                        {"layout": layout} if layout else {}), shape)
                written.add(key)
    for name, dense in jc.dense.items():
        for i, D in dense.items():
            key = entry_key("residual", name, names[i])
            writer.add(key, dense_entry(D.to(torch.float64), specs[name].shape)[0], specs[name].shape)
            written.add(key)
    for name, spec in specs.items():
        for task in names:
            key = entry_key("residual", name, task)
            if key not in written:
                writer.add(key, None, spec.shape)
    err2 = sum(jc.sq_errors.values(), np.zeros(len(names)))
    return G, err2, list(jc.labels), shared


def _build(pre: Checkpoint, lora: Mapping[str, LoraCheckpoint], specs: Mapping[str, TensorSpec],
           method: LoraStoreMethod, options: dict[str, Any], out: Path, kind: str, write: WriteOptions,
           run: Run) -> BasisStore:
    names = list(lora)
    T = len(names)
    joint = method.coded_modes[0] == JOINT
    with Staging.new_store(out) as stage:
        writer = stage.coded_writer(write.max_shard_size)
        labels: list[int] | None = None
        shared: list[tuple[int, str]] = []
        if joint:
            G, err2, labels, shared = _joint_entries(lora, specs, options, writer)
            residual_codec = "joint"
        else:
            G, err2, residual_codec = _factor_entries(lora, specs, options, writer, run)
        zero = [names[t] for t in range(T) if G[t, t] <= 0]
        if zero:
            raise ConfigError(f"adapter(s) {zero} change nothing (zero task vector)")
        chunk = chunk_for(T)
        checksum = combine_digests(pretrained_digests(pre, specs.values(), chunk))
        norms = np.sqrt(np.diag(G))
        rel = np.sqrt(np.clip(err2, 0.0, None)) / norms
        tasks = [TaskEntry(n, str(lora[n].path), float(norms[t]), float(rel[t]),
                           cluster=None if labels is None else int(labels[t])) for t, n in enumerate(names)]
        manifest = Manifest(
            method=method.name, options=options, M=0, T=T, layerwise=False, task_like=False, tasks=tasks,
            groups={WHOLE_VECTOR: zero_fit(T)}, group_of={},
            cross={WHOLE_VECTOR: Cross(np.zeros((0, T)), np.zeros((0, 0)))}, gram=(G + G.T) / 2, group_grams={},
            pretrained=PretrainedRef(str(pre.root_dir or pre.path), structure_fingerprint(pre), checksum, chunk),
            tensors=list(specs.values()), store_dtypes=dict.fromkeys(specs, "float32"), files=StoreFiles(),
            task_vectors_bytes=T * sum(4 * s.numel for s in specs.values()), digests=Digests(chunk, {}))
        order = coded_keys(names, list(specs), 0, False, True, False, shared)
        manifest.files.coded, section = writer.finish(order)
        section.mode = method.coded_modes[0]
        section.residual_codec = residual_codec
        manifest.coded = section
        manifest.write(stage.dir)
        commit_new_store(stage.dir, out, manifest, kind, write.force, write.lock_timeout)
    return BasisStore.open(out)


# ------------------------------------------------------------------------------------------------ PEFT export
def export_peft(store: BasisStore | str | Path, task: str, out_dir: str | Path,
                pretrained: str | Path | Checkpoint | None = None, *, force: bool = False) -> Path:
    """Write task ``task`` of ``store`` as a PEFT LoRA adapter directory at ``out_dir`` (atomically), exactly:
    the task must be held as low-rank entries (a store with M = 0). Every such tensor becomes ``lora_A``/``lora_B``
    (or ``lora_embedding_A``/``lora_embedding_B``) at its stored rank, the layout the source adapter had, else the
    module's class in the pretrained model, else the tensor's name (``store/lora_export.py``); tensors held densely
    become ``modules_to_save`` (they need ``pretrained``). ``tvbasis.export_lora`` also takes any other store
    (truncated SVD at a rank)."""
    from tvbasis.store.lora_export import export_lora

    return export_lora(store, task, out_dir, pretrained, force=force, exact_only=True).path
