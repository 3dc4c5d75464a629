"""Fine-tunes given as PEFT LoRA adapters: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``.bin``), read over the pretrained checkpoint it adapts and presented as the full fine-tuned model.

For a module ``X`` with adapter matrices A (r × in) and B (out × r) the fine-tuned weight is
W + s·B·A with s = lora_alpha / r (``use_rslora``: lora_alpha / √r; ``alpha_pattern`` per module), r taken
from A itself (so ``rank_pattern`` needs no parsing). Handled as PEFT's ``merge_and_unload`` does:

- linear layers (``X.lora_A.weight``/``X.lora_B.weight``), ``fan_in_fan_out`` (GPT-2 ``Conv1D``: ΔW transposed);
- embeddings (``X.lora_embedding_A``/``X.lora_embedding_B``: ΔW = (B·A)ᵀ);
- convolutions whose B is a 1×1 kernel (PEFT's default);
- ``lora_bias`` (``X.lora_B.bias``: bias + s·b);
- trained biases (``bias="all"|"lora_only"``: ``X.base_layer.bias``) and ``modules_to_save`` (any other saved
  tensor): the saved value replaces the pretrained one.

Every tensor the adapter touches is returned in float32 whatever the pretrained dtype: W + ΔW rounded to bf16
would bury a LoRA delta (typically 10⁻³ of W) in rounding error, while float32 keeps the difference from the
pretrained tensor exact to ~10⁻⁷ of W. Untouched tensors read straight from the pretrained model (zero delta).
Reads stay lazy and per row range: a row slice of W + s·B·A needs only the same rows of B.
``LoraCheckpoint.factors(name)`` gives a product-shaped ΔW as its two float32 factors instead (scale and layout
folded in; ``tvbasis.lora`` computes Grams and joint compressions from them without forming ΔW).

Refused with a clear error: other PEFT types (IA³, LoHa, ...), DoRA (its magnitude vector rescales whole
columns: merge it with PEFT first), trainable-token adapters, and adapters naming tensors the pretrained model
lacks or shaped differently from it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvbasis.errors import CheckpointError, TensorMismatchError
from tvbasis.io.hub import resolve_model_path
from tvbasis.io.reader import Checkpoint, open_checkpoint
from tvbasis.io.specs import TensorSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                       r"lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: str | Path) -> bool:
    """True for a PEFT adapter directory (it holds ``adapter_config.json``)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def open_finetuned(path: str | Path | Checkpoint, pretrained: Checkpoint) -> Checkpoint:
    """A fine-tuned model given as a checkpoint (any layout ``open_checkpoint`` reads) or as a LoRA adapter of
    ``pretrained``."""
    if isinstance(path, Checkpoint):
        return path
    local = resolve_model_path(path)  # a hub id in the local Hugging Face cache: its snapshot folder
    if is_adapter(local):
        return LoraCheckpoint(local, pretrained)
    return open_checkpoint(local)


@dataclass
class _Delta:
    """ΔW of one pretrained tensor: s·B·A in the layout of the stored weight."""

    A: str  # adapter tensor names
    B: str
    scale: float
    transpose: bool  # ΔW = (B·A)ᵀ (fan_in_fan_out, embeddings)


#: largest |lora_alpha| accepted: the scale alpha/r multiplies B·A in float32, and no LoRA recipe uses alphas beyond a
#: few thousand; 1e300 would overflow float32 (an internal error before, issue 27)
MAX_ALPHA = 1e6


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{what} must be a finite number, got {str(value)[:40]!r}")
    if abs(value) > MAX_ALPHA:
        raise CheckpointError(f"{what} is {float(value):.3g}; at most {MAX_ALPHA:g} in magnitude is accepted")
    return float(value)


def _check_config(config: dict[str, Any], cfg_path: Path) -> dict[str, re.Pattern[str]]:
    """Refuse malformed values of the fields the scale depends on; returns the compiled ``alpha_pattern``."""
    _number(config.get("lora_alpha", 8), f"{cfg_path}: lora_alpha")
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) not in (None, True, False):
            raise CheckpointError(f"{cfg_path}: {key} must be true or false, got {config[key]!r}")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{cfg_path}: alpha_pattern must be an object (module pattern -> alpha), "
                              f"got {type(patterns).__name__}")
    compiled = {}
    for pattern, value in patterns.items():
        _number(value, f"{cfg_path}: alpha_pattern[{pattern!r}]")
        try:
            compiled[pattern] = re.compile(rf"(.*\.)?({pattern})$")  # PEFT's get_pattern_key
        except re.error as e:
            raise CheckpointError(f"{cfg_path}: alpha_pattern key {pattern!r} is not a valid regular expression "
                                  f"({e})") from None
    return compiled


def _scale(config: dict[str, Any], module: str, r: int,
           patterns: dict[str, re.Pattern[str]] | None = None) -> float:
    alpha = float(config.get("lora_alpha", 8))
    alphas = config.get("alpha_pattern") or {}
    for pattern, rx in (patterns if patterns is not None else
                        {p: re.compile(rf"(.*\.)?({p})$") for p in alphas}).items():
        if rx.match(module):
            alpha = float(alphas[pattern])
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


