"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from tests.tinymodels import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A pretrained model and 6 fine-tunes in 3 planted clusters (safetensors HF directories), per module:
    (pretrained path, {task: path}, pretrained state, fine-tuned states)."""
    return make_family(tmp_path_factory.mktemp("fam"), T=6, clusters=3)
