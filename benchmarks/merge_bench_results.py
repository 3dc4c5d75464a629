"""Merge the rows of two bench results of one benchmark into one result, for ``tvbasis bench --claims``.

Two runs on the same fine-tunes, seeds, data subsets and protocol (say the default bench and a second run with
other row types) measure the same task-arithmetic row; this script checks that every row the two share has the
same addition numbers (else it refuses: the runs are not of one benchmark), then writes the first result with the
second's rows added (a shared row: the second's, whose extras may hold more) and its ``continual`` section.

    python benchmarks/merge_bench_results.py A/bench.json B/bench.json OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _key(row: dict[str, Any]) -> tuple[str, Any]:
    return row["method"], row.get("M")


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if a.get("seeds") != b.get("seeds") or list(a.get("tasks") or []) != list(b.get("tasks") or []):
        raise SystemExit("the two results differ in seeds or tasks: not one benchmark")
    rows = {_key(r): r for r in a["rows"]}
    for r in b["rows"]:
        k = _key(r)
        if k in rows:
            same = (rows[k].get("addition") or {}).get("mean_normalized_test") == \
                (r.get("addition") or {}).get("mean_normalized_test")
            if not same:
                raise SystemExit(f"row {k} differs between the two results: not the same fine-tunes / protocol")
        rows[k] = r  # a shared row: the second run's, which may carry more (addition_modes, addition_at_1)
    out = dict(a, rows=list(rows.values()))
    for section in ("continual",):
        if b.get(section) and not a.get(section):
            out[section] = b[section]
    out["merged_from"] = [a.get("out"), b.get("out")]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    a, b = (json.loads(Path(p).read_text()) for p in argv[:2])
    Path(argv[2]).write_text(json.dumps(merge(a, b), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
