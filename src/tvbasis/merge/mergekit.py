"""Reading mergekit's YAML merge configurations (``mergekit-yaml``'s ``models:`` form) as tvbasis merges.

``load_mergekit_config("merge.yml")`` parses the file with ``yaml.safe_load`` (never ``yaml.load``: tags such
as ``!!python/object`` are refused) and returns a ``MergekitConfig``: the base model, the fine-tuned models by
task name, one weight per task, the tvbasis ``MergeSpec``, the output dtype and the scaling coefficient, so that
θ = θ₀ + scaling_coef · merge(w_1·τ_1, …, w_T·τ_T) is what mergekit would have written. Everything tvbasis cannot
reproduce is refused with ``ConfigError`` naming the file and the key path, e.g.
``merge.yml: models[1].parameters.density: gradient lists are not supported``.

Mapping (mergekit's semantics read from mergekit's config.py, plan.py, merge_methods/{registry,
generalized_task_arithmetic,linear}.py and sparsify.py; defaults are mergekit's, written explicitly into the
spec because several differ from tvbasis's own, e.g. dare_ties' ``normalize``):

- ``task_arithmetic`` → ``task_arithmetic {normalize: false}``; ``density`` and ``rescale`` are accepted and
  ignored, as mergekit ignores them (no sparsification).
- ``ties`` → ``ties {density: 1.0, sign: total, normalize: true, trim_scope: tensor}`` (mergekit's consensus is
  the summed mass, tvbasis's ``total``; it trims each tensor on its own; mergekit keeps int(density·n) entries of
  an n-entry tensor where tvbasis keeps ceil(density·n), so the two differ by one entry where density·n is not
  whole). ``rescale: true`` is refused (mergekit would rescale the kept entries to the task's L1 norm; tvbasis's
  ties does not rescale).
- ``dare_linear`` → ``dare_linear {density: 1.0, rescale: true, normalize: false}``; ``dare_ties`` → ``dare_ties
  {density: 1.0, rescale: true, sign: total, normalize: false}``. ``rescale`` differs slightly: mergekit
  rescales each pruned tensor to its original L1 norm, tvbasis by 1/density (DARE's rule; equal in expectation);
  the drop masks are random in both (tvbasis's are seeded by ``seed``, default 0). A note says so.
- ``linear`` (a weighted average of whole models, the base included when given: mergekit adds ``base_model``
  to the inputs) → ``task_arithmetic {normalize: false}`` with weights w_i/Σw, Σ over every input including the
  base (its task vector is zero): Σ w_i·θ_i / Σ w_i = θ₀ + Σ (w_i/Σw)·τ_i exactly. Without ``base_model``,
  ``models[0]`` serves as θ₀ (exact: the average does not depend on the base). ``normalize: false`` gives
  Σ w_i·θ_i, a task-vector merge only when Σw = 1, else refused.
- per-model ``weight`` (mergekit requires one: per model, or a default under top-level ``parameters``) → the
  task's weight; per-model ``density`` → the one ``density`` of the merge: all task models must share it,
  otherwise refused by name (tvbasis takes one density per merge); density >= 1 keeps everything in mergekit
  and maps to 1.0.
- ``lambda`` (global; scales the merged task vector after normalization) → ``scaling_coef`` (default 1.0);
  ``normalize`` → ``normalize``; ``int8_mask`` → accepted and ignored (it only picks the dtype of mergekit's
  sign mask: no numerical effect).
- ``dtype`` and ``out_dtype`` → ``dtype``, the output dtype (``out_dtype`` if given, else ``dtype``;
  bfloat16/float16/float32, optional ``torch.`` prefix); tvbasis always computes in float32 (a note says so).
- ``tokenizer_source``: absent or ``base`` (tvbasis writes the base model's tokenizer files, if any).
- A model listed under ``models`` that is the base model is not a task (mergekit skips its task vector).
  Models are compared as normalized absolute paths.

Refused by name: ``slices``, ``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source`` other than
``base``, any other top-level key (e.g. mergekit-multi's ``name``), several YAML documents, every other merge
method (slerp, nuslerp, multislerp, karcher, breadcrumbs, della, sce, model_stock, passthrough, …, and
tvbasis-only names such as mean or topk), gradient lists, filtered (per-tensor) values, unknown or
per-model-misplaced parameters, LoRA (``MODEL+LORA``) and revision (``MODEL@REV``) references, duplicate models,
differing per-model densities.

Paths: mergekit takes model references as given (Hugging Face ids or local paths, relative ones resolved
against the current directory); tvbasis does no downloads, so each must be an existing local path, resolved
against the current directory (not the YAML file's) as mergekit does. Task names are each path's last component,
deduplicated with ``_2``, ``_3``, ….
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from tvbasis.errors import ConfigError
from tvbasis.merge.base import MergeSpec
from tvbasis.merge.registry import get_merger

#: mergekit method -> (tvbasis method, mergekit's default normalize, mergekit's default rescale)
_GTA_METHODS: dict[str, tuple[str, bool, bool]] = {
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_linear": ("dare_linear", False, True),
    "dare_ties": ("dare_ties", False, True),
}
SUPPORTED_METHODS: tuple[str, ...] = ("linear", *_GTA_METHODS)
#: mergekit's other methods, refused with a message naming them as mergekit's
_MERGEKIT_ONLY = ("slerp", "nuslerp", "multislerp", "karcher", "breadcrumbs", "breadcrumbs_ties", "della",
                  "della_linear", "sce", "model_stock", "nearswap", "arcee_fusion", "passthrough", "ram",
                  "ramplus_tl")

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_TOP_REFUSED = {
    "slices": "layer slices are not supported (tvbasis merges whole models; use `models:`)",
    "modules": "per-module definitions are not supported (use `models:`)",
    "tokenizer": "tokenizer configuration is not supported (tvbasis keeps the base model's tokenizer)",
    "chat_template": "chat templates are not supported (tvbasis keeps the base model's files)",
}
#: merge-wide parameters (mergekit's ``parameters()``): name -> kind
_GLOBAL_PARAMS = {"linear": {"normalize": "bool"},
                  "gta": {"normalize": "bool", "rescale": "bool", "int8_mask": "bool", "lambda": "number"}}
#: per-model parameters (mergekit's ``tensor_parameters()``), also accepted as defaults under ``parameters``
_MODEL_PARAMS = {"linear": {"weight": "number"}, "gta": {"weight": "number", "density": "number"}}
_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class MergekitConfig:
    """A mergekit config as a tvbasis merge: θ = base_model + scaling_coef · merge(spec; w_t·τ_t).

    source: the file (or label) read, for messages.
    mergekit_method: ``merge_method`` as written (``spec.method`` is tvbasis's name, see ``method``).
    base_model: θ₀, an existing local path (absolute).
    models: task name -> fine-tuned model path (absolute), in the file's order; the base model is not a task.
    weights: task name -> weight (for ``linear``, already divided by the sum of all weights).
    spec: the tvbasis merge method and its parameters (every mapped parameter written explicitly).
    dtype: output dtype name (bfloat16, float16, float32) or None (keep the checkpoint's).
    scaling_coef: mergekit's ``lambda`` (1.0 when absent, and for ``linear``).
    notes: where tvbasis only approximates mergekit, or a setting is ignored; for the caller to print.
    """

    source: str
    mergekit_method: str
    base_model: Path
    models: dict[str, Path]
    weights: dict[str, float]
    spec: MergeSpec
    dtype: str | None = None
    scaling_coef: float = 1.0
    notes: tuple[str, ...] = field(default=())

    @property
    def method(self) -> str:
        """The tvbasis merge method (``spec.method``)."""
        return self.spec.method


def load_mergekit_config(path: str | Path, *, check_paths: bool = True) -> MergekitConfig:
    """Read a mergekit YAML file (``yaml.safe_load``); ConfigError naming the file for anything unreadable,
    malformed, not a mapping or not supported. ``check_paths=False`` skips the existence check of model paths."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read mergekit config: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except ConstructorError as e:
        raise ConfigError(f"{source}: unsupported YAML tag (read with yaml.safe_load: plain YAML only): "
                          f"{e.problem}{_mark(e)}") from None
    except ComposerError as e:
        if "single document" in str(e):
            raise ConfigError(f"{source}: several YAML documents (mergekit-multi) are not supported; "
                              f"give one merge per file") from None
        raise ConfigError(f"{source}: malformed YAML: {e.problem}{_mark(e)}") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: malformed YAML: {problem}{_mark(e)}") from None
    if not isinstance(data, Mapping):
        what = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: a mergekit config must be a YAML mapping, got {what}")
    return parse_mergekit_config(data, source, check_paths=check_paths)


def parse_mergekit_config(data: Mapping[str, Any], source: str, *, check_paths: bool = True) -> MergekitConfig:
    """A parsed mergekit config (the mapping ``yaml.safe_load`` returns) as a MergekitConfig; ``source`` names
    it in messages. See the module docstring for the mapping and what is refused."""
    return _Parser(source, check_paths).parse(data)


def _mark(e: yaml.YAMLError) -> str:
    m = getattr(e, "problem_mark", None)
    return f" (line {m.line + 1}, column {m.column + 1})" if m is not None else ""


class _Parser:
    def __init__(self, source: str, check_paths: bool) -> None:
        self.source = source
        self.check_paths = check_paths
        self.notes: list[str] = []

    def err(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {msg}")

    # -------------------------------------------------------------------------------------------- values
    def scalar(self, value: Any, where: str, kind: str) -> bool | float:
        """A scalar parameter value; gradients and filtered values refused by name."""
        if isinstance(value, list):
            if value and all(isinstance(v, Mapping) for v in value):
                raise self.err(where, "filtered (per-tensor) value lists are not supported; give one scalar")
            raise self.err(where, "gradient lists are not supported; give one scalar")
        if isinstance(value, Mapping):
            extra = sorted(map(str, set(value) - {"filter", "value"}))
            if extra or "value" not in value:
                raise self.err(where, f"expected a scalar, got a mapping with keys {sorted(map(str, value))}")
            if value.get("filter") not in (None, "*"):
                raise self.err(where, f"filtered (per-tensor) values (filter: {value['filter']!r}) are not supported")
            return self.scalar(value["value"], where + ".value", kind)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.err(where, f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.err(where, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.err(where, f"must be finite, got {value!r}")
        return float(value)

    def params(self, raw: Any, where: str, allowed: dict[str, str], misplaced: dict[str, str],
               method: str) -> dict[str, bool | float]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise self.err(where, f"must be a mapping of parameter names to values, got {raw!r}")
        out: dict[str, bool | float] = {}
        for k, v in raw.items():
            if k in misplaced:
                raise self.err(f"{where}.{k}", "a merge-wide parameter in mergekit (per-model values are "
                                               "ignored there); give it under the top-level `parameters`")
            if k not in allowed:
                raise self.err(f"{where}.{k}", f"not a parameter of mergekit's {method!r} that tvbasis supports; "
                                               f"accepted: {sorted(allowed)}")
            out[k] = self.scalar(v, f"{where}.{k}", allowed[k])
        return out

    # -------------------------------------------------------------------------------------------- models
    def model_ref(self, ref: Any, where: str) -> str:
        """A mergekit model reference (string or mapping) as a path string; LoRA and revisions refused."""
        if isinstance(ref, Mapping):
            extra = sorted(map(str, set(ref) - {"model", "lora", "override_architecture"}))
            if extra:
                raise self.err(f"{where}.{extra[0]}", "unknown key of a model reference")
            if ref.get("lora") is not None:
                raise self.err(f"{where}.lora", "LoRA references are not supported; merge the LoRA first")
            if ref.get("override_architecture") is not None:
                raise self.err(f"{where}.override_architecture", "is not supported")
            inner = ref.get("model")
            if isinstance(inner, Mapping):
                extra = sorted(map(str, set(inner) - {"path", "revision"}))
                if extra:
                    raise self.err(f"{where}.model.{extra[0]}", "unknown key of a model path")
                if inner.get("revision") is not None:
                    raise self.err(f"{where}.model.revision", "revisions are not supported (tvbasis does no "
                                                              "downloads; give a local path)")
                inner, where = inner.get("path"), f"{where}.model.path"
            else:
                where = f"{where}.model"
            ref = inner
        if not isinstance(ref, str) or not ref.strip():
            raise self.err(where, f"must be a model path, got {ref!r}")
        if "+" in ref:
            raise self.err(where, f"LoRA references (MODEL+LORA) are not supported: {ref!r}; merge the LoRA first")
        if "@" in ref:
            raise self.err(where, f"revisions (MODEL@REVISION) are not supported (tvbasis does no downloads; "
                                  f"give a local path): {ref!r}")
        return ref

    def local(self, ref: str, where: str) -> Path:
        p = Path(os.path.abspath(ref))
        if self.check_paths and not p.exists():
            raise self.err(where, f"model {ref!r} does not exist locally (resolved against the current directory "
                                  f"to {p}); tvbasis does no downloads, give a local path")
        return p

    # -------------------------------------------------------------------------------------------- config
    def parse(self, data: Mapping[str, Any]) -> MergekitConfig:
        for k in data:
            if k in _TOP_REFUSED:
                raise self.err(str(k), _TOP_REFUSED[k])
            if k not in _TOP_KEYS:
                raise self.err(str(k), f"unknown or unsupported key; supported: {sorted(_TOP_KEYS)}")
        method = data.get("merge_method")
        if method is None:
            raise self.err("merge_method", "missing")
        if not isinstance(method, str):
            raise self.err("merge_method", f"must be a string, got {method!r}")
        if method not in SUPPORTED_METHODS:
            kind = "mergekit's method" if method in _MERGEKIT_ONLY else "method"
            raise self.err("merge_method", f"{kind} {method!r} is not supported; supported: {list(SUPPORTED_METHODS)}")
        family = "linear" if method == "linear" else "gta"

        tok = data.get("tokenizer_source")
        if tok not in (None, "base"):
            raise self.err("tokenizer_source", f"{tok!r} is not supported (only `base`: tvbasis keeps the base "
                                               f"model's tokenizer)")
        dtype = self.dtype(data, "dtype")
        out_dtype = self.dtype(data, "out_dtype")
        out = out_dtype or dtype
        if dtype is not None:
            self.notes.append(f"dtype {dtype}: tvbasis computes in float32 and writes {out}")

        gparams = self.params(data.get("parameters"), "parameters",
                              {**_GLOBAL_PARAMS[family], **_MODEL_PARAMS[family]}, {}, method)

        models = data.get("models")
        if models is None:
            raise self.err("models", "missing (tvbasis reads mergekit's `models:` form)")
        if not isinstance(models, list) or not models:
            raise self.err("models", f"must be a non-empty list of {{model: PATH, parameters: {{...}}}}, "
                                     f"got {models!r}")

        base_ref = data.get("base_model")
        base: Path | None = None
        if base_ref is not None:
            base = self.local(self.model_ref(base_ref, "base_model"), "base_model")
        elif family == "gta":
            raise self.err("base_model", f"missing; mergekit's {method!r} merges task vectors, differences from "
                                         f"a base model")

        entries: list[tuple[int, str, Path, dict[str, bool | float]]] = []
        seen: dict[Path, int] = {}
        for i, entry in enumerate(models):
            where = f"models[{i}]"
            if not isinstance(entry, Mapping):
                raise self.err(where, f"must be a mapping {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            extra = sorted(map(str, set(entry) - {"model", "parameters"}))
            if extra:
                raise self.err(f"{where}.{extra[0]}", "unknown key; a model entry has `model` and `parameters`")
            if "model" not in entry:
                raise self.err(f"{where}.model", "missing")
            ref = self.model_ref(entry["model"], f"{where}.model")
            path = self.local(ref, f"{where}.model")
            if path in seen:
                raise self.err(f"{where}.model", f"{ref!r} is listed twice (also models[{seen[path]}])")
            seen[path] = i
            params = self.params(entry.get("parameters"), f"{where}.parameters", _MODEL_PARAMS[family],
                                 _GLOBAL_PARAMS[family], method)
            entries.append((i, ref, path, params))

        if family == "linear":
            return self.linear(method, base, entries, gparams, out)
        return self.gta(method, base, entries, gparams, out)

    def dtype(self, data: Mapping[str, Any], key: str) -> str | None:
        v = data.get(key)
        if v is None:
            return None
        name = v.removeprefix("torch.") if isinstance(v, str) else v
        if name not in _DTYPES:
            raise self.err(key, f"{v!r} is not supported; expected one of {list(_DTYPES)}")
        return str(name)

    def weight(self, i: int, params: dict[str, bool | float], gparams: dict[str, bool | float]) -> float:
        w = params.get("weight", gparams.get("weight"))
        if w is None:
            raise self.err(f"models[{i}].parameters.weight", "missing; mergekit requires a weight per model "
                                                             "(or a default under the top-level `parameters`)")
        return float(w)

    def names(self, refs: list[tuple[str, Path]]) -> list[str]:
        out: list[str] = []
        for ref, path in refs:
            stem = Path(ref.rstrip("/\\")).name or path.name or "model"
            name, n = stem, 1
            while name in out:
                n += 1
                name = f"{stem}_{n}"
            out.append(name)
        return out

    def finish(self, method: str, base: Path, tasks: list[tuple[str, Path, float]], spec: MergeSpec,
               out: str | None, coef: float) -> MergekitConfig:
        if not tasks:
            raise self.err("models", "no model to merge besides the base model")
        try:
            get_merger(spec)
        except ConfigError as e:
            raise self.err("parameters", str(e)) from None
        names = self.names([(ref, p) for ref, p, _ in tasks])
        return MergekitConfig(source=self.source, mergekit_method=method, base_model=base,
                              models={n: p for n, (_, p, _) in zip(names, tasks, strict=True)},
                              weights={n: w for n, (_, _, w) in zip(names, tasks, strict=True)},
                              spec=spec, dtype=out, scaling_coef=coef, notes=tuple(self.notes))

    def linear(self, method: str, base: Path | None, entries: list[tuple[int, str, Path, dict[str, bool | float]]],
               gparams: dict[str, bool | float], out: str | None) -> MergekitConfig:
        normalize = bool(gparams.get("normalize", True))
        if base is None:
            i0, ref0, base, _ = entries[0]
            self.notes.append(f"linear without base_model: models[{i0}] ({ref0}) serves as the base θ₀ (exact: "
                              f"a weighted average does not depend on the base)")
        weights = [(i, ref, path, self.weight(i, params, gparams)) for i, ref, path, params in entries]
        if not any(path == base for _, _, path, _ in weights):
            w_base = gparams.get("weight")
            if w_base is None:
                raise self.err("base_model", "linear averages the base model too (mergekit adds it to the inputs) "
                                             "and it has no weight: list it under `models` with a weight, or give "
                                             "a default `parameters.weight`")
            weights.append((-1, "", base, float(w_base)))
        total = math.fsum(w for *_, w in weights)
        if normalize:
            if abs(total) < 1e-8:
                raise self.err("parameters.normalize", f"the weights sum to {total:g}: mergekit would divide by zero")
            scale = total
        else:
            if abs(total - 1.0) > 1e-6:
                raise self.err("parameters.normalize", f"false with weights summing to {total:g} scales the base "
                                                       f"model itself by {total:g}; tvbasis merges task vectors "
                                                       f"(θ₀ + Σ w·τ) and can express this only when they sum to 1")
            scale = 1.0
        tasks = [(ref, path, w / scale) for i, ref, path, w in weights if path != base]
        return self.finish(method, base, tasks, MergeSpec("task_arithmetic", {"normalize": False}), out, 1.0)

    def gta(self, method: str, base: Path | None, entries: list[tuple[int, str, Path, dict[str, bool | float]]],
            gparams: dict[str, bool | float], out: str | None) -> MergekitConfig:
        assert base is not None
        tv_method, d_normalize, d_rescale = _GTA_METHODS[method]
        normalize = bool(gparams.get("normalize", d_normalize))
        rescale = bool(gparams.get("rescale", d_rescale))
        coef = float(gparams.get("lambda", 1.0))
        tasks: list[tuple[str, Path, float]] = []
        density: tuple[int, float] | None = None
        for i, ref, path, params in entries:
            if path == base:
                continue
            tasks.append((ref, path, self.weight(i, params, gparams)))
            d = float(params.get("density", gparams.get("density", 1.0)))
            if method == "task_arithmetic":  # density is ignored: no sparsification (mergekit's too)
                density = density if density is not None and density[1] != 1.0 else (i, d)
                continue
            if density is not None and d != density[1]:
                raise self.err(f"models[{i}].parameters.density",
                               f"{d:g} differs from models[{density[0]}]'s {density[1]:g}; tvbasis takes one density "
                               f"per merge (per-model densities are not supported)")
            density = density or (i, d)
        d = density[1] if density else 1.0
        if method == "task_arithmetic":
            if d != 1.0:
                self.notes.append("task_arithmetic: density is ignored (mergekit does not sparsify it either)")
            spec = MergeSpec("task_arithmetic", {"normalize": normalize})
        else:
            if d <= 0:
                where = f"models[{density[0]}].parameters.density" if density else "parameters.density"
                raise self.err(where, f"must be > 0, got {d:g}")
            d = min(d, 1.0)  # mergekit keeps everything for density >= 1
            if method == "ties":
                if rescale:
                    raise self.err("parameters.rescale", "true is not supported for ties (mergekit would rescale "
                                                         "the kept entries to the task's L1 norm; tvbasis does not)")
                spec = MergeSpec("ties", {"density": d, "sign": "total", "normalize": normalize,
                                          "trim_scope": "tensor"})
            else:
                params: dict[str, object] = {"density": d, "rescale": rescale, "normalize": normalize}
                if method == "dare_ties":
                    params["sign"] = "total"
                spec = MergeSpec(tv_method, params)
                if rescale and d < 1.0:
                    self.notes.append(f"{method}: rescale divides kept entries by density (DARE's rule); mergekit "
                                      f"rescales each tensor to its original L1 norm (equal in expectation)")
        return self.finish(method, base, tasks, spec, out, coef)
