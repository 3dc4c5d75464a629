"""The mask arithmetic of Localize-and-Stitch, elementwise on stacked masks (T, ...) of one tensor slice.

* ``stitch_weights``: the weight of task t at a coordinate is m_t / n, n = the number of masks covering it
  (0 where none covers it) — the overlap averaging of L&S's Stitcher.
* ``majority_masks`` (SharedMask): per cluster c, m_c = 1[mean over its members of m_t ≥ ½].
* ``exactly_one_masks`` (the first stage of StitchTwice): within each cluster keep only the coordinates that
  exactly one member claims.
* ``effective_masks``: the mask each task stitches with under a rule (``stitch``, ``shared``, ``twice``).

Clusters are given as one label per task (``cluster_labels`` reads a mapping, a sequence, ``"a=0,b=0,c=1"`` or
anything with ``task_names`` and ``labels``, such as a cluster basis store) and renumbered 0..M-1 in order of first
appearance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tvbasis.errors import ConfigError

RULES = ("stitch", "shared", "twice")


def stitch_weights(masks: torch.Tensor) -> torch.Tensor:
    """(T, ...) bool -> (T, ...) float32 weights m_t / n (n = Σ_t m_t; 0 where no mask covers a coordinate)."""
    m = masks.to(torch.float32)
    n = m.sum(0, keepdim=True)
    return m / n.clamp(min=1.0)


def majority_masks(masks: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """(T, ...) bool task masks -> (M, ...) bool cluster masks: m_c = 1[mean_{t in c} m_t ≥ ½]."""
    lab = torch.as_tensor(list(labels), dtype=torch.long)
    M = int(lab.max()) + 1 if len(lab) else 0
    out = torch.zeros((M, *masks.shape[1:]), dtype=torch.bool, device=masks.device)
    for c in range(M):
        members = masks[lab == c]
        # mean ≥ ½  <=>  2·count ≥ size (integers: no rounding at the tie)
        out[c] = 2 * members.sum(0, dtype=torch.int32) >= members.shape[0]
    return out


def exactly_one_masks(masks: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """(T, ...) bool -> (T, ...) bool: m_t where exactly one member of t's cluster claims the coordinate."""
    lab = torch.as_tensor(list(labels), dtype=torch.long)
    out = masks.clone()
    for c in lab.unique().tolist():
        idx = (lab == c).nonzero().view(-1)
        once = masks[idx].sum(0, dtype=torch.int32) == 1
        out[idx] &= once
    return out


def effective_masks(masks: torch.Tensor, rule: str, labels: Sequence[int] | None = None) -> torch.Tensor:
    """The (T, ...) masks the tasks stitch with: their own (``stitch``), their cluster's majority vote
    (``shared``), or their own less what another member of their cluster also claims (``twice``)."""
    if rule == "stitch":
        return masks
    if labels is None:
        raise ConfigError(f"the {rule!r} rule needs clusters (one label per task)")
    if len(labels) != masks.shape[0]:
        raise ConfigError(f"{len(labels)} cluster labels for {masks.shape[0]} masks")
    if rule == "shared":
        return majority_masks(masks, labels)[torch.as_tensor(list(labels), dtype=torch.long)]
    if rule == "twice":
        return exactly_one_masks(masks, labels)
    raise ConfigError(f"unknown stitching rule {rule!r}; expected one of {', '.join(RULES)}")


def rule_of(shared_mask: bool = False, stitch_twice: bool = False, rule: str | None = None) -> str:
    """The rule named by the flags (``shared_mask`` -> ``shared``, ``stitch_twice`` -> ``twice``) or ``rule``."""
    named = [r for r, on in (("shared", shared_mask), ("twice", stitch_twice)) if on]
    if rule is not None and rule != "stitch":
        named.append(rule)
    if len(set(named)) > 1:
        raise ConfigError("choose one of shared-mask and stitch-twice")
    return named[0] if named else "stitch"


def canonical(labels: Sequence[int]) -> list[int]:
    """Renumber cluster labels 0..M-1 in order of first appearance."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(x), len(mapping)) for x in labels]


def parse_clusters(text: str) -> dict[str, int]:
    """``"a=0,b=0,c=1"`` -> {"a": 0, "b": 0, "c": 1}."""
    out: dict[str, int] = {}
    for item in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, lab = item.partition("=")
        if not sep or not name or not lab:
            raise ConfigError(f"--clusters expects NAME=LABEL[,NAME=LABEL...], got {item!r}")
        try:
            out[name] = int(lab)
        except ValueError:
            raise ConfigError(f"--clusters {item!r}: the label must be an integer") from None
        if out[name] < 0:
            raise ConfigError(f"--clusters {item!r}: the label must be >= 0")
    if not out:
        raise ConfigError("--clusters is empty")
    return out


def cluster_labels(clusters: Any, tasks: Sequence[str]) -> list[int]:
    """One cluster label per task of ``tasks``, from a {task: label} mapping, a sequence in task order, a
    ``"a=0,b=0,c=1"`` string or an object with ``task_names`` and ``labels`` (a cluster basis store)."""
    if clusters is None:
        raise ConfigError("shared-mask / stitch-twice need clusters (a cluster store or --clusters a=0,b=0,c=1)")
    if isinstance(clusters, str):
        clusters = parse_clusters(clusters)
    elif hasattr(clusters, "task_names") and hasattr(clusters, "labels"):
        labels = clusters.labels
        if labels is None:
            raise ConfigError(f"the store {getattr(clusters, 'root', '')} has no clusters (build it with "
                              "--method cluster)")
        clusters = dict(zip(clusters.task_names, labels))
    if isinstance(clusters, Mapping):
        missing = [t for t in tasks if t not in clusters]
        if missing:
            raise ConfigError(f"no cluster given for task(s) {missing}; clusters cover {sorted(clusters)}")
        return canonical([int(clusters[t]) for t in tasks])
    labels = [int(x) for x in clusters]
    if len(labels) != len(tasks):
        raise ConfigError(f"{len(labels)} cluster labels for {len(tasks)} tasks")
    return canonical(labels)
