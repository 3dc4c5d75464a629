"""Cost of ``tvbasis build --budget`` against a plain ``pca`` build of the same fine-tunes, in one run.

Each build runs as its own ``tvbasis build`` process (wall time and peak RSS from ``os.wait4``), in alternation, so
load on the machine hits both alike; the budget builds' own split (measuring pass, allocation, write) comes from
their ``--json`` report. Writes ``<out>.json`` and ``<out>.md``.

    python benchmarks/budget_build.py --work tvbasis-work --budgets 128x --repeats 2 \
        --out benchmarks/results/budget_build
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one process (its output through files: no pipe to fill)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {err.read().strip()[-400:]}")
        return wall, usage.ru_maxrss * 1024, out.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a bench work directory (pretrained/ and finetuned/<task>/)")
    ap.add_argument("--tasks", help="comma-separated fine-tunes (default: every directory with a config.json under finetuned/)")
    ap.add_argument("--budgets", default="128x")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = Path(a.work)
    # a fine-tune is a directory with a config.json; finetuned/ also holds other modes' folders (linear/, seed1/, …)
    tasks = a.tasks.split(",") if a.tasks else sorted(p.name for p in (work / "finetuned").iterdir()
                                                       if (p / "config.json").is_file())
    ft = sum((["--finetuned", f"{t}={work / 'finetuned' / t}"] for t in tasks), [])
    base = [sys.executable, "-m", "tvbasis.cli", "-q", "build", "--pretrained", str(work / "pretrained"), *ft]
    tmp = Path(tempfile.mkdtemp(prefix="budget-build-"))
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        for rep in range(a.repeats):
            configs = [("pca -M 1", ["--method", "pca", "-M", "1"])]
            configs += [(f"--budget {b}", ["--budget", b, "--json"]) for b in a.budgets.split(",")]
            for label, extra in configs:
                out = tmp / f"s{rep}-{len(rows.get(label, []))}-{label.replace(' ', '_')}"
                wall, rss, stdout = run([*base, *extra, "--out", str(out)])
                row: dict[str, float] = {"wall_s": wall, "peak_rss_bytes": rss}
                if "--json" in extra:
                    rep_json = json.loads(stdout)
                    row.update({f"{k}_s": v for k, v in rep_json["seconds"].items()})
                    row["store_bytes"] = rep_json["store_bytes"]
                    row["budget_bytes"] = rep_json["budget_bytes"]
                    row["attempts"] = rep_json["attempts"]
                rows.setdefault(label, []).append(row)
                shutil.rmtree(out, ignore_errors=True)
                print(f"{label}: {wall:.1f} s, peak {rss / 1e9:.2f} GB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain = statistics.median(r["wall_s"] for r in rows["pca -M 1"])
    result = {"command": " ".join(["python", "benchmarks/budget_build.py", *sys.argv[1:]]), "tasks": tasks,
              "load_average": os.getloadavg(), "rows": rows,
              "median_wall_s": {k: statistics.median(r["wall_s"] for r in v) for k, v in rows.items()},
              "ratio_to_pca": {k: statistics.median(r["wall_s"] for r in v) / plain for k, v in rows.items()}}
    Path(a.out + ".json").write_text(json.dumps(result, indent=1))
    lines = [f"# build --budget vs a plain pca build ({len(tasks)} MiniLM fine-tunes, {a.repeats} runs each, "
             "alternating)", "", f"Command: `{result['command']}`; load average at the end "
             f"{result['load_average'][0]:.1f} on 2 cores.", "",
             "| build | median wall | × pca build | peak RSS | measure / allocate / write (s) | store / budget |",
             "|---|---|---|---|---|---|"]
    for k, v in rows.items():
        split = " / ".join(f"{statistics.median(r.get(f'{p}_s', 0.0) for r in v):.1f}"
                           for p in ("measure", "allocate", "write")) if "budget" in k else ""
        fit = (f"{v[0]['store_bytes'] / 1e6:.2f} / {v[0]['budget_bytes'] / 1e6:.2f} MB" if "budget" in k else "")
        lines.append(f"| {k} | {result['median_wall_s'][k]:.1f} s | {result['ratio_to_pca'][k]:.2f} | "
                     f"{max(r['peak_rss_bytes'] for r in v) / 1e9:.2f} GB | {split} | {fit} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
