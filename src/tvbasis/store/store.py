"""BasisStore: open a store (validated manifest, shards checked against it) and do arithmetic on it.

All operations — reconstruct one task, any linear combination (addition, negation, analogy), an outer merge of
the bases — are lazy ``TaskVector``s that read only the store, tensor by tensor; applying one to a model also
reads the pretrained checkpoint, whose structure and content are checked against the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import cosine_from_gram, random_rows
from tvbasis.errors import ConfigError, StoreError, UnknownTaskError
from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.io.checksum import check_pretrained_structure
from tvbasis.merge import MergeContext, MergeSpec, get_merger
from tvbasis.passes import ALL, operand_thresholds
from tvbasis.store.format import Manifest
from tvbasis.vectors import Producer, TaskVector


# --------------------------------------------------------------------------------------------------- store
class BasisStore:
    """A basis store on disk. Cheap to open (reads the manifest and shard headers)."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.M: int = manifest.M
        self.method: str = manifest.method
        self.task_names: list[str] = manifest.task_names
        self.fits = manifest.groups
        self.group_of: dict[str, str] = manifest.group_of
        self.specs = {s.name: s for s in manifest.tensors}
        self.total_params = sum(s.numel for s in self.specs.values())
        self._bases = self._open_part("bases", manifest.files.bases)
        self._mean = self._open_part("mean", manifest.files.mean)
        self._check_shards()

    # -- open --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> BasisStore:
        root = Path(path)
        return cls(root, Manifest.read(root))

    def _open_part(self, prefix: str, files: list[str]) -> Checkpoint | None:
        if not files:
            return None
        target = self.root / (files[0] if len(files) == 1 else f"{prefix}.safetensors.index.json")
        try:
            return open_checkpoint(target)
        except Exception as e:
            raise StoreError(f"{self.root}: cannot open the store's {prefix} shards: {e}") from None

    def _check_shards(self) -> None:
        for name, s in self.specs.items():
            if self._bases is not None:
                want = (self.M, *s.shape)
                if name not in self._bases or self._bases.spec(name).shape != want:
                    got = self._bases.spec(name).shape if name in self._bases else "missing"
                    raise StoreError(f"{self.root}: bases tensor {name!r} is {got}, expected shape {want}")
            if self._mean is not None and (name not in self._mean or self._mean.spec(name).shape != s.shape):
                raise StoreError(f"{self.root}: mean tensor {name!r} missing or of the wrong shape")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (BasisStore.open, (str(self.root),))

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.task_names)

    @property
    def nbytes(self) -> int:
        """Bytes on disk (all files of the store, manifest included)."""
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    @property
    def task_vectors_bytes(self) -> int:
        """Bytes the T task vectors would take (in the stored dtype)."""
        per = sum(s.numel * getattr(torch, self.manifest.store_dtypes[n]).itemsize for n, s in self.specs.items())
        return per * self.T

    @property
    def gram(self) -> np.ndarray:
        return self.manifest.gram

    @property
    def cosine(self) -> np.ndarray:
        return cosine_from_gram(self.gram)

    @property
    def labels(self) -> list[int] | None:
        return self.fits[next(iter(self.fits))].labels

    @property
    def rel_errors(self) -> dict[str, float]:
        return {t.name: t.rel_error for t in self.manifest.tasks}

    def task_index(self, task: str) -> int:
        try:
            return self.task_names.index(task)
        except ValueError:
            raise UnknownTaskError(f"{self.root}: no task named {task!r}; the store holds {self.task_names}") from None

    # -- reading bases -----------------------------------------------------------------------------------
    def bases_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(M, *shape) float32 bases of one parameter (or rows [a, b) of each)."""
        spec = self.specs[name]
        fit = self.fits[self.group_of.get(name, ALL)]
        a, b = rows if rows is not None else (0, spec.shape[0] if spec.shape else 1)
        if fit.random_seed is not None:
            return random_rows(fit.random_seed, name, spec.shape, self.M, self.total_params, a, b)
        assert self._bases is not None
        if rows is None or not spec.shape:
            t = self._bases.get(name)
        else:
            t = self._bases.get_inner_rows(name, a, b)
        return t.to(torch.float32)

    def mean_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if self._mean is None:
            return None
        t = self._mean.get(name) if rows is None else self._mean.get_rows(name, *rows)
        return t.to(torch.float32)

    # -- arithmetic --------------------------------------------------------------------------------------
    def _coefficients(self, alpha: Mapping[str, float]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        a = np.zeros(self.T)
        for task, c in alpha.items():
            a[self.task_index(task)] += float(c)
        coefs = {g: f.W @ a for g, f in self.fits.items()}
        means = {g: float(f.mean_coef @ a) if f.mean_coef is not None else 0.0 for g, f in self.fits.items()}
        return coefs, means

    def combine(self, alpha: Mapping[str, float], name: str | None = None) -> TaskVector:
        """Σ_t α_t·v̂_t = S·(W·α) (+ μ·Σ mean_coef·α): addition, negation, analogy in one pass."""
        if not alpha:
            raise ConfigError("combine needs at least one task coefficient")
        coefs, means = self._coefficients(alpha)
        label = name or " + ".join(f"{c:g}*{t}" for t, c in alpha.items())
        return self._vector(_Combination(self, coefs, means), label)

    def reconstruct(self, task: str) -> TaskVector:
        """v̂_t from the store alone."""
        self.task_index(task)
        return self.combine({task: 1.0}, name=f"reconstructed {task}")

    def addition(self, outer: MergeSpec | None = None, tasks: Sequence[str] | None = None) -> TaskVector:
        """The multi-task vector. Without ``outer``: as the paper, the sum of the bases (for task-like bases;
        PCA and random bases, which are not task vectors themselves, sum the reconstructions). With ``outer``:
        that merge method over the bases (task-like) or over the reconstructions of ``tasks``."""
        selected = list(tasks) if tasks else list(self.task_names)
        for t in selected:
            self.task_index(t)
        whole = set(selected) == set(self.task_names)
        task_like = self.manifest.task_like
        if outer is None:
            if task_like and whole:
                return self._vector(_SumOfBases(self), "sum of bases")
            return self.combine({t: 1.0 for t in selected}, name="sum of reconstructions")
        merger = get_merger(outer)
        if merger.needs_fisher:
            raise ConfigError("fisher cannot be an outer merge of a store (no Fisher weights for bases)")
        operands = _Operands(self, None if (task_like and whole) else selected)
        thresholds = None
        if merger.needs_global_thresholds:
            assert merger.density is not None
            thresholds = operand_thresholds(operands, list(self.specs), operands.count, merger.density)
        return self._vector(_OuterMerge(operands, outer, thresholds), f"{outer.method} of bases")

    def _vector(self, fn: Producer, name: str) -> TaskVector:
        tv = TaskVector.from_producer(self.specs, fn, None, name)
        tv.expected_pretrained = self.manifest.pretrained.to_json()
        return tv

    # -- pretrained check --------------------------------------------------------------------------------
    def check_pretrained(self, pretrained: Checkpoint) -> None:
        """Cheap structural check (names, shapes, dtypes); the content checksum is verified while streaming."""
        check_pretrained_structure(self.manifest.pretrained.to_json(), pretrained, self.root)

    # -- add a task --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        first = self.fits[next(iter(self.fits))]
        return {
            "path": str(self.root), "method": self.method, "options": self.manifest.options,
            "M": self.M, "T": self.T, "layerwise": self.manifest.layerwise,
            "tasks": self.task_names, "bytes_on_disk": self.nbytes, "task_vectors_bytes": self.task_vectors_bytes,
            "compression": self.task_vectors_bytes / max(1, self.nbytes),
            "rel_errors": self.rel_errors,
            "errors_exact": {t.name: t.error_exact for t in self.manifest.tasks},
            "norms": {t.name: t.norm for t in self.manifest.tasks},
            "cosine": self.cosine.tolist(), "labels": first.labels,
            "loss": first.stats.get("loss"), "lower_bound": first.stats.get("lower_bound"),
            "stats": {g: {k: v for k, v in f.stats.items() if k not in ("loss_history", "laplacian_spectrum")}
                      for g, f in self.fits.items()} if len(self.fits) <= 4 else {},
            "pretrained": self.manifest.pretrained.to_json(),
        }


class _Combination(Producer):
    fresh = True

    def __init__(self, store: BasisStore, coefs: Mapping[str, np.ndarray], means: Mapping[str, float]) -> None:
        self.store, self.coefs, self.means = store, dict(coefs), dict(means)

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        g = self.store.group_of.get(name, ALL)
        S = self.store.bases_rows(name, rows)
        c = torch.as_tensor(self.coefs[g], dtype=torch.float32)
        out = torch.tensordot(c, S, dims=1)
        if self.means[g] != 0.0:
            mu = self.store.mean_rows(name, rows)
            assert mu is not None
            out.add_(mu, alpha=self.means[g])
        return out


class _SumOfBases(Producer):
    fresh = True

    def __init__(self, store: BasisStore) -> None:
        self.store = store

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        return self.store.bases_rows(name, rows).sum(0)


class _Operands:
    """Per tensor: the M bases (task-like stores) or the reconstructions of chosen tasks (T', *shape)."""

    def __init__(self, store: BasisStore, tasks: list[str] | None) -> None:
        self.store = store
        self.idx = None if tasks is None else [store.task_index(t) for t in tasks]
        self.count = store.M if tasks is None else len(tasks)

    def __call__(self, name: str) -> torch.Tensor:
        S = self.store.bases_rows(name)
        if self.idx is None:
            return S
        fit = self.store.fits[self.store.group_of.get(name, ALL)]
        Wf = torch.as_tensor(fit.W[:, self.idx].T, dtype=torch.float32)  # (T', M)
        out = torch.tensordot(Wf, S, dims=1)
        if fit.mean_coef is not None:
            mu = self.store.mean_rows(name)
            assert mu is not None
            out += torch.as_tensor(fit.mean_coef[self.idx], dtype=torch.float32).view(-1, *[1] * mu.dim()) * mu
        return out


class _OuterMerge(Producer):
    fresh = True

    def __init__(self, operands: _Operands, spec: MergeSpec, thresholds: torch.Tensor | None) -> None:
        self.operands, self.spec, self.thresholds = operands, spec, thresholds

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        x = self.operands(name)
        merged = get_merger(self.spec).merge(x, torch.ones(x.shape[0]), MergeContext(name=name, thresholds=self.thresholds))
        return merged if rows is None or not merged.dim() else merged[rows[0]:rows[1]]
