"""Probes for ``tvbasis build --budget ... --probe NAME=FILE``: how much a compressed task vector moves a task's
predictions away from its fine-tune's, on the task's own text, without using any label as ground truth.

``PredictionProbe(task, delta)`` = the mean total-variation distance between the task's class probabilities under
its fine-tune (θ₀ + v_t) and under θ₀ + delta, over the task's texts:

    TV_t = mean_i ½ Σ_c |p_c(x_i; θ₀ + v_t) − p_c(x_i; θ₀ + delta)|

The classifier is the task's frozen zero-shot head (``tvbasis.eval.heads``: 20 · cosine to its label names'
pretrained embeddings, the protocol every fine-tune of the benchmark and of ``tvbasis eval`` is scored with). Why
this and not an error of the weights or of the embeddings: equal relative error of the weights is not equal
accuracy, and neither is equal embedding error (``benchmarks/results/budget_output_error.md``: a task of 77
near-synonymous intents loses most accuracy at the second-lowest embedding error); what costs accuracy is a
prediction crossing a decision boundary, and TV is the smooth count of that: the change of the expected accuracy
of the fine-tune's own classifier is at most TV, whatever the true labels are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tvbasis.errors import ConfigError
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.heads import Head, head_of
from tvbasis.vectors import TaskVector


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of ½ Σ_c |p − q| (rows are probability vectors)."""
    return float(0.5 * (p.double() - q.double()).abs().sum(-1).mean())


class PredictionProbe:
    """``probe(task, delta) -> TV`` for every task given: its texts, its head's label texts and its fine-tune's
    class probabilities on them (computed once, here)."""

    def __init__(self, pretrained: str | Path, finetuned: Mapping[str, str | Path],
                 texts: Mapping[str, Sequence[str]], label_texts: Mapping[str, Sequence[str]],
                 max_length: int = 128, encoder: Encoder | None = None) -> None:
        missing = [t for t in finetuned if t not in texts or t not in label_texts]
        if missing:
            raise ConfigError(f"probe: give texts and label names for every task; missing for {missing[:5]}")
        self.encoder = encoder if encoder is not None else Encoder(pretrained, max_length=max_length)
        self.max_length = int(max_length)
        self.texts: dict[str, list[str]] = {}
        self.heads: dict[str, Head] = {}
        self.reference: dict[str, torch.Tensor] = {}
        for t in finetuned:
            if len(label_texts[t]) < 2:
                raise ConfigError(f"probe {t}: a head needs at least 2 classes, got {len(label_texts[t])}")
            self.heads[t] = head_of(self.encoder, t, label_texts[t])
        for t, ft in finetuned.items():
            ts = [s for s in texts[t] if isinstance(s, str) and s.strip()]
            if not ts:
                raise ConfigError(f"probe {t}: no non-empty text")
            self.texts[t] = ts
            delta = dict(TaskVector.from_checkpoints(pretrained, ft).items())
            self.reference[t] = self._probs(t, delta)
        self.encoder.set_delta(None)

    def _probs(self, task: str, delta: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        self.encoder.set_delta(delta)
        emb = self.encoder.encode(self.texts[task], max_length=self.max_length)
        return (self.heads[task].logits(emb).double()).softmax(-1)

    def __call__(self, task: str, delta: Mapping[str, torch.Tensor]) -> float:
        try:
            return total_variation(self.reference[task], self._probs(task, delta))
        finally:
            self.encoder.set_delta(None)
