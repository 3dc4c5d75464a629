"""Engines: the LocalEngine contract (order, bounded in-flight work, errors) and the same answers on Ray.

The Ray tests (marked ``ray``; skipped when Ray is not installed) start one local Ray with 2 CPUs for the
module and run the CLI end to end with ``--engine local`` and ``--engine ray`` on a tiny model family, then
require the same stores and outputs. Each item's arithmetic is identical on both engines and the driver sums
the per-item results in item order, so only float summation order inside BLAS may differ: Gram and
cross-Gram entries are compared with rtol 1e-9, tensors with atol 1e-6.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tinymodels import ft_args, pretrained_state, save_hf
from tvbasis.cli import main
from tvbasis.engine import LocalEngine, get_engine
from tvbasis.errors import ConfigError, NonFiniteError
from tvbasis.io import open_checkpoint

GRAM_RTOL = 1e-9  # G, cross-Grams C = UᵀV and K = UᵀU, and everything computed from them
TENSOR_ATOL = 1e-6  # stored bases, reconstructed vectors, edited models


# ------------------------------------------------------------------------------------------- LocalEngine
class _Tracked:
    """Records how many items are started but not yet consumed by the caller."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.lock = threading.Lock()
        self.outstanding = 0
        self.peak = 0
        self.fail_at = fail_at

    def __call__(self, i: int) -> int:
        with self.lock:
            self.outstanding += 1
            self.peak = max(self.peak, self.outstanding)
        time.sleep(random.Random(i).uniform(0, 0.004))  # finish out of order
        if i == self.fail_at:
            raise ConfigError(f"item {i} is bad")
        return i * i

    def consumed(self) -> None:
        with self.lock:
            self.outstanding -= 1


@pytest.mark.parametrize("workers,max_in_flight", [(1, None), (3, None), (4, 2), (2, 7)])
def test_local_engine_order_and_bounded_in_flight(workers, max_in_flight):
    eng = LocalEngine(workers, max_in_flight, progress=False)
    fn = _Tracked()
    out = []
    for r in eng.map(fn, list(range(60)), desc="t", sizes=[10] * 60):
        out.append(r)
        fn.consumed()
        time.sleep(0.001)  # a slow consumer: workers must not run ahead unboundedly
    assert out == [i * i for i in range(60)]
    # at most max_in_flight items pending in the pool, plus the one result the caller is holding
    assert fn.peak <= eng.max_in_flight + 1
    if workers > 1:
        assert fn.peak >= 2  # it did run items concurrently


def test_local_engine_propagates_errors_and_stops():
    eng = LocalEngine(2, progress=False)
    fn = _Tracked(fail_at=7)
    got = []
    with pytest.raises(ConfigError, match="item 7 is bad"):
        for r in eng.map(fn, list(range(100))):
            got.append(r)
            fn.consumed()
    assert got == [i * i for i in range(7)]
    assert list(eng.map(fn, [])) == []


@pytest.mark.parametrize("workers, free, expected", [(1, 1, 1), (1, 2, 2), (2, 4, 2), (2, 1, 1), (3, 8, 2)])
def test_local_engine_threads_share_the_free_cores(monkeypatch, workers, free, expected):
    """Each worker's torch threads = the cores free now // workers (at least 1; a single worker never more than
    torch's own default), and the caller's thread count is back afterwards."""
    import tvbasis.engine.local as local

    monkeypatch.setattr(local, "free_cores", lambda: free)
    monkeypatch.setattr(local, "available_cores", lambda: 8)  # enough cores that the free ones decide
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))  # so a single worker's cap (torch's default) does not hide the rule
    try:
        start = torch.get_num_threads()
        seen = list(LocalEngine(workers=workers, progress=False).map(lambda _i: torch.get_num_threads(), range(6)))
        assert set(seen) == {min(expected, start) if workers == 1 else expected}
        assert torch.get_num_threads() == start
    finally:
        torch.set_num_threads(before)


def test_free_cores_counts_what_others_keep_busy(monkeypatch):
    import tvbasis.engine.cores as cores

    monkeypatch.setattr(cores, "available_cores", lambda: 4)
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    for busy, want in ((0.2, 4), (1.4, 3), (2.6, 1), (7.0, 1), (None, 4)):
        monkeypatch.setattr(cores, "busy_cores_elsewhere", lambda _w=0.2, b=busy: b)
        assert cores.free_cores() == want, busy
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (0.3, 0.3, 0.3))  # idle (< 0.5): no measurement
    monkeypatch.setattr(cores, "busy_cores_elsewhere", lambda _w=0.2: pytest.fail("measured an idle machine"))
    assert cores.free_cores() == 4


def test_get_engine_names():
    assert isinstance(get_engine("local", workers=2), LocalEngine)
    eng = LocalEngine(1)
    assert get_engine(eng) is eng
    with pytest.raises(ConfigError, match="unknown engine"):
        get_engine("spark")


# ------------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray")
    import sys

    from ray import cloudpickle

    from tvbasis.engine.ray import RayEngine
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    eng = RayEngine(workers=2, progress=False, object_store_memory=256 * 2**20)
    yield eng
    eng.close()


