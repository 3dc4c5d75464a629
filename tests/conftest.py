"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from tests.tinymodels import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A pretrained model and 6 fine-tunes in 3 planted clusters (safetensors HF directories), per module:
    (pretrained path, {task: path}, pretrained state, fine-tuned states)."""
    return make_family(tmp_path_factory.mktemp("fam"), T=6, clusters=3)


def pytest_configure(config):
    """Under pytest-xdist each worker gets one torch thread (two workers on two cores, not four threads fighting):
    OMP_NUM_THREADS=1 is what the library's own thread setting (tvbasis.eval.encoder.available_cores) follows."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
