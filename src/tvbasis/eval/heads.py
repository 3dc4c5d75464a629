"""Frozen zero-shot classification heads: the pretrained encoder's embeddings of the cleaned label names.

logits = 20 · cos(sentence embedding, label embedding). The head never changes, so a task vector carries the
whole task (the task-arithmetic protocol); every edited encoder is evaluated with each task's own head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tvbasis.eval.encoder import Encoder
from tvbasis.eval.tasks import Task

#: logit scale (inverse temperature) applied to cosine similarities
LOGIT_SCALE = 20.0


@dataclass(frozen=True)
class Head:
    task: str
    label_texts: tuple[str, ...]
    weight: torch.Tensor  # (C, H), rows L2-normalised
    scale: float = LOGIT_SCALE

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, H) normalised embeddings -> (N, C) logits = scale · cosine."""
        return self.scale * embeddings @ self.weight.to(embeddings.dtype).T

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits(embeddings).argmax(dim=-1)


def head_of(encoder: Encoder, name: str, label_texts: Sequence[str], scale: float = LOGIT_SCALE) -> Head:
    """The head of the classes ``label_texts`` from the encoder's *pretrained* weights (any current edit is ignored
    and kept)."""
    texts = tuple(str(t) for t in label_texts)
    with encoder.at_pretrained():
        weight = encoder.encode(list(texts))
    return Head(task=name, label_texts=texts, weight=weight.clone(), scale=scale)


def build_head(encoder: Encoder, task: Task, scale: float = LOGIT_SCALE) -> Head:
    """Head of ``task`` (``head_of`` its label texts)."""
    return head_of(encoder, task.name, task.label_texts, scale)
