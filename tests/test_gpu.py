"""The --device cuda path gives the CPU path's answers (runs where a GPU is present; skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tinymodels import make_family
from tvbasis.engine import RunOptions, resolve_device
from tvbasis.errors import ConfigError
from tvbasis.merge import MergeSpec
from tvbasis.passes import compute_gram, merge_task_vectors
from tvbasis.store import build_store
from tvbasis.taskset import TaskSet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_device_validation():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@cuda
def test_gram_merge_and_build_on_cuda_match_cpu(tmp_path):
    pre_p, fts, *_ = make_family(tmp_path, T=5, clusters=2)
    ts = TaskSet.open(pre_p, fts)
    np.testing.assert_allclose(compute_gram(ts, RunOptions(device="cuda")).G, compute_gram(ts).G, rtol=1e-9)
    spec = MergeSpec("ties", {"density": 0.3})
    a = merge_task_vectors(pre_p, fts, spec, run=RunOptions(device="cuda")).to_state_dict()
    b = merge_task_vectors(pre_p, fts, spec).to_state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)
    for method in ("pca", "cluster"):
        g = build_store(pre_p, fts, method, 2, tmp_path / f"{method}-gpu", run=RunOptions(device="cuda"))
        c = build_store(pre_p, fts, method, 2, tmp_path / f"{method}-cpu")
        for t in c.task_names:
            assert abs(g.rel_errors[t] - c.rel_errors[t]) < 1e-6
