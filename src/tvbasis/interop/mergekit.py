"""Reading mergekit's YAML merge configurations (``mergekit-yaml``'s ``models:`` form) as tvbasis merges.

``load_mergekit_config("merge.yml")`` parses the file with ``untrusted.load_yaml`` (``yaml.SafeLoader``: tags
such as ``!!python/object`` are refused; no anchors or aliases, so no alias bomb; no repeated keys; size, depth
and integer caps) and returns a ``MergekitConfig``: the base model, the fine-tuned models by
task name, one weight per task, the tvbasis ``MergeSpec``, the output dtype and the scaling coefficient, so that
θ = θ₀ + scaling_coef · merge(w_1·τ_1, …, w_T·τ_T) is what mergekit would have written. Everything tvbasis cannot
reproduce is refused with ``ConfigError`` naming the file and the key path, e.g.
``merge.yml: models[1].parameters.density: gradient lists are not supported``.

Mapping (mergekit's semantics read from mergekit's config.py, plan.py, merge_methods/{registry,
generalized_task_arithmetic,linear}.py and sparsify.py; defaults are mergekit's, written explicitly into the
spec because several differ from tvbasis's own, e.g. dare_ties' ``normalize``):

- ``task_arithmetic`` → ``task_arithmetic {normalize: false}``; ``density`` and ``rescale`` are accepted and
  ignored, as mergekit ignores them (no sparsification).
- ``ties`` → ``ties {density: 1.0, sign: total, normalize: true, trim_scope: tensor, rounding: floor}``
  (mergekit's consensus is the summed mass, tvbasis's ``total``; it trims each tensor on its own and keeps
  int(density·n) entries of an n-entry tensor, tvbasis's ``rounding: floor``; tvbasis's own default keeps
  ceil(density·n)). ``rescale: true`` is refused (mergekit would rescale the kept entries to the task's L1 norm;
  tvbasis's ties does not rescale).
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from tvbasis.errors import ConfigError
from tvbasis.merge.base import MergeSpec
from tvbasis.merge.registry import get_merger
from tvbasis.merge.settings import Resolver, Scalar, Setting, TensorMerge, TensorPlan
from tvbasis.untrusted import describe_yaml_error, load_yaml

#: mergekit method -> (tvbasis method, mergekit's default normalize, mergekit's default rescale)
_GTA_METHODS: dict[str, tuple[str, bool, bool]] = {
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_linear": ("dare_linear", False, True),
    "dare_ties": ("dare_ties", False, True),
    "breadcrumbs": ("breadcrumbs", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
    "della": ("della", True, True),
    "della_linear": ("della_linear", False, True),
}
SUPPORTED_METHODS: tuple[str, ...] = ("linear", *_GTA_METHODS, "slerp", "nuslerp", "multislerp", "model_stock",
                                      "arcee_fusion", "sce", "nearswap", "karcher")
#: mergekit's other methods, refused with a message naming them as mergekit's
_MERGEKIT_ONLY = ("passthrough", "ram", "ramplus_tl")
#: why a mergekit method is refused (appended to the message)
_UNSUPPORTED_WHY = {
    "passthrough": " (it copies or stacks layers, e.g. frankenmerges: the output is not θ₀ + a task vector)",
    "ram": " (not implemented here)",
    "ramplus_tl": " (not implemented here)",
}

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source"}
_TOP_REFUSED = {
    "modules": "per-module definitions are not supported (use `models:`)",
    "tokenizer": "tokenizer configuration is not supported (tvbasis keeps the base model's tokenizer)",
    "chat_template": "chat templates are not supported (tvbasis keeps the base model's files)",
}
#: merge-wide parameters (mergekit's ``parameters()``): name -> kind
_GLOBAL_PARAMS: dict[str, dict[str, str]] = {
    "linear": {"normalize": "bool"},
    "gta": {"normalize": "bool", "rescale": "bool", "int8_mask": "bool", "lambda": "number"},
    "slerp": {"t": "number"},
    "nuslerp": {"nuslerp_flatten": "bool", "nuslerp_row_wise": "bool"},
    "model_stock": {"filter_wise": "bool"},
    "arcee_fusion": {},
    "sce": {"select_topk": "number", "int8_mask": "bool"},
    "multislerp": {"normalize_weights": "bool"},
    "nearswap": {"t": "number"},
    "karcher": {"max_iter": "number", "tol": "number"},
}
#: per-model parameters (mergekit's ``tensor_parameters()``), also accepted as defaults under ``parameters``
#: (breadcrumbs add ``gamma``, della ``epsilon``: ``_params_of``)
_MODEL_PARAMS: dict[str, dict[str, str]] = {
    "linear": {"weight": "number"}, "gta": {"weight": "number", "density": "number"}, "slerp": {},
    "nuslerp": {"weight": "number"}, "model_stock": {}, "arcee_fusion": {}, "sce": {},
    "multislerp": {"weight": "number"}, "nearswap": {}, "karcher": {},
}
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
    scaling_coef: mergekit's ``lambda`` (1.0 when absent, and for ``linear``; 1.0 with a ``plan``, which
        carries λ per tensor).
    notes: where tvbasis only approximates mergekit, or a setting is ignored; for the caller to print.
    plan: None when every tensor merges alike (then ``spec``, ``weights`` and ``scaling_coef`` are exact);
        otherwise the per-tensor plan (gradient lists, filters, per-model densities: ``merge.settings``) that
        the merge must follow, and ``spec``/``weights`` show the values of an unfiltered non-layer tensor.
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
    plan: TensorPlan | None = None

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
    data = load_yaml(text, source, ConfigError, on_error=_yaml_problem)
    if not isinstance(data, Mapping):
        what = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: a mergekit config must be a YAML mapping, got {what}")
    return parse_mergekit_config(data, source, check_paths=check_paths)


def parse_mergekit_config(data: Mapping[str, Any], source: str, *, check_paths: bool = True) -> MergekitConfig:
    """A parsed mergekit config (the mapping ``yaml.safe_load`` returns) as a MergekitConfig; ``source`` names
    it in messages. See the module docstring for the mapping and what is refused."""
    return _Parser(source, check_paths).parse(data)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The tail of the one-line error of an unreadable config."""
    if isinstance(e, ConstructorError) and "tag" in str(e.problem):
        return f"unsupported YAML tag (plain YAML only): {str(e.problem)[:200]}{_mark(e)}"
    if isinstance(e, ComposerError) and "single document" in str(e):
        return "several YAML documents (mergekit-multi) are not supported; give one merge per file"
    return describe_yaml_error(e)


