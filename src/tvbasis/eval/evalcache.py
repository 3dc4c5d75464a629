"""Accuracies kept on disk, so a benchmark that was stopped resumes where it was (``tvbasis bench --resume``).

A benchmark's time goes into encoder passes: one per (weights, task, split) it scores. With a cache attached to
the encoder (``Encoder.eval_cache``), each ``Evaluator`` looks a score up before it runs the pass and appends it
after, one JSON line per score in ``<out>/eval-cache.jsonl`` (flushed at once: a killed run loses at most the
pass it was in). A score is found again only for the same weights and the same question:

- the **weights** are identified by an XXH3-128 digest of the edited tensors' values (names and bytes of every
  tensor the current edit touched, ``Encoder.weights_digest``) — so a λ, a store's reconstruction or a merge that
  changed by one bit is a different key, and the same vector rebuilt later is the same key;
- the **context** digests everything else an accuracy depends on: the tvbasis version, θ₀ (every tensor of the
  pretrained encoder), the encoder's max length, and per task and split the texts, the labels and the head's
  weights. A line of another context is ignored (and kept in the file).

The file is untrusted input like any other: a line that does not parse (a run killed mid-write) or holds no
finite accuracy in [0, 1] is skipped with one warning. Only opt-in (``--resume``): after a change to tvbasis that
alters scores without a version bump, start a fresh output directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import xxhash

from tvbasis._version import __version__

log = logging.getLogger(__name__)

#: name of the cache file in a benchmark's output directory
CACHE_NAME = "eval-cache.jsonl"
#: lines longer than this are not ours
MAX_LINE = 4096


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]], seed: str = "") -> str:
    """XXH3-128 over (name, dtype, shape, bytes) of each tensor, in the order given."""
    h = xxhash.xxh3_128(seed.encode())
    for name, t in named:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(t.shape)}|".encode())
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def context_digest(parts: Mapping[str, object], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Digest of an evaluation context: JSON-able ``parts`` and named tensors."""
    return tensors_digest(tensors, seed=json.dumps({"tvbasis": __version__, **parts}, sort_keys=True, default=str))


class EvalCache:
    """Scores by (context, weights, task, split), read from and appended to one JSON-lines file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.scores: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        bad = 0
        if self.path.is_file():
            with open(self.path, "rb") as f:
                for raw in f:
                    rec = _record(raw)
                    if rec is None:
                        bad += 1
                        continue
                    self.scores[rec[0]] = rec[1]
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (a run stopped mid-write, or not a tvbasis cache)",
                        self.path, bad)
        self._fh = open(self.path, "ab")

    @staticmethod
    def key(context: str, weights: str, task: str, split: str) -> str:
        return f"{context}|{weights}|{task}|{split}"

    def get(self, key: str) -> float | None:
        value = self.scores.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: float) -> None:
        self.scores[key] = float(value)
        self._fh.write(json.dumps({"k": key, "v": float(value)}).encode() + b"\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            log.info("%s: %d score(s) read back, %d computed", self.path, self.hits, self.misses)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _record(raw: bytes) -> tuple[str, float] | None:
    if len(raw) > MAX_LINE:
        return None
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("k"), str) or type(d.get("v")) not in (int, float):
        return None
    v = float(d["v"])
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        return None
    return d["k"], v
