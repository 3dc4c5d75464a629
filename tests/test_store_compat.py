"""Stores built before the store-method registry (tvbasis at d1e36e1, ``tests/data/legacy_stores/make.py``) open,
verify and read back exactly what that tvbasis read right after the build, and — checked against task vectors
computed here from the same deterministic model — within the errors their manifests record (exactly, where the
method is exact)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvbasis.store import BasisStore

DATA = Path(__file__).parent / "data" / "legacy_stores"


def _make():
    spec = importlib.util.spec_from_file_location("legacy_stores_make", DATA / "make.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make = _make()
#: stores whose reconstruction is the task vector itself (up to float32 rounding)
EXACT = ("pca_m2", "lora_factors")


def _true_vectors(store: str) -> dict[str, dict[str, torch.Tensor]]:
    """Task -> tensor -> v_t in float64, computed here (not by tvbasis)."""
    if store == "lora_factors":
        s = make.LORA_ALPHA / make.LORA_RANK
        return {
            t: {f"{m}.weight": s * B.double() @ A.double() for m, (B, A) in f.items()}
            for t, f in make.adapter_factors().items()
        }
    pre, fts = make.model_states()
    return {t: {n: fts[t][n].double() - pre[n].double() for n in pre} for t in make.TASKS}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "expected.safetensors"))


@pytest.mark.parametrize("name", list(make.STORES))
def test_legacy_store_opens_verifies_and_reads_the_same(name, expected, tmp_path):
    root = tmp_path / name
    shutil.copytree(DATA / name, root)  # a reader may take the lock file; the fixture stays untouched
    store = BasisStore.open(root)
    try:
        assert store.verify() == []
        assert store.method == make.STORES[name].get("method", f"lora-{make.STORES[name].get('lora')}")
        truth = _true_vectors(name)
        recorded = store.rel_errors
        for t in make.TASKS:
            got = dict(store.reconstruct(t).items())
            want = {k[len(f"{name}/{t}/") :]: v for k, v in expected.items() if k.startswith(f"{name}/{t}/")}
            assert set(got) == set(want)
            for k, v in got.items():
                # the same values up to the float32 products' rounding, which differs by an ulp or so between CPUs
                # (the expected file was written on an earlier machine; an Intel Xeon reads pca_m2 and lora_factors
                # back within 1.2e-7 of it, relative to each tensor's largest entry): a format change moves far more
                w = want[k]
                tol = 8 * torch.finfo(torch.float32).eps * float(w.abs().max())
                assert float((v.to(torch.float32) - w).abs().max()) <= tol, (name, t, k)
            err2 = sum(float(((got[k].double() - v) ** 2).sum()) for k, v in truth[t].items())
            norm2 = sum(float((v**2).sum()) for v in truth[t].values())
            assert set(truth[t]) <= set(got)
            rel = (err2 / norm2) ** 0.5
            if name in EXACT:
                assert rel < 1e-5, (name, t, rel)
            else:
                assert rel == pytest.approx(recorded[t], rel=1e-3, abs=1e-6), (name, t)
                assert rel > 0  # lossy: TALL masks on unrelated random tasks may even exceed 1
    finally:
        store.close()
