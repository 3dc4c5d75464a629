"""``--engine ray`` across two raylets on this machine against ``--engine local``: wall time, the stores compared
byte for byte, and where the work ran and what each worker read.

The cluster (``tests/raycluster.py``) is a head (``ray start --head``) and a second node (``ray start --address``),
each with one CPU, its own object store and a custom resource; the Ray build goes through ``--ray-address``. A
Gram pass on the same cluster through ``RayEngine(address=...)`` reports every Ray task's node, worker pid, the
input bytes the pass planned for its items and the bytes the worker thread read (``RayEngine.records``).

    nice -n 10 python benchmarks/ray_raylets.py --size 50MB --T 4
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.raycluster
from tests.raycluster import RayCluster, gram_records

from common import common_args, gb, log, make_family, markdown_table, run_measured, save_results, tvbasis_cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="50MB")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("-M", type=int, default=2)
    common_args(ap)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fam = make_family(a.work, a.size, "float32", a.T)
    inputs = fam.input_bytes(a.T)
    out = a.work / "ray-raylets"
    shutil.rmtree(out, ignore_errors=True)
    build = ["build", *fam.cli_args(a.T), "--method", "pca", "-M", str(a.M)]
    with RayCluster() as cluster:
        log(f"two-node cluster up in {cluster.start_s:.1f} s at {cluster.address}")
        local = run_measured(tvbasis_cmd(*build, "--engine", "local", "--workers", "2", "--out", str(out / "local")))
        log(f"local: {local.wall_s:.1f} s")
        remote = run_measured(tvbasis_cmd(*build, "--engine", "ray", "--ray-address", cluster.address, "--workers",
                                          "2", "--out", str(out / "ray")), env=cluster.env)
        log(f"ray, two raylets: {remote.wall_s:.1f} s")
        gram = gram_records(cluster, fam.pretrained, fam.subset(a.T))
        start_s = cluster.start_s
    files = sorted(p.name for p in (out / "local").iterdir() if p.is_file() and p.suffix == ".safetensors")
    same = {f: filecmp.cmp(out / "local" / f, out / "ray" / f, shallow=False) for f in files}
    nodes = gram["nodes"]
    per: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: {"tasks": 0, "items": 0, "planned": 0, "read": 0})
    for r in gram["records"]:
        w = per[(r["node_id"], r["pid"])]
        w["tasks"] += 1
        w["items"] += r["items"]
        w["planned"] += r["planned_bytes"]
        w["read"] += r["read_bytes"]
    rows = [[",".join(nodes[n]) or n[:8], pid, w["tasks"], w["items"], gb(w["planned"]), gb(w["read"]),
             f"{w['read'] / max(1, w['planned']):.4f}"] for (n, pid), w in sorted(per.items())]
    head = (f"`tvbasis build --method pca -M {a.M}` of T = {a.T} synthetic fine-tunes ({gb(fam.model_bytes)} float32 "
            f"each, {gb(inputs)} of inputs), {os.cpu_count()} cores shared with other work, page cache as left by "
            f"generation. Two-node cluster started in {start_s:.1f} s.\n\n"
            + markdown_table(["engine", "wall s", "CPU s (driver)", "peak anon (driver tree)"], [
                ["local, 2 workers", f"{local.wall_s:.1f}", f"{local.cpu_s:.1f}", gb(local.peak_anon_bytes)],
                ["ray, 2 raylets × 1 CPU, --ray-address", f"{remote.wall_s:.1f}", f"{remote.cpu_s:.1f}",
                 gb(remote.peak_anon_bytes)]])
            + f"\n\nStore files byte-identical to the local engine's: {sum(same.values())} of {len(same)} "
            f"({', '.join(f for f, s in same.items() if not s) or 'all'}{' differ' if not all(same.values()) else ''})."
            f"\n\nGram pass on the cluster through `RayEngine(address=...)` ({gram['wall_s']:.1f} s), per worker "
            "process: Ray tasks, items, the input bytes planned for its items and the bytes its task thread read "
            "(`rchar`), so read ÷ planned near 1 means each worker read only its own tensors (the excess is the "
            "safetensors headers it opened):\n\n"
            + markdown_table(["node (resource)", "pid", "tasks", "items", "planned", "read", "read ÷ planned"], rows))
    save_results(a.name or "ray_raylets", {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "input_bytes": inputs, "cluster_start_s": start_s, "local": local.to_json(), "ray": remote.to_json(),
        "byte_identical": same, "gram": gram}, head)
    shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(fam.root, ignore_errors=True)


if __name__ == "__main__":
    main()