class LoraCheckpoint(Checkpoint):
    """The fine-tuned model pretrained + LoRA adapter, read lazily (see the module docstring)."""

    def __init__(self, adapter_dir: Path, pretrained: Checkpoint) -> None:
        super().__init__(adapter_dir, pretrained.root_dir)
        self.pretrained = pretrained
        cfg_path = adapter_dir / ADAPTER_CONFIG
        try:
            config = json.loads(cfg_path.read_text())
            if not isinstance(config, dict):
                raise TypeError("not a JSON object")
        except Exception as e:
            raise CheckpointError(f"{cfg_path}: not a valid adapter config ({e})") from None
        self.config = config
        self._patterns = _check_config(config, cfg_path)
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {peft_type} is not supported (LoRA adapters only); "
                                  "merge it into the model with PEFT and pass the merged model")
        if config.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (the magnitude vector rescales "
                                  "whole columns); merge it with PEFT's merge_and_unload and pass the merged model")
        files = [adapter_dir / f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()]
        if not files:
            raise CheckpointError(f"{adapter_dir}: adapter weights not found (expected {' or '.join(ADAPTER_WEIGHTS)})")
        self.weights = open_checkpoint(files[0])
        self._deltas: dict[str, _Delta] = {}
        self._bias_deltas: dict[str, tuple[str, float]] = {}
        self._replaced: dict[str, str] = {}
        self._parse(config)
        self._touched = frozenset(self._deltas) | frozenset(self._bias_deltas) | frozenset(self._replaced)
        for s in pretrained.specs():
            self._specs[s.name] = (TensorSpec(s.name, s.shape, torch.float32) if s.name in self._touched and s.is_float
                                   else s)

    # -- parsing ------------------------------------------------------------------------------------------
    def _target(self, key: str, stem: str) -> str:
        """The pretrained tensor that adapter tensor ``key`` (for pretrained name ``stem``) belongs to: the same
        name, else the one pretrained name that it ends with or that ends with it (a model saved with or
        without its task head's prefix, e.g. ``bert.``)."""
        pre_keys = self.pretrained.keys()
        if stem in self.pretrained:
            return stem
        cands = [k for k in pre_keys if k.endswith("." + stem) or stem.endswith("." + k)]
        if len(cands) == 1:
            return cands[0]
        what = "matches several" if cands else "matches none"
        raise TensorMismatchError(
            f"{self.weights.path}: adapter tensor {key!r} is for {stem!r}, which {what} of the tensors of the "
            f"pretrained model {self.pretrained.path}" + (f" ({', '.join(cands[:4])})" if cands else
                                                           f" (it has e.g. {', '.join(pre_keys[:3])})"))

    def _parse(self, config: dict[str, Any]) -> None:
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        pairs: dict[str, dict[str, str]] = {}
        for key in self.weights.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = _LORA_KEY.match(name)
            if "lora_magnitude_vector" in name or "token_adapter" in name or (".lora_" in name and not m):
                raise CheckpointError(f"{self.weights.path}: adapter tensor {key!r} is not supported (LoRA A/B "
                                      "matrices, biases and modules_to_save only; DoRA and trainable tokens are not)")
            if m:
                pairs.setdefault(m["module"], {})[m["kind"]] = key
            else:  # a trained bias or a modules_to_save tensor: the saved value is the fine-tuned value
                stem = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
                target = self._target(key, stem)
                self._check_shape(key, target, tuple(self.weights.spec(key).shape))
                self._replaced[target] = key
        for module, kinds in pairs.items():
            emb = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight"))
            if a_key not in kinds or b_key not in kinds:
                raise CheckpointError(f"{self.weights.path}: module {module!r} has only one of {a_key}/{b_key}")
            A, B = self.weights.spec(kinds[a_key]), self.weights.spec(kinds[b_key])
            r = A.shape[0] if A.shape else 0
            if r < 1 or len(A.shape) < 2:
                raise CheckpointError(f"{self.weights.path}: {kinds[a_key]!r} has shape {tuple(A.shape)}: a LoRA A "
                                      "matrix needs rank >= 1 rows (r, in)")
            if len(B.shape) < 2 or B.shape[1] != r or any(d != 1 for d in B.shape[2:]):
                raise CheckpointError(f"{self.weights.path}: {kinds[b_key]!r} has shape {tuple(B.shape)}, expected "
                                      f"(out, {r}) or (out, {r}, 1, 1) to match {kinds[a_key]!r} {tuple(A.shape)}")
            target = self._target(kinds[a_key], module + ".weight")
            transpose = emb or fan_in_fan_out
            inner = tuple(A.shape[1:])
            shape = (inner[0], B.shape[0]) if transpose else (B.shape[0], *inner)
            self._check_shape(kinds[a_key], target, shape)
            scale = _scale(config, module, r, self._patterns)
            self._deltas[target] = _Delta(kinds[a_key], kinds[b_key], scale, transpose)
            if "lora_B.bias" in kinds:
                bias = self._target(kinds["lora_B.bias"], module + ".bias")
                self._check_shape(kinds["lora_B.bias"], bias, tuple(self.weights.spec(kinds["lora_B.bias"]).shape))
                self._bias_deltas[bias] = (kinds["lora_B.bias"], scale)

    def _check_shape(self, key: str, target: str, shape: tuple[int, ...]) -> None:
        want = tuple(self.pretrained.spec(target).shape)
        if shape != want:
            raise TensorMismatchError(f"{self.weights.path}: adapter tensor {key!r} gives {target!r} the shape "
                                      f"{shape}, pretrained {self.pretrained.path} has {want}")

    # -- reading --------------------------------------------------------------------------------------------
    def _value(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        def w(key: str, row_slice: bool = True) -> torch.Tensor:  # an adapter tensor, or its rows, in float32
            t = self.weights.get(key) if rows is None or not row_slice else self.weights.get_rows(key, *rows)
            return t.to(torch.float32)

        if name in self._replaced:
            return w(self._replaced[name])
        pre = self.pretrained.get(name) if rows is None else self.pretrained.get_rows(name, *rows)
        if name not in self._touched:
            return pre
        out = pre.to(torch.float32, copy=True)
        if name in self._deltas:
            d = self._deltas[name]
            if d.transpose:  # ΔW = (B·A)ᵀ: rows of ΔW are columns of A
                A, B = w(d.A, row_slice=False), w(d.B, row_slice=False)
                delta = (B.reshape(B.shape[0], -1) @ (A if rows is None else A[:, rows[0]:rows[1]])).T
            else:  # rows of ΔW are rows of B
                A, B = w(d.A, row_slice=False), w(d.B)
                delta = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:])
            out.add_(delta, alpha=d.scale)
        if name in self._bias_deltas:
            key, scale = self._bias_deltas[name]
            out.add_(w(key), alpha=scale)
        return out

    def _get(self, name: str) -> torch.Tensor:
        return self._value(name, None)

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._value(name, (start, stop))

    def factored(self) -> frozenset[str]:
        """Names of the pretrained tensors this adapter changes by a low-rank product (``factors`` gives them)."""
        return frozenset(n for n in self._deltas if n not in self._replaced)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ΔW of tensor ``name`` as two float32 factors ``(B_eff, A_eff)``, (rows × r) and (r × cols) with
        ΔW[name].reshape(rows, -1) == B_eff @ A_eff (rows = the stored tensor's first dimension): the scale s is
        folded into one factor and the layout transposes are applied — linear (s·B, A), ``fan_in_fan_out`` and
        embeddings (Aᵀ, s·Bᵀ), a 1×1-kernel convolution (s·B, A flattened to (r, in·kh·kw)). Equal to the
        difference ``get(name)`` − pretrained up to float32 rounding of the product.

        None for a tensor that is not a low-rank product: one replaced whole (``modules_to_save``, trained
        biases), one shifted by ``lora_bias`` (a bias vector), or one the adapter leaves alone (zero delta).
        """
        d = self._deltas.get(name)
        if d is None or name in self._replaced:
            return None
        A = self.weights.get(d.A).to(torch.float32)
        B = self.weights.get(d.B).to(torch.float32)
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        if d.transpose:  # ΔW = s·(B·A)ᵀ = Aᵀ·(s·Bᵀ)
            return A.T.contiguous(), (B.T * d.scale).contiguous()
        return B * d.scale, A.contiguous()

    def layout(self, name: str) -> str | None:
        """How PEFT holds the product of tensor ``name`` (None where ``factors`` gives none): ``linear`` (ΔW = B·A),
        ``conv`` (a convolution, B a 1×1 kernel), ``embedding`` (``lora_embedding_A/B``, ΔW = (B·A)ᵀ) or
        ``fan_in_fan_out`` (GPT-2 ``Conv1D``, ΔW = (B·A)ᵀ)."""
        d = self._deltas.get(name)
        if d is None or name in self._replaced:
            return None
        if "lora_embedding_A" in d.A:
            return "embedding"
        if d.transpose:
            return "fan_in_fan_out"
        return "conv" if len(self.weights.spec(d.B).shape) > 2 else "linear"

    def metadata(self) -> dict[str, str]:
        """The adapter's path and the base model its config names."""
        return {"adapter": str(self.path), "base_model": str(self.config.get("base_model_name_or_path") or "")}

    def changed_tensors(self) -> frozenset[str]:
        """Names of the pretrained tensors this adapter changes."""
        return self._touched

    def close(self) -> None:
        """Close the adapter's weights file."""
        self.weights.close()

    def __reduce__(self) -> tuple[object, tuple[str, Checkpoint]]:
        # pickles as (adapter path, pretrained): a Ray worker reopens both from shared storage
        return (LoraCheckpoint, (self.path, self.pretrained))  # type: ignore[return-value]