def _close(a, b, path: str = "") -> None:
    """JSON-like values equal; floats up to GRAM_RTOL (relative to the scale of the array they sit in)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("created", "manifest_sha256", "digests"):  # time stamp, hashes of rounding-level differences
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        try:
            x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        except (TypeError, ValueError):  # strings, dicts, ragged: element by element
            for i, (u, v) in enumerate(zip(a, b)):
                _close(u, v, f"{path}[{i}]")
            return
        scale = float(np.nanmax(np.abs(x))) if x.size else 0.0
        np.testing.assert_allclose(y, x, rtol=GRAM_RTOL, atol=GRAM_RTOL * scale, err_msg=path)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=GRAM_RTOL, abs=1e-12), path
    else:
        assert a == b, path


def _same_tensors(a: Path, b: Path) -> None:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert ca.keys() == cb.keys()
    for k in ca.keys():
        x, y = ca.get(k), cb.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        torch.testing.assert_close(y.double(), x.double(), atol=TENSOR_ATOL, rtol=0, msg=k)


def _run(args, capsys=None):
    rc = main(["-q", *args])
    assert rc == 0, args
    return capsys.readouterr().out if capsys is not None else None


@pytest.mark.ray
@pytest.mark.parametrize("method,extra", [("autoencoder", ["-M", "3", "--steps", "40"]), ("cluster", []),
                                          ("pca", ["-M", "3"])])
def test_ray_same_answers_as_local(ray_engine, fam, tmp_path, capsys, method, extra):
    pre_p, fts, *_ = fam
    outs = {}
    for engine in ("local", "ray"):
        d = tmp_path / engine
        eng = ["--engine", engine, "--workers", "2"]
        _run(["build", "--pretrained", str(pre_p), *ft_args(fts), "--method", method, *extra,
              "--out", str(d / "store"), *eng])
        capsys.readouterr()
        summary = json.loads(_run(["inspect", str(d / "store"), "--json"], capsys))
        _run(["reconstruct", str(d / "store"), "task1", "--out", str(d / "rec.safetensors"), *eng])
        _run(["edit", str(d / "store"), "--pretrained", str(pre_p), "--add", "all", "--scaling-coef", "0.4",
              "--out", str(d / "add"), *eng])
        _run(["edit", str(d / "store"), "--pretrained", str(pre_p), "--negate", "task2", "--scaling-coef", "0.7",
              "--out", str(d / "neg"), *eng])
        outs[engine] = (d, summary)
    (dl, sl), (dr, sr) = outs["local"], outs["ray"]
    for s in (sl, sr):
        s.pop("path")
    _close(sl, sr)
    ml = json.loads((dl / "store" / "tvbasis.json").read_text())
    mr = json.loads((dr / "store" / "tvbasis.json").read_text())
    _close(ml, mr)
    assert sorted(p.name for p in (dl / "store").iterdir()) == sorted(p.name for p in (dr / "store").iterdir())
    for f in ml["files"]["bases"] + ml["files"]["mean"]:
        _same_tensors(dl / "store" / f, dr / "store" / f)
    for out in ("rec.safetensors", "add", "neg"):
        _same_tensors(dl / out, dr / out)


@pytest.mark.ray
def test_ray_merge_and_vector_same_as_local(ray_engine, fam, tmp_path):
    pre_p, fts, *_ = fam
    for engine in ("local", "ray"):
        eng = ["--engine", engine]
        _run(["merge", "--pretrained", str(pre_p), *ft_args(fts), "--method", "ties", "--density", "0.3",
              "--trim-scope", "global", "--out", str(tmp_path / engine / "merged"), *eng])
        _run(["vector", "--pretrained", str(pre_p), "--finetuned", str(fts["task3"]),
              "--out", str(tmp_path / engine / "v.safetensors"), *eng])
    _same_tensors(tmp_path / "local" / "merged", tmp_path / "ray" / "merged")
    _same_tensors(tmp_path / "local" / "v.safetensors", tmp_path / "ray" / "v.safetensors")


@pytest.mark.ray
def test_ray_worker_errors_keep_their_type(ray_engine, fam, tmp_path, capsys):
    pre_p, fts, *_ = fam
    bad = pretrained_state(0)
    bad["pooler.dense.weight"][0, 0] = float("nan")
    bad_p = save_hf(bad, tmp_path / "bad")
    capsys.readouterr()
    rc = main(["-q", "build", "--pretrained", str(pre_p), "--finetuned", f"a={fts['task0']}",
               "--finetuned", f"b={bad_p}", "--method", "pca", "-M", "1", "--out", str(tmp_path / "s"),
               "--engine", "ray"])
    err = capsys.readouterr().err.strip()
    assert rc == NonFiniteError.exit_code and len(err.splitlines()) == 1 and "NaN" in err, err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))  # nothing half-written


class _Square:
    def __call__(self, i: int) -> int:
        if i < 0:
            raise NonFiniteError(f"item {i}")
        return i * i


@pytest.mark.ray
def test_ray_engine_map_contract(ray_engine):
    from tvbasis.engine.ray import plan_groups
    items = list(range(203))
    sizes = [random.Random(i).randint(1, 5000) for i in items]
    assert list(ray_engine.map(_Square(), items, sizes=sizes)) == [i * i for i in items]
    assert list(ray_engine.map(_Square(), items)) == [i * i for i in items]
    assert list(ray_engine.map(_Square(), [])) == []
    with pytest.raises(NonFiniteError, match="item -1"):
        list(ray_engine.map(_Square(), [1, 2, -1, 3]))
    assert get_engine("ray") is not None  # reuses the running Ray, does not own it
    for n, sz in [(203, sizes), (203, None), (1, [10]), (5, [10**12] * 5)]:
        groups = plan_groups(n, sz, 4096, 8, 2)
        assert [i for g in groups for i in g] == list(range(n))
        if sz is not None and n > 1:
            assert all(len(g) == 1 or sum(sz[i] for i in g) <= 4096 for g in groups)
        assert len(groups) >= min(n, 8) or sz is not None and max(sz) > 4096
