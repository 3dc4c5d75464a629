"""The budget sweep's two losses on the default frontier's fine-tunes: ``--budget`` with ``loss=relative`` (each
tensor's error against the pretrained weights it perturbs) at 128x and 256x, beside the task vectors; the
Frobenius rows are ``benchmarks/results/frontier-budget`` (same fine-tunes, same protocol).

    python benchmarks/budget_loss.py --work tvbasis-work --out benchmarks/results/frontier-budget/relative-loss
"""

from __future__ import annotations

import argparse

from tvbasis.bench.bench import BenchConfig
from tvbasis.bench.frontier import Config, run_frontier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="tvbasis-work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budgets", default="128x,256x")
    a = ap.parse_args()
    cfgs = [Config("task vectors (fp32)", "task vectors", "full")]
    for b in a.budgets.split(","):
        cfgs.append(Config(f"budget {b} relative", "tvbasis --budget relative", "budget",
                           {"budget": b, "loss": "relative"}))
    r = run_frontier(BenchConfig(work=a.work, out=a.out, progress=False), configs=cfgs)
    print(r["markdown"])


if __name__ == "__main__":
    main()
