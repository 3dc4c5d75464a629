"""What a store's numbers mean when they are not what a user expects: warnings on useless or unknown errors, and
the size of a store against the adapters it was built from.

- A task whose relative error is ≥ ``USELESS_ERROR`` (0.9) is kept almost not at all: its vector is nearly
  orthogonal to what the store holds (typically a task folded in by ``add-task``, which only expresses it in the
  existing bases).
- A relative error above 1 means the reconstruction is further from the task vector than zero is; TALL stores
  and PCA stores can do that for reasons of their own (``why_above_one``).
- An imported basis (``import-tvb`` without ``--finetuned``) has no task vectors to measure against: its errors
  are unknown (``unknown_errors``), not 0.
- A store built from PEFT adapters is compared with the adapters' own bytes, not with dense task vectors
  (``adapter_bytes``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tvbasis.io.lora import ADAPTER_WEIGHTS, is_adapter
from tvbasis.methods import get_store_method
from tvbasis.store.store import BasisStore

__all__ = ["USELESS_ERROR", "adapter_bytes", "error_warnings", "unknown_errors", "why_above_one"]

#: a task error at or above this is reported as keeping almost nothing of the task
USELESS_ERROR = 0.9


def unknown_errors(store: BasisStore) -> list[str]:
    """Tasks whose relative error is unknown: not measured exactly, and their Gram row itself estimated from the
    task's reconstruction (an imported basis without the fine-tunes), so the recorded value compares the
    reconstruction with itself."""
    estimated = set(store.manifest.gram_estimated_rows)
    return [t.name for t in store.manifest.tasks if not t.error_exact and t.name in estimated]


def why_above_one(store: BasisStore) -> str:
    """Why this kind of store can reconstruct a task further from its vector than zero is."""
    why = get_store_method(store.method).error_above_one
    if why is not None:
        return why
    return "its reconstruction points partly away from its vector (a lossy codec, an inner merge or an estimate)"


def error_warnings(store: BasisStore, tasks: Iterable[str] | None = None) -> list[str]:
    """One line per problem with the tasks' errors (all tasks, or ``tasks``): unknown errors, errors above 1
    (with why), errors ≥ USELESS_ERROR."""
    names = list(store.task_names if tasks is None else tasks)
    unknown = set(unknown_errors(store))
    entries = {t.name: t for t in store.manifest.tasks}
    out: list[str] = []
    if unknown & set(names):
        shown = [t for t in names if t in unknown]
        out.append(f"the relative errors of {len(shown)} task(s) ({', '.join(shown[:5])}"
                   f"{', ...' if len(shown) > 5 else ''}) are unknown: the store holds no task vectors to measure "
                   "them against (import-tvb --finetuned measures them)")
    for t in names:
        if t in unknown or t not in entries:
            continue
        e = entries[t].rel_error
        if e > 1.0:
            out.append(f"task {t}: relative error {e:.4f} > 1: the store's reconstruction is further from the task "
                       f"vector than zero is, because {why_above_one(store)}")
        elif e >= USELESS_ERROR:
            hint = ("; add-task only expresses a new task in the existing bases: rebuild the store with it, or build "
                    "with --residual" if entries[t].added else "; a larger M or --residual keeps more of it")
            out.append(f"task {t}: relative error {e:.4f} ≥ {USELESS_ERROR}: the store keeps almost nothing of this "
                       f"task (its vector is nearly orthogonal to what is stored){hint}")
    return out


def adapter_bytes(sources: Iterable[str | Path]) -> int | None:
    """The bytes of the PEFT adapters' weight files when every source is an adapter directory still on disk; None
    otherwise (then the comparison is with dense task vectors)."""
    total, n = 0, 0
    for s in sources:
        p = Path(s).expanduser()
        if not is_adapter(p):
            return None
        files = [p / f for f in ADAPTER_WEIGHTS if (p / f).is_file()]
        if not files:
            return None
        total += files[0].stat().st_size
        n += 1
    return total if n else None
