"""LoRA collections in factor space: ``tvbasis.lora.joint_compress`` (shared per-tensor bases U, V + per-adapter
cores, the Compress-then-Serve form) against the adapters as they are and against a dense basis store.

(i) synthetic: the T = 16 adapters (r = 16, query and value of every layer, B = B_cluster + B_task, A random per
    adapter) of ``benchmarks/lora_store.py`` over its 400 MB BERT-like model. Per configuration (cores full/diag,
    k, clusters), in a child process: bytes, per-adapter relative error of ΔW (from the stored values, in factor
    space), build time, CPU time and peak private memory; rows for the adapters as they are, every ΔW expanded
    (float32), and the dense PCA store of ``lora_store.py`` (``tvbasis build --method pca -M 4``: M bases + the
    mean over the adapted tensors; its per-adapter errors follow exactly from the factor-space Gram).
(ii) ``--real``: one PEFT LoRA adapter per task (``tvbasis.eval.lora_finetune``: r = 8 on every linear layer of
    the blocks, cached in the work directory) on the bundled MiniLM, default bench tasks; per configuration the
    per-task test accuracy of each reconstructed adapter at λ = 1, normalized by the adapter's own.

    python benchmarks/lora_factors.py                        # (i)
    python benchmarks/lora_factors.py --real                 # (i) and (ii)
    python benchmarks/lora_factors.py --no-synthetic --real  # (ii) only

Results: benchmarks/results/lora_factors.json and .md (the command at the top). Computations run on one thread
(``--threads``): the reduced problems are small matrices, where thread synchronisation costs more than it saves
on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, common_args, log, make_family, markdown_table, mb, run_measured, save_results
from lora_store import write_adapter
from tvbasis.bases import get_basis_method
from tvbasis.io import open_checkpoint
from tvbasis.lora import AdapterFactors, factor_gram, joint_compress, open_adapters

SYNTHETIC = ("full:32", "full:64", "full:96", "full:128", "full:256", "diag:128", "diag:256", "full:64:4:subspace")
REAL = ("full:8", "full:16", "full:24", "full:32", "full:48x8", "full:32x16", "diag:24", "diag:48")


def parse_config(text: str) -> dict[str, object]:
    """``cores:k[:clusters[:affinity]]``, e.g. ``full:64``, ``full:64:4:subspace`` or ``full:32x8`` (rectangular
    cores, k_out × k_in)."""
    parts = text.split(":")
    k = tuple(int(x) for x in parts[1].split("x"))
    cfg = {"cores": parts[0], "k": k[0] if len(k) == 1 else k, "clusters": int(parts[2]) if len(parts) > 2 else 1,
           "affinity": parts[3] if len(parts) > 3 else "cosine"}
    cfg["label"] = (f"{cfg['cores']} k={parts[1]}" + (f", {cfg['clusters']} clusters ({cfg['affinity']})"
                                                       if cfg["clusters"] > 1 else ""))
    return cfg


def compress(pretrained: Path, adapters: dict[str, Path], cfg: dict[str, object]) -> tuple[object, dict]:
    ads = open_adapters(pretrained, adapters)
    t0 = time.perf_counter()
    jc = joint_compress(ads, k=cfg["k"], cores=str(cfg["cores"]), clusters=int(cfg["clusters"]),
                        affinity=str(cfg["affinity"]))
    return jc, {**jc.summary(), "build_s": time.perf_counter() - t0, "expanded_nbytes": jc.expanded_nbytes}


def child(a: argparse.Namespace) -> None:
    """One measured configuration: read the adapters (``open``: only read every factor) and compress."""
    torch.set_num_threads(a.threads)
    spec = json.loads(a.child)
    pretrained, adapters = Path(spec["pretrained"]), {n: Path(p) for n, p in spec["adapters"].items()}
    if spec["config"] == "open":
        ads = open_adapters(pretrained, adapters)
        t0 = time.perf_counter()
        held = [AdapterFactors.from_checkpoint(x) for x in ads.values()]
        out = {"build_s": time.perf_counter() - t0, "tensors": sum(len(h.factors) for h in held)}
    else:
        _, out = compress(pretrained, adapters, parse_config(spec["config"]))
    Path(a.child_out).write_text(json.dumps(out))


def pca_store(G: np.ndarray, M: int, touched_numel: int) -> dict[str, object]:
    """The dense PCA basis store of the same adapters: bytes (M bases + the mean, float32, over the tensors the
    adapters change) and per-adapter relative errors, exactly, from the Gram: V̂ = V·R, ‖v̂_t − v_t‖² = (EᵀGE)_tt."""
    fit = get_basis_method("pca").fit(G, M)
    R = fit.B @ fit.W + np.outer(fit.mean_weights, fit.mean_coef)
    E = R - np.eye(G.shape[0])
    err = np.sqrt(np.clip(np.diag(E.T @ G @ E), 0, None) / np.diag(G))
    return {"nbytes": (M + 1) * touched_numel * 4, "rel_errors": err.tolist()}


def synthetic(a: argparse.Namespace) -> tuple[str, dict[str, object]]:
    fam = make_family(a.work, a.size, "float32", T=0)
    hidden, layers = fam.config["hidden_size"], fam.config["num_hidden_layers"]
    root = fam.root / f"lora-r{a.rank}"
    adapters = {f"task{t:02d}": root / f"ad{t:02d}" for t in range(a.T)}
    for t, p in enumerate(adapters.values()):
        write_adapter(p, fam.pretrained, layers, hidden, a.rank, t, clusters=4)
    files = sum(f.stat().st_size for p in adapters.values() for f in p.iterdir())
    ads = open_adapters(fam.pretrained, adapters)
    fg = factor_gram(ads)
    pre = open_checkpoint(fam.pretrained)
    touched = sorted(set().union(*(x.changed_tensors() for x in ads.values())))
    numel = sum(pre.spec(n).numel for n in touched)
    pca = pca_store(fg.G, a.M, numel)
    lora_store = RESULTS / "lora_store.json"
    measured_store = None
    if lora_store.is_file():
        runs = json.loads(lora_store.read_text()).get("runs", [])
        measured_store = next((r["store_bytes"] for r in runs if r.get("inputs") == "LoRA adapters"), None)
    in_bytes = sum(x.weights.nbytes for x in ads.values())
    runs: list[dict[str, object]] = []
    spec = {"pretrained": str(fam.pretrained), "adapters": {n: str(p) for n, p in adapters.items()}}
    for cfg_text in ("open", *a.configs):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            log(f"synthetic: {cfg_text} ...")
            m = run_measured([sys.executable, __file__, "--threads", str(a.threads), "--child",
                              json.dumps({**spec, "config": cfg_text}), "--child-out", tmp.name])
            out = json.loads(Path(tmp.name).read_text())
        runs.append({"config": cfg_text, **out, "measured": m.to_json()})
        log(f"  wall {m.wall_s:.1f} s, peak anon {mb(m.peak_anon_bytes)}"
            + (f", {mb(out['nbytes'])}, max rel err {max(out['rel_errors'].values()):.3f}" if "nbytes" in out else ""))
    base = next(r for r in runs if r["config"] == "open")
    rows = [["adapters as they are", mb(in_bytes), "1.00", "0", "0", "–", "–", "–"],
            ["every ΔW expanded (float32)", mb(a.T * numel * 4), f"{a.T * numel * 4 / in_bytes:.2f}", "0", "0",
             "–", "–", "–"],
            [f"dense PCA store M={a.M} (lora_store.py)", mb(pca["nbytes"]) + (f" (measured {mb(measured_store)})"
                                                                          if measured_store else ""),
             f"{pca['nbytes'] / in_bytes:.2f}", f"{np.mean(pca['rel_errors']):.3f}", f"{max(pca['rel_errors']):.3f}",
             "–", "–", "–"]]
    for r in runs[1:]:
        errs = list(r["rel_errors"].values())
        mm = r["measured"]
        rows.append([parse_config(r["config"])["label"], mb(r["nbytes"]), f"{r['nbytes'] / in_bytes:.2f}",
                     f"{np.mean(errs):.3f}", f"{max(errs):.3f}", f"{r['build_s']:.1f}", f"{mm['cpu_s']:.1f}",
                     f"{mb(mm['peak_anon_bytes'])} "
                     f"({(mm['peak_anon_bytes'] - base['measured']['peak_anon_bytes']) / 1e6:+.0f} MB)"])
    head = (f"(i) Synthetic: T = {a.T} LoRA adapters (r = {a.rank}, query and value of {layers} layers, hidden "
            f"{hidden}; `benchmarks/lora_store.py`'s family) = {mb(in_bytes)} of factors ({mb(files)} on disk). "
            "joint_compress per tensor: shared U (out × k), V (in × k), per-adapter cores (full k × k or diagonal k), "
            "float32. rel err = ‖ΔW_i − U Σ_i Vᵀ‖ / ‖ΔW_i‖ over all of adapter i's tensors (from the stored values, "
            "in factor space); mean and max over the adapters. build = the joint_compress call (read + fit), CPU = "
            f"the child process, peak = its peak private memory (+ over a child that only reads every factor: "
            f"{mb(base['measured']['peak_anon_bytes'])}). One thread. Machine load average "
            f"{runs[-1]['measured']['loadavg_1m']:.1f} (shared).\n\n")
    table = head + markdown_table(["method", "bytes", "× adapters", "mean rel err", "max rel err", "build s",
                                   "CPU s", "peak anon"], rows)
    table += ("\n\nThis family is adversarial for shared bases: every adapter's A is an independent random "
              f"r × {hidden} matrix, so the {a.T} adapters' row spaces are {a.T * a.rank} independent directions "
              "per tensor, and only k ≥ Σr (full: 256) is exact; a shared V smaller than that drops the same share "
              "of every adapter. Real adapters trained from one recipe share far more (part ii).")
    payload = {"params": {"T": a.T, "size": a.size, "rank": a.rank, "M": a.M, "configs": list(a.configs),
                          "threads": a.threads},
               "adapter_bytes": in_bytes, "adapter_file_bytes": files, "expanded_bytes": a.T * numel * 4,
               "pca_store": {**pca, "measured_store_bytes": measured_store}, "runs": runs}
    return table, payload


def real(a: argparse.Namespace) -> tuple[str, dict[str, object]]:
    from tvbasis.bench.bench import QUICK_TASKS
    from tvbasis.eval.finetune import FinetuneSettings, pretrained_encoder
    from tvbasis.eval.lora_finetune import LoraSettings, lora_finetune
    from tvbasis.eval.metrics import Evaluator, mean, normalized_accuracy
    from tvbasis.eval.tasks import load_task
    from tvbasis.vectors import TaskVector

    names = tuple(a.tasks.split(",")) if a.tasks else QUICK_TASKS
    settings = FinetuneSettings(max_train=a.max_train)
    lora = LoraSettings()
    t0 = time.time()
    tasks = {n: load_task(n, max_train=a.max_train, max_dev=32, max_test=a.max_test, seed=0) for n in names}
    enc = pretrained_encoder(a.real_work, settings)
    results = {n: lora_finetune(t, a.real_work, settings, lora, encoder=enc, progress=False) for n, t in tasks.items()}
    train_s = time.time() - t0
    pre_dir = Path(a.real_work) / "pretrained"
    paths = {n: r.path for n, r in results.items()}
    ev = Evaluator(enc, tasks, progress=False)
    zs = ev.zero_shot("test")
    own_delta = {n: {k: v.float() for k, v in TaskVector.from_checkpoints(pre_dir, p).to_state_dict().items()}
                 for n, p in paths.items()}
    own = {n: ev.with_delta(own_delta[n], 1.0, "test", [n])[n] for n in names}
    ads = open_adapters(pre_dir, paths)
    in_bytes = sum(x.weights.nbytes for x in ads.values())
    fg = factor_gram(ads)
    touched = sorted(set().union(*(x.changed_tensors() for x in ads.values())))
    pre = open_checkpoint(pre_dir)
    numel = sum(pre.spec(n).numel for n in touched)
    rows = [["adapters as they are", mb(in_bytes), "1.00", "0", "0", "100.0", "100.0",
             " ".join(f"{100 * own[n]:.1f}" for n in names)]]
    runs = []
    for text in a.real_configs:
        cfg = parse_config(text)
        jc, out = compress(pre_dir, paths, cfg)
        acc = {n: ev.with_delta(jc.reconstruct(n), 1.0, "test", [n])[n] for n in names}
        norm = {n: normalized_accuracy(acc[n], own[n]) for n in names}
        errs = list(out["rel_errors"].values())
        runs.append({"config": text, **out, "accuracy": acc, "normalized": norm})
        rows.append([cfg["label"], f"{out['nbytes'] / 1e6:.2f} MB", f"{out['nbytes'] / in_bytes:.2f}",
                     f"{np.mean(errs):.3f}", f"{max(errs):.3f}", f"{100 * mean(norm.values()):.1f}",
                     f"{100 * min(norm.values()):.1f}", " ".join(f"{100 * acc[n]:.1f}" for n in names)])
        log(f"real: {cfg['label']}: {out['nbytes'] / 1e6:.2f} MB, min norm acc {min(norm.values()):.3f}")
    pca = pca_store(fg.G, min(a.M, len(names) - 1), numel)
    rows.insert(1, [f"dense PCA store M={min(a.M, len(names) - 1)} (bytes, rel err from G)",
                    f"{pca['nbytes'] / 1e6:.2f} MB", f"{pca['nbytes'] / in_bytes:.2f}",
                    f"{np.mean(pca['rel_errors']):.3f}", f"{max(pca['rel_errors']):.3f}", "–", "–", "–"])
    head = (f"(ii) Real adapters: one PEFT LoRA adapter per task (r = {lora.r}, α = {lora.alpha:g}, every linear "
            f"layer of the 6 blocks, lr {lora.lr:g}, {a.max_train} training examples, the full fine-tunes' recipe "
            f"otherwise; trained or reused in {train_s:.0f} s) on the bundled MiniLM: {mb(in_bytes)} of factors for "
            f"{len(names)} tasks. Accuracy of each reconstructed adapter on its own task at λ = 1, test split "
            f"({a.max_test} examples per task); norm = accuracy / the adapter's own. Tasks: {', '.join(names)}; "
            f"zero-shot {' '.join(f'{100 * zs[n]:.1f}' for n in names)}.\n\n")
    table = head + markdown_table(["method", "bytes", "× adapters", "mean rel err", "max rel err", "mean norm %",
                                   "min norm %", "per-task acc %"], rows)
    payload = {"tasks": list(names), "adapter_bytes": in_bytes, "zero_shot": zs, "own": own,
               "cosine": fg.cosine.tolist(), "pca_store": pca, "train_s": train_s, "runs": runs,
               "lora": {"r": lora.r, "alpha": lora.alpha, "lr": lora.lr, "targets": lora.target_modules}}
    return table, payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--size", default="400MB")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("-M", type=int, default=4, help="bases of the dense PCA store compared against (default 4)")
    ap.add_argument("--configs", type=lambda s: tuple(s.split(",")), default=SYNTHETIC,
                    help="synthetic configurations cores:k[:clusters[:affinity]] (default %(default)s)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--real", action="store_true", help="also (ii): real MiniLM LoRA adapters")
    ap.add_argument("--real-configs", type=lambda s: tuple(s.split(",")), default=REAL)
    ap.add_argument("--real-work", default="/tmp/tvbasis-lora-work", help="work directory of (ii) (cached)")
    ap.add_argument("--tasks", help="tasks of (ii), comma-separated (default: the quick bench tasks)")
    ap.add_argument("--max-train", type=int, default=500)
    ap.add_argument("--max-test", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    common_args(ap)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    torch.set_num_threads(a.threads)
    parts, payload = [], {}
    if not a.no_synthetic:
        a.work.mkdir(parents=True, exist_ok=True)
        t, p = synthetic(a)
        parts.append(t)
        payload["synthetic"] = p
    if a.real:
        t, p = real(a)
        parts.append(t)
        payload["real"] = p
    if not parts:
        raise SystemExit("nothing to run (--no-synthetic without --real)")
    save_results(a.name or "lora_factors", payload, "\n\n".join(parts))


if __name__ == "__main__":
    main()
