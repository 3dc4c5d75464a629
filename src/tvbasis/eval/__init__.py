"""Evaluation (the eval extra): the eight bundled text tasks and the user's labelled files, an encoder adapter with
in-memory editing, frozen zero-shot heads, accuracy and λ search (``tvbasis eval``, ``tvbasis tune``, aTLAS), real
fine-tuning (full and LoRA), the trained Localize-and-Stitch localizer and the plots of ``tvbasis inspect --plot``.
The paper-reproduction harness that drives them, ``tvbasis bench``, is ``tvbasis.bench``, one layer above."""

from tvbasis.eval.encoder import Encoder, default_model_dir
from tvbasis.eval.heads import LOGIT_SCALE, Head, build_head
from tvbasis.eval.metrics import (
    DEFAULT_GRID,
    AdditionResult,
    Evaluator,
    NegationResult,
    lambda_grid,
    normalized_accuracy,
    parse_grid,
)
from tvbasis.eval.tasks import DOMAINS, TASK_NAMES, Task, canonical_name, label_text, load_task, load_tasks

__all__ = [
    "DEFAULT_GRID", "DOMAINS", "LOGIT_SCALE", "TASK_NAMES", "AdditionResult", "Encoder", "Evaluator", "Head",
    "NegationResult", "Task", "build_head", "canonical_name", "default_model_dir", "label_text", "lambda_grid",
    "load_task", "load_tasks", "normalized_accuracy", "parse_grid",
]
