"""LoRA-to-LoRA merges: `tvbasis merge --out-format peft` (lora/merge_peft.py) against PEFT's
``add_weighted_adapter`` on the same adapters — wall time, agreement of the merged ΔW, and the rank cut's error.

A BERT encoder (random weights, float32; ``--hidden``, ``--layers``) and T LoRA adapters (rank ``--r`` on query,
key, value and every dense layer, random A and B) are written to a work directory. For each combination both
tools merge the same adapters with the same weights; every module's ΔW of the two results is compared
(largest relative Frobenius difference) and both wall times are reported (PEFT's includes loading the T adapters
into the model, tvbasis's reading them from disk and writing the adapter). The relative error is tvbasis's
record of ‖merged ΔW − written adapter's ΔW‖ / ‖merged ΔW‖.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.lora.merge_peft import merge_adapters


def build(work: Path, hidden: int, layers: int, T: int, r: int, seed: int) -> Any:
    import peft
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                  intermediate_size=4 * hidden, vocab_size=1000, max_position_embeddings=128)
    base = transformers.BertModel(cfg).eval()
    base.save_pretrained(str(work / "pre"))
    for t in range(T):
        torch.manual_seed(seed + 1 + t)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=["query", "key", "value", "dense"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.02)
        model.save_pretrained(str(work / f"ad{t}"))
    return base


def deltas(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    import peft
    return {n: m.get_delta_weight(adapter).detach().double() for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/tvbasis-lora-merge")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("-T", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="lora_merge")
    args = ap.parse_args()
    import peft
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = build(work, args.hidden, args.layers, args.T, args.r, args.seed)
    names = [f"ad{t}" for t in range(args.T)]
    weights = [1.0, -0.5, 0.75, 2.0, 0.3, -1.2, 0.9, 1.1][:args.T]
    cases = [("cat", {}), ("svd", {"svd_rank": args.r}), ("svd", {"svd_rank": 2 * args.r}),
             ("svd", {"svd_rank": args.T * args.r}), ("ties_svd", {"density": 0.5, "svd_rank": args.T * args.r})]
    rows, results = [], []
    for method, kw in cases:
        t0 = time.perf_counter()
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(work / names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(work / n), adapter_name=n)
        model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kw)
        ref = deltas(model, "merged")
        t_peft = time.perf_counter() - t0
        out = work / f"out_{method}_{kw.get('svd_rank', 0)}"
        t0 = time.perf_counter()
        res = merge_adapters(work / "pre", {n: work / n for n in names}, out, method, dict(zip(names, weights)),
                             rank=kw.get("svd_rank"), density=kw.get("density", 1.0))
        t_tv = time.perf_counter() - t0
        mine = deltas(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out), adapter_name="m"), "m")
        worst = max(float((mine[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
        r = {"method": method, "rank": kw.get("svd_rank"), "modules": len(ref), "peft_s": t_peft, "tvbasis_s": t_tv,
             "max_rel_diff_vs_peft": worst, "rel_error_of_rank_cut": res.rel_error}
        results.append(r)
        log(f"{method} rank {r['rank']}: peft {t_peft:.2f}s, tvbasis {t_tv:.2f}s, diff {worst:.1e}")
        rows.append([method, r["rank"] or f"{args.T}·{args.r} (Σr)", len(ref), f"{t_peft:.2f}", f"{t_tv:.2f}",
                     f"{worst:.1e}", f"{res.rel_error:.3f}"])
    table = markdown_table(["method", "rank", "modules", "PEFT add_weighted_adapter (s)", "tvbasis (s)",
                            "max rel diff of ΔW vs PEFT", "rel error of the rank cut"], rows)
    note = (f"BERT encoder hidden {args.hidden}, {args.layers} layers, float32; T = {args.T} LoRA adapters of rank "
            f"{args.r} on query/key/value/dense (random factors), weights {weights}; CPU, torch threads "
            f"{torch.get_num_threads()}. PEFT's time includes loading the adapters into the model; tvbasis's reading "
            f"them and writing the merged adapter.")
    save_results(args.name, {"config": vars(args), "weights": weights, "rows": results, "note": note},
                 note + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
