"""Any task of any store as a PEFT LoRA adapter directory (``tvbasis export-lora``, ``tvbasis.export_lora``).

Per tensor of the task, one at a time (never more than one decoded tensor in memory):

* held as low-rank factors (a store with M = 0 whose entry is a ``lowrank`` product, lora-factors entries,
  lora-joint cores): the factors themselves, exact, at their stored rank;
* any other matrix of a module PEFT can adapt (linear, embedding, convolution, GPT-2's ``Conv1D``): ΔW decoded
  from the store and cut to its best rank-R approximation by a truncated SVD (``mergekit-extract-lora``'s job),
  ΔW ≈ (U_R Σ_R)(V_Rᵀ); its error ‖ΔW − P·Q‖ is recorded per tensor;
* anything else that the task changes (biases, norms, a matrix of a module PEFT cannot adapt): its value
  θ₀ + ΔW̃, as ``modules_to_save`` of its module (a LoRA module's bias as its ``base_layer.bias``, PEFT's
  ``bias="lora_only"``) — these need the pretrained model, checked against the store first.

The layout of each module — ``linear``, ``embedding`` (``lora_embedding_A``/``lora_embedding_B``), ``conv`` or
``fan_in_fan_out`` — is, in this order: the layout of the source adapter the entry came from; the module's class
in the model (``model``, or the pretrained ``config.json`` instantiated by transformers on the meta device: no
weights); else the tensor's name and rank (4-D: conv; a name containing ``embed``, ``wte`` or ``wpe``: embedding;
else linear). Module names are the model's own where a model is known (tensors matched as the readers match
checkpoint keys, e.g. a ``bert.`` prefix on one side), else the store's tensor names.

The adapter directory gets ``adapter_config.json`` (``lora_alpha`` = r so PEFT's scale is 1; ``rank_pattern``/
``alpha_pattern`` for modules of another rank), ``adapter_model.safetensors`` and ``tvbasis_export.json`` (per
tensor: how it was exported, rank, squared error; the relative error of the adapter against the store's task).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tvbasis.errors import ConfigError, TensorMismatchError
from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.io.atomic import atomic_output
from tvbasis.io.checksum import check_pretrained_checksum
from tvbasis.io.lora import PEFT_PREFIX
from tvbasis.store.apply import accumulate, match_names
from tvbasis.store.format import NONE_CODEC, entry_key
from tvbasis.store.lora_entries import pretrained_digests
from tvbasis.store.store import BasisStore

#: rank of the truncated SVD when none is given
DEFAULT_RANK = 16
EXPORT_RECORD = "tvbasis_export.json"
LAYOUTS = ("linear", "embedding", "conv", "fan_in_fan_out")


@dataclass
class LoraExport:
    """What ``export_lora`` wrote: the directory, per-tensor records, and the adapter's relative error against
    the store's decoded task (0 where every tensor was exact)."""

    path: Path
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    rel_error: float = 0.0
    store_rel_error: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(r["rank"]) for n, r in self.tensors.items() if r["how"] in ("factors", "svd")}


