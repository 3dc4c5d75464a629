"""``--engine ray`` across two raylets: a head (``ray start --head``) and a second node (``ray start --address``), each
with its own object store, one CPU and a custom resource, started on this machine in a private temp dir.

The store built through ``--ray-address`` equals the local engine's, work runs on both nodes, and every Ray task
reads about the input bytes of its own items (``RayEngine.records``), not whole checkpoints. Marked ``ray``; skipped
when Ray (the ``ray`` extra) or its ``ray`` command is missing. The cluster (``tests/raycluster.py``) is stopped in the
fixture's finaliser through the process groups of its two ``ray start --block`` (never ``ray stop``, which would stop
every Ray on the machine); drivers on it run as child processes started with its environment (its auth token).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.raycluster import ClusterStartError, RayCluster, gram_records
from tvbasis.cli import main
from tvbasis.io import open_checkpoint

pytestmark = pytest.mark.ray
pytest.importorskip("ray")  # the ray extra; the driver processes below import it themselves

#: tensors of the test family: enough items that a pass makes several Ray tasks
SHAPES = {f"layer.{i}.weight": (192, 128) for i in range(8)} | {f"layer.{i}.bias": (192,) for i in range(8)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    if shutil.which("ray") is None and not Path(sys.executable).with_name("ray").exists():
        pytest.skip("the `ray` command is not installed")
    c = RayCluster()
    try:
        c.start()
    except ClusterStartError as e:
        pytest.skip(str(e))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("rayfam")
    g = torch.Generator().manual_seed(0)
    pre = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    paths = {}
    for d, sd in [("pre", pre)] + [(f"ft{t}", {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in pre.items()})
                                   for t in range(4)]:
        (root / d).mkdir()
        save_file(sd, str(root / d / "model.safetensors"))
        (root / d / "config.json").write_text(json.dumps({"model_type": "bert"}))
        paths[d] = root / d
    return paths.pop("pre"), paths


def _build(pre: Path, fts: dict[str, Path], out: Path, *engine: str) -> None:
    args = ["-q", "build", "--pretrained", str(pre), *[a for n, p in fts.items() for a in ("--finetuned", f"{n}={p}")],
            "--method", "pca", "-M", "2", "--out", str(out), *engine]
    assert main(args) == 0


def test_store_over_two_raylets_equals_local(cluster, family, tmp_path):
    pre, fts = family
    _build(pre, fts, tmp_path / "local", "--engine", "local", "--workers", "2")
    ft = [a for n, p in fts.items() for a in ("--finetuned", f"{n}={p}")]
    # the driver is its own process: it must start with the cluster's environment (its auth token)
    subprocess.run([sys.executable, "-m", "tvbasis.cli", "-q", "build", "--pretrained", str(pre), *ft, "--method", "pca",
                    "-M", "2", "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-address", cluster.address,
                    "--workers", "2"], env=cluster.env, check=True, timeout=600)
    ml = json.loads((tmp_path / "local" / "tvbasis.json").read_text())
    mr = json.loads((tmp_path / "ray" / "tvbasis.json").read_text())
    assert ml["files"] == mr["files"]
    for f in ml["files"]["bases"] + ml["files"]["mean"]:
        a, b = open_checkpoint(tmp_path / "local" / f), open_checkpoint(tmp_path / "ray" / f)
        assert a.keys() == b.keys()
        for k in a.keys():
            torch.testing.assert_close(b.get(k), a.get(k), atol=1e-6, rtol=0, msg=k)


def test_work_runs_on_both_nodes_and_reads_only_its_own_tensors(cluster, family):
    pre, fts = family
    got = gram_records(cluster, pre, fts)
    nodes, recs = got["nodes"], got["records"]
    assert sorted(r for rs in nodes.values() for r in rs) == ["head", "node2"]
    assert len(recs) >= 4
    assert {r["node_id"] for r in recs} == set(nodes)  # tasks ran on the head and on the second raylet
    inputs = sum((Path(p) / "model.safetensors").stat().st_size for p in (pre, *fts.values()))
    assert sum(r["planned_bytes"] for r in recs) == 5 * sum(torch.Size(s).numel() * 4 for s in SHAPES.values())
    for r in recs:  # each task read its own items' slices, plus at most the headers of the files it opened
        assert r["planned_bytes"] <= r["read_bytes"] <= r["planned_bytes"] + 5 * 64 * 1024, r
    assert sum(r["read_bytes"] for r in recs) < 1.1 * inputs  # no task read whole checkpoints
    workers = {(r["node_id"], r["pid"]) for r in recs}
    assert len({node for node, _ in workers}) == 2
