"""UltraDelta (Wang et al., NeurIPS 2025, arXiv 2505.13563, "Breaking the Compression Ceiling: Data-Free Pipeline
for Ultra-Efficient Delta Compression"): the per-task rules around the ``ultra`` codec.

As the reference code (``xiaohuiwang000/UltraDelta``: ``src/ViT.py``, ``src/ultradelta_compression.py``, defaults
of ``run.sh``), per task vector:

1. **Which tensors**: the linear weights of the transformer blocks (``is_block_weight``; the reference's
   ``attn.in_proj``/``attn.out_proj``/``mlp.c_fc``/``mlp.c_proj`` weights). The reference applies only those deltas
   (every other tensor stays pretrained): ``rest=none``, the default; ``rest=float16`` keeps the others' deltas.
2. **Variance-based mixed sparsity allocation** (``allocate_densities``, the reference's
   ``assign_sparsity_rates``): the tensors are sorted by the standard deviation of their *quantised* delta
   (quantisation comes first in the reference) and cut into thirds by parameter count; the low-variance third gets
   sparsity s + step, the middle third s, the high-variance third the sparsity that makes the parameter-weighted
   mean exactly s (clamped to [0, 0.99]). Densities are 1 − sparsity; ``density`` is 1 − s (0.03: the reference's
   mask rate 0.97), ``step`` 0.01.
3. **Distribution-aware compression**: the ``ultra`` codec (``tvbasis.codecs.ultra``) at ``bits`` (4) with the
   tensor's density.
4. **Rescaling**: every tensor of the task by ``factor``/``density`` (the reference's global 1/(1 − s) times its
   ``additional_factor``, 1.0) — the *target* density, not the tensor's.
5. **Trace-norm-guided rescaling** (``trace_norm``, on by default): tr_t = Σ over the task's 2-D tensors of the
   nuclear norm of the compressed, rescaled delta; task t is further scaled by (mean tr / tr_t) / max_u (mean tr /
   tr_u) = min_u tr_u / tr_t (so the task of smallest trace norm keeps scale 1, the others shrink toward it).

Steps 2 and 5 need a statistics pass each over the inputs (``tvbasis.store.ultradelta``): the per-(task,
tensor) standard deviations, then the per-task trace norms. Their results — every task's density per tensor and
its scale — are recorded in the store's options (``allocation``, ``scales``), so the build is reproducible and
visible. Random choices are seeded per (task, tensor) from ``seed`` (``tensor_seed``). Option ``zstd`` (false; not
the paper's) wraps each tensor's codes and position mask in the lossless ``zstd`` stage: 60 % fewer bytes at
density 0.03 on MiniLM deltas (``benchmarks/results/codec_rd.md``), the same reconstruction.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tvbasis.codecs import Codec, Encoded, parse_codec
from tvbasis.compress.blocks import is_block_weight, parse_rule_options
from tvbasis.errors import ConfigError

#: the reference's run.sh: MASK_RATE 0.97, QUANT_BIT 4, STEP_SIZE 0.01, ADDITIONAL_FACTOR 1.0, USE_TRACE_NORM True
ULTRADELTA_DEFAULTS: dict[str, Any] = {"density": 0.03, "bits": 4, "step": 0.01, "factor": 1.0, "trace_norm": True,
                                       "seed": 0, "rest": "none", "zstd": False}
#: codecs for the tensors the method does not compress (sparse rows: an embedding table's touched rows)
REST_CODECS = ("none", "float16", "bfloat16", "float32", "sparse-rows+float16", "sparse-rows+int8")
#: the reference clamps the high-variance third's sparsity to this
MAX_SPARSITY = 0.99


def check_ultradelta_options(options: Mapping[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """The options with defaults filled in, validated (ConfigError naming the option). ``allocation`` (task ->
    tensor -> density) and ``scales`` (task -> number) are what the statistics passes computed."""
    known = set(ULTRADELTA_DEFAULTS) | {"allocation", "scales"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"--method ultradelta: unknown option(s) {sorted(unknown)}; expected "
                          f"{', '.join(ULTRADELTA_DEFAULTS)}")
    out = {**ULTRADELTA_DEFAULTS, **options}
    _num(out, "density", 0.0, 1.0, lo_open=True)
    _num(out, "step", 0.0, 1.0)
    _num(out, "factor", 0.0, math.inf, lo_open=True)
    for k, lo, hi in (("bits", 1, 8), ("seed", 0, 2**62)):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"--method ultradelta: option {k} must be an integer in {lo}..{hi}, got {v!r}")
    for k in ("trace_norm", "zstd"):
        if not isinstance(out[k], bool):
            raise ConfigError(f"--method ultradelta: option {k} must be true or false, got {out[k]!r}")
    if out["rest"] not in REST_CODECS:
        raise ConfigError(f"--method ultradelta: option rest must be one of {', '.join(REST_CODECS)}, "
                          f"got {out['rest']!r}")
    alloc, scales = out.get("allocation"), out.get("scales")
    if alloc is not None:
        if not isinstance(alloc, Mapping) or not all(isinstance(v, Mapping) for v in alloc.values()):
            raise ConfigError("--method ultradelta: option allocation must map tasks to {tensor: density}")
        for t, per in alloc.items():
            for name, d in per.items():
                if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
                    raise ConfigError(f"--method ultradelta: allocation of {t!r}/{name!r} must be a density in "
                                      f"[0, 1], got {d!r}")
        out["allocation"] = {str(t): {str(n): float(d) for n, d in per.items()} for t, per in alloc.items()}
    if scales is not None:
        if not isinstance(scales, Mapping):
            raise ConfigError("--method ultradelta: option scales must map tasks to numbers")
        for t, v in scales.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"--method ultradelta: scale of task {t!r} must be a number > 0, got {v!r}")
        out["scales"] = {str(t): float(v) for t, v in scales.items()}
    if tasks is not None:
        for what in ("allocation", "scales"):
            extra = set(out.get(what) or {}) - set(tasks)
            if extra:
                raise ConfigError(f"--method ultradelta: option {what} names unknown task(s) {sorted(extra)}")
    return out


def _num(out: dict[str, Any], key: str, lo: float, hi: float, lo_open: bool = False) -> None:
    v = out[key]
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if lo_open
                                                                                          else v >= lo) and v <= hi
    if not ok:
        raise ConfigError(f"--method ultradelta: option {key} must be a number in {'(' if lo_open else '['}{lo:g}, "
                          f"{hi:g}], got {v!r}")
    out[key] = float(v)


def is_target(name: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether UltraDelta compresses this tensor (a linear weight of a transformer block)."""
    return is_block_weight(name, tuple(shape))


