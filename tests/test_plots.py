"""The plots of ``tvbasis inspect --plot`` (eval/plots.py) and of the benchmark (bench/plots.py)."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

from tests.tinymodels import ft_args
from tvbasis.bench import bench, plots
from tvbasis.bench.plots import make_plots
from tvbasis.cli import main
from tvbasis.cli.store import cmd_inspect
from tvbasis.errors import ConfigError
from tvbasis.eval.plots import cluster_order, store_plots
from tvbasis.store import build_store

PNG = b"\x89PNG\r\n\x1a\n"


def image(path) -> np.ndarray:
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG
    return matplotlib.image.imread(path)


def test_cluster_order_groups_tasks_by_label_then_name():
    assert cluster_order(["d", "a", "c", "b"], [1, 0, 1, 0]) == [1, 3, 2, 0]
    assert cluster_order(["d", "a"], None) == [0, 1]


def test_inspect_plot_writes_the_three_pictures(fam, tmp_path, capsys):
    pre_p, fts, _, _ = fam
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "cluster",
                 "--out", str(store)]) == 0
    out = tmp_path / "plots"
    assert main(["inspect", str(store), "--plot", str(out)]) == 0
    err = capsys.readouterr().err
    for name in ("cosine.png", "spectrum.png", "rel_errors.png"):
        assert f"wrote {out / name}" in err
        img = image(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # not a blank canvas
    # --json stays machine-readable: the written paths go to stderr
    assert main(["inspect", str(store), "--json", "--plot", str(tmp_path / "p2")]) == 0
    assert capsys.readouterr().out.lstrip().startswith("{")


def test_inspect_plot_without_the_eval_extra_is_a_clear_error(fam, tmp_path, monkeypatch):
    pre_p, fts, _, _ = fam
    s = build_store(pre_p, fts, "pca", 2, tmp_path / "store")
    args = argparse.Namespace(store=str(s.root), json=False, plot=str(tmp_path / "p"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the eval extra's plotting library, not installed
    with pytest.raises(ConfigError, match=r"--plot needs the eval extra.*tvbasis\[eval\]"):
        cmd_inspect(args)
    assert not (tmp_path / "p").exists()


def test_store_plots_of_an_estimated_gram(fam, tmp_path):
    pre_p, fts, _, _ = fam
    s = build_store(pre_p, fts, "autoencoder", 2, tmp_path / "store", {"steps": 200})
    paths = store_plots(s, tmp_path / "p")
    assert [p.name for p in paths] == ["cosine.png", "spectrum.png", "rel_errors.png"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        store_plots(s, tmp_path / "file")


def test_benchmark_plots_come_from_the_shared_module(tmp_path):
    assert bench.make_plots is plots.make_plots
    neg = {"target": "a", "control": "b", "target_test": 0.2, "control_retained": 0.97}
    result = {
        "cosine": {"tasks": ["a", "b", "c"], "matrix": [[1, 0.1, 0.0], [0.1, 1, 0.3], [0.0, 0.3, 1]],
                   "cluster_labels": [0, 1, 1]},
        "zero_shot": {"test": {"a": 0.5, "b": 0.6, "c": 0.4}},
        "rows": [
            {"method": "zero-shot", "M": None, "bytes_stored": 0, "addition": {"mean_normalized_test": 0.6},
             "negation": []},
            {"method": "fine-tuned (one model per task)", "M": None, "bytes_stored": 3e6,
             "addition": {"mean_normalized_test": 1.0}, "negation": []},
            {"method": "task arithmetic (sum)", "M": None, "bytes_stored": 3e6,
             "addition": {"mean_normalized_test": 0.8}, "negation": [neg]},
            {"method": "pca", "M": 2, "bytes_stored": 2e6, "addition": {"mean_normalized_test": 0.75},
             "negation": [{**neg, "target_test": 0.3}]},
        ],
    }
    paths = make_plots(result, tmp_path)
    assert [p.name for p in paths] == ["cosine.png", "accuracy_vs_bytes.png", "negation.png"]
    for p in paths:
        assert image(p).shape[1] > 300
