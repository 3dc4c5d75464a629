"""The trained Localize-and-Stitch localizer on the harness's encoder (``tvbasis localize --data``).

Per task: few-shot data (``shots`` examples per class, 64 by default, from a benchmark task's training split or
from the user's labelled file), the task's frozen zero-shot head (20·cos to the label-name embeddings of θ₀), the
loss = mean cross-entropy; the mask over the localized tensors is learnt by ``tvbasis.stitch.train_mask`` from the
dataless top-s mask. The masks are then written, with the task-vector values on their supports (and the SharedMask
/ StitchTwice rule when asked), by the streaming masks pass. Every setting is recorded in the file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tvbasis.codecs.bits import pack_bits
from tvbasis.engine import Run
from tvbasis.errors import ConfigError, TensorMismatchError, UnknownTaskError
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.finetune import MICRO_BATCH_TOKENS, micro_batches
from tvbasis.eval.heads import LOGIT_SCALE, build_head
from tvbasis.eval.tasks import Split, Task, canonical_name, load_task
from tvbasis.eval.userdata import load_user_task
from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.merge import global_thresholds
from tvbasis.stitch import MaskSet, MaskTraining, train_mask, write_mask_set
from tvbasis.stitch.localize import MemoryMasks, TaskSetDeltas, check_scope, check_sparsity, top_magnitudes
from tvbasis.stitch.rules import rule_of
from tvbasis.taskset import TaskSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedLocalizeSettings:
    """Everything that determines a trained mask (recorded in the masks file)."""

    sparsity: float = 0.01
    trim_scope: str = "tensor"  # of the initial (dataless) mask
    sigmoid_bias: float = 3.0
    epochs: int = 10
    lr: float = 10.0
    l1: float = 0.0
    budget: str = "round"
    shots: int = 64  # examples per class
    max_examples: int | None = None  # cap on the few-shot examples per task (None: shots × classes)
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0

    def check(self) -> TrainedLocalizeSettings:
        check_sparsity(self.sparsity)
        check_scope(self.trim_scope)
        self.training().check()
        if self.shots < 1 or self.batch_size < 1 or self.max_length < 2 or (
                self.max_examples is not None and self.max_examples < 1):
            raise ConfigError(f"invalid few-shot settings: {self}")
        return self

    def training(self) -> MaskTraining:
        return MaskTraining(self.sigmoid_bias, self.epochs, self.lr, self.l1, self.budget)


def few_shot(split: Split, shots: int, seed: int = 0, max_examples: int | None = None) -> Split:
    """Up to ``shots`` examples of each class (a seeded choice; file order kept), at most ``max_examples`` in all
    (then round-robin over the classes, so every class keeps about the same number)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(split.labels):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(f"few-shot:{seed}")
    picked: dict[int, list[int]] = {}
    for y in sorted(by_class):
        idx = list(by_class[y])
        rng.shuffle(idx)
        picked[y] = idx[:shots]
    order: list[int] = []
    depth = max((len(v) for v in picked.values()), default=0)
    for r in range(depth):  # round-robin: a cap keeps the classes balanced
        order += [v[r] for _, v in sorted(picked.items()) if r < len(v)]
    if max_examples is not None:
        order = order[:max_examples]
    order.sort()
    return Split([split.texts[i] for i in order], [split.labels[i] for i in order])


def data_task(name: str, source: str | Path | Task) -> Task:
    """A task's labelled data: a ``Task``, a labelled file (CSV / TSV / JSONL with text and label columns) or the
    name of a benchmark task (its training split)."""
    if isinstance(source, Task):
        return source
    path = Path(source)
    if path.exists():
        return load_user_task(name, {"train": path})
    try:
        bench = canonical_name(str(source))
    except UnknownTaskError:
        raise ConfigError(f"--data {name}={source}: neither a file nor a benchmark task") from None
    return load_task(bench, max_train=None, max_dev=1, max_test=1)