def allocate_densities(stats: Mapping[str, tuple[int, float]], density: float, step: float) -> dict[str, float]:
    """Per tensor of one task, its kept fraction (1 − sparsity), from ``stats`` = {tensor: (numel, std)}: the
    reference's ``assign_sparsity_rates`` (see the module docstring), ties in std broken by name."""
    target = 1.0 - density
    # the reference leaves s + step unclamped (its masking asserts a rate in [0, 1]): at density ≤ step the
    # low-variance third is masked whole (density 0, the tensor's delta dropped); clamped so rounding cannot pass 1
    high, mid = min(1.0, target + step), target
    total = sum(n for n, _ in stats.values())
    order = sorted(stats, key=lambda k: (stats[k][1], k))
    rates: dict[str, float] = {}
    acc = low_params = mid_params = max_params = 0
    for key in order:
        n = stats[key][0]
        acc += n
        if acc <= total / 3:
            rates[key] = high
            low_params += n
        elif acc <= 2 * total / 3:
            rates[key] = mid
            mid_params += n
        else:
            max_params += n
    if max_params > 0:
        rest = (target * total - mid * mid_params - high * low_params) / max_params
        rest = min(MAX_SPARSITY, max(0.0, rest))
    else:
        rest = mid
    return {k: 1.0 - rates.get(k, rest) for k in stats}


def trace_ratios(trace_norms: Mapping[str, float]) -> dict[str, float]:
    """Per task, (mean tr / tr_t) / max_u (mean tr / tr_u) = min_u tr_u / tr_t (1 for a task of trace norm 0)."""
    positive = [v for v in trace_norms.values() if v > 0]
    if not positive:
        return {t: 1.0 for t in trace_norms}
    low = min(positive)
    return {t: (low / v if v > 0 else 1.0) for t, v in trace_norms.items()}


def tensor_seed(seed: int, task: str, name: str) -> int:
    """The pruning seed of one (task, tensor): ``seed`` mixed with a CRC-32 of the names (stable across runs and
    machines), so tasks and tensors of one shape do not share a random pattern."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{task}\x00{name}".encode())) % (1 << 62)


@dataclass
class UltraDeltaRule:
    """UltraDelta as a store coder (``tvbasis.compress.Coder``): per (task, tensor) an ``ultra`` codec at the
    task's allocated density, bits and scale. A task without an allocation (one added later, ``add-task``) gets
    the uniform target density and the scale factor/density (no cross-layer or trace-norm step: those need the
    statistics pass of a build)."""

    options: dict[str, Any]
    allocation: dict[str, dict[str, float]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> UltraDeltaRule:
        o = check_ultradelta_options(options)
        return cls({k: o[k] for k in ULTRADELTA_DEFAULTS}, dict(o.get("allocation") or {}),
                   dict(o.get("scales") or {}))

    @property
    def spec(self) -> str:
        o = self.options
        return (f"ultradelta:density={o['density']!r},bits={o['bits']},step={o['step']!r},factor={o['factor']!r},"
                f"trace_norm={str(o['trace_norm']).lower()},seed={o['seed']},rest={o['rest']},"
                f"zstd={str(o['zstd']).lower()}")

    @classmethod
    def parse(cls, text: str) -> UltraDeltaRule:
        """Inverse of ``spec`` (what a store records as its residual coder; the allocation is in its options)."""
        return cls.from_options(parse_rule_options(text, "ultradelta", lower_strings=True))

    def base_scale(self) -> float:
        """factor / density: the reference's global rescale, before the trace-norm ratio."""
        return float(self.options["factor"]) / float(self.options["density"])

    def codec_for(self, name: str, shape: tuple[int, ...] | torch.Size, task: str | None,
                  scale: float | None = None) -> Codec | None:
        """The codec of one (task, tensor); ``scale`` overrides the task's (the trace pass uses the base scale)."""
        if not is_target(name, tuple(shape)):
            rest = str(self.options["rest"])
            return None if rest == "none" else parse_codec(rest)
        per = self.allocation.get(task or "", {})
        density = per.get(name, float(self.options["density"]))
        if density <= 0.0:  # masked whole, as the reference's rate 1.0: nothing stored, decodes to zeros
            return None
        if scale is None:
            scale = self.base_scale() * self.scales.get(task or "", 1.0)
        spec = (f"ultra:density={density!r},bits={int(self.options['bits'])},scale={scale!r},"
                f"seed={tensor_seed(int(self.options['seed']), task or '', name)}")
        return parse_codec(("zstd+" if self.options["zstd"] else "") + spec)

    def encode(self, name: str, x: torch.Tensor, task: str | None = None) -> Encoded | None:
        codec = self.codec_for(name, tuple(x.shape), task)
        return None if codec is None else codec.encode(x)