# ---------------------------------------------------------------------------------------------------- layouts
def module_layouts(model: torch.nn.Module) -> dict[str, str | None]:
    """Parameter name -> the LoRA layout of its module (None: a module PEFT's LoRA does not adapt)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        Conv1D = ()  # type: ignore[assignment,misc]
    out: dict[str, str | None] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            kind: str | None = "embedding"
        elif Conv1D and isinstance(mod, Conv1D):
            kind = "fan_in_fan_out"
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            kind = "conv"
        elif isinstance(mod, torch.nn.Linear):
            kind = "linear"
        else:
            kind = None
        for pname, _ in mod.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = kind if pname == "weight" else None
    return out


def meta_model(pretrained: Checkpoint | None) -> torch.nn.Module | None:
    """The pretrained model's transformers class built on the meta device (no weights, no memory), or None."""
    if pretrained is None or pretrained.root_dir is None or not (Path(pretrained.root_dir) / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(pretrained.root_dir), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation notes are not the user's concern here
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:
        return None


def _name_layout(name: str, shape: tuple[int, ...]) -> str | None:
    if len(shape) > 2:
        return "conv"
    if len(shape) != 2:
        return None
    parts = name.lower().split(".")
    if any("embed" in p or p in ("wte", "wpe") for p in parts[:-1]):
        return "embedding"
    return "linear"


def _layouts(st: BasisStore, task: str, model: torch.nn.Module | None) -> tuple[dict[str, str | None], dict[str, str]]:
    """Per store tensor: its LoRA layout (None: not adaptable) and its name in the model (the PEFT key stem)."""
    names = {n: n for n in st.specs}
    by_model: dict[str, str | None] = {}
    if model is not None:
        kinds = module_layouts(model)
        try:
            names = match_names(list(st.specs), list(kinds), type(model).__name__)
        except TensorMismatchError:
            names = {n: n for n in st.specs}  # a model that does not fit: the names decide
        else:
            by_model = {n: kinds[names[n]] for n in st.specs}
    out: dict[str, str | None] = {}
    coded = st.coded
    for n, spec in st.specs.items():
        src = None
        if coded is not None and st.manifest.has_residuals and not st.masks:
            src = coded.section.entries[entry_key("residual", n, task)].encoded.get("meta", {}).get("layout")
        if src in LAYOUTS:
            out[n] = str(src)
        elif n in by_model:
            out[n] = by_model[n] if n.endswith(".weight") and len(spec.shape) >= 2 else None
        else:
            out[n] = _name_layout(n, spec.shape) if n.endswith(".weight") else None
    return out, names


# ---------------------------------------------------------------------------------------------------- factors
def _svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors (P, Q) of the 2-D ``delta`` and the squared error ‖delta − P·Q‖² (float64)."""
    D = delta.to(torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    r = min(rank, S.numel())
    err2 = float(S[r:].pow(2).sum())
    return (U[:, :r] * S[:r]).to(torch.float32).contiguous(), Vh[:r].to(torch.float32).contiguous(), err2


def peft_tensors(module: str, layout: str, P: torch.Tensor, Q: torch.Tensor,
                 shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """PEFT's saved tensors of one module with ΔW.reshape(rows, -1) = P·Q (scale 1)."""
    key = PEFT_PREFIX + module
    r = P.shape[1]
    if layout == "embedding":  # ΔW = (B·A)ᵀ with A (r × vocab), B (hidden × r)
        return {f"{key}.lora_embedding_A": P.T.contiguous(), f"{key}.lora_embedding_B": Q.T.contiguous()}
    if layout == "fan_in_fan_out":
        return {f"{key}.lora_A.weight": P.T.contiguous(), f"{key}.lora_B.weight": Q.T.contiguous()}
    if layout == "conv":
        return {f"{key}.lora_A.weight": Q.reshape(r, *shape[1:]).contiguous(),
                f"{key}.lora_B.weight": P.reshape(shape[0], r, *[1] * (len(shape) - 2)).contiguous()}
    return {f"{key}.lora_A.weight": Q.contiguous(), f"{key}.lora_B.weight": P.contiguous()}


def dense_tensors(root: Path, task: str, dense: Mapping[str, torch.Tensor], lora_modules: set[str],
                  pre: Checkpoint | None, names: Mapping[str, str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], set[str], str]:
    """PEFT's saved values θ₀ + ΔW̃ of the tensors a task replaces whole: a LoRA module's bias as its
    ``base_layer.bias`` (``bias="lora_only"``), anything else through ``modules_to_save`` of its module (every
    floating tensor of that module written, the unchanged ones as θ₀). ``names``: store tensor -> model name."""
    names = names or {}
    saved: dict[str, torch.Tensor] = {}
    to_save: dict[str, str] = {}  # model module -> the store's module prefix
    bias = "none"
    for name, D in dense.items():
        assert pre is not None
        mname = names.get(name, name)
        module, _, leaf = mname.rpartition(".")
        if not module:
            raise ConfigError(f"{root}: task {task} changes {name!r}, a parameter of no module; PEFT's "
                              "modules_to_save cannot hold it")
        if module in lora_modules:
            if leaf != "bias":
                raise ConfigError(f"{root}: task {task} changes {name!r} whole and its module by LoRA; PEFT cannot "
                                  "hold both")
            saved[f"{PEFT_PREFIX}{module}.base_layer.bias"] = (pre.get(name).to(torch.float32) + D).contiguous()
            bias = "lora_only"
        else:
            to_save[module] = name.rpartition(".")[0]
    for module, store_module in to_save.items():
        assert pre is not None
        for s in pre.specs():
            parent, _, leaf = s.name.rpartition(".")
            if parent == store_module and s.is_float:
                value = pre.get(s.name).to(torch.float32)
                saved[f"{PEFT_PREFIX}{module}.{leaf}"] = (value + dense[s.name] if s.name in dense else value).contiguous()
    return saved, set(to_save), bias


# ---------------------------------------------------------------------------------------------------- export
def export_lora(store: BasisStore | str | Path, task: str, out_dir: str | Path,
                pretrained: str | Path | Checkpoint | None = None, *, rank: int | None = None, force: bool = False,
                model: torch.nn.Module | None = None, exact_only: bool = False) -> LoraExport:
    """Write task ``task`` of ``store`` as a PEFT LoRA adapter at ``out_dir`` (atomically); see the module
    docstring. ``rank``: of the truncated SVD for tensors not held as factors (default ``DEFAULT_RANK``).
    ``model``: a module of the pretrained architecture to read layouts and module names from (default: built from
    the pretrained ``config.json`` on the meta device). ``exact_only``: refuse tasks not held as factors."""
    st = store if isinstance(store, BasisStore) else BasisStore.open(store)
    st.task_index(task)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    R = DEFAULT_RANK if rank is None else rank
    factored = st.M == 0 and st.manifest.has_residuals and not st.masks and st.coded is not None
    if exact_only and not factored:
        raise ConfigError(f"{st.root}: a PEFT adapter needs the task as low-rank entries (a store with M = 0: "
                          f"lora-factors, lora-joint, or --residual lowrank); this is a {st.method} store with "
                          f"M = {st.M}")
    pre = None
    if pretrained is not None:
        pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
        st.check_pretrained(pre)
        ref = st.manifest.pretrained
        check_pretrained_checksum(pretrained_digests(pre, st.specs.values(), ref.checksum_chunk_elements),
                                  ref.to_json(), pre.path, "; nothing written")
    layouts, names = _layouts(st, task, model if model is not None else meta_model(pre))
    coefs, means = st._coefficients(st._alpha({task: 1.0}))
    per_task = {task: 1.0} if st.manifest.has_residuals else {}
    result = LoraExport(Path(out_dir), store_rel_error=st.rel_errors[task])
    lora: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds: set[str] = set()
    dense: dict[str, torch.Tensor] = {}
    total2 = err_total = 0.0
    for name, spec in st.specs.items():
        layout = layouts[name]
        module = names[name].removesuffix(".weight")
        key = entry_key("residual", name, task)
        f = None
        if factored:
            assert st.coded is not None
            if st.coded.codec_of(key) == NONE_CODEC:
                continue
            f = st.coded.factors(key) if len(spec.shape) >= 2 else None
        if f is not None and f[0].shape[1] == 0:
            continue
        if f is not None and layout is None and exact_only and not name.endswith(".weight"):
            raise ConfigError(f"{st.root}: task {task} holds {name!r} as a low-rank product, but PEFT adapts "
                              "'.weight' tensors only")
        if f is not None and layout is not None:
            P, Q = f
            n2 = float((P.double() @ Q.double()).pow(2).sum())
            how, err2 = "factors", 0.0
        else:
            delta = torch.zeros(spec.shape, dtype=torch.float32)
            accumulate(st, name, delta, coefs, means, per_task, 1.0)
            n2 = float(delta.double().pow(2).sum())
            if n2 == 0.0:
                continue
            if layout is None or exact_only:
                dense[name] = delta
                result.tensors[name] = {"how": "modules_to_save", "rank": 0, "sq_error": 0.0, "sq_norm": n2}
                total2 += n2
                continue
            P, Q, err2 = _svd(delta.reshape(spec.shape[0], -1), R)
            how = "svd"
            del delta
        if not all(math.isfinite(float(x)) for x in (P.abs().max(), Q.abs().max())):
            raise ConfigError(f"{st.root}: task {task}: {name!r} gives non-finite factors")
        lora.update(peft_tensors(module, layout, P, Q, spec.shape))
        ranks[module] = int(P.shape[1])
        kinds.add("embedding" if layout == "embedding" else "fan_in_fan_out" if layout == "fan_in_fan_out"
                  else "plain")
        result.tensors[name] = {"how": how, "layout": layout, "module": module, "rank": int(P.shape[1]),
                                "sq_error": err2, "sq_norm": n2}
        total2 += n2
        err_total += err2
    if not ranks:
        raise ConfigError(f"{st.root}: task {task} changes no matrix PEFT's LoRA can adapt")
    if {"fan_in_fan_out", "plain"} <= kinds:
        raise ConfigError(f"{st.root}: task {task} mixes fan_in_fan_out (Conv1D) and plain linear layouts; PEFT's "
                          "fan_in_fan_out is one flag per adapter")
    if dense and pre is None:
        raise ConfigError(f"{st.root}: task {task} changes {len(dense)} tensor(s) PEFT saves whole (e.g. "
                          f"{sorted(dense)[0]!r}); pass the pretrained model (--pretrained)")
    saved, to_save, bias = dense_tensors(st.root, task, dense, set(ranks), pre, names)
    result.modules_to_save = sorted(to_save)
    result.rel_error = math.sqrt(err_total / total2) if total2 > 0 else 0.0
    top = max(ranks.values())
    config = {"peft_type": "LORA", "r": top, "lora_alpha": top, "target_modules": sorted(ranks),
              "rank_pattern": {m: r for m, r in ranks.items() if r != top},
              "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
              "modules_to_save": sorted(to_save) or None, "bias": bias, "fan_in_fan_out": "fan_in_fan_out" in kinds,
              "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "inference_mode": True,
              "init_lora_weights": True, "task_type": None,
              "base_model_name_or_path": st.manifest.pretrained.path}
    record = {"store": str(st.root), "task": task, "svd_rank": R, "rel_error": result.rel_error,
              "store_rel_error": result.store_rel_error,
              "note": "rel_error: ||adapter delta - store task||/||store task||; store_rel_error: the store's own "
                      "error against the fine-tune it was built from", "tensors": result.tensors}
    inputs = [st.root, *([Path(str(pre.path))] if pre is not None else [])]
    with atomic_output(out_dir, force, inputs) as tmp:
        save_file({**lora, **saved}, str(tmp / "adapter_model.safetensors"), {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return result


__all__ = ["DEFAULT_RANK", "LoraExport", "export_lora", "module_layouts"]
