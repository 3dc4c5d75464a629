"""``tvbasis bench --frontier --lora``: the frontier's LoRA rows — one PEFT LoRA adapter per task, stored as it is
and through the stores that read adapters.

The adapters: ``tvbasis.eval.lora_finetune`` (rank r = ``--lora-rank``, default 8, α = 2r so the scale stays 2,
every linear layer of the transformer blocks, the full fine-tunes' data and recipe with lr 1e-3), trained on the
same θ₀ and tasks as the frontier's fine-tunes, cached in ``<work>/lora/<task>`` and reused while their settings
hash and files match. Each adapter's own ΔW_t = s·B_t·A_t (from its factors; only the tensors it changes) is the
reference of its rows.

Rows (family ``LoRA``; every store built on disk from the adapter directories and read back with ``reconstruct``,
as ``frontier.compress_store``):

* ``adapters as they are`` — bytes: every tensor of the adapter files (Σ r·(m + n)·4 per adapted module);
  per-task = 1 by definition; addition and negation from the adapters' own ΔW;
* ``lora-factors fp32`` / ``int8`` — ``build_lora_store(method="factors")``, the factors as low-rank entries,
  raw or through ``factor_codec="int8"``;
* ``lora-joint full k=8/16/24``, ``diag k=24`` — ``build_lora_store(method="joint")``: shared per-tensor bases
  U, V and per-adapter cores (the "Compress then Serve" form);
* ``pca M=T/2 (dense ΔW)`` — ``build_store(method="pca", M=T//2)`` from the adapters (read as ΔW): M dense bases +
  the mean over the adapted tensors, plus the coefficients;
* ``pca M=0 + res lowrank:rank=r`` — ``build_store(method="pca", M=0, residual="lowrank:rank=r")``: the coded path
  from dense ΔW (an SVD of each ΔW_t at the adapters' rank).

Measured as the frontier's rows (``frontier.measure``), but against the adapters: per-task normalized accuracy
= acc(θ₀ + ṽ_t on t) / acc(θ₀ + ΔW_t on t) at λ = 1; addition θ₀ + λ·Σ_t ṽ_t (λ on dev) normalized by the same
per-adapter accuracies; negation θ₀ − λ·ṽ_target (target, and control as % of pretrained); rel. err against
ΔW_t; bytes against the adapters' (``compression`` = adapters / stored, ``relative_size`` = stored / adapters).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tvbasis.bench.bench import BenchConfig, _fmt_bytes, _pct
from tvbasis.bench.frontier import Compressed, Config, Context, compress_store, measure, read_store
from tvbasis.eval.metrics import mean
from tvbasis.methods import get_store_method, store_method_names

State = dict[str, torch.Tensor]

FAMILY = "LoRA"
#: full-core joint stores (k) and the diagonal one
JOINT_KS = (8, 16, 24)
JOINT_DIAG_K = 24
#: the issue's goal on real adapters: every task ≥ 0.99 of its adapter's own accuracy at ≤ the adapters' bytes
GOAL_ACCURACY = 0.99


def lora_settings(rank: int = 8) -> Any:
    """The adapters' settings for ``--lora-rank``: r = rank, α = 2·rank (scale 2, as the default r = 8, α = 16)."""
    from tvbasis.eval.lora_finetune import LoraSettings

    s = LoraSettings(r=int(rank), alpha=2.0 * int(rank))
    s.check()
    return s


def lora_configs(T: int, rank: int) -> list[Config]:
    """The LoRA rows for T adapters of rank ``rank``."""
    out = [Config("adapters as they are", FAMILY, "adapters"),
           Config("lora-factors fp32", FAMILY, "lora-factors"),
           Config("lora-factors int8", FAMILY, "lora-factors", {"factor_codec": "int8"})]
    out += [Config(f"lora-joint full k={k}", FAMILY, "lora-joint", {"k": k, "cores": "full"}) for k in JOINT_KS]
    out.append(Config(f"lora-joint diag k={JOINT_DIAG_K}", FAMILY, "lora-joint",
                      {"k": JOINT_DIAG_K, "cores": "diagonal"}))
    if T >= 2:
        M = T // 2
        out.append(Config(f"pca M={M} (dense ΔW)", FAMILY, "bases",
                          {"basis": "pca", "bases_plan": None, "residual": None}, M))
    out.append(Config(f"pca M=0 + res lowrank:rank={rank}", FAMILY, "residual",
                      {"residual": f"lowrank:rank={rank}"}))
    return out


