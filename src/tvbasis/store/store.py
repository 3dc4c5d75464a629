"""BasisStore: open a store (validated manifest, shards checked against it) and do arithmetic on it.

All operations — reconstruct one task, any linear combination (addition, negation, analogy), an outer merge of
the bases — are lazy ``TaskVector``s that read only the store, tensor by tensor; applying one to a model also
reads the pretrained checkpoint, whose structure and content are checked against the manifest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import addition_weights, cosine_from_gram, orthonormal_sum_coefficients
from tvbasis.errors import ConfigError, StoreError, UnknownTaskError
from tvbasis.io import Checkpoint
from tvbasis.io.checksum import check_pretrained_structure
from tvbasis.merge import MergeContext, MergeSpec, get_merger
from tvbasis.passes import WHOLE_VECTOR, operand_thresholds
from tvbasis.store.coded import CodedData
from tvbasis.store.decoded import plausibility_problems
from tvbasis.store.format import MANIFEST, MAX_MANIFEST_BYTES, Manifest, entry_key
from tvbasis.store.integrity import MissingFile, StoreData, open_in_store
from tvbasis.vectors import Producer, TaskVector

# --------------------------------------------------------------------------------------------------- store
#: attempts to open a store whose generation a concurrent writer switches meanwhile
OPEN_ATTEMPTS = 5


#: ``BasisStore.addition`` modes: the sum of the stored bases Σ_m s_m (the paper's addition), or the sum of the
#: tasks' reconstructions Σ_t v̂_t; ``"paper"`` is the first one's old name, still accepted (and the value the
#: ``addition`` option of pca and random stores records)
SUM_OF_BASES, RECONSTRUCTIONS = "sum-of-bases", "reconstructions"
ADDITION_ALIASES = {"paper": SUM_OF_BASES}
ADDITION_MODES = (SUM_OF_BASES, RECONSTRUCTIONS, *ADDITION_ALIASES)


def addition_mode(mode: str) -> str:
    """``mode`` under its explanatory name (``"paper"`` -> ``"sum-of-bases"``)."""
    return ADDITION_ALIASES.get(mode, mode)


class BasisStore:
    """A basis store on disk. Cheap to open (reads the manifest, checks each data file's size and header) and
    consistent: the data files are opened once, so a concurrent writer's new generation never mixes in."""

    def __init__(self, root: Path, manifest: Manifest, data: StoreData | None = None,
                 coded: CodedData | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.M: int = manifest.M
        self.method: str = manifest.method
        self.task_names: list[str] = manifest.task_names
        self.fits = manifest.groups
        self.group_of: dict[str, str] = manifest.group_of
        self.specs = {s.name: s for s in manifest.tensors}
        self.total_params = sum(s.numel for s in self.specs.values())
        if data is None:
            dfd = _open_dir(root)
            try:
                data, coded = _open_data(root, dfd, manifest)
            finally:
                os.close(dfd)
        self.data = data
        #: the coded files (residuals, TALL masks, coded bases); None for a store without them
        self.coded = coded

    # -- open --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> BasisStore:
        """Open and validate the store at ``path`` (manifest fields and digest, each data file's size and header).
        The manifest and the files are read through one descriptor of the directory, and a generation switched by
        a concurrent writer while opening is retried, so the store opened is one committed state."""
        root = Path(path)
        for attempt in range(OPEN_ATTEMPTS):
            dfd = _open_dir(root)
            try:
                raw = _read_manifest(root, dfd)
                manifest = Manifest.parse(raw, str(root / MANIFEST))
                try:
                    data, coded = _open_data(root, dfd, manifest)
                except MissingFile:
                    if attempt + 1 < OPEN_ATTEMPTS and _read_manifest(root, dfd) != raw:
                        continue  # a writer switched generations meanwhile: open the new one
                    raise
            finally:
                os.close(dfd)
            return cls(root, manifest, data, coded)
        raise StoreError(f"{root}: the store kept changing while being opened")  # pragma: no cover

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # a worker process (Ray) reopens the store and checks it is the same committed state
        return (_reopen, (str(self.root), self.manifest.manifest_sha256))

    def close(self) -> None:
        """Close the store's open data files (bases, means and coded entries); the store cannot be read after."""
        self.data.close()
        if self.coded is not None:
            self.coded.close()

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Number of tasks the store holds."""
        return len(self.task_names)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the store's own files (manifest and data files; foreign entries not counted)."""
        total = 0
        for name in [MANIFEST, *self.manifest.files.all()]:
            try:
                total += (self.root / name).stat().st_size
            except OSError:
                pass
        return total

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense bases and mean tensors (headers excluded)."""
        mf = self.manifest
        total = 0
        for part, files in (("bases", mf.files.bases), ("mean", mf.files.mean)):
            if files:
                total += sum(s.nbytes for s in mf.stacked_specs(part, list(self.specs)))
        return total

    @property
    def data_bytes(self) -> int:
        """Bytes of every stored tensor, dense and coded (headers and manifest excluded)."""
        return self.dense_bytes + (self.manifest.coded.nbytes() if self.manifest.coded is not None else 0)

    @property
    def task_vectors_bytes(self) -> int:
        """Bytes the T task vectors would take (in the stored dtype)."""
        per = sum(s.numel * getattr(torch, self.manifest.store_dtypes[n]).itemsize for n, s in self.specs.items())
        return per * self.T

    @property
    def gram(self) -> np.ndarray:
        """The T×T Gram matrix G = VᵀV of the task vectors (float64), as recorded at build time (rows of
        imported or estimated tasks come from their reconstructions: ``manifest.gram_estimated_rows``)."""
        return self.manifest.gram

    @property
    def cosine(self) -> np.ndarray:
        """The T×T cosine similarity matrix of the task vectors, from ``gram``."""
        return cosine_from_gram(self.gram)

    @property
    def labels(self) -> list[int] | None:
        """Cluster label of every task (cluster bases), else None."""
        return self.fits[next(iter(self.fits))].labels

    @property
    def rel_errors(self) -> dict[str, float]:
        """Task name → relative reconstruction error ‖v_t − ṽ_t‖ / ‖v_t‖ as recorded in the manifest (exact
        unless the task's ``error_exact`` is false; unknown for an imported basis without its fine-tunes:
        ``tvbasis.store.notes.unknown_errors``)."""
        return {t.name: t.rel_error for t in self.manifest.tasks}

    def task_index(self, task: str) -> int:
        """Position of ``task`` in the store's task order; UnknownTaskError naming the tasks if there is none."""
        try:
            return self.task_names.index(task)
        except ValueError:
            raise UnknownTaskError(f"{self.root}: no task named {task!r}; the store holds {self.task_names}") from None

    # -- reading bases -----------------------------------------------------------------------------------
    def bases_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """(M, *shape) float32 bases of one parameter (or rows [a, b) of each)."""
        spec = self.specs[name]
        fit = self.fits[self.group_of.get(name, WHOLE_VECTOR)]
        a, b = rows if rows is not None else (0, spec.shape[0] if spec.shape else 1)
        if fit.random_seed is not None:  # regenerated from the seed, as the build made them
            return fit.stored_rows(None, name, spec.shape, a, b, self.total_params)
        if self.M == 0:
            return torch.zeros((0, *((b - a,) if spec.shape else ()), *spec.shape[1:]))
        if self.manifest.bases_coded:
            assert self.coded is not None
            S = torch.stack([self.coded.decode(entry_key("bases", name, m)) for m in range(self.M)])
            return S[:, a:b] if rows is not None and spec.shape else S
        return self.data.read("bases", name, rows if spec.shape else None).to(torch.float32)

    def mean_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The stored mean μ of tensor ``name`` (PCA stores), or rows ``rows`` of it, in float32; None when the
        store (or this tensor's layer group) keeps no mean."""
        if self.manifest.bases_coded:
            if not self.fits[self.group_of.get(name, WHOLE_VECTOR)].has_mean:
                return None
            assert self.coded is not None
            mu = self.coded.decode(entry_key("mean", name))
            return mu[rows[0]:rows[1]] if rows is not None and mu.dim() else mu
        if not self.data.has("mean"):
            return None
        return self.data.read("mean", name, rows).to(torch.float32)

    def task_rows(self, task: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Task ``task``'s coded entry of one tensor (rows [a, b)): its decoded residual r̂_t (mode ``add``), its
        0/1 mask m_t (mode ``mask``) or U Σ_t Vᵀ over its cluster's shared bases (mode ``joint``); None when the
        store has no per-task entries."""
        if not self.manifest.has_residuals:
            return None
        assert self.coded is not None
        if self.joint:
            return self.coded.joint_sum(name, {task: 1.0}, rows if self.specs[name].shape else None)
        r = self.coded.decode(entry_key("residual", name, task))
        return r[rows[0]:rows[1]] if rows is not None and r.dim() else r

    @property
    def joint(self) -> bool:
        """True for a lora-joint store: task t is U_c Σ_t V_cᵀ per tensor, linear in its core Σ_t."""
        return self.manifest.coded is not None and self.manifest.coded.mode == "joint"

    @property
    def masks(self) -> bool:
        """True for a TALL store: task t is m_t ∘ s_0, not a linear reconstruction plus a residual."""
        return self.manifest.coded is not None and self.manifest.coded.mode == "mask"

    # -- integrity ---------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Re-read every data file (header, every chunk's digest, finite values, size, SHA-256) against the
        manifest, then decode every coded entry and compare the data with the manifest's recorded norms and errors
        (``store/decoded.py``); the problems found, one line each (empty: intact). A version-1 store has no digests
        to check (reported as a problem: ``tvbasis upgrade`` adds them)."""
        problems: list[str] = []
        for f in self.manifest.files.dense():
            problems.extend(self.data.verify_file(f))
        if self.coded is not None:
            for f in self.manifest.files.coded:
                problems.extend(self.coded.verify_file(f))
        if not problems:  # the bytes are those recorded (or, version 1, finite): are they what the manifest says?
            problems.extend(plausibility_problems(self.root, self.manifest, self.data, self.coded))
        if self.manifest.digests is None:
            problems.insert(0, f"{self.root}: store format version {self.manifest.format_version} records no "
                            "digests of its data, so corruption is only detected by the checks of its decoded "
                            "values against the manifest; run `tvbasis upgrade STORE`")
        return problems

    # -- arithmetic --------------------------------------------------------------------------------------
    def _alpha(self, alpha: Mapping[str, float]) -> np.ndarray:
        a = np.zeros(self.T)
        for task, c in alpha.items():
            i = self.task_index(task)
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                raise ConfigError(f"coefficient of task {task!r} must be a finite number, got {c!r}")
            a[i] += float(c)
        return a

    def _coefficients(self, a: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        coefs = {g: f.W @ a for g, f in self.fits.items()}
        means = {g: float(f.mean_coef @ a) if f.mean_coef is not None else 0.0 for g, f in self.fits.items()}
        return coefs, means

    def combine(self, alpha: Mapping[str, float], name: str | None = None) -> TaskVector:
        """Σ_t α_t·v̂_t = S·(W·α) (+ μ·Σ mean_coef·α): addition, negation, analogy in one pass."""
        if not alpha:
            raise ConfigError("combine needs at least one task coefficient")
        a = self._alpha(alpha)
        coefs, means = self._coefficients(a)
        label = name or " + ".join(f"{c:g}*{t}" for t, c in alpha.items())
        per_task = {self.task_names[i]: float(a[i]) for i in np.flatnonzero(a)} if self.manifest.has_residuals else {}
        return self._vector(_Combination(self, coefs, means, per_task), label)

    def reconstruct(self, task: str) -> TaskVector:
        """v̂_t from the store alone (plus its residual r̂_t, or TALL's m_t ∘ s_0, where the store keeps them)."""
        self.task_index(task)
        return self.combine({task: 1.0}, name=f"reconstructed {task}")

    def default_addition_mode(self) -> str:
        """The plain addition's mode when none is given: ``"reconstructions"`` for stores with residuals (TALL
        aside) or no bases, ``"sum-of-bases"`` for task-like bases, else the store's ``addition`` option (default
        reconstructions; its ``"paper"`` is the sum of bases)."""
        residual_store = self.manifest.has_residuals and not self.masks
        if residual_store or self.M == 0:
            return RECONSTRUCTIONS
        if self.manifest.task_like:
            return SUM_OF_BASES
        return addition_mode(str(self.manifest.options.get("addition", RECONSTRUCTIONS)))

    def addition(self, outer: MergeSpec | None = None, tasks: Sequence[str] | None = None,
                 mode: str | None = None) -> TaskVector:
        """The multi-task vector. Without ``outer``, by ``mode``: ``"sum-of-bases"`` (alias ``"paper"``, the
        paper's addition) sums the bases Σ_m s_m (a random store's directions orthonormalised first unless built
        with orthonormal=false); ``"reconstructions"`` sums the reconstructions Σ_t v̂_t of ``tasks``; None: the
        store's default — the sum of bases for task-like bases, and the ``addition`` option the store was built
        with for PCA and random (default reconstructions). The sum of bases covers all tasks: for a subset the
        default falls back to the reconstructions. With ``outer``: that merge method over the bases (task-like) or
        over the reconstructions of ``tasks`` (``mode`` does not apply)."""
        selected = list(tasks) if tasks else list(self.task_names)
        for t in selected:
            self.task_index(t)
        whole = set(selected) == set(self.task_names)
        task_like = self.manifest.task_like
        if mode not in (None, *ADDITION_MODES):
            raise ConfigError(f"addition mode must be 'sum-of-bases' ('paper') or 'reconstructions', got {mode!r}")
        given = None if mode is None else addition_mode(mode)
        if outer is None:
            opts = self.manifest.options
            if self.M == 0 and given == SUM_OF_BASES:
                raise ConfigError(f"{self.root}: has no bases (M = 0), so the paper's sum of bases is empty; use "
                                  "mode='reconstructions'")
            chosen = given or self.default_addition_mode()
            if chosen == SUM_OF_BASES and not whole:
                if given == SUM_OF_BASES:
                    raise ConfigError("the paper's addition sums all the bases, so it covers every task; for "
                                      "a subset of tasks use mode='reconstructions'")
                chosen = RECONSTRUCTIONS
            if chosen == RECONSTRUCTIONS:
                return self.combine({t: 1.0 for t in selected}, name="sum of reconstructions")
            if any(f.random_seed is not None for f in self.fits.values()):
                ortho = bool(opts.get("orthonormal", True))
                coefs = {g: orthonormal_sum_coefficients(self.manifest.cross[g].K[:f.M, :f.M]) if ortho
                         else np.ones(f.M) for g, f in self.fits.items()}
                return self._vector(_Combination(self, coefs, dict.fromkeys(self.fits, 0.0)),
                                    "sum of orthonormalised random bases" if ortho else "sum of random bases")
            return self._vector(_SumOfBases(self), "sum of bases")
        if mode is not None:
            raise ConfigError("addition: mode applies to the plain sum; an outer merge runs over the bases of "
                              "task-like stores and over the reconstructions otherwise")
        merger = get_merger(outer)
        if merger.needs_fisher:
            raise ConfigError("fisher cannot be an outer merge of a store (no Fisher weights for bases)")
        # a store with residuals holds every task: the outer merge runs over the tasks ṽ_t themselves
        over_bases = task_like and whole and not (self.manifest.has_residuals and not self.masks)
        operands = _Operands(self, None if over_bases else selected)
        thresholds = None
        if merger.needs_global_thresholds:
            assert merger.density is not None
            thresholds = operand_thresholds(operands, list(self.specs), operands.count, merger.density)
        return self._vector(_OuterMerge(operands, outer, thresholds), f"{outer.method} of bases")

    # -- in memory ---------------------------------------------------------------------------------------
    def apply_into(self, model: torch.nn.Module, alpha: str | Mapping[str, float], scale: float = 1.0, *,
                   check: bool = False) -> list[str]:
        """Add scale·Σ_t α_t ṽ_t into a loaded model's tensors in place, tensor by tensor (``store/apply.py``)."""
        from tvbasis.store.apply import apply_into

        return apply_into(self, model, alpha, scale, check=check)

    def swapped(self, model: torch.nn.Module, alpha: str | Mapping[str, float], scale: float = 1.0, *,
                restore: str = "copy", check: bool = False) -> AbstractContextManager[torch.nn.Module]:
        """``with store.swapped(model, "a"): ...``: task a applied inside the block, θ₀ restored after it
        (``restore="copy"``: exact; ``"subtract"``: float32 tensors re-subtracted; ``store/apply.py``)."""
        from tvbasis.store.apply import swapped

        return swapped(self, model, alpha, scale, restore=restore, check=check)

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
        """A JSON-ready description of the store: method, M, T, sizes and compression, per-task norms and relative
        errors (and whether exact), the cosine matrix, cluster labels, addition weights, the basis loss and its
        Eckart–Young bound, the pretrained model's reference and the coded parts (what ``tvbasis inspect --json``
        prints, with the CLI's additions)."""
        first = self.fits[next(iter(self.fits))]
        # r_t = Σ_m B[t, m], v_t's weight in the paper's sum Σ_m s_m (bases linear in V only; layer-wise: the
        # ‖v_t‖²-weighted mean over groups, and the range)
        weights = addition_weights(self.fits, self.manifest.group_grams)
        return {
            "path": str(self.root), "method": self.method, "options": self.manifest.options,
            "M": self.M, "T": self.T, "layerwise": self.manifest.layerwise,
            "tasks": self.task_names, "bytes_on_disk": self.nbytes, "task_vectors_bytes": self.task_vectors_bytes,
            "compression": self.task_vectors_bytes / max(1, self.nbytes),
            "rel_errors": self.rel_errors,
            "errors_exact": {t.name: t.error_exact for t in self.manifest.tasks},
            "norms": {t.name: t.norm for t in self.manifest.tasks},
            "cosine": self.cosine.tolist(),
            "labels": [t.cluster for t in self.manifest.tasks] if self.joint else first.labels,
            "addition_weights": None if weights is None else dict(zip(self.task_names, weights[0].tolist())),
            "addition_weights_range": (None if weights is None or len(self.fits) == 1 else
                                       dict(zip(self.task_names, weights[1].tolist()))),
            "loss": first.stats.get("loss"), "lower_bound": first.stats.get("lower_bound"),
            "stats": {g: {k: v for k, v in f.stats.items() if k not in ("loss_history", "laplacian_spectrum")}
                      for g, f in self.fits.items()} if len(self.fits) <= 4 else {},
            "pretrained": self.manifest.pretrained.to_json(),
            "coded": self._coded_summary(),
        }

    def _coded_summary(self) -> dict[str, Any] | None:
        c = self.manifest.coded
        if c is None:
            return None
        return {"mode": c.mode, "bases_codec": c.bases_codec, "residual_codec": c.residual_codec,
                "bases_bytes": c.nbytes("bases/") + c.nbytes("mean/") + c.nbytes("shared/"),
                "per_task_bytes": c.nbytes("residual/"),
                "per_task_bytes_by_task": {t: c.entry_nbytes([entry_key("residual", p, t) for p in self.specs])
                                           for t in self.task_names} if c.residual_codec else {}}


class _Combination(Producer):
    """Σ_t α_t·ṽ_t of one tensor: S·(W·α) (+ μ·Σ mean_coef·α), plus Σ_t α_t·r̂_t where the store keeps residuals;
    TALL: s_0 ∘ Σ_t α_t·m_t."""

    fresh = True

    def __init__(self, store: BasisStore, coefs: Mapping[str, np.ndarray], means: Mapping[str, float],
                 per_task: Mapping[str, float] | None = None) -> None:
        self.store, self.coefs, self.means = store, dict(coefs), dict(means)
        self.per_task = dict(per_task or {})
        self.inputs = (store.root,)

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        g = self.store.group_of.get(name, WHOLE_VECTOR)
        S = self.store.bases_rows(name, rows)
        c = torch.as_tensor(self.coefs[g], dtype=torch.float32)
        out = torch.tensordot(c, S, dims=1)
        if self.means[g] != 0.0:
            mu = self.store.mean_rows(name, rows)
            assert mu is not None
            out.add_(mu, alpha=self.means[g])
        return add_task_terms(self.store, out, S, name, rows, self.per_task)


def add_task_terms(store: BasisStore, out: torch.Tensor, S: torch.Tensor, name: str, rows: tuple[int, int] | None,
                   per_task: Mapping[str, float]) -> torch.Tensor:
    """``out`` plus the per-task coded terms with coefficients ``per_task``: Σ α_t·r̂_t, s_0 ∘ Σ α_t·m_t, or (joint)
    per tensor and cluster U (Σ α_t Σ_t) Vᵀ — linear in the cores, one product whatever the number of tasks."""
    if not per_task:
        return out
    if store.joint:
        assert store.coded is not None
        return out.add_(store.coded.joint_sum(name, per_task, rows if store.specs[name].shape else None))
    if store.masks:
        weight = torch.zeros_like(out)
        for t, a in per_task.items():
            m = store.task_rows(t, name, rows)
            assert m is not None
            weight.add_(m, alpha=a)
        return out.add_(S[0] * weight)
    for t, a in per_task.items():
        r = store.task_rows(t, name, rows)
        assert r is not None
        out.add_(r, alpha=a)
    return out


class _SumOfBases(Producer):
    fresh = True

    def __init__(self, store: BasisStore) -> None:
        self.store = store
        self.inputs = (store.root,)

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
        fit = self.store.fits[self.store.group_of.get(name, WHOLE_VECTOR)]
        Wf = torch.as_tensor(fit.W[:, self.idx].T, dtype=torch.float32)  # (T', M)
        out = torch.tensordot(Wf, S, dims=1)
        if fit.mean_coef is not None:
            mu = self.store.mean_rows(name)
            assert mu is not None
            out += torch.as_tensor(fit.mean_coef[self.idx], dtype=torch.float32).view(-1, *[1] * mu.dim()) * mu
        if self.store.manifest.has_residuals:
            for j, i in enumerate(self.idx):
                out[j] = add_task_terms(self.store, out[j], S, name, None, {self.store.task_names[i]: 1.0})
        return out


class _OuterMerge(Producer):
    fresh = True

    def __init__(self, operands: _Operands, spec: MergeSpec, thresholds: torch.Tensor | None) -> None:
        self.operands, self.spec, self.thresholds = operands, spec, thresholds
        self.inputs = (operands.store.root,)

    def __call__(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        x = self.operands(name)
        merged = get_merger(self.spec).merge(x, torch.ones(x.shape[0]), MergeContext(name=name, thresholds=self.thresholds))
        return merged if rows is None or not merged.dim() else merged[rows[0]:rows[1]]


# --------------------------------------------------------------------------------------------------- helpers
def _open_dir(root: Path) -> int:
    if not root.exists():
        raise StoreError(f"{root}: no such store")
    if not root.is_dir():
        raise StoreError(f"{root}: not a tvbasis store (not a directory)")
    try:
        return os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise StoreError(f"{root}: cannot open the store directory ({e.strerror})") from None


def _read_manifest(root: Path, dfd: int) -> bytes:
    """The manifest's bytes, read through the directory descriptor (no symlink out of the store followed)."""
    fd = open_in_store(root, dfd, MANIFEST, f"{root}: manifest",
                       StoreError(f"{root}: not a tvbasis store (no {MANIFEST})"), f"{root / MANIFEST}: unreadable manifest")
    try:
        chunks = []
        total = 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > MAX_MANIFEST_BYTES:
                raise StoreError(f"{root / MANIFEST}: manifest exceeds {MAX_MANIFEST_BYTES} bytes")
        return b"".join(chunks)
    except IsADirectoryError:
        raise StoreError(f"{root / MANIFEST}: is not a file") from None
    finally:
        os.close(fd)


def _open_data(root: Path, dfd: int, manifest: Manifest) -> tuple[StoreData, CodedData | None]:
    data = StoreData(root, dfd, manifest)
    try:
        coded = CodedData(root, dfd, manifest) if manifest.coded is not None else None
    except BaseException:
        data.close()
        raise
    return data, coded


def _reopen(root: str, manifest_sha256: str) -> BasisStore:
    store = BasisStore.open(root)
    if store.manifest.manifest_sha256 != manifest_sha256:
        raise StoreError(f"{root}: the store changed while it was being read (another process wrote a new "
                         "generation); run the command again")
    return store
