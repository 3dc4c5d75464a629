"""What the validation before a commit costs (issue 27): a build of T fine-tunes of a synthetic model with per-task
residuals, against the part of it that re-opens the written store and decodes every coded entry
(``store.commit.validate_store_dir``), and a full ``verify`` (digests, then every entry decoded and compared with
the manifest's norms and errors).

    python benchmarks/validate_cost.py [--params 20e6] [--tasks 4] [--residual lowrank:rank=16+int8]

Prints a table, writes benchmarks/results/validate_cost.{json,md}. Wall times on a shared machine: read them as
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def family(root: Path, params: int, T: int) -> tuple[Path, dict[str, Path]]:
    """A pretrained model of square float32 matrices (~``params`` values) and T fine-tunes of low-rank-ish deltas."""
    g = torch.Generator().manual_seed(0)
    n = 512
    k = max(1, round(params / (n * n)))
    pre = {f"layer.{i}.weight": torch.randn(n, n, generator=g) * 0.02 for i in range(k)}
    out = {}
    for d, sd in [("pre", pre)] + [(f"ft{t}", None) for t in range(T)]:
        p = root / d
        p.mkdir(parents=True)
        if sd is None:
            sd = {name: w + 0.01 * (torch.randn(n, 8, generator=g) @ torch.randn(8, n, generator=g)) / 8
                  + 1e-4 * torch.randn(n, n, generator=g) for name, w in pre.items()}
            out[d] = p
        save_file(sd, str(p / "model.safetensors"))
        (p / "config.json").write_text("{}")
    return root / "pre", out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=20e6)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--residual", default="lowrank:rank=16+int8")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a loaded shared machine, tiny multi-threaded products "
                    "spend most of their time waiting for each other)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tvbasis.engine import RunOptions
    from tvbasis.store import BasisStore, build_store
    from tvbasis.store.commit import validate_store_dir

    work = Path(tempfile.mkdtemp(prefix="tvb-validate-"))
    try:
        pre, fts = family(work / "fam", int(args.params), args.tasks)
        run = RunOptions(progress=False)
        t0 = time.perf_counter()
        build_store(pre, fts, "pca", 1, work / "s", residual=args.residual, run=run).close()
        build_s = time.perf_counter() - t0
        store = BasisStore.open(work / "s")
        t0 = time.perf_counter()
        validate_store_dir(store.root, store.manifest, store.root)
        validate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        problems = store.verify()
        verify_s = time.perf_counter() - t0
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmd = "python benchmarks/validate_cost.py " + " ".join(sys.argv[1:])
    res = {"command": cmd.strip(), "params": int(args.params), "tasks": args.tasks, "residual": args.residual,
           "build_s": round(build_s, 2), "validate_in_build_s": round(validate_s, 2),
           "validate_share_of_build": round(validate_s / build_s, 3), "verify_s": round(verify_s, 2),
           "verify_problems": len(problems)}
    rows = [("build (validation included)", f"{build_s:.2f} s"),
            ("of which: validation before commit (decode every entry, compare norms)",
             f"{validate_s:.2f} s ({100 * validate_s / build_s:.0f} %)"),
            ("verify (digests + decode + norms)", f"{verify_s:.2f} s")]
    table = "\n".join(["| step | wall |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])
    print(table)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate_cost.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "validate_cost.md").write_text(f"# Cost of validating before commit (issue 27)\n\nCommand: `{cmd.strip()}` "
                                          f"({res['params']:.3g} float32 values, T = {args.tasks}, residual "
                                          f"`{args.residual}`, {args.threads} torch thread(s); shared 2-core "
                                          f"machine under load, one run: read the ratio, not the seconds).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
