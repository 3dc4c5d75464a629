"""A per-task codec plan: which codec encodes each *kind* of tensor of a task vector.

Kinds (``tensor_kind``): ``embedding`` — a 2-D tensor whose name marks an embedding table (``embed``, ``wte``,
``wpe``, ``lm_head``): fine-tuning changes only the rows of the tokens it saw (4–18 % of MiniLM's word rows), so
``sparse-rows`` fits; ``matrix`` — any other tensor of ≥ 2 dimensions (low rank and quantisation fit);
``vector`` — 0-d/1-d tensors (biases, norms; tiny, kept at float16).

A plan is written ``embedding=SPEC;matrix=SPEC;vector=SPEC`` (any subset; the rest keep their defaults), each
SPEC a codec spec of ``tvbasis.codecs`` or ``none``: that kind is not stored (decodes to zeros, 0 bytes) — a
lossy choice for a task, and the way to leave a kind out of coded bases (see ``tvbasis.compress.residual``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tvbasis.codecs import Codec, Encoded, parse_codec
from tvbasis.compress.bitdelta import bitdelta_codec
from tvbasis.compress.budget import BudgetRule
from tvbasis.compress.deltacome import DeltaComeRule
from tvbasis.compress.kinds import KINDS, tensor_kind
from tvbasis.compress.svd import SVD, encode_with_svd, truncated_svd
from tvbasis.compress.tsvc import tsvc_codec
from tvbasis.compress.ultradelta import UltraDeltaRule
from tvbasis.errors import ConfigError

NONE = "none"


@dataclass(frozen=True)
class CodecPlan:
    """Codec spec per tensor kind (``none``: the kind is not stored)."""

    embedding: str = "sparse-rows+int8"
    matrix: str = "lowrank:rank=16+int8"
    vector: str = "float16"

    def __post_init__(self) -> None:
        for kind in KINDS:  # validate every spec now, with the kind in the message
            spec = getattr(self, kind)
            if not isinstance(spec, str) or not spec.strip():
                raise ConfigError(f"codec plan: {kind} needs a codec spec or 'none', got {spec!r}")
            if spec.strip().lower() != NONE:
                try:
                    parse_codec(spec)
                except ConfigError as e:
                    raise ConfigError(f"codec plan, {kind}: {e}") from None

    @classmethod
    def parse(cls, text: str) -> CodecPlan:
        """``embedding=SPEC;matrix=SPEC;vector=SPEC`` (any subset, any order)."""
        values: dict[str, str] = {}
        for part in text.split(";"):
            if not part.strip():
                continue
            key, sep, spec = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in KINDS:
                raise ConfigError(f"codec plan: expected KIND=SPEC with KIND one of {', '.join(KINDS)}; "
                                  f"got {part.strip()!r}")
            if key in values:
                raise ConfigError(f"codec plan: {key} given twice")
            values[key] = spec.strip()
        return cls(**values)

    @property
    def spec(self) -> str:
        """Canonical text: every kind, each codec spec canonical (defaults spelled out)."""
        return ";".join(f"{k}={self._canonical(getattr(self, k))}" for k in KINDS)

    @staticmethod
    def _canonical(spec: str) -> str:
        return NONE if spec.strip().lower() == NONE else parse_codec(spec).spec

    def codec(self, kind: str) -> Codec | None:
        """The codec of one kind (None for ``none``)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown tensor kind {kind!r}; expected one of {', '.join(KINDS)}")
        spec = getattr(self, kind)
        return None if spec.strip().lower() == NONE else parse_codec(spec)

    def codec_for(self, name: str, shape: tuple[int, ...] | torch.Size) -> Codec | None:
        """The codec of the kind of tensor ``name`` with ``shape`` (``compress.kinds``); None when the plan does not
        store that kind."""
        return self.codec(tensor_kind(name, shape))

    def encode(self, name: str, x: torch.Tensor, svd: SVD | None = None) -> Encoded | None:
        """``x`` encoded by the codec of its kind (None when the kind is ``none``).

        ``svd``: where a top-level fixed-rank ``lowrank`` codec gets its factors (``tvbasis.compress.svd``:
        a fast float64-Gram SVD, or a cache shared between plans); the ``Encoded`` is the codec's either way."""
        codec = self.codec_for(name, tuple(x.shape))
        if codec is None:
            return None
        return encode_with_svd(codec, x, svd) if svd is not None else codec.encode(x)

    def roundtrip(self, name: str, x: torch.Tensor, svd: SVD | None = None) -> tuple[torch.Tensor, int]:
        """(decode(encode(x)), exact stored bytes) — zeros and 0 bytes for a ``none`` kind."""
        codec = self.codec_for(name, tuple(x.shape))
        if codec is None:
            return torch.zeros(x.shape, dtype=torch.float32), 0
        enc = self.encode(name, x, svd)
        assert enc is not None
        return codec.decode(enc), enc.nbytes


