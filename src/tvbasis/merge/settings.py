"""Per-tensor merge settings, as mergekit defines them: gradient lists over the layer index and ``filter``ed
values by tensor name (mergekit's ``config.py``: ``evaluate_setting`` and ``ConfigReader.parameter``).

A setting is one of
- a scalar (number or bool): the same for every tensor;
- a gradient, a list of numbers [v_0, …, v_{n−1}]: at position t ∈ [0, 1], with s = t·(n − 1), i = ⌊s⌋,
  j = min(n − 1, i + 1): (1 − (s − i))·v_i + (s − i)·v_j (linear interpolation between the listed values);
- a conditional list [{filter: F, value: V}, …]: the first entry whose filter is absent, ``*`` or a substring
  of the tensor's name gives V (a scalar or a gradient); no entry matching gives no value (the lookup then
  falls back to the merge-wide setting, then the method's default).

The position t of a tensor: for a tensor of layer i of an L-layer stack (the first ``.<digits>.`` name part
after ``layers``, ``layer``, ``h``, ``blocks`` or ``block``, e.g. ``model.layers.3.mlp.up_proj.weight``),
t = i/(L − 1) (1 when L = 1), L counted over the checkpoint's names with the same stack prefix; every other
tensor (embeddings, final norm, head) has t = 0, as mergekit plans them outside the layer slices.

``TensorPlan`` ties the settings to a method mapping (``resolve``) and gives each tensor its ``TensorMerge``:
the tvbasis merge spec, per-task weights, per-task parameter values and a scale (mergekit's ``lambda``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from tvbasis.errors import ConfigError
from tvbasis.merge.base import MergeSpec

Scalar = float | bool
#: a scalar, a gradient (tuple of floats) or a conditional list (tuple of (filter or None, scalar or gradient))
Setting = Scalar | tuple[float, ...] | tuple[tuple[str | None, "Scalar | tuple[float, ...]"], ...]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def is_constant(setting: Setting) -> bool:
    """True when the setting gives the same value for every tensor (a scalar)."""
    return not isinstance(setting, tuple)


def is_conditional(setting: Setting) -> bool:
    return isinstance(setting, tuple) and bool(setting) and isinstance(setting[0], tuple)


def interpolate(values: tuple[float, ...], t: float) -> float:
    """mergekit's gradient: the piecewise-linear interpolation of ``values`` at t ∈ [0, 1]."""
    n = len(values)
    s = t * (n - 1)
    i = int(s)
    j = min(n - 1, i + 1)
    frac = s - i
    return (1 - frac) * values[i] + frac * values[j]


def evaluate(setting: Setting, name: str, t: float) -> Scalar | None:
    """The value of ``setting`` for tensor ``name`` at layer position ``t``; None when no filter matches."""
    if not isinstance(setting, tuple):
        return setting
    if is_conditional(setting):
        for flt, value in setting:  # type: ignore[misc]
            if flt is None or flt == "*" or (name and flt in name):
                return evaluate(value, name, t)
        return None
    return interpolate(setting, t)  # type: ignore[arg-type]


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """t per tensor name (see the module doc): i/(L − 1) for layer i of L, 0 outside the layer stacks."""
    found: dict[str, tuple[str, int]] = {}
    count: dict[str, int] = {}
    for n in names:
        m = _LAYER.search(n)
        if m is None:
            continue
        prefix, i = n[:m.start(1)], int(m.group(1))
        found[n] = (prefix, i)
        count[prefix] = max(count.get(prefix, 0), i + 1)
    out: dict[str, float] = {}
    for n, (prefix, i) in found.items():
        L = count[prefix]
        out[n] = i / (L - 1) if L > 1 else 1.0
    return out


def layer_count(names: Iterable[str]) -> int:
    """The number of layers of the (longest) layer stack among ``names``; 0 when there is none."""
    count: dict[str, int] = {}
    for n in names:
        m = _LAYER.search(n)
        if m is not None:
            prefix = n[:m.start(1)]
            count[prefix] = max(count.get(prefix, 0), int(m.group(1)) + 1)
    return max(count.values(), default=0)


@dataclass(frozen=True)
class TensorMerge:
    """How one tensor is merged: θ₀ + scale · merge(spec; weights, per_task)."""

    spec: MergeSpec
    weights: tuple[float, ...]
    per_task: dict[str, tuple[float, ...]] = field(default_factory=dict)
    scale: float = 1.0


#: (merge-wide values, one dict of values per model entry) -> TensorMerge; raises ConfigError
Resolver = Callable[[dict[str, Scalar], list[dict[str, Scalar]]], TensorMerge]


@dataclass(frozen=True)
class TensorPlan:
    """Per-tensor settings of a merge and the mapping that turns their values into a ``TensorMerge``.

    source: the config file, for messages.
    global_settings: merge-wide settings (mergekit's top-level ``parameters``).
    model_settings: one mapping per model entry (mergekit's per-model ``parameters``); a model's lookup of a
        name falls back to the merge-wide setting when its own gives no value.
    resolve: picklable callable (values) -> TensorMerge.
    layer_range: mergekit slice's [start, end) layers, which must be every layer of the model (checked by
        ``bind``), or None.
    positions: tensor name -> t, set by ``bind`` from the checkpoint's names (missing names: t = 0).
    """

    source: str
    global_settings: Mapping[str, Setting]
    model_settings: tuple[Mapping[str, Setting], ...]
    resolve: Resolver
    layer_range: tuple[int, int] | None = None
    positions: Mapping[str, float] = field(default_factory=dict)

    def bind(self, names: Iterable[str]) -> TensorPlan:
        """This plan with the layer positions of the checkpoint whose tensors are ``names``."""
        names = list(names)
        if self.layer_range is not None:
            L = layer_count(names)
            if tuple(self.layer_range) != (0, L):
                raise ConfigError(f"{self.source}: slices[0].sources: layer_range {list(self.layer_range)} must "
                                  f"cover every layer of the model, [0, {L}] (tvbasis merges whole models; "
                                  f"layer stacking or partial slices are not supported)")
        return replace(self, positions=layer_positions(names))

    def values(self, name: str) -> tuple[dict[str, Scalar], list[dict[str, Scalar]]]:
        """The merge-wide values and each model's values for tensor ``name``."""
        t = self.positions.get(name, 0.0)
        glob: dict[str, Scalar] = {}
        for k, s in self.global_settings.items():
            v = evaluate(s, name, t)
            if v is not None:
                glob[k] = v
        models: list[dict[str, Scalar]] = []
        for ms in self.model_settings:
            own: dict[str, Scalar] = {}
            for k in {*ms, *glob}:
                v = evaluate(ms[k], name, t) if k in ms else None
                if v is None:
                    v = glob.get(k)
                if v is not None:
                    own[k] = v
            models.append(own)
        return glob, models

    def for_tensor(self, name: str) -> TensorMerge:
        """The TensorMerge of tensor ``name``; ConfigError naming the file and the tensor."""
        glob, models = self.values(name)
        try:
            tm = self.resolve(glob, models)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: tensor {name!r}: {e}") from None
        if not all(math.isfinite(w) for w in tm.weights) or not math.isfinite(tm.scale):
            raise ConfigError(f"{self.source}: tensor {name!r}: non-finite weights {tm.weights} or scale {tm.scale}")
        return tm

    @property
    def constant(self) -> bool:
        """True when every setting is a scalar (every tensor merges alike)."""
        return self.layer_range is None and all(is_constant(s) for s in self.global_settings.values()) and all(
            is_constant(s) for ms in self.model_settings for s in ms.values())
