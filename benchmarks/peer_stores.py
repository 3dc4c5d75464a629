"""The Delta-CoMe and UltraDelta store methods built as a user would, on real MiniLM fine-tunes: bytes on disk (every
file of the store: data, manifest, headers), the ratio to the float32 task vectors, each task's relative error as
the store records it, and the build's wall time — next to a plain PCA build (the time reference), an M = 0
``lowrank:rank=32+int4`` store and BitDelta. Rows with ``rest sparse-rows+int8`` code the tensors the peer leaves
alone (embeddings, norms, biases) as the touched rows at int8 instead of the papers' float16 (``none`` for
UltraDelta).

One store per row, built in this process one after the other on one thread (``--threads``), ``RunOptions(
progress=False)``; wall time includes the statistics passes of ``ultradelta`` (``tvbasis.store.ultradelta``).

    python benchmarks/peer_stores.py --work /tmp/h0-work        # pretrained/ and finetuned/<task>/ inside

Results: benchmarks/results/peer_stores.json and .md (the command at the top).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, save_results
from tvbasis.engine import RunOptions
from tvbasis.store import build_store
from tvbasis.store.ultradelta import build_ultradelta_store

#: (label, method, M, options, residual)
ROWS = [("pca M=1 (plain build: the time reference)", "pca", 1, {}, None),
        ("M=0 lowrank:rank=32+int4", "pca", 0, {}, "lowrank:rank=32+int4"),
        ("bitdelta", "bitdelta", None, {}, None),
        ("deltacome (α = 1/16)", "deltacome", None, {}, None),
        ("deltacome (α = 1/32)", "deltacome", None, {"alpha": 0.03125}, None),
        ("deltacome (α = 1/16), rest sparse-rows+int8", "deltacome", None, {"rest": "sparse-rows+int8"}, None),
        ("deltacome (α = 1/16), rest sparse-rows+int8, + zstd", "deltacome", None,
         {"rest": "sparse-rows+int8", "zstd": True}, None),
        ("ultradelta (density 0.03)", "ultradelta", None, {}, None),
        ("ultradelta (density 0.03) + zstd", "ultradelta", None, {"zstd": True}, None),
        ("ultradelta (density 0.03) + zstd, rest sparse-rows+int8", "ultradelta", None,
         {"zstd": True, "rest": "sparse-rows+int8"}, None)]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a tvbasis finetune work directory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="peer_stores")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pre = args.work / "pretrained"
    fts = {d.name: d for d in sorted((args.work / "finetuned").iterdir()) if d.is_dir()}
    run = RunOptions(progress=False, workers=1)
    tmp = Path(tempfile.mkdtemp(prefix="peer-stores-"))
    results = {}
    try:
        for label, method, M, options, residual in ROWS:
            out = tmp / "store"
            t0 = time.perf_counter()
            if method == "ultradelta":
                store = build_ultradelta_store(pre, fts, out, options=options, force=True, run=run)
            else:
                store = build_store(pre, fts, method, M, out, options=options, residual=residual, force=True,
                                    run=run)
            wall = time.perf_counter() - t0
            s = store.summary()
            size = dir_bytes(out)
            errs = {t: float(store.rel_errors[t]) for t in store.task_names}
            results[label] = {"method": method, "options": options, "residual": residual, "seconds": wall,
                              "bytes_on_disk": size, "task_vectors_bytes": s["task_vectors_bytes"],
                              "ratio": s["task_vectors_bytes"] / size, "rel_errors": errs}
            log(f"{label}: {wall:.1f} s, {size} B, {s['task_vectors_bytes'] / size:.1f}x, errors {errs}")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = results[ROWS[0][0]]["seconds"]
    rows = [[label, f"{r['bytes_on_disk'] / 1e6:.2f}", f"{r['ratio']:.1f}x",
             " / ".join(f"{e:.3f}" for e in r["rel_errors"].values()), f"{r['seconds']:.1f}",
             f"{r['seconds'] / ref:.2f}"] for label, r in results.items()]
    table = markdown_table(["store", "MB on disk", "× vs fp32 task vectors", f"rel. error ({' / '.join(fts)})",
                            "build s", "÷ pca build"], rows)
    save_results(args.name, {"tasks": list(fts), "results": results}, table)


if __name__ == "__main__":
    main()