@dataclass
class LoraContext(Context):
    """A frontier ``Context`` whose fine-tunes are adapter directories and whose ``tvs`` are their own ΔW."""

    adapter_bytes: int = 0


@dataclass
class Adapters:
    """The trained (or reused) adapters of one run."""

    dirs: dict[str, Path]
    reused: dict[str, bool]
    settings: Any  # LoraSettings
    train_seconds: float


def train_adapters(tasks: Mapping[str, Any], work: Path, settings: Any, lora: Any, encoder: Any,
                   progress: bool = False) -> Adapters:
    """Train (or reuse from ``<work>/lora``) one adapter per task on the encoder's θ₀."""
    from tvbasis.eval.lora_finetune import lora_finetune

    t0 = time.time()
    results = {n: lora_finetune(t, work, settings, lora, encoder=encoder, progress=progress) for n, t in tasks.items()}
    return Adapters({n: Path(r.path) for n, r in results.items()}, {n: r.reused for n, r in results.items()}, lora,
                    round(time.time() - t0, 1))


def _file_bytes(adapter: Any) -> int:
    return sum(s.nbytes for s in adapter.weights.specs())


def adapter_file_bytes(pre_dir: str | Path, dirs: Mapping[str, str | Path]) -> dict[str, int]:
    """Per adapter, the bytes of its file's tensors (Σ numel · itemsize; r·(m + n)·4 per module in float32), from
    the headers alone."""
    from tvbasis.io import open_checkpoint
    from tvbasis.lora import open_adapters

    ads = open_adapters(open_checkpoint(pre_dir), dirs)
    try:
        return {n: _file_bytes(a) for n, a in ads.items()}
    finally:
        for a in ads.values():
            a.close()  # type: ignore[union-attr]


def adapter_deltas(pre_dir: str | Path, dirs: Mapping[str, str | Path]) -> tuple[dict[str, State], dict[str, int]]:
    """Each adapter's own ΔW (name -> float32 tensor, the tensors it changes: s·B·A from its factors, the others
    as saved − θ₀) and the bytes of its file's tensors (Σ numel · itemsize; r·(m + n)·4 per module in float32)."""
    from tvbasis.io import open_checkpoint
    from tvbasis.lora import open_adapters

    pre = open_checkpoint(pre_dir)
    ads = open_adapters(pre, dirs)
    deltas: dict[str, State] = {}
    nbytes: dict[str, int] = {}
    try:
        for n, a in ads.items():
            state: State = {}
            for name in sorted(a.changed_tensors()):  # type: ignore[union-attr]
                f = a.factors(name)
                shape = tuple(pre.spec(name).shape)
                if f is None:
                    state[name] = a.get(name).float() - pre.get(name).float()  # type: ignore[union-attr]
                else:
                    state[name] = (f[0].double() @ f[1].double()).reshape(shape).float()
            deltas[n] = state
            nbytes[n] = _file_bytes(a)
    finally:
        for a in ads.values():
            a.close()  # type: ignore[union-attr]
    return deltas, nbytes


def compress_lora(config: Config, ctx: Context, seed: int = 0) -> Compressed:
    """The T compressed ΔW of one LoRA row (``ctx``: a ``LoraContext``)."""
    from tvbasis.engine import RunOptions
    from tvbasis.store import StoreSpec, WriteOptions, build_lora_store, build_store

    assert isinstance(ctx, LoraContext)
    p = dict(config.params)
    if config.method == "adapters":
        return Compressed(dict(ctx.tvs), ctx.adapter_bytes, {"adapter_tensor_bytes": ctx.adapter_bytes}, exact=True)
    if config.method in store_method_names():  # a LoRA store method: build_lora_store's method is its suffix
        kwargs = {"method": config.method.removeprefix("lora-"), **p}
        return read_store(config, ctx, lambda path: build_lora_store(ctx.pre_dir, ctx.ft_dirs, path, force=True,
                                                                     **kwargs), {"builder": "build_lora_store", **kwargs}, {})
    if config.method == "residual":
        kwargs = {"method": "pca", "M": 0, "residual": p["residual"]}
        spec = StoreSpec(**kwargs)
        return read_store(config, ctx, lambda path: build_store(ctx.pre_dir, ctx.ft_dirs, spec, path,
                                                                RunOptions(progress=ctx.progress),
                                                                WriteOptions(force=True)),
                          kwargs, {})
    return compress_store(config, ctx, seed)


