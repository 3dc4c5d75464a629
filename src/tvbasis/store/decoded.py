"""Coded data checked like dense data: every entry decodes (shape, finite values), and what decodes agrees with the
numbers the manifest records.

Digests catch flipped bits, but a manifest re-signed by hand (or a writer's bug) can describe data that digests
correctly and still is not what the store was built from: scales, indices or coefficients changed consistently.
Two exact identities of a store tie its data to its recorded numbers, and both are checked here:

- **Stored vectors.** The cross-Gram ``K = U·Uᵀ`` was accumulated (float64) from exactly the vectors a reader
  rebuilds, so ‖U_m‖² summed over a group's tensors must equal ``K_mm``. Tolerance: 1e-4 relative (the float64 sum
  of the same float32 values in another order differs by ~1e-12; a bf16/fp16 store's values are the ones K saw).
- **Per-task residuals.** With ``r_t = v_t − U·c_t`` (its norm ‖r_t‖² = G_tt − 2c_tᵀC_t + c_tᵀKc_t is exact from
  the manifest) and the decoded residual ``r̂_t``, the recorded error is ‖v_t − (U·c_t + r̂_t)‖ = ‖r_t − r̂_t‖,
  so the triangle inequality gives |‖r̂_t‖ − ‖r_t‖| ≤ e_t exactly. Tolerance: e_t + 1e-3·‖v_t‖ + 1e-3·‖r_t‖
  (float32 decoding and the cancellation in G_tt − 2cᵀC + cᵀKc); a tampering that moves a task's residual
  norm by less than that is not seen.

A TALL store's masks (mode ``mask``) select from the stored vector rather than add to it: only their decoding is
checked. A task whose error is not exact (``error_exact`` false) gets its residual decoded, not compared.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from tvbasis.errors import StoreError, TvbasisError
from tvbasis.io import row_chunks
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store.coded import CodedData
from tvbasis.store.format import Manifest, entry_key
from tvbasis.store.integrity import StoreData

#: relative tolerance of ‖U_m‖² against K_mm
STORED_RTOL = 1e-4
#: slack of the residual triangle inequality, relative to ‖v_t‖ and to ‖r_t‖
RESIDUAL_RTOL = 1e-3


#: elements per basis of one row chunk when the stored bases' norms are checked
NORM_ROWS_ELEMENTS = 1 << 22


def _sq(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64)) ** 2


def entry_sq_norm(coded: CodedData, key: str) -> float:
    """‖decoded entry‖² (float64). A low-rank entry is decoded to its factors P, Q (their own codec chain decoded
    and checked finite) and ‖P·Q‖² = Σ (PᵀP) ∘ (Q·Qᵀ) formed from them, without expanding P·Q (a low-rank
    residual store would otherwise cost a dense product per entry); any other entry is decoded whole."""
    try:
        if not key.startswith("shared/") and coded.codec_of(key).startswith("lowrank"):
            f = coded.factors(key)
            if f is not None:
                P, Q = f[0].double(), f[1].double()
                return float(((P.T @ P) * (Q @ Q.T)).sum())
    except TvbasisError:
        raise
    except Exception as e:
        raise coded_error(coded.root, key, e) from None
    return _sq(decode_entry(coded, key))


def decode_entry(coded: CodedData, key: str) -> torch.Tensor:
    """Entry ``key`` decoded (a shared entry of a joint store: its U and V stacked as one flat vector); StoreError
    for anything that does not decode to finite values of its shape, whatever the codec raised."""
    try:
        if key.startswith("shared/"):
            _, cl, param = key.split("/", 2)
            u, v = coded.shared(param, int(cl))
            return torch.cat([u.reshape(-1), v.reshape(-1)])
        return coded.decode(key)
    except TvbasisError:
        raise
    except Exception as e:  # a codec fed consistent-looking nonsense: one line, never an internal error
        raise coded_error(coded.root, key, e) from None


def coded_error(root: Path, key: str, e: BaseException) -> TvbasisError:
    return StoreError(f"{root}: coded entry {key[:120]!r} cannot be decoded ({type(e).__name__}: {str(e)[:160]})")


def decode_problems(root: Path, coded: CodedData, keys: Iterable[str]) -> tuple[list[str], dict[str, float]]:
    """Decode every entry of ``keys``: the problems (one line each) and the squared norm of each entry that
    decoded."""
    problems: list[str] = []
    norms: dict[str, float] = {}
    for key in keys:
        try:
            norms[key] = entry_sq_norm(coded, key)
        except TvbasisError as e:
            problems.append(str(e))
    return problems, norms


def plausibility_problems(root: Path, mf: Manifest, data: StoreData, coded: CodedData | None,
                          keys: Iterable[str] | None = None, dense: bool = True) -> list[str]:
    """Decode the coded entries (``keys``, default all) and compare the store's data with the manifest's numbers
    (module docstring). Problems as lines; empty when the data is what the manifest says. With ``keys`` given only
    those entries are decoded and the task-level comparisons cover the tasks all of whose entries are among them;
    ``dense``: read the dense bases and mean too, to compare their norms."""
    problems: list[str] = []
    norms: dict[str, float] = {}
    section = mf.coded
    if coded is not None and section is not None:
        chosen = list(section.entries) if keys is None else [k for k in keys if k in section.entries]
        problems, norms = decode_problems(root, coded, chosen)  # ("empty" entries with tensors: format.py)
    if problems:
        return problems
    try:
        problems += _stored_norms(root, mf, data, norms, dense)
        problems += _residual_norms(root, mf, norms)
    except TvbasisError as e:
        problems.append(str(e))
    return problems


def _groups(mf: Manifest) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {g: [] for g in mf.groups}
    for s in mf.tensors:
        out[mf.group_of.get(s.name, WHOLE_VECTOR)].append(s.name)
    return out


def _stored_norms(root: Path, mf: Manifest, data: StoreData, norms: dict[str, float], dense: bool) -> list[str]:
    """‖U_m‖² per group from the dense files (when ``dense``) or the decoded coded bases, against K_mm."""
    first = next(iter(mf.groups.values()))
    nU = first.n_stored
    if nU == 0 or first.random_seed is not None:
        return []
    coded_bases = mf.bases_coded
    if not coded_bases and not (dense and (data.has("bases") or data.has("mean"))):
        return []
    problems = []
    specs = mf.specs()
    for g, names in _groups(mf).items():
        got = np.zeros(nU)
        for name in names:
            if coded_bases:
                keys = [entry_key("bases", name, m) for m in range(mf.M)]
                keys += [entry_key("mean", name)] if first.has_mean else []
                if any(k not in norms for k in keys):
                    return []  # not decoded here (an update that did not touch the bases)
                got += np.array([norms[k] for k in keys])
                continue
            # row chunks of NORM_ROWS_ELEMENTS per basis, each basis's norm in float64 without a float64 copy:
            # the whole (M, *shape) tensor read and converted to float64 at once held 12 bytes per stored element
            # (0.75 GB for the 4 bases of a 30 522 x 512 embedding) after every build
            for a, b in row_chunks(specs[name], NORM_ROWS_ELEMENTS):
                if data.has("bases"):
                    u = data.read("bases", name, (a, b))
                    for m in range(mf.M):
                        got[m] += _sq(u[m])
                    del u
                if first.has_mean and data.has("mean"):
                    got[mf.M] += _sq(data.read("mean", name, (a, b)))
        want = np.diag(mf.cross[g].K)
        for m in range(nU):
            if abs(got[m] - want[m]) > STORED_RTOL * max(want[m], got[m]) + 1e-30:
                what = "the mean" if m == mf.M else f"basis {m}"
                problems.append(f"{root}: {what} of group {g!r} has squared norm {got[m]:.6g} in the data files, the "
                                f"manifest records {want[m]:.6g} (field 'cross.{g}.K'): data and manifest disagree")
    return problems


def _residual_norms(root: Path, mf: Manifest, norms: dict[str, float]) -> list[str]:
    """Each task's decoded residual norm against the triangle inequality |‖r̂‖ − ‖r‖| ≤ e (module docstring)."""
    if not mf.has_residuals or mf.coded is None or mf.coded.mode == "mask":
        return []
    r2 = np.zeros(mf.T)
    for g, fit in mf.groups.items():
        cr = mf.cross[g]
        r2 += fit.squared_errors(mf.gram_of_group(g), cr.C, cr.K)
    problems = []
    for t, task in enumerate(mf.tasks):
        keys = [entry_key("residual", s.name, task.name) for s in mf.tensors]
        if not task.error_exact or any(k not in norms for k in keys):
            continue
        got = float(np.sqrt(sum(norms[k] for k in keys)))
        want = float(np.sqrt(max(r2[t], 0.0)))
        slack = task.rel_error * task.norm + RESIDUAL_RTOL * (task.norm + want)
        if abs(got - want) > slack:
            problems.append(f"{root}: task {task.name[:80]!r}: its decoded residual has norm {got:.6g}, but the "
                            f"manifest's Gram, cross-Grams and recorded error put it within {want:.6g} ± "
                            f"{slack:.3g}: data and manifest disagree")
    return problems
