"""A store's tasks applied to a model loaded in memory: ``apply_into``, ``swapped`` and ``load_task``.

``apply_into(store, model, {"a": 1.0, "b": -0.5}, scale=λ)`` adds λ·Σ_t α_t ṽ_t into the parameters of a loaded
``torch.nn.Module`` in place, tensor by tensor, without writing anything and without materialising the task
vector: per tensor, in additive steps of which at most one decoded tensor is alive,

* the bases part S·(W·α) (+ μ·Σ mean_coef·α): dense or seed-regenerated bases read in row chunks of at most
  ``ROWS_CHUNK_ELEMENTS`` in all (the M bases of a tensor are never all in memory at once), coded bases entry by
  entry;
* the per-task terms: a low-rank entry (``lowrank`` codec residuals, lora-factors entries, lora-joint cores, and
  coded bases that are low-rank) as one ``addmm`` of its factors — ΔW is never decoded on its own; any other coded
  entry decoded and added; a TALL store's s_0 ∘ Σ_t α_t m_t.

A float32 parameter receives the steps in place (no accumulator); a 16-bit one through one float32 accumulator,
then (θ.float() + acc).to(dtype), the rounding ``TaskVector.apply_to`` does. Peak memory: the model plus one
decoded tensor (float32); for a 16-bit parameter plus its float32 accumulator and copy while it is updated.

Store tensors are matched to the model's ``state_dict`` names as the readers match checkpoint keys: the same
name, else the one name that ends with it or that it ends with (a checkpoint saved with or without a task head's
prefix such as ``bert.``); shapes must agree, all checked before the first parameter changes. An error while
decoding (a corrupt chunk) rolls back what was already changed — exactly, from copies, inside ``swapped``; by
subtracting the completed steps again (float32 rounding) in a bare ``apply_into``.

``swapped(store, model, "a")`` applies on entry and restores θ₀ on exit. ``restore="copy"`` (default) keeps a
copy of every touched tensor and copies it back: exact, bit for bit, for every dtype, at the cost of one copy of
the touched tensors. ``restore="subtract"`` subtracts the same decoded combination again (no copy) for float32
tensors — float32 rounding drifts (``benchmarks/serve.py`` measures it over 1,000 swaps) — and copies 16-bit
tensors, which subtraction cannot restore.

``load_task`` (``store/load.py``) builds on it: the task's model in memory, from a pretrained directory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from tvbasis.errors import ConfigError, StoreError, TensorMismatchError, TvbasisError
from tvbasis.io.checksum import check_pretrained_checksum, chunk_digests
from tvbasis.io.specs import TensorSpec
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store.format import NONE_CODEC, entry_key

#: a ``tvbasis.store.store.BasisStore`` (not imported here: store.py delegates to this module, imports go one way)
BasisStore = Any

#: elements of the bases read per row chunk (all M bases together): about one tensor's worth
ROWS_CHUNK_ELEMENTS = 4 * 2**20
RESTORE_MODES = ("copy", "subtract")


# ------------------------------------------------------------------------------------------------- matching
def match_names(store_names: list[str], model_names: list[str], where: str) -> dict[str, str]:
    """Store tensor -> model tensor name: the same name, else the one model name that ends with ``.`` + it or
    that it ends with ``.`` + (a task head's prefix such as ``bert.`` on one side only)."""
    model_set = set(model_names)
    out: dict[str, str] = {}
    for n in store_names:
        if n in model_set:
            out[n] = n
            continue
        cands = [k for k in model_names if k.endswith("." + n) or n.endswith("." + k)]
        if len(cands) != 1:
            what = f"matches several ({', '.join(cands[:4])})" if cands else \
                f"matches none (it has e.g. {', '.join(model_names[:3])})"
            raise TensorMismatchError(f"{where}: the store's tensor {n!r} {what} of the model's tensors")
        out[n] = cands[0]
    return out


def _targets(store: BasisStore, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Store tensor name -> the model's tensor it changes (shapes and dtypes checked; tied tensors once)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"apply_into needs a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict(keep_vars=True)
    names = match_names(list(store.specs), list(state), f"{type(model).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for n, m in names.items():
        t = state[m]
        spec = store.specs[n]
        if tuple(t.shape) != tuple(spec.shape):
            raise TensorMismatchError(f"{type(model).__name__}: tensor {m!r} has shape {tuple(t.shape)}, the store's "
                                      f"{n!r} has {tuple(spec.shape)}")
        if not t.is_floating_point():
            raise TensorMismatchError(f"{type(model).__name__}: tensor {m!r} is {t.dtype}, not floating point")
        key = id(t)
        if key in seen:  # tied weights: one tensor under two names; the store holds both, the same delta
            continue
        seen[key] = n
        out[n] = t
    return out


# ------------------------------------------------------------------------------------------------- decoding
def _plan(store: BasisStore, alpha: Mapping[str, float]) -> tuple[dict[str, np.ndarray], dict[str, float],
                                                                    dict[str, float]]:
    a = store._alpha(alpha)
    coefs, means = store._coefficients(a)
    per_task = {store.task_names[i]: float(a[i]) for i in np.flatnonzero(a)} if store.manifest.has_residuals else {}
    return coefs, means, per_task


class Steps:
    """Counts the additive steps ``accumulate`` completed; with ``limit``, only the first ``limit`` are run (how a
    tensor that failed midway is rolled back: the steps it completed, again, with the opposite sign)."""

    def __init__(self, limit: int | None = None) -> None:
        self.done, self.limit = 0, limit

    def go(self) -> bool:
        return self.limit is None or self.done < self.limit


def accumulate(store: BasisStore, name: str, acc: torch.Tensor, coefs: Mapping[str, np.ndarray],
               means: Mapping[str, float], per_task: Mapping[str, float], scale: float,
               steps: Steps | None = None) -> None:
    """``acc`` (float32, tensor ``name``'s shape, any device) += scale·Σ_t α_t ṽ_t of that tensor, in additive
    steps (a coded entry, a row chunk of the dense bases, a TALL mask sum) of which at most one decoded tensor is
    alive; see the module docstring for what is read and decoded."""
    st = steps or Steps()
    spec = store.specs[name]
    g = store.group_of.get(name, WHOLE_VECTOR)
    c = np.asarray(coefs[g], dtype=np.float64) * scale
    dev = acc.device
    if store.masks:
        assert store.coded is not None
        if st.go():
            S0 = store.bases_rows(name)[0].to(dev)
            weight = torch.zeros_like(acc)
            for t, a in per_task.items():
                m = store.task_rows(t, name)
                assert m is not None
                weight.add_(m.to(dev), alpha=a)
            acc.addcmul_(S0, weight, value=scale)
            del weight, S0
            st.done += 1
        return
    if store.M > 0 and (np.any(c != 0) or means[g] != 0.0):
        if store.manifest.bases_coded:
            assert store.coded is not None
            for m in range(store.M):
                if c[m] != 0 and st.go():
                    _add_entry(store, entry_key("bases", name, m), acc, float(c[m]))
                    st.done += 1
            if means[g] != 0.0 and st.go():
                _add_entry(store, entry_key("mean", name), acc, means[g] * scale)
                st.done += 1
        else:
            ct = torch.as_tensor(c, dtype=torch.float32)
            for rows in _row_chunks(spec, store.M + 1):
                if not st.go():
                    break
                S = store.bases_rows(name, rows)
                part = torch.tensordot(ct, S, dims=1).to(dev)
                if means[g] != 0.0:
                    mu = store.mean_rows(name, rows)
                    assert mu is not None
                    part.add_(mu.to(dev), alpha=means[g] * scale)
                if rows is None:
                    acc.add_(part)
                else:
                    acc[rows[0]:rows[1]].add_(part)
                del S, part
                st.done += 1
    for t, a in per_task.items():
        if a != 0.0 and st.go():
            _add_entry(store, entry_key("residual", name, t), acc, a * scale)
            st.done += 1


def _add_entry(store: BasisStore, key: str, acc: torch.Tensor, alpha: float) -> None:
    """acc += alpha · coded entry ``key``: an ``addmm`` of its factors where it is a low-rank product, else decoded
    and added; nothing for an entry that stores nothing."""
    coded = store.coded
    assert coded is not None
    if coded.codec_of(key) == NONE_CODEC:
        return
    f = coded.factors(key) if acc.dim() >= 2 else None
    if f is not None:
        acc.view(acc.shape[0], -1).addmm_(f[0].to(acc.device), f[1].to(acc.device), alpha=alpha)
    else:
        acc.add_(coded.decode(key).to(acc.device), alpha=alpha)


def _row_chunks(spec: TensorSpec, parts: int) -> Iterator[tuple[int, int] | None]:
    """Row ranges of ``spec`` with ``parts`` × rows × row elements ≤ ROWS_CHUNK_ELEMENTS (None: a 0-d tensor)."""
    if not spec.shape:
        yield None
        return
    per_row = max(1, math.prod(spec.shape[1:]))
    step = max(1, ROWS_CHUNK_ELEMENTS // (per_row * parts))
    for a in range(0, spec.shape[0], step):
        yield (a, min(spec.shape[0], a + step))


def _add_into(store: BasisStore, name: str, target: torch.Tensor, coefs: Mapping[str, np.ndarray],
              means: Mapping[str, float], per_task: Mapping[str, float], scale: float) -> None:
    """target ← target + scale·Σ α_t ṽ_t. A float32 tensor receives the steps of ``accumulate`` straight into it
    (low-rank entries as ``addmm``, at most one decoded tensor alive; a step that fails is rolled back by
    subtracting the completed ones); a 16-bit one through one float32 accumulator, then (θ.float() + acc).to(dtype)
    in one step."""
    with torch.no_grad():
        if target.dtype == torch.float32 and target.is_contiguous():
            steps = Steps()
            try:
                accumulate(store, name, target, coefs, means, per_task, scale, steps)
            except BaseException:
                accumulate(store, name, target, coefs, means, per_task, -scale, Steps(steps.done))
                raise
            return
        acc = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
        accumulate(store, name, acc, coefs, means, per_task, scale)
        target.copy_(target.to(torch.float32).add_(acc))


# ------------------------------------------------------------------------------------------------- checks
def check_model_pretrained(store: BasisStore, targets: Mapping[str, torch.Tensor]) -> None:
    """StoreError unless the model's tensors are the pretrained model the store was built from: their chunk
    digests (in the checkpoint's dtype; a float32 model loaded from a 16-bit checkpoint converts back exactly)
    combine to the store's recorded checksum."""
    ref = store.manifest.pretrained
    if ref.checksum is None:
        return
    digests = []
    for name, spec in store.specs.items():
        t = targets.get(name)
        if t is None:
            raise StoreError(f"{store.root}: the model ties {name!r} to another tensor the store also covers; the "
                             "checksum cannot be checked (pass check=False)")
        digests.extend(chunk_digests(spec, t.detach().to("cpu", spec.dtype), ref.checksum_chunk_elements))
    check_pretrained_checksum(digests, ref.to_json(), "the model", "; the model is unchanged")


# ------------------------------------------------------------------------------------------------- API
def _alpha_of(alpha: str | Mapping[str, float]) -> Mapping[str, float]:
    if isinstance(alpha, str):
        return {alpha: 1.0}
    if not isinstance(alpha, Mapping) or not alpha:
        raise ConfigError("give a task name or a non-empty {task: coefficient} mapping")
    return alpha


def apply_into(store: BasisStore, model: torch.nn.Module, alpha: str | Mapping[str, float], scale: float = 1.0, *,
               check: bool = False, _saved: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Add scale·Σ_t α_t ṽ_t (``alpha``: a task name, or task -> coefficient) into ``model``'s tensors in place;
    returns the model tensor names changed. ``check``: first verify the model holds the store's pretrained
    weights (a checksum pass over the touched tensors). See the module docstring."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"scale must be a finite number, got {scale!r}")
    coefs, means, per_task = _plan(store, _alpha_of(alpha))
    targets = _targets(store, model)
    if check:
        check_model_pretrained(store, targets)
    done: list[str] = []
    try:
        for name, t in targets.items():
            if _saved is not None:
                _saved[name] = t.detach().clone()
            _add_into(store, name, t.data, coefs, means, per_task, float(scale))
            done.append(name)
    except (TvbasisError, OSError) as e:
        _roll_back(store, targets, done, coefs, means, per_task, float(scale), _saved)
        raise StoreError(f"{e}; the model's {len(done)} changed tensor(s) were restored"
                         + ("" if _saved is not None else " by subtraction (float32 rounding)")) from None
    state_names = match_names(list(store.specs), list(model.state_dict(keep_vars=True)), type(model).__name__)
    return [state_names[n] for n in done]


def _roll_back(store: BasisStore, targets: Mapping[str, torch.Tensor], done: list[str],
               coefs: Mapping[str, np.ndarray], means: Mapping[str, float], per_task: Mapping[str, float],
               scale: float, saved: Mapping[str, torch.Tensor] | None) -> None:
    with torch.no_grad():
        for name in done:
            if saved is not None:
                targets[name].data.copy_(saved[name])
            else:
                _add_into(store, name, targets[name].data, coefs, means, per_task, -scale)


@contextmanager
def swapped(store: BasisStore, model: torch.nn.Module, alpha: str | Mapping[str, float], scale: float = 1.0, *,
            restore: str = "copy", check: bool = False) -> Iterator[torch.nn.Module]:
    """``with swapped(store, model, "a"): ...``: the model holds θ₀ + scale·ṽ_a inside the block and its own
    weights again after it (``restore``: ``"copy"``, exact; ``"subtract"``, float32 tensors re-subtracted)."""
    if restore not in RESTORE_MODES:
        raise ConfigError(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
    saved: dict[str, torch.Tensor] = {}
    coefs, means, per_task = _plan(store, _alpha_of(alpha))
    targets = _targets(store, model)
    if restore == "subtract":
        subtract = {n for n, t in targets.items() if t.dtype == torch.float32}
        for n, t in targets.items():
            if n not in subtract:
                saved[n] = t.detach().clone()
        apply_into(store, model, alpha, scale, check=check)
    else:
        subtract = set()
        apply_into(store, model, alpha, scale, check=check, _saved=saved)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, t in targets.items():
                if n in subtract:
                    _add_into(store, n, t.data, coefs, means, per_task, -float(scale))
                else:
                    t.data.copy_(saved.pop(n))


class StateModule(torch.nn.Module):
    """A state dict seen as a module (its tensors as buffers, names kept) so apply_into can change it in place."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.state