def _mark(e: yaml.YAMLError) -> str:
    m = getattr(e, "problem_mark", None)
    return f" (line {m.line + 1}, column {m.column + 1})" if m is not None else ""


class _Parser:
    def __init__(self, source: str, check_paths: bool) -> None:
        self.source = source
        self.check_paths = check_paths
        self.notes: list[str] = []
        self.filters: set[str] = set()

    def err(self, where: str, msg: str) -> ConfigError:
        msg = msg if len(msg) <= 400 else msg[:400] + "…"  # an offending value is quoted, never printed whole
        return ConfigError(f"{self.source}: {where[:200]}: {msg}")

    # -------------------------------------------------------------------------------------------- values
    def leaf(self, value: Any, where: str, kind: str) -> Scalar | tuple[float, ...]:
        """A scalar or (numbers only) a gradient list."""
        if isinstance(value, list):
            if kind == "bool":
                raise self.err(where, "must be true or false (a list of booleans is not supported)")
            if not value:
                raise self.err(where, "an empty gradient list")
            for j, v in enumerate(value):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise self.err(f"{where}[{j}]", f"a gradient list holds numbers, got {v!r}")
                if not math.isfinite(v):
                    raise self.err(f"{where}[{j}]", f"must be finite, got {v!r}")
            return tuple(float(v) for v in value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.err(where, f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.err(where, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.err(where, f"must be finite, got {value!r}")
        return float(value)

    def setting(self, value: Any, where: str, kind: str) -> Setting:
        """A mergekit parameter setting: scalar, gradient list, or filtered values ({filter, value} entries)."""
        conds = [value] if isinstance(value, Mapping) else value
        if not isinstance(conds, list) or not conds or not all(isinstance(c, Mapping) for c in conds):
            if isinstance(conds, list) and any(isinstance(c, Mapping) for c in conds):
                raise self.err(where, "mixes {filter, value} entries with plain values")
            return self.leaf(value, where, kind)
        out: list[tuple[str | None, Scalar | tuple[float, ...]]] = []
        for j, c in enumerate(conds):
            w = where if isinstance(value, Mapping) else f"{where}[{j}]"
            extra = sorted(map(str, set(c) - {"filter", "value"}))
            if extra or "value" not in c:
                raise self.err(w, f"expected {{filter: NAME-PART, value: V}}, got a mapping with keys "
                                  f"{sorted(map(str, c))}")
            flt = c.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise self.err(f"{w}.filter", f"must be a string (a part of tensor names), got {flt!r}")
            if isinstance(c["value"], (Mapping, list)) and any(isinstance(v, Mapping) for v in (
                    c["value"] if isinstance(c["value"], list) else [c["value"]])):
                raise self.err(f"{w}.value", "nested {filter, value} entries are not supported")
            if flt not in (None, "*"):
                self.filters.add(flt)
            out.append((flt, self.leaf(c["value"], f"{w}.value", kind)))
        if len(out) == 1 and out[0][0] in (None, "*") and not isinstance(out[0][1], tuple):
            return out[0][1]  # {value: x} or {filter: '*', value: x}: a plain scalar
        return tuple(out)

    def params(self, raw: Any, where: str, allowed: dict[str, str], misplaced: dict[str, str],
               method: str) -> dict[str, Setting]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise self.err(where, f"must be a mapping of parameter names to values, got {raw!r}")
        out: dict[str, Setting] = {}
        for k, v in raw.items():
            if k in misplaced:
                raise self.err(f"{where}.{k}", "a merge-wide parameter in mergekit (per-model values are "
                                               "ignored there); give it under the top-level `parameters`")
            if k not in allowed:
                raise self.err(f"{where}.{k}", f"not a parameter of mergekit's {method!r} that tvbasis supports; "
                                               f"accepted: {sorted(allowed)}")
            out[str(k)] = self.setting(v, f"{where}.{k}", allowed[k])
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

    def slices(self, raw: Any) -> tuple[list[Any], str, tuple[int, int]]:
        """mergekit's ``slices:`` form when it is the ``models:`` form in disguise: ONE output slice whose
        sources all take the same layer range (checked against the model at merge time to be every layer)."""
        if not isinstance(raw, list) or not raw:
            raise self.err("slices", f"must be a non-empty list of {{sources: [...]}}, got {raw!r}")
        if len(raw) > 1:
            raise self.err("slices[1]", "several output slices (layer stacking, e.g. passthrough frankenmerges) "
                                        "are not supported: tvbasis merges whole models of one architecture")
        sl = raw[0]
        if not isinstance(sl, Mapping):
            raise self.err("slices[0]", f"must be a mapping {{sources: [...]}}, got {sl!r}")
        for k in sl:
            if k != "sources":
                raise self.err(f"slices[0].{k}", "per-slice settings are not supported (give `parameters` and "
                                                 "`base_model` at the top level)")
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise self.err("slices[0].sources", f"must be a non-empty list, got {sources!r}")
        rng: tuple[int, int] | None = None
        out: list[Any] = []
        for i, src in enumerate(sources):
            where = f"slices[0].sources[{i}]"
            if not isinstance(src, Mapping):
                raise self.err(where, f"must be a mapping {{model, layer_range, parameters}}, got {src!r}")
            extra = sorted(map(str, set(src) - {"model", "layer_range", "parameters"}))
            if extra:
                raise self.err(f"{where}.{extra[0]}", "unknown key of a slice source")
            lr = src.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                     for v in lr)):
                raise self.err(f"{where}.layer_range", f"must be [START, END], got {lr!r}")
            if rng is not None and tuple(lr) != rng:
                raise self.err(f"{where}.layer_range", f"{lr} differs from slices[0].sources[0]'s {list(rng)}: "
                                                       f"tvbasis merges whole models, layer by layer alike")
            rng = (lr[0], lr[1])
            out.append({k: v for k, v in src.items() if k != "layer_range"})
        assert rng is not None
        return out, "slices[0].sources", rng

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
            why = _UNSUPPORTED_WHY.get(method, "")
            raise self.err("merge_method", f"{kind} {method!r} is not supported{why}; supported: "
                                           f"{list(SUPPORTED_METHODS)}")
        family = _family(method)

        tok = data.get("tokenizer_source")
        if tok not in (None, "base"):
            raise self.err("tokenizer_source", f"{tok!r} is not supported (only `base`: tvbasis keeps the base "
                                               f"model's tokenizer)")
        dtype = self.dtype(data, "dtype")
        out_dtype = self.dtype(data, "out_dtype")
        out = out_dtype or dtype
        if dtype is not None:
            self.notes.append(f"dtype {dtype}: tvbasis computes in float32 and writes {out}")

        gallowed, mallowed = _params_of(method)
        gparams = self.params(data.get("parameters"), "parameters", {**gallowed, **mallowed}, {}, method)

        models, mkey, layer_range = data.get("models"), "models", None
        if data.get("slices") is not None:
            if models is not None:
                raise self.err("slices", "give either `models` or `slices`, not both")
            models, mkey, layer_range = self.slices(data["slices"])
        if models is None:
            raise self.err("models", "missing (tvbasis reads mergekit's `models:` form)")
        if not isinstance(models, list) or not models:
            raise self.err("models", f"must be a non-empty list of {{model: PATH, parameters: {{...}}}}, "
                                     f"got {models!r}")

        base_ref = data.get("base_model")
        base: Path | None = None
        if base_ref is not None:
            base = self.local(self.model_ref(base_ref, "base_model"), "base_model")
        elif family in ("gta", "slerp", "model_stock", "arcee_fusion", "sce", "nearswap"):
            raise self.err("base_model", f"missing; mergekit's {method!r} needs a base model")

        entries: list[tuple[str, str, Path, dict[str, Setting]]] = []
        seen: dict[Path, int] = {}
        for i, entry in enumerate(models):
            where = f"{mkey}[{i}]"
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
                raise self.err(f"{where}.model", f"{ref!r} is listed twice (also {mkey}[{seen[path]}])")
            seen[path] = i
            params = self.params(entry.get("parameters"), f"{where}.parameters", mallowed, gallowed, method)
            entries.append((where, ref, path, params))
        return self.build(method, family, base, entries, gparams, out, layer_range)

    def dtype(self, data: Mapping[str, Any], key: str) -> str | None:
        v = data.get(key)
        if v is None:
            return None
        name = v.removeprefix("torch.") if isinstance(v, str) else v
        if name not in _DTYPES:
            raise self.err(key, f"{v!r} is not supported; expected one of {list(_DTYPES)}")
        return str(name)

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

    def roles(self, method: str, family: str, base: Path | None,
              entries: list[tuple[str, str, Path, dict[str, Setting]]]) -> tuple[Path, list[int], int | None]:
        """θ₀, the entries that are tasks, and the entry of the base (None: not listed)."""
        where_base = [i for i, (_, _, p, _) in enumerate(entries) if p == base]
        base_idx = where_base[0] if where_base else None
        if family == "linear" and base is None:
            base, base_idx = entries[0][2], 0
            self.notes.append(f"linear without base_model: {entries[0][0]} ({entries[0][1]}) serves as the base "
                              f"θ₀ (exact: a weighted average does not depend on the base)")
        if family == "nuslerp":
            if base is not None:
                if base_idx is not None:
                    raise self.err(f"{entries[base_idx][0]}.model", "nuslerp's base model cannot be one of the two "
                                                                   "models it interpolates (mergekit refuses too)")
                if len(entries) != 2:
                    raise self.err("models", f"nuslerp interpolates exactly two models, got {len(entries)}")
                return base, [0, 1], None
            if len(entries) != 2:
                raise self.err("models", f"nuslerp interpolates exactly two models, got {len(entries)}")
            return entries[0][2], [0, 1], None  # interpolates whole weights: models[0] only serves as θ₀
        if family == "karcher":  # every model averaged; without base_model the first serves as θ₀ (its τ = 0)
            if len(entries) < 2 and base is None:
                raise self.err("models", f"karcher averages at least two models, got {len(entries)}")
            if base is None:
                return entries[0][2], list(range(len(entries))), None
        if family == "multislerp" and base is None:  # whole weights: the first model only serves as θ₀
            if len(entries) < 2:
                raise self.err("models", f"multislerp interpolates at least two models, got {len(entries)}")
            return entries[0][2], list(range(len(entries))), None
        assert base is not None
        tasks = [i for i in range(len(entries)) if i != base_idx]
        if family in ("slerp", "arcee_fusion", "nearswap") and len(tasks) != 1:
            raise self.err("models", f"{method} combines the base model and ONE other model, got {len(tasks)} "
                                     f"other(s)")
        if family == "model_stock" and len(tasks) < 2:
            raise self.err("models", f"model_stock needs at least two models besides the base, got {len(tasks)}")
        if not tasks:
            raise self.err("models", "no model to merge besides the base model")
        return base, tasks, base_idx

    def build(self, method: str, family: str, base: Path | None,
              entries: list[tuple[str, str, Path, dict[str, Setting]]], gparams: dict[str, Setting],
              out: str | None, layer_range: tuple[int, int] | None) -> MergekitConfig:
        given_base = base is not None
        base, tasks, base_idx = self.roles(method, family, base, entries)
        wheres = tuple(e[0] for e in entries)
        own = tuple(frozenset(e[3]) for e in entries)
        resolver: Resolver
        if family == "linear":
            resolver = _LinearResolve(wheres, tuple(tasks), base_idx)
        elif family == "gta":
            resolver = _GTAResolve(method, wheres, own, tuple(tasks))
            self.gta_notes(method, gparams, entries)
        elif family == "slerp":
            resolver = _SlerpResolve(len(tasks))
        elif family == "nuslerp":
            resolver = _NuSlerpResolve(wheres, tuple(tasks), on_weights=base == entries[0][2])
        elif family == "arcee_fusion":
            resolver = _ArceeFusionResolve()
        elif family == "sce":
            resolver = _SCEResolve(len(tasks))
        elif family == "multislerp":
            # no base_model: whole weights, models[0] only serves as θ₀
            resolver = _MultiSlerpResolve(wheres, tuple(tasks), on_weights=not given_base)
        elif family == "nearswap":
            resolver = _NearSwapResolve()
        elif family == "karcher":  # mergekit averages the base model too when one is given
            resolver = _KarcherResolve(len(tasks), include_base=given_base)
        else:
            resolver = _ModelStockResolve(len(tasks))
        plan = TensorPlan(self.source, gparams, tuple(e[3] for e in entries), resolver, layer_range)
        probe = self.probe(plan)
        try:
            get_merger(probe.spec)
        except ConfigError as e:
            raise self.err("parameters", str(e)) from None
        names = self.names([(entries[i][1], entries[i][2]) for i in tasks])
        models = {n: entries[i][2] for n, i in zip(names, tasks, strict=True)}
        weights = dict(zip(names, probe.weights, strict=True))
        if plan.constant and not probe.per_task:
            return MergekitConfig(source=self.source, mergekit_method=method, base_model=base, models=models,
                                  weights=weights, spec=probe.spec, dtype=out, scaling_coef=probe.scale,
                                  notes=tuple(self.notes))
        self.notes.append("per-tensor values (gradient lists over the layers, filters, per-model parameters) are "
                          "evaluated tensor by tensor as mergekit does")
        return MergekitConfig(source=self.source, mergekit_method=method, base_model=base, models=models,
                              weights=weights, spec=probe.spec, dtype=out, scaling_coef=1.0,
                              notes=tuple(self.notes), plan=plan)

    def probe(self, plan: TensorPlan) -> TensorMerge:
        """Resolve the plan for an unfiltered tensor at layer positions 0, 0.5 and 1 and for a tensor matching
        each filter, so that bad values are refused before any tensor is read; the first result (an
        unfiltered non-layer tensor) is returned for display."""
        first: TensorMerge | None = None
        for name in ["", *sorted(self.filters)]:
            for t in (0.0, 0.5, 1.0):
                glob, models = replace(plan, positions={name: t}).values(name)
                try:
                    tm = plan.resolve(glob, models)
                except ConfigError as e:
                    at = (f" (for a tensor named like {name!r}" if name else " (for a tensor matching no filter") + \
                         (f" at layer position {t:g})" if t else ")")
                    raise ConfigError(f"{self.source}: {e}{at}") from None
                first = first or tm
        assert first is not None
        return first

    def gta_notes(self, method: str, gparams: dict[str, Setting],
                  entries: list[tuple[str, str, Path, dict[str, Setting]]]) -> None:
        _, _, d_rescale = _GTA_METHODS[method]
        rescale = gparams.get("rescale", d_rescale)
        has_density = "density" in gparams or any("density" in e[3] for e in entries)
        if method == "task_arithmetic":
            if has_density:
                self.notes.append("task_arithmetic: density is ignored (mergekit does not sparsify it either)")
            return
        if method == "ties" and rescale is True:
            raise self.err("parameters.rescale", "true is not supported for ties (mergekit would rescale "
                                                 "the kept entries to the task's L1 norm; tvbasis does not)")
        if method.startswith("dare") and rescale is not False and has_density:
            self.notes.append(f"{method}: rescale divides kept entries by density (DARE's rule); mergekit "
                              f"rescales each tensor to its original L1 norm (equal in expectation)")
        if method.startswith(("dare", "della")) and has_density:
            self.notes.append(f"{method}: the random drops come from tvbasis's seeded generators (seed 0), not "
                              f"mergekit's; the two merges agree in distribution, not entry by entry")
        if method.startswith("breadcrumbs"):
            self.notes.append(f"{method}: tvbasis keeps the entries ranked [n-k-g, n-g) by magnitude; mergekit's "
                              f"slice [n_bot:-n_top] is empty when gamma*n < 1 (it then drops everything)")


# ------------------------------------------------------------------------------------------------ resolvers
def _family(method: str) -> str:
    if method in _GTA_METHODS:
        return "gta"
    return method  # linear, slerp, nuslerp, multislerp, model_stock, arcee_fusion, sce, nearswap


def _params_of(method: str) -> tuple[dict[str, str], dict[str, str]]:
    """(merge-wide parameters, per-model parameters) of a supported mergekit method: name -> kind."""
    family = _family(method)
    if family != "gta":
        return _GLOBAL_PARAMS[family], _MODEL_PARAMS[family]
    model = dict(_MODEL_PARAMS["gta"])
    if method.startswith("breadcrumbs"):
        model["gamma"] = "number"
    if method.startswith("della"):
        model["epsilon"] = "number"
    return _GLOBAL_PARAMS["gta"], model


def _weight(models: list[dict[str, Scalar]], i: int, where: str) -> float:
    w = models[i].get("weight")
    if w is None:
        raise ConfigError(f"{where}.parameters.weight: missing; mergekit requires a weight per model (or a "
                          f"default under the top-level `parameters`)")
    return float(w)


@dataclass(frozen=True)
class _LinearResolve:
    """linear: Σ w_i·θ_i / Σ w_i over every input, the base included, as task-vector weights w_i/Σw."""

    wheres: tuple[str, ...]
    tasks: tuple[int, ...]
    base_idx: int | None

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        normalize = bool(g.get("normalize", True))
        if self.base_idx is not None:
            w_base = _weight(models, self.base_idx, self.wheres[self.base_idx])
        else:
            if g.get("weight") is None:
                raise ConfigError("base_model: linear averages the base model too (mergekit adds it to the inputs) "
                                  "and it has no weight: list it under `models` with a weight, or give a default "
                                  "`parameters.weight`")
            w_base = float(g["weight"])
        ws = [_weight(models, i, self.wheres[i]) for i in self.tasks]
        total = math.fsum([*ws, w_base])
        if normalize:
            if abs(total) < 1e-8:
                raise ConfigError(f"parameters.normalize: the weights sum to {total:g}: mergekit would divide by zero")
            scale = total
        else:
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(f"parameters.normalize: false with weights summing to {total:g} scales the base "
                                  f"model itself by {total:g}; tvbasis merges task vectors (θ₀ + Σ w·τ) and can "
                                  f"express this only when they sum to 1")
            scale = 1.0
        return TensorMerge(MergeSpec("task_arithmetic", {"normalize": False}), tuple(w / scale for w in ws))


@dataclass(frozen=True)
class _GTAResolve:
    """mergekit's generalized task arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*)."""

    method: str
    wheres: tuple[str, ...]
    own: tuple[frozenset[str], ...]
    tasks: tuple[int, ...]

    def key(self, i: int, name: str) -> str:
        return f"{self.wheres[i]}.parameters.{name}" if name in self.own[i] else f"parameters.{name}"

    def per_task(self, models: list[dict[str, Scalar]], name: str, default: float) -> list[float]:
        return [float(models[i].get(name, default)) for i in self.tasks]

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        tv_method, d_normalize, d_rescale = _GTA_METHODS[self.method]
        normalize = bool(g.get("normalize", d_normalize))
        rescale = bool(g.get("rescale", d_rescale))
        scale = float(g.get("lambda", 1.0))
        weights = tuple(_weight(models, i, self.wheres[i]) for i in self.tasks)
        if self.method == "task_arithmetic":  # density is ignored: no sparsification (mergekit's too)
            return TensorMerge(MergeSpec("task_arithmetic", {"normalize": normalize}), weights, {}, scale)
        if self.method == "ties" and rescale:
            raise ConfigError("parameters.rescale: true is not supported for ties (mergekit would rescale the kept "
                              "entries to the task's L1 norm; tvbasis does not)")
        dens = self.per_task(models, "density", 1.0)
        for i, d in zip(self.tasks, dens, strict=True):
            if d <= 0:
                raise ConfigError(f"{self.key(i, 'density')}: must be > 0, got {d:g}")
        dens = [min(d, 1.0) for d in dens]  # mergekit keeps everything for density >= 1
        params: dict[str, object] = {"density": dens[0]}
        per_task: dict[str, tuple[float, ...]] = {}
        if len(set(dens)) > 1:
            per_task["density"] = tuple(dens)
        if self.method == "ties":
            params.update(sign="total", normalize=normalize, trim_scope="tensor", rounding="floor")
        elif self.method.startswith("dare"):
            params.update(rescale=rescale, normalize=normalize)
            if self.method == "dare_ties":
                params["sign"] = "total"
        else:
            extra = "gamma" if self.method.startswith("breadcrumbs") else "epsilon"
            vals = self.per_task(models, extra, 0.01 if extra == "gamma" else 0.15)
            for i, v, d in zip(self.tasks, vals, dens, strict=True):
                if v < 0:
                    raise ConfigError(f"{self.key(i, extra)}: must be >= 0, got {v:g}")
                if extra == "epsilon" and d < 1 and not (0 < d - v and d + v < 1):
                    raise ConfigError(f"{self.key(i, extra)}: density ± epsilon must lie inside (0, 1), got "
                                      f"density {d:g} and epsilon {v:g} (mergekit refuses too)")
            params.update({extra: vals[0], "rescale": "l1" if rescale else "none", "normalize": normalize})
            if len(set(vals)) > 1:
                per_task[extra] = tuple(vals)
        return TensorMerge(MergeSpec(tv_method, params), weights, per_task, scale)


@dataclass(frozen=True)
class _SlerpResolve:
    """slerp: the base model and one other, at the merge-wide ``t``."""

    count: int

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        t = g.get("t")
        if t is None:
            raise ConfigError("parameters.t: missing; mergekit's slerp requires t (0: the base model, 1: the other)")
        return TensorMerge(MergeSpec("slerp", {"t": float(t)}), (1.0,) * self.count)


@dataclass(frozen=True)
class _NuSlerpResolve:
    """nuslerp: two models, t = w₂/(w₁ + w₂); task vectors with a base model, else whole weights."""

    wheres: tuple[str, ...]
    tasks: tuple[int, ...]
    on_weights: bool

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        weights = tuple(_weight(models, i, self.wheres[i]) for i in self.tasks)
        return TensorMerge(MergeSpec("nuslerp", {"nuslerp_flatten": bool(g.get("nuslerp_flatten", True)),
                                                 "nuslerp_row_wise": bool(g.get("nuslerp_row_wise", False)),
                                                 "on_weights": self.on_weights}), weights)


@dataclass(frozen=True)
class _ModelStockResolve:
    """model_stock: no weights; ``filter_wise`` merge-wide."""

    count: int

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        return TensorMerge(MergeSpec("model_stock", {"filter_wise": bool(g.get("filter_wise", False))}),
                           (1.0,) * self.count)


@dataclass(frozen=True)
class _ArceeFusionResolve:
    """arcee_fusion: the base model and one other; no parameters."""

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        return TensorMerge(MergeSpec("arcee_fusion"), (1.0,))


@dataclass(frozen=True)
class _SCEResolve:
    """sce: ``select_topk`` merge-wide (``int8_mask`` has no numerical effect); no weights."""

    count: int

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        return TensorMerge(MergeSpec("sce", {"select_topk": float(g.get("select_topk", 1.0))}), (1.0,) * self.count)


@dataclass(frozen=True)
class _MultiSlerpResolve:
    """multislerp: per-model weights; task vectors with a base model, else whole weights."""

    wheres: tuple[str, ...]
    tasks: tuple[int, ...]
    on_weights: bool

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        weights = tuple(_weight(models, i, self.wheres[i]) for i in self.tasks)
        return TensorMerge(MergeSpec("multislerp", {"normalize_weights": bool(g.get("normalize_weights", True)),
                                                    "on_weights": self.on_weights}), weights)


@dataclass(frozen=True)
class _NearSwapResolve:
    """nearswap: the base model and one other; ``t`` merge-wide and required."""

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        t = g.get("t")
        if t is None:
            raise ConfigError("parameters.t: missing; mergekit's nearswap requires t (the closeness threshold)")
        return TensorMerge(MergeSpec("nearswap", {"t": float(t)}), (1.0,))


@dataclass(frozen=True)
class _KarcherResolve:
    """karcher: every model (the base model too, when given) averaged with equal weights; ``max_iter``, ``tol``."""

    count: int
    include_base: bool

    def __call__(self, g: dict[str, Scalar], models: list[dict[str, Scalar]]) -> TensorMerge:
        max_iter = g.get("max_iter", 10)
        if float(max_iter) != int(max_iter) or max_iter < 0:
            raise ConfigError(f"parameters.max_iter: must be a whole number >= 0, got {max_iter!r}")
        return TensorMerge(MergeSpec("karcher", {"max_iter": int(max_iter), "tol": float(g.get("tol", 1e-5)),
                                                 "include_base": self.include_base}), (1.0,) * self.count)