class _HeadLoss:
    """The batch's share of the mean cross-entropy of the task's frozen head."""

    def __init__(self, encoder: Encoder, weight: torch.Tensor, n: int) -> None:
        self.encoder, self.weight, self.n = encoder, weight, n

    def __call__(self, model: torch.nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        emb = self.encoder.forward(inputs, model=model)
        logits = LOGIT_SCALE * emb @ self.weight.T
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / self.n


def initial_masks(tau: Mapping[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """The dataless masks of one task vector held in memory ({name: τ}), as the dataless localizer makes them."""
    th = None
    if scope == "global":
        th = global_thresholds(lambda: (t.reshape(1, -1) for t in tau.values()), 1, sparsity)
    return {n: top_magnitudes(t.unsqueeze(0), sparsity, th)[0] for n, t in tau.items()}


def localize_trained(pretrained: str | Path | Checkpoint, finetuned: Mapping[str, str | Path | Checkpoint],
                     data: Mapping[str, str | Path | Task], out: str | Path,
                     settings: TrainedLocalizeSettings | None = None, include: Iterable[str] | None = None,
                     exclude: Iterable[str] | None = None, shared_mask: bool = False, stitch_twice: bool = False,
                     clusters: Any = None, values: str | None = "float32", encoder: Encoder | None = None,
                     force: bool = False, run: Run = None, progress: bool = False) -> MaskSet:
    """Trained L&S localization of every fine-tune on its task's few-shot ``data`` ({task: file, benchmark task
    name or Task}); writes the masks file ``out`` (as ``tvbasis.stitch.localize`` does) and returns it opened.
    ``encoder``: the harness encoder of ``pretrained`` (loaded from it when not given)."""
    cfg = (settings or TrainedLocalizeSettings()).check()
    rule = rule_of(shared_mask, stitch_twice)
    missing = [t for t in finetuned if t not in data]
    extra = [t for t in data if t not in finetuned]
    if missing or extra:
        raise ConfigError(f"--data: give one labelled source per fine-tune (missing: {missing or 'none'}; "
                          f"unknown: {extra or 'none'}); without --data the masks are dataless")
    sources = {t: data_task(t, data[t]) for t in finetuned}  # every data source checked before any work
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    taskset = TaskSet.open(pre, finetuned, include, exclude)
    enc = encoder if encoder is not None else Encoder(pre.root_dir or pre.path, max_length=cfg.max_length)
    if enc.edited:
        enc.reset()
    live = {n: enc._resolve(n) for n in taskset.specs}
    not_params = sorted(n for n, k in live.items() if k not in dict(enc.model.named_parameters()))
    if not_params:
        raise TensorMismatchError(f"localized tensor(s) {not_params[:3]} are not parameters of the encoder "
                                  "(leave them out with --exclude)")
    packed: dict[str, list[torch.Tensor]] = {n: [] for n in taskset.specs}
    report: dict[str, Any] = {}
    for t, task_name in enumerate(taskset.names):
        task = sources[task_name]
        shots = few_shot(task["train"], cfg.shots, cfg.seed, cfg.max_examples)
        if len(shots) == 0:
            raise ConfigError(f"task {task_name}: no labelled examples to localize with")
        head = build_head(enc, task)
        tokens = enc.tokenize(shots.texts, cfg.max_length)
        labels = torch.tensor(shots.labels)
        batches = []
        for s in range(0, len(tokens), cfg.batch_size):
            idx = list(range(s, min(len(tokens), s + cfg.batch_size)))
            for chunk in micro_batches(idx, tokens, MICRO_BATCH_TOKENS):
                batches.append((enc.collate(tokens, chunk), labels[chunk]))
        tau = {live[n]: taskset.deltas(n, None, [t])[0] for n in taskset.specs}
        init = initial_masks(tau, cfg.sparsity, cfg.trim_scope)

        def tick(epoch: int, loss: float, name: str = task_name) -> None:
            if progress:
                log.info("localize %s: epoch %d, loss %.4f", name, epoch + 1, loss)
        masks, stats = train_mask(enc.model, tau, init, batches, _HeadLoss(enc, head.weight.detach(), len(shots)),
                                  cfg.training(), tick)
        enc._dirty = set()  # train_mask restored θ₀ in place
        for n in taskset.specs:
            packed[n].append(pack_bits(masks[live[n]]))
        report[task_name] = {"examples": len(shots), "classes": task.num_classes, "source": str(
            data[task_name].name if isinstance(data[task_name], Task) else data[task_name]), **stats}
        del tau, init, masks
    settings_out = {"localizer": "trained", **asdict(cfg), "include": list(include or []),
                    "exclude": list(exclude or []),
                    "finetuned": {n: str(getattr(p, "path", p)) for n, p in finetuned.items()},
                    "encoder": enc.describe(), "training": report}
    inputs = [str(pre.root_dir or pre.path), *(str(getattr(p, "path", p)) for p in finetuned.values())]
    return write_mask_set(out, TaskSetDeltas(taskset), MemoryMasks(packed, taskset.specs), taskset.specs,
                          settings_out, rule, clusters, values, taskset.pretrained, force, inputs, run)
