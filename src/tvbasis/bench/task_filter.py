"""The bad-task filter of the paper's v1 pipeline: keep a task only if its fine-tune beats the majority-label
baseline.

For each task: the fine-tuned model's accuracy on the task's dev split, and the majority baseline = the share of
the most frequent label among that dev split's labels (what always answering the commonest class scores). A
task is kept when fine-tuned dev accuracy > majority baseline (strictly). Over several seeds a task is kept only
when every seed's fine-tune passes. ``tvbasis bench`` applies it by default with ``--tasks many`` (the sub-tasks
carved from the bundled datasets, some of which are tiny or easy); ``--no-task-filter`` keeps every task.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tvbasis.eval.tasks import Task


def majority_baseline(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent label (NaN for no labels)."""
    if not labels:
        return float("nan")
    return Counter(labels).most_common(1)[0][1] / len(labels)


@dataclass
class TaskFilterReport:
    """Kept and dropped tasks with their numbers: task -> {"finetuned_dev": [..per seed], "majority_dev": x}."""

    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "keep a task when its fine-tune's dev accuracy > the majority-label baseline on dev "
                        "(every seed)", "kept": self.kept, "dropped": self.dropped}

    def lines(self) -> list[str]:
        return report_lines(self.to_dict())


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """What the filter did, one line per dropped task (a report as ``TaskFilterReport.to_dict`` writes it)."""
    def one(name: str, d: Mapping[str, Any]) -> str:
        ft = ", ".join(f"{100 * v:.1f}" for v in d["finetuned_dev"])
        return f"{name} (fine-tuned dev {ft} % vs majority {100 * d['majority_dev']:.1f} %)"

    kept, dropped = report.get("kept") or {}, report.get("dropped") or {}
    out = [f"task filter: kept {len(kept)} of {len(kept) + len(dropped)} tasks"
           + ("" if dropped else " (none dropped)")]
    out += [f"  dropped {one(n, d)}" for n, d in dropped.items()]
    return out


def filter_tasks(tasks: Mapping[str, Task], finetuned_dev: Sequence[Mapping[str, float]] | Mapping[str, float]
                 ) -> TaskFilterReport:
    """Apply the rule to ``tasks`` given the fine-tuned dev accuracies (one mapping, or one per seed)."""
    per_seed = [finetuned_dev] if isinstance(finetuned_dev, Mapping) else list(finetuned_dev)
    report = TaskFilterReport()
    for name, task in tasks.items():
        majority = majority_baseline(list(task["dev"].labels))
        accs = [float(d[name]) for d in per_seed]
        entry = {"finetuned_dev": accs, "majority_dev": majority, "n_dev": len(task["dev"])}
        keep = bool(accs) and all(a > majority for a in accs)
        (report.kept if keep else report.dropped)[name] = entry
    return report