def plan_roundtrip(plan: CodecPlan, vector: Mapping[str, torch.Tensor],
                   svd: Callable[[str], SVD | None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of a task vector through the plan: (decoded tensors, total stored bytes). ``svd(name)``
    gives the factor source of each tensor (see ``CodecPlan.encode``)."""
    out: dict[str, torch.Tensor] = {}
    total = 0
    for name, x in vector.items():
        out[name], nbytes = plan.roundtrip(name, x, svd(name) if svd is not None else None)
        total += nbytes
    return out, total


#: the peers' named rules a coder spec may start with (``deltacome:…``, ``ultradelta:…``)
_TASK_RULES: dict[str, type[DeltaComeRule] | type[UltraDeltaRule]] = {"deltacome": DeltaComeRule,
                                                                       "ultradelta": UltraDeltaRule}
_PLAN_RE = re.compile(r"^\s*(embedding|matrix|vector)\s*=", re.IGNORECASE)


class Coder:
    """How a store codes each tensor of its bases or residuals: one codec for every tensor, a ``CodecPlan``
    (``KIND=SPEC;…``), TSV-C's rule (``tsvc``: 2-D tensors at 1/T of their rank, the rest float32) or BitDelta's
    (``bitdelta``: block linear weights as signs × one scale, the rest float16).
    ``spec`` is canonical (what the store records)."""

    def __init__(self, text: str, T: int | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"expected a codec spec, a codec plan (KIND=SPEC;...) or 'tsvc', got {text!r}")
        self._rule: Callable[[str, tuple[int, ...]], Codec] | None = None
        self._plan: CodecPlan | None = None
        self._codec: Codec | None = None
        self._budget: BudgetRule | None = None
        #: a peer's rule that codes each (task, tensor) its own way: Delta-CoMe's, UltraDelta's
        self._task_rule: DeltaComeRule | UltraDeltaRule | None = None
        if text.strip().lower().partition(":")[0].strip() in _TASK_RULES:
            self._task_rule = _TASK_RULES[text.strip().lower().partition(":")[0].strip()].parse(text)
            self.spec = self._task_rule.spec
        elif text.strip().lower().startswith("budget"):
            self._budget = BudgetRule.parse(text)
            self.spec = self._budget.spec
        elif text.strip().lower() == "tsvc":
            if T is None:
                raise ConfigError("the tsvc coder needs the number of tasks")
            self._rule = lambda name, shape: tsvc_codec(shape, T)
            self.spec = "tsvc"
        elif text.strip().lower() == "bitdelta":
            self._rule = bitdelta_codec
            self.spec = "bitdelta"
        elif _PLAN_RE.match(text):
            self._plan = CodecPlan.parse(text)
            self.spec = self._plan.spec
        else:
            self._codec = parse_codec(text)
            self.spec = self._codec.spec

    @classmethod
    def allocated(cls, rule: BudgetRule) -> Coder:
        """The coder of a ``--budget`` build: each (task, tensor) through the codec the allocation chose."""
        coder = cls(rule.spec)
        coder._budget = rule
        return coder

    @classmethod
    def with_rule(cls, rule: DeltaComeRule | UltraDeltaRule) -> Coder:
        """The coder of a peer rule as built (UltraDelta's with the allocation its statistics passes made)."""
        coder = cls(rule.spec)
        coder._task_rule = rule
        return coder

    def codec_for(self, name: str, shape: tuple[int, ...] | torch.Size) -> Codec | None:
        """The codec this coder uses for tensor ``name`` of ``shape`` (one codec, a plan's per-kind codec, or a rule's
        choice); None when the tensor is not stored. Coders that choose per task and tensor refuse (use ``encode``)."""
        if self._task_rule is not None:
            raise ConfigError(f"the {self.spec.partition(':')[0]} coder chooses a codec per task and tensor: use "
                              "encode(name, x, task=...)")
        if self._budget is not None:
            raise ConfigError("a budget coder chooses a codec per task and tensor: use encode(name, x, task=...)")
        if self._rule is not None:
            return self._rule(name, tuple(shape))
        if self._plan is not None:
            return self._plan.codec_for(name, shape)
        return self._codec

    def encode(self, name: str, x: torch.Tensor, svd: SVD | None = truncated_svd,
               task: str | None = None) -> Encoded | None:
        """``x`` encoded by its tensor's codec (None: the plan does not store this kind; it decodes to zeros).
        A fixed-rank ``lowrank`` codec takes its factors from ``svd`` (the float64-Gram SVD, as the benchmark).
        ``task``: whose tensor this is (a coder that codes each task its own way, ``compress.budget``'s, uses it)."""
        if self._task_rule is not None:
            return self._task_rule.encode(name, x, task)
        if self._budget is not None:
            return self._budget.encode(name, x, task)
        codec = self.codec_for(name, tuple(x.shape))
        if codec is None:
            return None
        return encode_with_svd(codec, x, svd) if svd is not None else codec.encode(x)