def measure_lora(adapters: Adapters, pre_dir: Path, names: Sequence[str], ev: Any, cfg: BenchConfig,
                 stores: Path, configs: Sequence[Config] | None = None) -> dict[str, Any]:
    """The LoRA rows (``lora_configs`` unless ``configs``) through ``ev``, and the facts of the adapters."""
    t0 = time.time()
    dirs = {n: adapters.dirs[n] for n in names}
    tvs, per_adapter = adapter_deltas(pre_dir, dirs)
    total = sum(per_adapter.values())
    own_dev = {n: ev.with_delta(tvs[n], 1.0, "dev", [n])[n] for n in names}
    own_test = {n: ev.with_delta(tvs[n], 1.0, "test", [n])[n] for n in names}
    stores.mkdir(parents=True, exist_ok=True)
    ctx = LoraContext(list(names), tvs, Path(pre_dir), {n: str(d) for n, d in dirs.items()}, stores, cfg.keep_stores,
                      lambda v, t: ev.with_delta(v, 1.0, "dev", [t])[t], progress=cfg.progress, adapter_bytes=total)
    rank = int(adapters.settings.r)
    todo = list(configs) if configs is not None else lora_configs(len(names), rank)
    rows = measure(todo, ctx, ev, own_dev, own_test, cfg, compressor=compress_lora, reference_bytes=total)
    for r in rows:
        r["relative_size"] = r["bytes_stored"] / max(1, total)
    out: dict[str, Any] = {
        "rows": rows, "adapter_bytes": total, "adapter_bytes_per_task": per_adapter,
        "adapters": own_test, "adapters_dev": own_dev, "reused": adapters.reused,
        "settings": asdict(adapters.settings), "dirs": {n: str(d) for n, d in dirs.items()},
        "train_seconds": adapters.train_seconds, "measure_seconds": round(time.time() - t0, 1)}
    out["seconds"] = round(adapters.train_seconds + out["measure_seconds"], 1)
    out["goal"] = lora_goal(out)
    return out


def lora_goal(lora: Mapping[str, Any]) -> list[str]:
    """Rows other than the adapters themselves with every task ≥ GOAL_ACCURACY of its adapter's own accuracy at
    a store no larger than the adapters."""
    return [r["label"] for r in lora["rows"] if r["method"] != "adapters" and r["per_task_min"] >= GOAL_ACCURACY
            and r["bytes_stored"] <= lora["adapter_bytes"]]


