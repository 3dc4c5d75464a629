"""The materialisation pass of a build: per work item (one tensor, or a row chunk of a big one) form the stored
vectors U (the M bases, then μ for PCA), write them into the preallocated shards, and return the float64
cross-Grams C = U·Vᵀ and K = U·Uᵀ of exactly what was stored (after rounding to the stored dtype). From those the
least-squares coefficients and every task's exact reconstruction error follow without another pass. Every
row is checked finite once rounded to the stored dtype (a float16 store overflows past 65504) before it is
written: a NaN/Inf never reaches a shard.

How each stored row is made is the fit's business (``BasisFit.stored_rows``); bases made by a non-linear inner
merge (TIES, top-k, DARE, Fisher, consensus per cluster) are merged by the merge pass's ``merge_tensor`` one row
chunk at a time (a per-tensor trim's cuts found once per basis), then written and measured chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from tvbasis.bases import BasisFit
from tvbasis.io import Checkpoint, check_finite, row_chunks
from tvbasis.io.writer import PositionalShard
from tvbasis.merge import get_merger
from tvbasis.passes.gram import cross_of, gram_of, row_sq_norms
from tvbasis.passes.merge import fisher_rows, merge_tensor
from tvbasis.taskset import Item, TaskSet

#: the one layer group of a store that is not layer-wise: every tensor, fitted on the whole task vector
#: (a layer-wise store names its groups after layers, ``taskset.layer_group``)
WHOLE_VECTOR = "*"
#: per-task elements of one row chunk when non-linear bases are written and measured
MERGE_ROWS_ELEMENTS = 2 * 2**20

#: per item: (group, C (n_stored, T), K (n_stored, n_stored), direct squared residual norms (T,) or empty)
Measured = tuple[str, np.ndarray, np.ndarray, np.ndarray]


class MaterialiseTask:
    """Work unit of the materialisation pass (picklable: runs on threads or Ray workers)."""

    def __init__(self, taskset: TaskSet, fits: Mapping[str, BasisFit], group_of: Mapping[str, str],
                 dtype_of: Mapping[str, torch.dtype], bases: Mapping[str, PositionalShard],
                 means: Mapping[str, PositionalShard], device: str, total_params: int,
                 thresholds: Mapping[str, torch.Tensor] | None = None,
                 fisher: list[Checkpoint] | None = None, label: str = "store") -> None:
        self.taskset, self.fits, self.group_of, self.dtype_of = taskset, dict(fits), dict(group_of), dict(dtype_of)
        self.bases, self.means, self.device, self.total_params = dict(bases), dict(means), device, total_params
        self.thresholds = dict(thresholds or {})
        self.fisher = fisher
        #: how errors name the output (the final store path, not the temporary being written)
        self.label = label

    def __call__(self, item: Item) -> Measured:
        name, a, b = item
        fit = self.fits[self.group_of.get(name, WHOLE_VECTOR)]
        if fit.is_merged:
            return self._merged(name, fit)
        spec = self.taskset.specs[name]
        x = self.taskset.deltas(name, (a, b) if spec.shape else None).to(self.device)
        s = fit.stored_rows(x, name, spec.shape, a, b, self.total_params)
        return self._store_and_measure(name, fit, a, s, x)

    def _store_and_measure(self, name: str, fit: BasisFit, a: int, s: torch.Tensor, x: torch.Tensor) -> Measured:
        """Write rows starting at ``a`` of s: the M bases (M, rows, ...), then μ as row M when the fit has a mean
        (PCA); return C, K and direct errors. Consumes x (the residuals are formed in place)."""
        spec = self.taskset.specs[name]
        group = self.group_of.get(name, WHOLE_VECTOR)
        dtype = self.dtype_of[name]
        stored = s.to(dtype)
        check_finite(stored, f"{self.label} ({'bases' if fit.stores_bases else 'random bases'})", name)
        u = stored.to(torch.float32)  # exactly what is stored
        row_elems = spec.numel // spec.shape[0] if spec.shape else 1
        start = a * row_elems if spec.shape else 0
        if fit.stores_bases:
            shard = self.bases[name]
            for m in range(fit.M):
                shard.write_elements(name, m * spec.numel + start, u[m].cpu(), dtype)
        if fit.has_mean:
            self.means[name].write_elements(name, start, u[fit.M].cpu(), dtype)
        C = cross_of(u, x).cpu().numpy()
        K = gram_of(u).cpu().numpy()
        err2 = np.zeros(0)
        if fit.residuals_known_in_pass:
            # residuals measured directly: exact even when they are tiny (the formula from G, C, K cancels)
            coef = torch.as_tensor(fit.coef_matrix().T, dtype=torch.float32, device=u.device)  # (T, n_stored)
            r = x.reshape(x.shape[0], -1).addmm_(coef, u.reshape(u.shape[0], -1), alpha=-1)  # x is not used again
            err2 = row_sq_norms(r).cpu().numpy()
        return group, C, K, err2

    def _merged(self, name: str, fit: BasisFit) -> Measured:
        assert fit.labels is not None and fit.inner is not None
        spec = self.taskset.specs[name]
        rows_of = (lambda a, b: (a, b)) if spec.shape else (lambda a, b: None)
        th = self.thresholds.get(self.group_of.get(name, WHOLE_VECTOR))
        labels = np.asarray(fit.labels)
        readers = []
        for m in range(fit.M):
            idx = np.flatnonzero(labels == m).tolist()

            def read(a: int, b: int, idx: list[int] = idx) -> torch.Tensor:
                return self.taskset.deltas(name, rows_of(a, b), tasks=idx)
            fisher_read = None
            if self.fisher is not None:
                members = [self.fisher[i] for i in idx]

                def fisher_read(a: int, b: int, members: list[Checkpoint] = members) -> torch.Tensor:
                    return fisher_rows(members, spec, a, b)
            readers.append((idx, read, fisher_read))
        cuts: list[dict[str, torch.Tensor]] = [{} for _ in range(fit.M)]  # per basis, found on its first chunk
        whole: dict[int, torch.Tensor] = {}  # bases of inner merges that need the whole tensor, merged once

        def basis_rows(m: int, rows: tuple[int, int] | None) -> torch.Tensor:
            idx, read, fisher_read = readers[m]
            merge_it = lambda r: merge_tensor(  # noqa: E731
                fit.inner_for(m), read, spec, len(idx), torch.ones(len(idx)), None if th is None else th[idx],
                fisher_read, self.device, MERGE_ROWS_ELEMENTS, rows=r, cuts=cuts[m])
            if not get_merger(fit.inner_for(m)).whole_tensor:
                return merge_it(rows)
            if m not in whole:
                whole[m] = merge_it(None)
            return whole[m] if rows is None else whole[m][rows[0]:rows[1]]
        C, K = np.zeros((fit.M, self.taskset.T)), np.zeros((fit.M, fit.M))
        for a, b in row_chunks(spec, MERGE_ROWS_ELEMENTS):
            # each basis merged for these rows only: memory is one chunk of the M bases, not M whole tensors
            s = torch.stack([basis_rows(m, rows_of(a, b)) for m in range(fit.M)]).to(self.device)
            x = self.taskset.deltas(name, rows_of(a, b)).to(self.device)
            _, c, k, _ = self._store_and_measure(name, fit, a, s, x)
            C += c
            K += k
        return self.group_of.get(name, WHOLE_VECTOR), C, K, np.zeros(0)
