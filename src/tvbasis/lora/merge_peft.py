"""LoRA-to-LoRA merges: several PEFT adapters of one base model merged into ONE PEFT adapter, with the
combinations of PEFT's ``LoraModel.add_weighted_adapter`` (``tvbasis merge --out-format peft``).

Per adapted module, each adapter t gives ΔW_t = s_t·B_t·A_t (its scale s_t = lora_alpha/r, or the rsLoRA /
pattern scale, folded in by ``LoraCheckpoint.factors``); w_t is its weight. Methods (PEFT's definitions):

- ``cat`` (exact): A = [w_1·s_1·A_1; …; w_T·s_T·A_T], B = [B_1 … B_T]: ΔW = Σ_t w_t·ΔW_t at rank Σ_t r_t.
- ``svd``: ΔW = Σ_t w_t·ΔW_t cut to its best rank-R approximation (R = ``rank``, default the largest input rank),
  B = U_R·Σ_R, A = V_Rᵀ. Computed from the factors (QR of the stacked factors, SVD of a (Σr × Σr) core): the
  dense ΔW is never formed.
- ``ties_svd``: per adapter keep the int(density·n) largest |ΔW_t| (PEFT's ``magnitude_based_pruning``), elect a
  sign per entry from the UNWEIGHTED pruned deltas (``sign``: total = sign of their sum, frequency = of their
  signs' sum; 0 elects +), then Σ of the agreeing weighted entries divided by the NUMBER of agreeing adapters
  (at least 1) — PEFT's TIES, which differs from tvbasis's and mergekit's ``ties`` (weighted election, weight
  sum divisor); then the rank-R SVD.
- ``dare_linear_svd`` / ``dare_ties_svd``: each ΔW_t keeps entries with probability density, rescaled by
  1/density (the drop masks are tvbasis's seeded DARE masks, ``seed``; PEFT draws from torch's global
  generator), then Σ w_t·ΔW_t, or PEFT's disjoint merge as in ``ties_svd``; then the rank-R SVD.
- ``magnitude_prune_svd``: magnitude pruning as in ``ties_svd``, then Σ w_t·ΔW_t and the rank-R SVD.
- ``linear`` (PEFT's own: "a very rough approximation"): needs one rank; A = Σ_t σ_t·√|w_t·s_t|·A_t,
  B = Σ_t √|w_t·s_t|·B_t with σ_t the sign of w_t·s_t — the factors are averaged, not the products.
- any tvbasis merge method (``ties``, ``dare_ties``, ``slerp``, ``tsv_merge``, …, with its own parameters): applied
  to the T adapters' ΔW of each module (an adapter that leaves the module alone contributes ΔW = 0), then the
  rank-R SVD. Module-wise only: ``trim_scope=global`` and Fisher merges are refused.

The output adapter has scale 1 (``lora_alpha`` = r, per module through ``rank_pattern``/``alpha_pattern`` where
ranks differ), the first adapter's other settings and its module names; ``tvbasis_merge.json`` records the
method, the weights and, per module, the rank and the relative error of the rank cut against the merged ΔW the
method defines. Only LoRA A/B matrices are merged: an adapter that replaces tensors whole (``modules_to_save``,
trained biases) is refused, as PEFT refuses conflicting ``modules_to_save``. Memory: one module's factors, and
for the pruning methods its dense ΔW per adapter, at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tvbasis.errors import ConfigError
from tvbasis.io import Checkpoint, open_checkpoint
from tvbasis.io.atomic import atomic_output
from tvbasis.io.lora import PEFT_PREFIX, LoraCheckpoint, open_finetuned
from tvbasis.merge.base import BaseMerger, MergeContext, MergeSpec
from tvbasis.merge.dare import dare_mask
from tvbasis.merge.registry import MERGE_METHODS, get_merger
from tvbasis.merge.trim import magnitude_mask

#: PEFT's add_weighted_adapter combination types that give an adapter (the SVD ones at rank R)
PEFT_MERGES = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "linear")
MERGE_RECORD = "tvbasis_merge.json"


@dataclass
class PeftMerge:
    """What ``merge_adapters`` wrote: the adapter directory, the rank per module and the overall relative error
    of the rank cuts (0 for ``cat``; ``linear`` has none to report: it is not an approximation of Σ w·ΔW)."""

    path: Path
    method: str
    ranks: dict[str, int] = field(default_factory=dict)
    rel_error: float | None = 0.0
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)


def _open(pretrained: str | Path | Checkpoint, adapters: Mapping[str, str | Path | Checkpoint]
          ) -> tuple[Checkpoint, dict[str, LoraCheckpoint]]:
    pre = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    out: dict[str, LoraCheckpoint] = {}
    for name, p in adapters.items():
        ck = p if isinstance(p, Checkpoint) else open_finetuned(p, pre)
        if not isinstance(ck, LoraCheckpoint):
            raise ConfigError(f"--out-format peft merges PEFT LoRA adapters; {name}={getattr(ck, 'path', p)} is a "
                              f"full model (merge it without --out-format peft)")
        whole = sorted(ck.changed_tensors() - ck.factored())
        if whole:
            raise ConfigError(f"{ck.path}: the adapter replaces {len(whole)} tensor(s) whole (modules_to_save or "
                              f"trained biases, e.g. {whole[0]!r}); --out-format peft merges LoRA A/B matrices only")
        out[name] = ck
    return pre, out


def _module(ck: LoraCheckpoint, target: str) -> str:
    """The adapter's own module name for pretrained tensor ``target`` (its keys' stem, without PEFT's prefix)."""
    key = ck._deltas[target].A  # the key the adapter stores A under (private: io.lora has no accessor)
    stem = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix in (".lora_A.weight", ".lora_embedding_A"):
        if suffix in stem:
            return stem[:stem.index(suffix)]
    return stem.rsplit(".lora_", 1)[0]


