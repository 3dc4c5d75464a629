"""docs/store-format.md describes exactly the fields that store/format.py reads and writes."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np

from tvbasis.bases import BasisFit
from tvbasis.store.format import CodedSection, Cross, Manifest, PretrainedRef, StoreFiles, TaskEntry, manifest_fields

DOC = Path(__file__).resolve().parents[1] / "docs" / "store-format.md"


def documented(section: str) -> set[str]:
    """Field names in the first column of the table under the heading that starts with ``section``."""
    text = DOC.read_text()
    start = text.index(section)
    body = text[start:].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", body, flags=re.M))


def test_top_level_fields():
    assert documented("## Manifest fields") == set(manifest_fields())


def test_nested_fields():
    assert documented("### A task") == {f.name for f in fields(TaskEntry)}
    assert documented("### The pretrained model") == {f.name for f in fields(PretrainedRef)}
    assert documented("### Files") == {f.name for f in fields(StoreFiles)}
    assert documented("### Coded part") == {f.name for f in fields(CodedSection)}
    fit = BasisFit(M=1, B=np.zeros((2, 1)), W=np.zeros((1, 2)))
    assert documented("### A fit") == set(fit.to_json())


def test_written_manifest_has_exactly_the_documented_keys():
    """The JSON a store writes: its top-level keys are the documented ones (optional ones may be omitted)."""
    fit = BasisFit(M=1, B=np.ones((2, 1)), W=np.ones((1, 2)))
    m = Manifest(method="pca", options={}, M=1, T=2, layerwise=False, task_like=False,
                 tasks=[TaskEntry("a", "", 1.0, 0.0), TaskEntry("b", "", 1.0, 0.0)], groups={"*": fit},
                 group_of={}, cross={"*": Cross(np.zeros((1, 2)), np.zeros((1, 1)))}, gram=np.eye(2),
                 group_grams={}, pretrained=PretrainedRef("p", "f", "c", 1), tensors=[],
                 store_dtypes={}, files=StoreFiles(["bases.safetensors"]), task_vectors_bytes=0)
    keys = set(m.to_json())
    doc = documented("## Manifest fields")
    assert keys <= doc and doc - keys <= {"gram_estimated_rows", "coded"}
