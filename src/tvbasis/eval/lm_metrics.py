"""The benchmark's evaluator for a causal LM (``--model gemma3-270m``): accuracy = the share of a task split's texts
whose highest-scoring label text (``causal_lm.CausalLMScorer``: summed log-likelihood after the prompt) is the
true one. Everything else — per-task accuracy of θ₀ + λ·τ, the λ searches of addition and negation — is the
encoder ``Evaluator``'s, with the scorer's in-place edits (``InPlaceEdit``) standing for the encoder's.

θ₀'s accuracies are kept (the searches ask for them again and again); edited weights are scored afresh (no score
cache: ``--resume`` is the encoder bench's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tvbasis.eval.causal_lm import CausalLMScorer
from tvbasis.eval.metrics import Evaluator, accuracy
from tvbasis.eval.tasks import Task


class LMEvaluator(Evaluator):
    """``Evaluator`` over a ``CausalLMScorer``: a task's classes are its ``label_texts``."""

    def __init__(self, scorer: CausalLMScorer, tasks: Mapping[str, Task], splits: Sequence[str] = ("dev", "test"),
                 progress: bool = False) -> None:
        scorer.reset()
        self.encoder = scorer  # type: ignore[assignment]  # set_delta / reset / edited, as the Encoder's
        self.tasks = dict(tasks)
        self.splits = tuple(splits)
        self.progress = progress
        self._pretrained_acc: dict[tuple[str, str], float] = {}
        self.passes = 0  # scoring passes over a task split (for the cost report)

    def embed(self, task: str, split: str) -> torch.Tensor:  # pragma: no cover - not an embedding model
        raise NotImplementedError("a causal LM is scored through its label texts, not embeddings")

    def accuracy(self, task: str, split: str = "test") -> float:
        """Accuracy of the scorer's current weights on one task split."""
        self._check(task, split)
        key = (task, split)
        scorer: CausalLMScorer = self.encoder  # type: ignore[assignment]
        if not scorer.edited and key in self._pretrained_acc:
            return self._pretrained_acc[key]
        t = self.tasks[task]
        desc = f"{task}/{split}" if self.progress else False
        pred = scorer.predict(t[split].texts, desc, label_texts=t.label_texts)
        self.passes += 1
        acc = accuracy(pred, t[split].labels)
        if not scorer.edited:
            self._pretrained_acc[key] = acc
        return acc