def _scale(ck: LoraCheckpoint, target: str) -> float:
    return float(ck._deltas[target].scale)


def peft_keys(module: str, layout: str, P: torch.Tensor, Q: torch.Tensor,
              shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """PEFT's saved tensors of one module whose ΔW.reshape(rows, -1) = P·Q (scale 1), by layout."""
    key = PEFT_PREFIX + module
    r = P.shape[1]
    if layout == "embedding":  # ΔW = (B·A)ᵀ with A (r × vocab), B (hidden × r)
        return {f"{key}.lora_embedding_A": P.T.contiguous(), f"{key}.lora_embedding_B": Q.T.contiguous()}
    if layout == "fan_in_fan_out":
        return {f"{key}.lora_A.weight": P.T.contiguous(), f"{key}.lora_B.weight": Q.T.contiguous()}
    if layout == "conv":
        return {f"{key}.lora_A.weight": Q.reshape(r, *shape[1:]).contiguous(),
                f"{key}.lora_B.weight": P.reshape(shape[0], r, *[1] * (len(shape) - 2)).contiguous()}
    return {f"{key}.lora_A.weight": Q.contiguous(), f"{key}.lora_B.weight": P.contiguous()}


def _low_rank_svd(Ps: list[torch.Tensor], Qs: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        float, float]:
    """Best rank-``rank`` factors of Σ P_t·Q_t from the factors (float64): QR of [P_1 … P_T] and of
    [Q_1; …; Q_T]ᵀ, SVD of the small core. Returns (P', Q', squared error, squared norm)."""
    P = torch.cat([p.double() for p in Ps], 1)
    Q = torch.cat([q.double() for q in Qs], 0)
    q1, r1 = torch.linalg.qr(P)
    q2, r2 = torch.linalg.qr(Q.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    k = min(rank, s.numel())
    return ((q1 @ u[:, :k]) * s[:k]).float(), (vh[:k] @ q2.T).float(), float(s[k:].pow(2).sum()), \
        float(s.pow(2).sum())


def _dense_svd(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of the dense float32 ``D`` (a float32 SVD, as PEFT's; the squared error and
    norm from the singular values in float64)."""
    U, S, Vh = torch.linalg.svd(D.float(), full_matrices=False)
    k = min(rank, S.numel())
    S64 = S.double()
    return (U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), float(S64[k:].pow(2).sum()), \
        float(S64.pow(2).sum())


def _magnitude_prune(d: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude pruning of each task slice of ``d`` (T, ...): the int(density·n) largest |d| kept (none
    pruned at density >= 1, none kept where int(density·n) = 0); equal magnitudes at the cut: the lowest indices
    first (``merge.trim.magnitude_mask`` with mergekit's and PEFT's floor count)."""
    if density >= 1:
        return d
    if int(density * d[0].numel()) == 0:
        return torch.zeros_like(d)
    return torch.where(magnitude_mask(d, density, rounding="floor"), d, 0.0)


def _peft_disjoint(pruned: torch.Tensor, w: torch.Tensor, sign: str) -> torch.Tensor:
    """PEFT's TIES combination of pruned (T, ...) deltas: sign elected from the unweighted deltas, the agreeing
    weighted entries summed and divided by how many adapters agree (at least 1)."""
    s = torch.sign(pruned)
    mass = s.sum(0) if sign == "frequency" else pruned.sum(0)
    agree = s == torch.where(mass >= 0, 1.0, -1.0)
    wx = pruned * w.view(-1, *[1] * (pruned.dim() - 1))
    return (wx * agree).sum(0) / agree.sum(0).clamp(min=1).to(wx.dtype)


@dataclass
class _Inputs:
    pre: Checkpoint
    cks: dict[str, LoraCheckpoint]
    weights: torch.Tensor  # (T,) float64, in adapter order
    targets: list[str]  # pretrained tensors some adapter changes by a product
    in_ranks: dict[str, list[int]]  # target -> ranks of the adapters that change it
    rank: int  # R of the SVD methods


def _svd_like(method: str) -> bool:
    """True for the merges cut to rank R by an SVD: PEFT's *svd and every tvbasis merge method."""
    return method.endswith("svd") or method not in PEFT_MERGES


def _tvbasis_merger(method: str, params: Mapping[str, Any] | None) -> BaseMerger:
    """A tvbasis merge method applied to the adapters' ΔW per module (then cut to rank R)."""
    if method not in MERGE_METHODS:
        raise ConfigError(f"--out-format peft: method {method!r} is neither one of PEFT's adapter merges "
                          f"{list(PEFT_MERGES)} nor a tvbasis merge method")
    merger = get_merger(MergeSpec(method, dict(params or {})))
    if merger.needs_global_thresholds or merger.needs_fisher:
        raise ConfigError(f"--out-format peft merges module by module: {method!r} with "
                          f"{'trim_scope=global' if merger.needs_global_thresholds else 'Fisher weights'} is not "
                          f"supported there")
    return merger


def _prepare(pretrained: str | Path | Checkpoint, adapters: Mapping[str, str | Path | Checkpoint], method: str,
             weights: Mapping[str, float] | None, rank: int | None, density: float, sign: str,
             params: Mapping[str, Any] | None = None) -> _Inputs:
    """Validate the arguments and open the adapters (headers only)."""
    if method not in PEFT_MERGES:
        _tvbasis_merger(method, params)
    elif params:
        raise ConfigError(f"--out-format peft: PEFT's {method!r} takes --density, --sign and --seed, not "
                          f"{sorted(params)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"--rank must be a positive integer, got {rank!r}")
    if rank is not None and not _svd_like(method):
        raise ConfigError(f"--rank applies to the SVD merges; {method!r} has the rank "
                          f"{'Σ r_t of its inputs (exact)' if method == 'cat' else 'of its inputs'}")
    if method in PEFT_MERGES and method not in ("cat", "svd", "linear") and not 0 < density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {density!r}")
    if sign not in ("total", "frequency"):
        raise ConfigError(f"--sign must be total or frequency, got {sign!r}")
    if not adapters:
        raise ConfigError("no adapters given (use --finetuned NAME=ADAPTER_DIR)")
    pre, cks = _open(pretrained, adapters)
    names = list(cks)
    w = dict(weights or {})
    unknown = set(w) - set(names)
    if unknown:
        raise ConfigError(f"--weight given for unknown adapter(s) {sorted(unknown)}; adapters: {names}")
    wt = torch.tensor([float(w.get(n, 1.0)) for n in names], dtype=torch.float64)
    targets = sorted(set().union(*(ck.factored() for ck in cks.values())))
    in_ranks = {t: [_rank(ck, t) for ck in cks.values() if t in ck.factored()] for t in targets}
    all_ranks = {r for rs in in_ranks.values() for r in rs}
    if method == "linear" and len(all_ranks) > 1:
        raise ConfigError(f"method 'linear' (PEFT's) averages the factors and needs one rank; the adapters have "
                          f"ranks {sorted(all_ranks)} (use cat or svd)")
    return _Inputs(pre, cks, wt, targets, in_ranks, rank or max(all_ranks))


def _rank(ck: LoraCheckpoint, target: str) -> int:
    """The rank of an adapter's product for ``target``, from its A matrix's header (no data read)."""
    return int(ck.weights.spec(ck._deltas[target].A).shape[0])


def _out_rank(method: str, ranks: list[int], R: int) -> int:
    return sum(ranks) if method == "cat" else ranks[0] if method == "linear" else R


def plan_merge(pretrained: str | Path | Checkpoint, adapters: Mapping[str, str | Path | Checkpoint],
               out_dir: str | Path, method: str = "cat", weights: Mapping[str, float] | None = None, *,
               rank: int | None = None, density: float = 1.0, sign: str = "total",
               params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``merge_adapters`` would read and write (``--dry-run``): the adapters, the modules by layout with
    their input and output ranks, and the bytes; reads headers only, writes nothing."""
    inp = _prepare(pretrained, adapters, method, weights, rank, density, sign, params)
    rows: dict[str, dict[str, Any]] = {}
    out_bytes = 0
    for target in inp.targets:
        first = next(ck for ck in inp.cks.values() if target in ck.factored())
        layout = first.layout(target) or "linear"
        shape = tuple(inp.pre.spec(target).shape)
        r_out = _out_rank(method, inp.in_ranks[target], inp.rank)
        b = (shape[0] + math.prod(shape[1:])) * r_out * 4
        row = rows.setdefault(layout, {"layout": layout, "modules": 0, "input_ranks": set(), "output_rank": set(),
                                       "output_bytes": 0})
        row["modules"] += 1
        row["input_ranks"].update(inp.in_ranks[target])
        row["output_rank"].add(r_out)
        row["output_bytes"] += b
        out_bytes += b
    table = [{**r, "input_ranks": ",".join(map(str, sorted(r["input_ranks"]))),
              "output_rank": ",".join(map(str, sorted(r["output_rank"])))} for r in rows.values()]
    read = sum(f.stat().st_size for ck in inp.cks.values() for f in Path(str(ck.path)).glob("adapter_model.*"))
    return {"out": str(out_dir), "out_format": "peft", "method": method, "adapters": {n: str(ck.path) for n, ck in
                                                                                      inp.cks.items()},
            "weights": dict(zip(inp.cks, inp.weights.tolist(), strict=True)),
            "rank": inp.rank if _svd_like(method) else None, "read_bytes": read, "write_bytes": out_bytes,
            "modules": table}


def merge_adapters(pretrained: str | Path | Checkpoint, adapters: Mapping[str, str | Path | Checkpoint],
                   out_dir: str | Path, method: str = "cat", weights: Mapping[str, float] | None = None, *,
                   rank: int | None = None, density: float = 1.0, sign: str = "total", seed: int = 0,
                   dtype: torch.dtype | None = None, force: bool = False,
                   params: Mapping[str, Any] | None = None) -> PeftMerge:
    """Merge PEFT LoRA ``adapters`` (name -> adapter directory) of ``pretrained`` into one PEFT adapter at
    ``out_dir`` (atomically) with PEFT's ``method``, or any tvbasis merge ``method`` (with ``params``) applied
    to the adapters' ΔW per module and cut to rank R; see the module docstring. ``weights``: per adapter
    (default 1). ``rank``: of the SVD methods (default the largest input rank). ``density``, ``sign``, ``seed``:
    of PEFT's pruning methods. ``dtype``: of the written factors (default float32)."""
    inp = _prepare(pretrained, adapters, method, weights, rank, density, sign, params)
    merger = _tvbasis_merger(method, params) if method not in PEFT_MERGES else None
    pre, cks, wt, targets, R = inp.pre, inp.cks, inp.weights, inp.targets, inp.rank
    names = list(cks)
    result = PeftMerge(Path(out_dir), method, rel_error=None if method == "linear" else 0.0)
    tensors: dict[str, torch.Tensor] = {}
    err2 = tot2 = 0.0
    for target in targets:
        have = [(i, ck) for i, ck in enumerate(cks.values()) if target in ck.factored()]
        first = have[0][1]
        layout, module = first.layout(target), _module(first, target)
        assert layout is not None
        shape = tuple(pre.spec(target).shape)
        facs = [(i, ck.factors(target)) for i, ck in have]
        rows = shape[0]
        if method == "cat":
            P = torch.cat([f[0] * float(wt[i]) for i, f in facs if f is not None], 1)
            Q = torch.cat([f[1] for _, f in facs if f is not None], 0)
            e2, n2 = 0.0, 0.0
        elif method == "linear":
            P = torch.zeros_like(facs[0][1][0])  # type: ignore[index]
            Q = torch.zeros_like(facs[0][1][1])  # type: ignore[index]
            for (i, f), (_, ck) in zip(facs, have, strict=True):
                assert f is not None
                s = _scale(ck, target)
                ws = float(wt[i]) * s
                if ws == 0.0:
                    continue
                root = math.sqrt(abs(ws))
                sgn = 1.0 if ws >= 0 else -1.0
                # f = (s·B, A) in the stored orientation (transposed layouts: (Aᵀ, s·Bᵀ)): recover B and A
                if layout in ("embedding", "fan_in_fan_out"):
                    P += sgn * root * f[0]
                    Q += root * f[1] / s
                else:
                    P += root * f[0] / s
                    Q += sgn * root * f[1]
            e2 = n2 = 0.0
        elif merger is not None:
            x = torch.zeros((len(names), *shape), dtype=torch.float32)
            for i, f in facs:
                assert f is not None
                x[i] = (f[0] @ f[1]).reshape(shape)
            ctx = MergeContext(name=target, base=pre.get(target).to(torch.float32) if merger.needs_base else None)
            merged = merger.merge(x, wt.to(torch.float32), ctx).reshape(rows, -1)
            P, Q, e2, n2 = _dense_svd(merged, R)
        elif method == "svd":
            P, Q, e2, n2 = _low_rank_svd([f[0] * float(wt[i]) for i, f in facs if f is not None],
                                         [f[1] for _, f in facs if f is not None], R)
        else:
            deltas = torch.zeros((len(names), rows, math.prod(shape[1:])), dtype=torch.float32)
            for i, f in facs:
                assert f is not None
                torch.mm(f[0], f[1], out=deltas[i])
            if method.startswith("dare"):
                for i in range(len(names)):
                    if density < 1:
                        keep = dare_mask(tuple(deltas.shape[1:]), density, seed, target, i)
                        deltas[i] = torch.where(keep, deltas[i] / density, 0.0)
            else:
                deltas = _magnitude_prune(deltas, density)
            w32 = wt.to(torch.float32)
            if method in ("ties_svd", "dare_ties_svd"):
                D = _peft_disjoint(deltas, w32, sign)
            else:
                D = torch.tensordot(w32, deltas, dims=1)
            P, Q, e2, n2 = _dense_svd(D, R)
        if not (bool(torch.isfinite(P).all()) and bool(torch.isfinite(Q).all())):
            raise ConfigError(f"{target!r}: the merge gives non-finite factors")
        tensors.update(peft_keys(module, layout, P.to(dtype or torch.float32), Q.to(dtype or torch.float32), shape))
        result.ranks[module] = int(P.shape[1])
        result.modules[module] = {"tensor": target, "layout": layout, "rank": int(P.shape[1]),
                                  "adapters": [names[i] for i, _ in facs],
                                  "rel_error": math.sqrt(e2 / n2) if n2 > 0 else 0.0}
        err2, tot2 = err2 + e2, tot2 + n2
    if result.rel_error is not None:
        result.rel_error = math.sqrt(err2 / tot2) if tot2 > 0 else 0.0
    first_config = next(iter(cks.values())).config  # PEFT's add_weighted_adapter keeps the first's settings too
    top = max(result.ranks.values())
    config = {**first_config, "peft_type": "LORA", "r": top, "lora_alpha": top, "target_modules": sorted(result.ranks),
              "rank_pattern": {m: r for m, r in result.ranks.items() if r != top},
              "alpha_pattern": {m: r for m, r in result.ranks.items() if r != top},
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "bias": "none",
              "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
              "init_lora_weights": True, "lora_bias": False, "lora_dropout": 0.0,
              "fan_in_fan_out": bool(first_config.get("fan_in_fan_out", False))}
    record = {"method": method, **({"parameters": merger.params} if merger is not None else {}),
              "adapters": {n: str(ck.path) for n, ck in cks.items()},
              "weights": dict(zip(names, wt.tolist(), strict=True)), "rank": R if _svd_like(method) else None,
              "density": density, "sign": sign, "seed": seed, "rel_error": result.rel_error,
              "note": "rel_error: ||merged delta - written adapter delta|| / ||merged delta||, the merged delta "
                      "being what the method defines before its rank cut", "modules": result.modules}
    inputs = [Path(str(pre.path)), *[Path(str(ck.path)) for ck in cks.values()]]
    with atomic_output(out_dir, force, inputs) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return result


__all__ = ["PEFT_MERGES", "PeftMerge", "merge_adapters", "peft_keys", "plan_merge"]