def lora_markdown(result: Mapping[str, Any]) -> str:
    """The LoRA table of frontier.md (``result["lora"]``), with the adapters' accuracies and the goal."""
    lora = result["lora"]
    rows = lora["rows"]
    s = lora["settings"]
    pairs = [(n["target"], n["control"]) for n in next((r["negation"] for r in rows if r["negation"]), [])]
    head = ["config", "stored", "× adapters", "per-task norm (mean / min)", "rel. err", "λ add", "add norm"]
    head += [f"neg {t} (ctrl {c} %)" for t, c in pairs]
    head.append("build s")
    T = len(lora["adapters"])
    lines = [f"### LoRA adapters (T = {T}, r = {s['r']}, α = {s['alpha']:g}, every linear layer of the blocks; "
             f"{_fmt_bytes(lora['adapter_bytes'])} of adapter tensors). Per-task and addition normalized by each "
             "adapter's own test accuracy (not the full fine-tune's)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        add = r["addition"]
        errs = list(r["rel_errors"].values())
        build = (r.get("extra") or {}).get("build_seconds")
        cells = [r["label"], _fmt_bytes(r["bytes_stored"]), f"{r['relative_size']:.2f}",
                 f"{_pct(r['per_task_mean'])} / {_pct(r['per_task_min'])}", f"{mean(errs):.3f}",
                 f"{add['lam']:.2f}", _pct(add["mean_normalized_test"])]
        for n in r["negation"]:
            flag = "" if n["feasible"] else "*"
            cells.append(f"{_pct(n['target_test'])} ({_pct(n['control_retained'])}) λ={n['lam']:.2f}{flag}")
        cells.append("–" if build is None else f"{build:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    ft = result.get("finetuned", {}).get("test", {})
    zs = result.get("zero_shot", {}).get("test", {})
    lines += ["", "| task | zero-shot | full fine-tune | LoRA adapter | adapter / full fine-tune |", "|---|---|---|---|---|"]
    for t, a in lora["adapters"].items():
        f = ft.get(t, float("nan"))
        lines.append(f"| {t} | {_pct(zs.get(t))} | {_pct(f)} | {_pct(a)} | {_pct(a / f if f else float('nan'))} |")
    goal = lora.get("goal")
    if goal is None:
        goal = lora_goal(lora)
    lines += ["", f"Goal (this run): every task ≥ {GOAL_ACCURACY:.2f} of its adapter's own accuracy at ≤ the "
              "adapters' bytes: " + (", ".join(goal) or "not met"), "",
              "per-task norm = acc(θ₀ + ṽ_t on t) / acc(θ₀ + ΔW_t on t) at λ = 1, ΔW_t = s·B_t·A_t the adapter's own "
              "(mean / min over tasks, %); rel. err = mean ‖ṽ_t − ΔW_t‖/‖ΔW_t‖; add norm = mean over tasks of "
              "acc(θ₀ + λ·Σ_t ṽ_t on t) / acc(θ₀ + ΔW_t on t) at the λ chosen on dev; neg = target test accuracy "
              "after θ₀ − λ·ṽ_target (control as % of pretrained), * = no λ kept the control ≥ 95 %; stored = exact "
              "bytes of every stored tensor (adapters: the adapter files' tensors); × adapters = stored / adapters; "
              "build s = the store's build time."]
    return "\n".join(lines)


def _group(r: Mapping[str, Any]) -> str:
    m = r["method"]
    cores = get_store_method(m).defaults.get("cores") if m in store_method_names() else None
    if cores is not None:  # lora-joint: grouped by its cores
        return f"{m} ({(r.get('params') or {}).get('cores', cores)} cores)"
    return {"adapters": "adapters as they are", "bases": "pca (dense ΔW)", "residual": "pca M=0 + lowrank"}.get(m, m)


def _place_labels(fig: Any, ax: Any, items: Sequence[tuple[float, float, str, Any]]) -> None:
    """Annotate each (x, y, text, colour) at the nearest offset (right or left of the point, then further up or
    down) whose box stays inside the axes and overlaps no point and no label placed before."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.transforms import Bbox

    box = ax.get_window_extent(renderer)
    r = 4 * fig.dpi / 72  # about a marker's radius, in pixels
    taken = []
    for x, y, _, _ in items:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    offsets = [(dx, dy, ha) for k in range(8) for dy in (2 + 7 * k, -9 - 7 * k)
               for dx, ha in ((5, "left"), (-5, "right"))]
    for x, y, text, color in items:
        for dx, dy, ha in offsets:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5, color=color,
                            ha=ha)
            bb = t.get_window_extent(renderer)
            inside = bb.x0 >= box.x0 and bb.x1 <= box.x1 and bb.y0 >= box.y0 and bb.y1 <= box.y1
            if inside and not any(bb.overlaps(o) for o in taken):
                taken.append(bb)
                break
            t.remove()
        else:  # nowhere free: the first place
            ax.annotate(text, (x, y), xytext=offsets[0][:2], textcoords="offset points", fontsize=6.5, color=color)


def make_lora_plot(result: Mapping[str, Any], out: Path) -> Path:
    """frontier_lora.png: per-task (mean, with the min as a lower bar) and addition normalized accuracy of the LoRA
    rows against bytes stored (log x), the adapters' bytes marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = result["lora"]
    rows = [r for r in lora["rows"] if r["bytes_stored"] > 0]
    groups = list(dict.fromkeys(_group(r) for r in rows))
    cmap = plt.get_cmap("tab10")
    color = {g: cmap(i % cmap.N) for i, g in enumerate(groups)}
    markers = {"adapters as they are": "*", "lora-factors": "o", "lora-joint (full cores)": "s",
               "lora-joint (diagonal cores)": "D", "pca (dense ΔW)": "^", "pca M=0 + lowrank": "v"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), sharex=True)
    xs = [r["bytes_stored"] / 1e6 for r in rows]
    labels: dict[Any, list[tuple[float, float, str, Any]]] = {}
    for ax, key in zip(axes, ("per_task", "addition")):
        ys_all: list[float] = []
        labels[ax] = []
        for g in groups:
            pts = [r for r in rows if _group(r) == g]
            x = [r["bytes_stored"] / 1e6 for r in pts]
            if key == "per_task":
                y = [r["per_task_mean"] for r in pts]
                lo = [max(0.0, r["per_task_mean"] - r["per_task_min"]) for r in pts]
                ax.errorbar(x, y, yerr=[lo, [0.0] * len(lo)], fmt="none", ecolor=color[g], alpha=0.5, lw=1,
                            capsize=2, zorder=2)
                ys_all += [r["per_task_min"] for r in pts]
            else:
                y = [float(r["addition"]["mean_normalized_test"]) for r in pts]
            ys_all += y
            m = markers.get(g, "o")
            ax.scatter(x, y, color=color[g], marker=m, s=110 if m == "*" else 40, label=g, zorder=3)
            labels[ax] += [(xi, yi, r["label"].replace("lora-joint ", "").replace("lora-factors ", "factors "),
                            color[g]) for xi, yi, r in zip(x, y, pts) if not math.isnan(yi)]
        ax.axvline(lora["adapter_bytes"] / 1e6, color="black", ls=":", lw=1, label="adapters' bytes")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        if key == "per_task":
            ax.axhline(GOAL_ACCURACY, color="green", ls="--", lw=0.8, label=f"goal {GOAL_ACCURACY:.2f}")
        finite = [v for v in ys_all if not math.isnan(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.01, max(1.0, max(finite)) + 0.01)
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.5, max(xs) * 4)  # room for the labels of the extreme points
        ax.set_xlabel("bytes stored for all T adapters (MB, log scale)")
        ax.set_ylabel("per-task normalized accuracy (each ΔW alone, λ = 1; bar: min over tasks)" if key == "per_task"
                      else "addition: mean normalized accuracy (λ on dev)", fontsize=8)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    s = lora["settings"]
    fig.suptitle(f"LoRA adapters (T = {len(lora['adapters'])}, r = {s['r']}): storage vs accuracy, normalized by "
                 "each adapter's own accuracy", fontsize=10)
    fig.tight_layout()
    for ax, items in labels.items():  # after the layout: the boxes are measured where they will be drawn
        _place_labels(fig, ax, items)
    path = out / "frontier_lora.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


__all__ = ["FAMILY", "JOINT_DIAG_K", "JOINT_KS", "Adapters", "LoraContext", "adapter_deltas", "adapter_file_bytes",
           "compress_lora",
           "lora_configs", "lora_goal", "lora_markdown", "lora_settings", "make_lora_plot", "measure_lora",
           "train_adapters"]


class LoraRows:
    """``run_frontier(extra=LoraRows(settings))``: the adapters trained (or reused) after the fine-tunes, then the
    LoRA rows measured with the frontier's evaluator (``frontier.FrontierRows``)."""

    key = "lora"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.adapters: Adapters | None = None

    def prepare(self, tasks: Mapping[str, Any], work: Path, settings: Any, encoder: Any, progress: bool) -> None:
        self.adapters = train_adapters(tasks, work, settings, self.settings, encoder, progress)

    def measure(self, pre_dir: Path, names: Sequence[str], ev: Any, cfg: BenchConfig,
                stores: Path) -> dict[str, Any]:
        assert self.adapters is not None, "prepare() first"
        return measure_lora(self.adapters, pre_dir, names, ev, cfg, stores)

    def markdown(self, result: Mapping[str, Any]) -> str:
        return lora_markdown(result)

    def plot(self, result: Mapping[str, Any], out: Path) -> Path:
        return make_lora_plot(result, out)
