"""The materialisation pass of a store with coded parts: per tensor, the stored vectors U (dense, or through the
bases coder), the cross-Grams C = U·Vᵀ and K = U·Uᵀ of exactly what a reader rebuilds, and per task its coded
entry — the residual r_t = v_t − v̂_t through the residual coder (mode ``add``), or TALL's mask
m_t = 1[|v_t| ≥ λ_t·|s_0 − v_t|] (mode ``mask``) — with every task's exact squared reconstruction error
‖v_t − ṽ_t‖² (ṽ_t = v̂_t + r̂_t, or m_t ∘ s_0).

Codecs such as low rank need a whole tensor, so work items are whole tensors. The T task-vector slices of one
tensor are read once, in row chunks, into a (T, *shape) buffer — in memory up to ``SCRATCH_BYTES``, else a
memory-mapped scratch file in the build's staging directory (the page cache holds what fits: memory stays flat in
T) — and each task is then coded from its own slice. The inputs are still read once in this pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.bases import BasisFit
from tvbasis.codecs import Encoded, Mask, decode
from tvbasis.codecs.base import sq_dist64
from tvbasis.compress import Coder, tall_mask
from tvbasis.io import check_finite, row_chunks
from tvbasis.io.atomic import temp_path
from tvbasis.io.writer import PositionalShard
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store.format import entry_key
from tvbasis.taskset import TaskSet

#: a (T, *shape) buffer above this many bytes goes to a memory-mapped scratch file
SCRATCH_BYTES = 256 * 2**20
#: per item: (group, C, K, squared errors (T,), (tensor name, {entry key: Encoded or None}))
CodedMeasured = tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple[str, dict[str, Encoded | None]]]


#: elements per float64 chunk of the products below (bounds their temporaries, whatever the tensor's size)
PRODUCT_CHUNK = 1 << 20


def _gram64(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """A·Bᵀ of (p, n) and (q, n) float32 matrices, accumulated in float64 over column chunks (each chunk of A is
    converted once; ``B is A`` converts it once for both sides). B's chunks move to A's device one at a time."""
    out = torch.zeros((A.shape[0], B.shape[0]), dtype=torch.float64, device=A.device)
    step = max(1, PRODUCT_CHUNK // max(1, A.shape[0] + B.shape[0]))  # bounds the float64 temporaries
    for s in range(0, A.shape[1], step):
        a = A[:, s:s + step].double()
        b = a if B is A else B[:, s:s + step].to(A.device).double()
        out += a @ b.T
    return out.cpu().numpy()


def stacked_deltas(taskset: TaskSet, name: str, chunk_elements: int, stage: Path,
                   pretrained_rows_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, Path | None]:
    """The T task-vector slices of tensor ``name`` as one (T, *shape) float32 tensor, read once in row chunks:
    in memory up to ``SCRATCH_BYTES``, else memory-mapped on a scratch file in ``stage`` (returned, for the
    caller to unlink). ``pretrained_rows_sq`` (float64, one entry per row, or one for a scalar): also filled with
    the sum of squares of each row of the pretrained tensor the slices were taken against, from the same reads
    (what the budget's relative loss needs of it, without a float32 copy of the tensor)."""
    spec = taskset.specs[name]
    T = taskset.T
    scratch = None
    if T * spec.numel * 4 > SCRATCH_BYTES:
        scratch = temp_path(stage / "scratch")
        X = torch.from_numpy(np.memmap(scratch, dtype=np.float32, mode="w+", shape=(T, *spec.shape)))
    else:
        X = torch.empty((T, *spec.shape), dtype=torch.float32)
    if not spec.shape:
        d, pre = taskset.deltas_and_pretrained(name, None)
        X.copy_(d)
        if pretrained_rows_sq is not None:
            pretrained_rows_sq.fill_(float(pre.double() ** 2))
        return X, scratch
    for a, b in row_chunks(spec, chunk_elements):
        d, pre = taskset.deltas_and_pretrained(name, (a, b))
        X[:, a:b] = d
        if pretrained_rows_sq is not None:
            p = pre.reshape(b - a, -1).double()
            pretrained_rows_sq[a:b] = (p * p).sum(dim=1)
    return X, scratch


class ResidualMaterialiseTask:
    """Work unit (one whole tensor) of the materialisation pass of a store with coded parts."""

    def __init__(self, taskset: TaskSet, fits: Mapping[str, BasisFit], group_of: Mapping[str, str],
                 dtype_of: Mapping[str, torch.dtype], bases: Mapping[str, PositionalShard],
                 means: Mapping[str, PositionalShard], device: str, total_params: int, stage: Path,
                 bases_coder: Coder | None, residual_coder: Coder | None, mask_lambdas: list[float] | None,
                 chunk_elements: int, label: str = "store", sink: Any = None) -> None:
        self.taskset, self.fits, self.group_of, self.dtype_of = taskset, dict(fits), dict(group_of), dict(dtype_of)
        self.bases, self.means, self.device, self.total_params = dict(bases), dict(means), device, total_params
        self.stage = stage
        self.bases_coder, self.residual_coder, self.mask_lambdas = bases_coder, residual_coder, mask_lambdas
        self.chunk_elements = chunk_elements
        self.label = label
        #: where entries go as soon as they are coded (a ``CodedWriter`` when the work runs in this process, so
        #: a tensor's T coded residuals are never held together); None: returned with the item (Ray workers)
        self.sink = sink

    # ------------------------------------------------------------------------------------------------ the item
    def __call__(self, item: tuple[str, int, int]) -> CodedMeasured:
        name = item[0]
        X, scratch = stacked_deltas(self.taskset, name, self.chunk_elements, self.stage)
        try:
            return self._measure(name, X)
        finally:
            del X
            if scratch is not None:
                os.unlink(scratch)

    def _measure(self, name: str, X: torch.Tensor) -> CodedMeasured:
        spec = self.taskset.specs[name]
        group = self.group_of.get(name, WHOLE_VECTOR)
        fit = self.fits[group]
        T, nU = self.taskset.T, fit.n_stored
        entries: dict[str, Encoded | None] = {}
        flatX = X.reshape(T, -1)
        if nU:
            U = fit.stored_rows(X, name, spec.shape, 0, spec.shape[0] if spec.shape else 1, self.total_params)
            U = self._store(name, fit, U, entries)
        else:
            U = torch.zeros((0, *spec.shape))
        flatU = U.reshape(nU, spec.numel).to(self.device)
        K = _gram64(flatU, flatU)
        # the cross-Grams of every task at once: each chunk of U converted to float64 once, not once per task
        C = _gram64(flatU, flatX)
        err2 = np.zeros(T)
        coef = torch.as_tensor(fit.coef_matrix(), dtype=torch.float32, device=self.device)  # (nU, T)
        names = self.taskset.names
        for t in range(T):
            x = flatX[t].to(self.device)
            # M = 0: no zero reconstruction, residual copy or sum is formed (each would be a whole float32 slice:
            # 0.5 GB apiece for a 32 000 × 4096 embedding); the coder reads x itself and does not change it
            vhat = coef[:, t] @ flatU if nU else None
            key = entry_key("residual", name, names[t])
            if self.mask_lambdas is not None:  # TALL: m_t over the one stored vector s_0
                s0 = flatU[0]
                m = tall_mask(x, s0, self.mask_lambdas[t])
                self._emit(entries, key, Mask().encode(m.to(torch.float32).reshape(spec.shape)), spec.shape)
                approx = torch.where(m, s0, torch.zeros((), device=s0.device))
            elif self.residual_coder is not None:
                r = (x if vhat is None else x - vhat).reshape(spec.shape).cpu()
                enc = self.residual_coder.encode(name, r, task=names[t])
                del r
                self._emit(entries, key, enc, spec.shape)
                if enc is None:
                    approx = vhat if vhat is not None else torch.zeros_like(x)
                else:
                    dec = decode(enc).reshape(-1).to(self.device)
                    approx = dec if vhat is None else vhat.add_(dec)  # vhat is this loop's own; dec is not changed
                    del dec
                del enc
            else:
                approx = vhat if vhat is not None else torch.zeros_like(x)
            err2[t] = sq_dist64(x, approx)
            del approx, vhat
        return group, C, K, err2, (name, entries)

    def _emit(self, entries: dict[str, Encoded | None], key: str, enc: Encoded | None,
              shape: tuple[int, ...]) -> None:
        if self.sink is not None:
            self.sink.add(key, enc, shape)
        else:
            entries[key] = enc

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sink"] = None  # a worker in another process returns its entries instead
        return state

    def _store(self, name: str, fit: BasisFit, U: torch.Tensor, entries: dict[str, Encoded | None]) -> torch.Tensor:
        """Write the stored vectors (dense shards or coded entries); return exactly what a reader rebuilds."""
        spec = self.taskset.specs[name]
        if self.bases_coder is not None:
            out = torch.empty_like(U)
            for i in range(U.shape[0]):
                key = entry_key("bases", name, i) if i < fit.M else entry_key("mean", name)
                enc = self.bases_coder.encode(name, U[i])
                out[i] = decode(enc) if enc is not None else 0.0
                self._emit(entries, key, enc, spec.shape)
            return out
        dtype = self.dtype_of[name]
        stored = U.to(dtype)
        check_finite(stored, f"{self.label} (bases)", name)
        if fit.M:
            for m in range(fit.M):
                self.bases[name].write_elements(name, m * spec.numel, stored[m].cpu(), dtype)
        if fit.has_mean:
            self.means[name].write_elements(name, 0, stored[fit.M].cpu(), dtype)
        return stored.to(torch.float32)
