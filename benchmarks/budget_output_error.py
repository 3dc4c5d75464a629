"""Does a label-free output error on each task's own text rank the tasks a budget store hurts most? (issue 22)

The budget allocator equalises every task's relative weight error; the frontier shows equal weight error is not
equal accuracy (at 128x one task keeps 0.958 of its accuracy where two keep 1.000). A calibration set of unlabelled
text per task is what ``tvbasis build --calibration`` takes, so the natural next signal is each task's *output*
error on its own text: the sentence embeddings of θ₀ + ṽ_t against θ₀ + v_t. This script measures it for a store
and sets it beside the per-task accuracy a frontier run measured for the same store (``--frontier-json``,
``--row``), with Spearman's rank correlation between output error and accuracy loss.

    tvbasis build --pretrained W/pretrained --finetuned banking=W/finetuned/banking ... --budget 128x --out S
    python benchmarks/budget_output_error.py --work W --store S --frontier-json F/frontier.json --row "budget 128x"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.bench.spread import spearman
from tvbasis.eval.encoder import Encoder
from tvbasis.eval.heads import build_head
from tvbasis.eval.probe import total_variation
from tvbasis.eval.tasks import load_task
from tvbasis.store import open_store
from tvbasis.vectors import TaskVector


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="bench work dir (pretrained/, finetuned/<task>/)")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--frontier-json", type=Path, required=True)
    p.add_argument("--row", required=True, help="the frontier row built with the same plan as --store")
    p.add_argument("--texts", type=int, default=128, help="training texts per task (the frontier's CAL_TEXTS)")
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--name", default="budget_output_error")
    a = p.parse_args()

    frontier = json.loads(a.frontier_json.read_text())
    row = next(r for r in frontier["rows"] if r["label"] == a.row)
    store = open_store(a.store)
    pre = a.work / "pretrained"
    enc = Encoder(pre, max_length=64)
    out: dict[str, dict[str, float]] = {}
    for t in store.task_names:
        task = load_task(t, max_train=a.max_train, seed=0)
        texts = list(task["train"].texts)[: a.texts]
        head = build_head(enc, task)
        v = dict(TaskVector.from_checkpoints(pre, a.work / "finetuned" / t).items())
        vh = dict(store.reconstruct(t).items())
        enc.set_delta(None)
        e0 = enc.encode(texts)
        enc.set_delta(v)
        ev = enc.encode(texts)
        enc.set_delta(vh)
        eh = enc.encode(texts)
        moved = float((ev - e0).norm(dim=1).mean())
        lv, lh = head.logits(ev).double(), head.logits(eh).double()
        kl = (lv.softmax(-1) * (lv.log_softmax(-1) - lh.log_softmax(-1))).sum(-1)
        top2 = lv.topk(2, dim=-1).values
        out[t] = {
            "output_rel_error": float((eh - ev).norm(dim=1).mean()) / moved,
            "one_minus_cos": float(1 - (eh * ev).sum(1).mean()),
            "flips": float((lv.argmax(-1) != lh.argmax(-1)).double().mean()),
            "kl": float(kl.mean()),
            "tv": total_variation(lv.softmax(-1), lh.softmax(-1)),
            "margin": float((top2[:, 0] - top2[:, 1]).median()),
            "weight_rel_error": float(row["rel_errors"][t]),
            "per_task_norm": float(row["per_task"][t]),
        }
        log(f"{t}: {out[t]}")
    names = list(out)
    loss = [1 - out[t]["per_task_norm"] for t in names]
    rho = {k: spearman([out[t][k] for t in names], loss)
           for k in ("output_rel_error", "one_minus_cos", "flips", "kl", "tv", "margin")}
    table = markdown_table(
        ["task", "accuracy kept (frontier)", "weight rel. error", "output rel. error", "1 − cos(e_ṽ, e_v)",
         "prediction flips", "KL(p_v ‖ p_ṽ)", "TV(p_v, p_ṽ)", "median top-2 margin"],
        [[t, f"{out[t]['per_task_norm']:.3f}", f"{out[t]['weight_rel_error']:.3f}",
          f"{out[t]['output_rel_error']:.4f}", f"{out[t]['one_minus_cos']:.4f}", f"{out[t]['flips']:.3f}",
          f"{out[t]['kl']:.4f}", f"{out[t]['tv']:.4f}", f"{out[t]['margin']:.2f}"]
         for t in sorted(names, key=lambda t: out[t]["per_task_norm"])])
    table += (f"\n\nSpearman ρ with the accuracy loss over {len(names)} tasks: output rel. error "
              f"{rho['output_rel_error']:.2f}, 1 − cos {rho['one_minus_cos']:.2f}, prediction flips {rho['flips']:.2f}, "
              f"KL {rho['kl']:.2f}, TV {rho['tv']:.2f}, median margin {rho['margin']:.2f} (1 = ranks the tasks exactly). "
              f"Output rel. error = mean ‖e(θ₀+ṽ) − e(θ₀+v)‖ / mean ‖e(θ₀+v) − e(θ₀)‖ over {a.texts} training texts "
              f"of the task, e the L2-normalised sentence embedding the tasks are classified with; flips, KL and margin through "
              f"the task's frozen head (logits = 20 · cos to its label names' pretrained embeddings), no labels used.")
    save_results(a.name, {"store": str(a.store), "row": a.row, "frontier": str(a.frontier_json),
                          "tasks": out, "spearman": rho}, table)


if __name__ == "__main__":
    main()
