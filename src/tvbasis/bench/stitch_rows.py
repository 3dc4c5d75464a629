"""The Localize-and-Stitch rows of ``tvbasis bench``: dataless and trained L&S, SharedMask and StitchTwice.

All at sparsity 1 % of every floating-point tensor (the same tensors the task vectors cover), masks stored
bit-packed with float32 values on their supports. Per row: bytes stored (the masks file), task addition = the
stitched model θ₀ + Σ_t (m_t / n) ⊙ τ_t (λ = 1: L&S has none), and each task's accuracy through its own localized
vector θ₀ + m_t ⊙ τ_t. The trained masks hold the dataless masks' size exactly (``budget="topk"``) so that every row
is at 1 %; few-shot data come from each task's benchmark training subset (8 examples per class, at most 64 per
task; ``--full``: 16 and 256; at most an eighth of the subset), 10 epochs. SharedMask and StitchTwice use the trained masks and the clusters of the
cluster bases (spectral clustering of the task vectors' cosine similarities) at each M of the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import cosine_from_gram, spectral_clusters
from tvbasis.bench.states import float_state as _state
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.localize import TrainedLocalizeSettings, localize_trained
from tvbasis.eval.metrics import AdditionResult, Evaluator, mean, normalized_accuracy
from tvbasis.eval.tasks import Task
from tvbasis.stitch import MaskSet, derive, localize, localized_vector, stitch

log = logging.getLogger(__name__)

SPARSITY = 0.01


def bench_localize_settings(full: bool, max_length: int, seed: int, n_train: int = 2000) -> TrainedLocalizeSettings:
    """8 examples per class, at most 64 per task (--full: 16 and 256), and at most an eighth of the training
    subset (at least 16), 10 epochs: the mask training then costs about one fine-tune per task."""
    cap = min(256 if full else 64, max(16, n_train // 8))
    return TrainedLocalizeSettings(sparsity=SPARSITY, epochs=10, lr=10.0, budget="topk", shots=16 if full else 8,
                                   max_examples=cap, max_length=max_length, seed=seed)


def task_clusters(tvs: Mapping[str, Mapping[str, torch.Tensor]], M: int, seed: int) -> list[int]:
    """The cluster bases' clusters: spectral clustering of the task vectors' cosine similarities into M."""
    names = list(tvs)
    keys = list(tvs[names[0]])
    G = np.zeros((len(names), len(names)))
    for k in keys:
        X = torch.stack([tvs[n][k].reshape(-1).double() for n in names])
        G += (X @ X.T).numpy()
    if M == 1:
        return [0] * len(names)
    return spectral_clusters(cosine_from_gram(G), M, seed)


def _evaluate(ev: Evaluator, masks: MaskSet, ft_dev: Mapping[str, float], ft_test: Mapping[str, float]
              ) -> tuple[AdditionResult, dict[str, float]]:
    add = ev.search_addition(_state(stitch(None, None, masks)), (1.0,), finetuned_dev=dict(ft_dev),
                             finetuned_test=dict(ft_test))
    own = {t: ev.with_delta(_state(localized_vector(masks, t)), 1.0, "test", [t])[t] for t in masks.tasks}
    return add, own


def _row(label: str, masks: MaskSet, add: AdditionResult, own: dict[str, float], ft_test: Mapping[str, float],
         all_vectors: int, seconds: float, **extra: Any) -> dict[str, Any]:
    own_norm = {t: normalized_accuracy(a, ft_test[t]) for t, a in own.items()}
    info = {"kind": "localize-and-stitch", "own_test": own, "own_normalized_test": own_norm,
            "mean_own_normalized_test": mean(own_norm.values()), "density": {t: masks.density(t) for t in masks.tasks},
            "masks": len(masks.masks), "mask_bytes": masks.mask_bytes, "value_bytes": masks.value_bytes,
            "fraction_of_task_vectors": masks.nbytes / max(1, all_vectors), "rule": masks.rule,
            "settings": {k: v for k, v in masks.settings.items() if k not in ("training", "finetuned")},
            **extra}
    return {"method": label, "M": None, "bytes_stored": int(masks.nbytes), "addition": add, "extra": info,
            "seconds": seconds}


def stitch_rows(work: Path, pre_dir: Path, ft_dirs: Mapping[str, str], encoder: Encoder, ev: Evaluator,
                tasks: Mapping[str, Task], tvs: Mapping[str, Mapping[str, torch.Tensor]],
                ft_dev: Mapping[str, float], ft_test: Mapping[str, float], all_vectors: int, Ms: tuple[int, ...],
                full: bool, max_length: int, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """The L&S rows (keyword arguments of ``bench.Row``); masks files under ``<work>/stitch``, removed after."""
    out = work / "stitch"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    fts = dict(ft_dirs)

    t0 = time.time()
    dl = localize(pre_dir, fts, out / "dataless.safetensors", sparsity=SPARSITY, force=True)
    add, own = _evaluate(ev, dl, ft_dev, ft_test)
    rows.append(_row(f"L&S dataless ({SPARSITY:.0%})", dl, add, own, ft_test, all_vectors, time.time() - t0))

    t0 = time.time()
    cfg = bench_localize_settings(full, max_length, seed, min(len(t["train"]) for t in tasks.values()))
    tr = localize_trained(pre_dir, fts, dict(tasks), out / "trained.safetensors", cfg, encoder=encoder, force=True)
    t_train = time.time() - t0
    add, own = _evaluate(ev, tr, ft_dev, ft_test)
    training = tr.settings.get("training", {})
    rows.append(_row(f"L&S trained ({SPARSITY:.0%})", tr, add, own, ft_test, all_vectors, time.time() - t0,
                     localize_seconds=round(t_train, 2),
                     loss={t: [s.get("loss_initial_mask"), s.get("loss_final_mask")] for t, s in training.items()}))

    for M in Ms:
        labels = task_clusters(tvs, M, seed)
        clusters = dict(zip(tr.tasks, labels))
        for rule, label in (("shared", "SharedMask"), ("twice", "StitchTwice")):
            t0 = time.time()
            path = out / f"{rule}-M{M}.safetensors"
            derived = derive(tr, path, rule, clusters, pre_dir, fts if rule == "shared" else None, force=True)
            add, own = _evaluate(ev, derived, ft_dev, ft_test)
            rows.append(_row(f"L&S {label} trained (M={M})", derived, add, own, ft_test, all_vectors,
                             time.time() - t0, clusters=clusters))
    for p in out.glob("*.safetensors"):
        p.unlink()
    return rows


def stitch_markdown(result: Mapping[str, Any]) -> str:
    """A table of the L&S rows: bytes as a fraction of the task vectors, mask density, addition and each task's
    accuracy through its own localized vector (empty when the run has no L&S rows)."""
    rows = [r for r in result["rows"] if (r.get("extra") or {}).get("kind") == "localize-and-stitch"]
    if not rows:
        return ""
    tasks = list(result["zero_shot"]["test"])
    head = ["L&S method", "stored (% of task vectors)", "density %", "add norm", "own norm (mean)"] + [
        f"own {t}" for t in tasks]
    lines = ["", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["extra"]
        dens = [v for v in e["density"].values() if not math.isnan(v)]
        cells = [r["method"], f"{100 * e['fraction_of_task_vectors']:.2f}",
                 f"{100 * sum(dens) / max(1, len(dens)):.2f}",
                 f"{100 * (r['addition'] or {}).get('mean_normalized_test', float('nan')):.1f}",
                 f"{100 * e['mean_own_normalized_test']:.1f}"] + [
            f"{100 * e['own_test'].get(t, float('nan')):.1f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("L&S rows: 1 % masks of every tensor, no λ (add at λ = 1); own = accuracy of θ₀ + m_t ⊙ τ_t on task t "
                 "(own norm: / fine-tuned); stored = the masks file (bit-packed masks + float32 values on them).")
    return "\n".join(lines)
