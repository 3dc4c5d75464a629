"""A store is untrusted input and its writes must be crash- and concurrency-safe: manifest mutations (hypothesis),
byte flips in every file, kills between any two steps of a write, concurrent writers, foreign entries, version-1
stores, NaN/Inf coefficients and outputs, outputs overlapping inputs."""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tinymodels import flat, make_family, pretrained_state, save_hf
from tvbasis.errors import ConfigError, NonFiniteError, OutputExistsError, StoreError, TvbasisError
from tvbasis.io import open_checkpoint
from tvbasis.store import BasisStore, add_task, build_store, collect_garbage, store_lock
from tvbasis.store.format import manifest_digest

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def fam5(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam5"), T=6, clusters=2)


def first(fts: dict, n: int) -> dict:
    return {k: fts[k] for k in list(fts)[:n]}


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d (dot files included; the writer lock excluded) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".tvbasis.lock"}


def rewrite_manifest(root: Path, mf: dict, redigest: bool = True) -> None:
    """Write a (mutated) manifest; with redigest, as an attacker would, with a matching manifest_sha256."""
    if redigest:
        mf = dict(mf)
        try:
            mf["manifest_sha256"] = manifest_digest(mf)
        except ValueError:  # NaN/Inf: no canonical JSON exists (the reader refuses the literal anyway)
            pass
    (root / "tvbasis.json").write_text(json.dumps(mf, allow_nan=True))


def values(store: BasisStore) -> torch.Tensor:
    return torch.cat([flat(store.reconstruct(t).to_state_dict()) for t in store.task_names])


@pytest.fixture(scope="module")
def pca_store(fam5, tmp_path_factory):
    """A PCA store (bases and mean files) with small digest chunks: several chunks per tensor."""
    pre_p, fts, *_ = fam5
    return build_store(pre_p, first(fts, 5), "pca", 2, tmp_path_factory.mktemp("pca") / "s", chunk_elements=40)


@pytest.fixture(scope="module")
def cluster_store(fam5, tmp_path_factory):
    pre_p, fts, *_ = fam5
    return build_store(pre_p, first(fts, 5), "cluster", 2, tmp_path_factory.mktemp("cl") / "s", layerwise=True)


def fresh_copy(store: BasisStore) -> Path:
    """A copy of the store to tamper with, in a temporary directory removed when the test process exits."""
    parent = Path(tempfile.mkdtemp(prefix="tvb-safety-"))
    atexit.register(shutil.rmtree, parent, True)
    d = parent / "s"
    shutil.copytree(store.root, d)
    return d


# ------------------------------------------------------------------------------------------- manifest fields
def _mutations() -> dict:
    def drop(k):
        return lambda m: m.pop(k)

    def setf(path, value):
        def f(m):
            node = m
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        return f
    g = "*"
    return {  # case: (mutation, the field the error must name)
        "missing M": (drop("M"), "'M'"),
        "missing tasks": (drop("tasks"), "'tasks'"),
        "missing files": (drop("files"), "'files'"),
        "missing digests": (drop("digests"), "'digests'"),
        "format_version 0": (setf(["format_version"], 0), "format_version"),
        "format_version true": (setf(["format_version"], True), "format_version"),
        "format_version 1.5": (setf(["format_version"], 1.5), "format_version"),
        "W too few rows": (lambda m: m["groups"][g]["W"].pop(), f"groups.{g}.W"),
        "W string": (setf(["groups", g, "W"], "abc"), f"groups.{g}.W"),
        "W boolean entries": (lambda m: m["groups"][g]["W"][0].__setitem__(0, True), f"groups.{g}.W"),
        "mean_coef short": (lambda m: m["groups"][g]["mean_coef"].pop(), f"groups.{g}.mean_coef"),
        "B wrong shape": (setf(["groups", g, "B"], [[1.0]]), f"groups.{g}.B"),
        "cross C wrong shape": (lambda m: m["cross"][g]["C"].pop(), f"cross.{g}.C"),
        "gram not symmetric": (lambda m: m["gram"][0].__setitem__(1, m["gram"][0][1] + 1.0), "gram"),
        "gram negative diagonal": (lambda m: m["gram"][0].__setitem__(0, -1.0), "gram"),
        "duplicate task": (lambda m: m["tasks"][1].__setitem__("name", m["tasks"][0]["name"]), "tasks"),
        "task named all": (lambda m: m["tasks"][0].__setitem__("name", "all"), "tasks[0].name"),
        "task name with =": (lambda m: m["tasks"][0].__setitem__("name", "a=b"), "tasks[0].name"),
        "T disagrees": (setf(["T"], 9), "'T'"),
        "no checksum": (lambda m: m["pretrained"].pop("checksum"), "pretrained.checksum"),
        "no fingerprint": (lambda m: m["pretrained"].pop("fingerprint"), "pretrained.fingerprint"),
        "empty fingerprint": (setf(["pretrained", "fingerprint"], ""), "pretrained.fingerprint"),
        "null checksum": (setf(["pretrained", "checksum"], None), "pretrained.checksum"),
        "bad dtype": (setf(["store_dtypes", "pooler.dense.weight"], "int8"), "store_dtypes.pooler.dense.weight"),
        "tensor dtype": (lambda m: m["tensors"][0].__setitem__("dtype", "__class__"), "tensors[0].dtype"),
        "file ../": (setf(["files", "bases"], ["../outside.safetensors"]), "files.bases[0]"),
        "file absolute": (setf(["files", "bases"], ["/etc/passwd"]), "files.bases[0]"),
        "file subdir": (setf(["files", "bases"], ["sub/bases.safetensors"]), "files.bases[0]"),
        "file foreign name": (setf(["files", "bases"], ["README.md"]), "files.bases[0]"),
        "file twice": (lambda m: m["files"].__setitem__("mean", ["mean.safetensors", "mean.safetensors"]), "files"),
        "digest size": (lambda m: m["digests"]["files"]["bases.safetensors"].__setitem__("size", 5),
                        "digests.files.bases.safetensors.size"),
        "digest crc length": (lambda m: m["digests"]["files"]["bases.safetensors"]["chunks"].__setitem__(
            "pooler.dense.weight", "00"), "digests.files.bases.safetensors.chunks.pooler.dense.weight"),
        "unknown method": (setf(["method"], "magic"), "method"),
        "bad option": (lambda m: m["options"].__setitem__("nope", 1), "options"),
        "manifest a list": (None, "(manifest)"),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_manifest_field_mutation_is_refused_naming_the_field(pca_store, case):
    fn, field = _mutations()[case]
    d = fresh_copy(pca_store)
    mf = json.loads((d / "tvbasis.json").read_text())
    if fn is None:
        (d / "tvbasis.json").write_text(json.dumps([mf]))
    else:
        fn(mf)
        rewrite_manifest(d, mf)
    before = snapshot(d)
    with pytest.raises(StoreError, match=field.replace(".", r"\.").replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("*", r"\*")):
        BasisStore.open(d)
    assert snapshot(d) == before


def test_nan_literal_and_stale_digest_refused(pca_store):
    d = fresh_copy(pca_store)
    text = (d / "tvbasis.json").read_text()
    mf = json.loads(text)
    mf["groups"]["*"]["W"][0][0] = float("nan")
    rewrite_manifest(d, mf)
    with pytest.raises(StoreError, match="NaN is not a number JSON allows"):
        BasisStore.open(d)
    mf = json.loads(text)
    mf["tasks"][0]["norm"] = 3.0  # a plausible edit, digest not updated
    rewrite_manifest(d, mf, redigest=False)
    with pytest.raises(StoreError, match="does not match its recorded digest"):
        BasisStore.open(d)


def test_file_name_symlinked_out_of_the_store_is_refused(pca_store, tmp_path):
    d = fresh_copy(pca_store)
    outside = tmp_path / "outside.safetensors"
    shutil.move(d / "bases.safetensors", outside)
    (d / "bases.safetensors").symlink_to(outside)
    with pytest.raises(StoreError, match=r"files\.bases.*symlink to .*outside"):
        BasisStore.open(d)
    assert outside.read_bytes() == (pca_store.root / "bases.safetensors").read_bytes()


_PATH_TRICKS = ["../x.safetensors", "/etc/passwd", "sub/bases.safetensors", "", ".", "..", "a\\b", "bases\0",
                "bases.safetensors", "mean.safetensors", "README.md"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, -1.0, 1e300, 2**40]),
                     st.sampled_from(["", "x", "all", "float16", "pca"]), st.sampled_from(_PATH_TRICKS),
                     st.sampled_from([float("nan"), float("inf")]))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from _paths(v, (*prefix, i))


def _get(node, path):
    for k in path:
        node = node[k]
    return node


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_mutation_is_refused_or_harmless(pca_store, data):
    """Mutate one field anywhere (drop, retype, reshape, NaN, path tricks), with a matching digest or without:
    opening and using the store either works or raises a TvbasisError; nothing in the store is ever changed."""
    base = json.loads((pca_store.root / "tvbasis.json").read_text())
    mf = copy.deepcopy(base)
    paths = [p for p in _paths(mf) if p and p[-1] != "manifest_sha256"]
    path = data.draw(st.sampled_from(paths), label="path")
    parent, key = _get(mf, path[:-1]), path[-1]
    op = data.draw(st.sampled_from(["drop", "retype", "reshape", "scale"]), label="op")
    old = parent[key]
    if op == "drop":
        parent.pop(key)
    elif op == "retype":
        parent[key] = data.draw(st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3),
                                          st.dictionaries(st.sampled_from(["a", "*", "M"]), _SCALARS, max_size=2)),
                                label="value")
    elif op == "reshape":
        parent[key] = (old[:-1] if old and data.draw(st.booleans()) else [*old, old[-1] if old else 1]) \
            if isinstance(old, list) else [old]
    else:
        parent[key] = (old * data.draw(st.sampled_from([-1, 2, 10**6])) if isinstance(old, (int, float))
                       and not isinstance(old, bool) else old)
    d = fresh_copy(pca_store)
    try:
        rewrite_manifest(d, mf, redigest=data.draw(st.integers(0, 3), label="redigest") > 0)
        before = snapshot(d)
        try:
            store = BasisStore.open(d)
        except TvbasisError:
            pass
        else:
            try:
                for t in store.task_names:
                    v = flat(store.reconstruct(t).to_state_dict())
                    assert v.numel() > 0
                store.verify()
                store.summary()
                store.addition().to_state_dict()
            except TvbasisError:
                pass
        assert snapshot(d) == before
    finally:
        shutil.rmtree(d.parent, ignore_errors=True)


# ------------------------------------------------------------------------------------------- byte flips
def _chunk_positions(store: BasisStore) -> list[tuple[str, int, str]]:
    """(file, byte offset, tensor) for the first and last byte of every digest chunk of every data file."""
    out = []
    for part in ("bases", "mean"):
        for name, pl in store.data.places[part].items():
            for m in range(pl.outer):
                for a, b in pl.chunks:
                    lo = pl.offset + m * pl.inner.nbytes + a * pl.row_bytes
                    hi = pl.offset + m * pl.inner.nbytes + b * pl.row_bytes - 1
                    out += [(pl.file, lo, name), (pl.file, hi, name)]
    return out


def _flip(path: Path, pos: int) -> None:
    b = bytearray(path.read_bytes())
    b[pos] ^= 0xFF
    path.write_bytes(bytes(b))


def test_every_data_byte_flip_is_caught_when_read_and_by_verify(pca_store):
    positions = _chunk_positions(pca_store)
    assert len({p[2] for p in positions}) == len(pca_store.specs) and len(positions) > 100
    d = fresh_copy(pca_store)
    try:
        for fname, pos, tensor in positions:
            _flip(d / fname, pos)
            store = BasisStore.open(d)  # opening reads no tensor data
            part = "mean" if fname.startswith("mean") else "bases"
            read = store.mean_rows if part == "mean" else store.bases_rows
            with pytest.raises(StoreError, match=rf"{part} tensor {tensor!r} is corrupt"):
                read(tensor)
            other = next(n for n in store.specs if n != tensor)
            read(other)  # other tensors read fine
            problems = store.verify()
            assert any(repr(tensor) in p for p in problems) and any("SHA-256" in p for p in problems)
            store.close()
            _flip(d / fname, pos)
    finally:
        shutil.rmtree(d.parent)


def test_header_and_manifest_byte_flips_are_refused_at_open(pca_store):
    d = fresh_copy(pca_store)
    try:
        for fname in pca_store.manifest.files.all():
            header = pca_store.data.places["bases" if fname.startswith("bases") else "mean"]
            start = min(pl.offset for pl in header.values())
            for pos in [*range(0, start, 5), start - 1]:
                _flip(d / fname, pos)
                with pytest.raises(StoreError, match=rf"{fname}.*(header|bytes)"):
                    BasisStore.open(d)
                _flip(d / fname, pos)
        size = (d / "tvbasis.json").stat().st_size
        for pos in range(0, size, 11):
            _flip(d / "tvbasis.json", pos)
            with pytest.raises(StoreError):
                BasisStore.open(d)
            _flip(d / "tvbasis.json", pos)
        assert torch.equal(values(BasisStore.open(d)), values(pca_store))
    finally:
        shutil.rmtree(d.parent)


def test_shard_from_another_store_and_nan_in_a_shard_are_caught(fam5, pca_store, tmp_path):
    pre_p, fts, *_ = fam5
    other = build_store(pre_p, {k: fts[k] for k in list(fts)[1:]}, "pca", 2, tmp_path / "o", chunk_elements=40)
    d = fresh_copy(pca_store)
    shutil.copy(other.root / "bases.safetensors", d / "bases.safetensors")  # same layout, other data
    store = BasisStore.open(d)
    with pytest.raises(StoreError, match="is corrupt"):
        store.reconstruct("task0").to_state_dict()
    assert store.verify()
    # NaN written into a shard: caught by the digest (version 2) and by the finite check (version 1)
    shutil.copy(pca_store.root / "bases.safetensors", d / "bases.safetensors")
    pl = pca_store.data.places["bases"]["pooler.dense.weight"]
    with open(d / "bases.safetensors", "r+b") as f:
        f.seek(pl.offset)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    with pytest.raises(StoreError, match="'pooler.dense.weight' is corrupt"):
        BasisStore.open(d).bases_rows("pooler.dense.weight")
    make_v1(d)
    with pytest.raises(StoreError, match="'pooler.dense.weight' holds NaN/Inf"):
        BasisStore.open(d).bases_rows("pooler.dense.weight")


def test_edit_of_a_corrupted_store_fails_in_one_line_and_writes_nothing(fam5, pca_store, tmp_path, capsys):
    from tvbasis.cli import main
    pre_p, *_ = fam5
    d = fresh_copy(pca_store)
    pl = pca_store.data.places["bases"]["encoder.layer.0.attention.query.weight"]
    _flip(d / "bases.safetensors", pl.offset + 7)  # a flipped exponent byte: 4e35 in the edited model before
    rc = main(["-q", "edit", str(d), "--pretrained", str(pre_p), "--add", "all", "--scaling-coef", "1",
               "--out", str(tmp_path / "edited")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "'encoder.layer.0.attention.query.weight' is corrupt" in err[0]
    assert not (tmp_path / "edited").exists() and not list(tmp_path.glob(".edited*"))
    assert main(["verify", str(d)]) != 0
    assert main(["verify", str(pca_store.root)]) == 0


# ------------------------------------------------------------------------------------------- version 1
def make_v1(root: Path) -> None:
    """Turn a store into what tvbasis 0.1 wrote: format_version 1, no generation, digests or manifest digest."""
    mf = json.loads((root / "tvbasis.json").read_text())
    for k in ("generation", "digests", "manifest_sha256"):
        mf.pop(k)
    mf["format_version"] = 1
    (root / "tvbasis.json").write_text(json.dumps(mf, indent=1))


def test_version_1_store_reads_refuses_writes_and_upgrades(fam5, pca_store, capsys):
    from tvbasis.cli import main
    pre_p, fts, *_ = fam5
    d = fresh_copy(pca_store)
    (d / "bases.safetensors.index.json").write_text("{}")  # v1 stores could have an index file
    make_v1(d)
    old = BasisStore.open(d)
    assert old.manifest.format_version == 1 and torch.equal(values(old), values(pca_store))
    assert "upgrade" in old.verify()[0]
    with pytest.raises(StoreError, match="tvbasis upgrade"):
        add_task(old, "task5", fts["task5"], pre_p)
    assert main(["-q", "add-task", str(d), f"task5={fts['task5']}", "--pretrained", str(pre_p)]) != 0
    assert "tvbasis upgrade" in capsys.readouterr().err
    assert main(["upgrade", str(d)]) == 0
    new = BasisStore.open(d)
    assert new.manifest.format_version == 3 and new.verify() == [] and torch.equal(values(new), values(pca_store))
    assert not (d / "bases.safetensors.index.json").exists()
    assert add_task(new, "task5", fts["task5"], pre_p).T == 6
    assert main(["upgrade", str(d)]) == 0 and "nothing to do" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- outputs
def test_nan_and_inf_coefficients_are_refused_up_front(pca_store, fam5, tmp_path):
    pre_p, *_ = fam5
    with pytest.raises(ConfigError, match="task0"):
        pca_store.combine({"task0": float("nan")})
    with pytest.raises(ConfigError, match="finite"):
        pca_store.reconstruct("task0") * float("inf")
    with pytest.raises(ConfigError, match="scaling_coef"):
        pca_store.reconstruct("task0").apply_to(pre_p, float("nan"), tmp_path / "o")
    assert not list(tmp_path.iterdir())


def test_fp16_overflow_in_a_store_is_refused_and_nothing_written(tmp_path):
    pre = pretrained_state()
    pre_p = save_hf(pre, tmp_path / "pre")
    fts = {}
    for t in range(3):
        sd = {k: v.clone() for k, v in pre.items()}
        sd["pooler.dense.weight"] = sd["pooler.dense.weight"] + 1e5 * (t + 1)  # beyond float16's 65504
        fts[f"t{t}"] = save_hf(sd, tmp_path / f"ft{t}")
    with pytest.raises(NonFiniteError, match=r"'pooler\.dense\.weight'.*float16"):
        build_store(pre_p, fts, "random-sample", 1, tmp_path / "s", dtype="float16")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


def test_out_equal_to_inside_or_containing_an_input_is_refused(fam5, pca_store, tmp_path):
    pre_p, fts, *_ = fam5
    two = first(fts, 3)
    before = {p: snapshot(p) for p in [pre_p, *two.values()]}
    for out in (pre_p, pre_p / "store", pre_p.parent):
        with pytest.raises(ConfigError, match="input"):
            build_store(pre_p, two, "pca", 1, out, force=True)
    with pytest.raises(ConfigError, match="input"):
        pca_store.reconstruct("task0").apply_to(pre_p, 1.0, pre_p, force=True)
    with pytest.raises(ConfigError, match="input"):
        pca_store.reconstruct("task0").save(pca_store.root / "x.safetensors")
    assert {p: snapshot(p) for p in before} == before


def test_force_build_onto_a_store_keeps_foreign_entries_and_refuses_other_dirs(fam5, tmp_path):
    pre_p, fts, *_ = fam5
    s = build_store(pre_p, first(fts, 4), "pca", 2, tmp_path / "s")
    ref = values(s)
    (s.root / "NOTES.md").write_text("mine")
    (s.root / "runs").mkdir()
    (s.root / "runs" / "log.txt").write_text("keep")
    new = build_store(pre_p, first(fts, 5), "cluster", 2, tmp_path / "s", force=True)
    assert new.method == "cluster" and new.T == 5 and new.manifest.generation == 2 and new.verify() == []
    assert (s.root / "NOTES.md").read_text() == "mine" and (s.root / "runs" / "log.txt").read_text() == "keep"
    assert sorted(p.name for p in s.root.iterdir()) == sorted([".tvbasis.lock", "NOTES.md", "runs", "tvbasis.json",
                                                               *new.manifest.files.all()])
    assert torch.equal(values(s), ref)  # the store opened before still reads its own generation
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a tvbasis store"):
        build_store(pre_p, first(fts, 4), "pca", 2, other, force=True)
    assert (other / "precious.txt").read_text() == "x"
    with pytest.raises(OutputExistsError):
        build_store(pre_p, first(fts, 4), "pca", 2, tmp_path / "s")


def test_second_build_racing_for_a_new_out_fails_unless_force(fam5, tmp_path, monkeypatch):
    import tvbasis.store.commit as commit
    pre_p, fts, *_ = fam5
    real = commit.fault_point
    state = {"done": False}

    def racer(step):  # another build creates the output while ours is about to move in
        if step == "store written" and not state["done"]:
            state["done"] = True
            build_store(pre_p, first(fts, 3), "pca", 1, tmp_path / "s")
        real(step)
    monkeypatch.setattr(commit, "fault_point", racer)
    with pytest.raises(OutputExistsError, match="created by another process"):
        build_store(pre_p, first(fts, 4), "pca", 2, tmp_path / "s")
    assert BasisStore.open(tmp_path / "s").T == 3  # the winner's store, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # our temporary is gone
    state["done"] = False
    shutil.rmtree(tmp_path / "s")
    assert build_store(pre_p, first(fts, 4), "pca", 2, tmp_path / "s", force=True).T == 4


# ------------------------------------------------------------------------------------------- concurrency
def test_a_second_writer_fails_clearly_or_waits(fam5, cluster_store):
    pre_p, fts, *_ = fam5
    d = fresh_copy(cluster_store)
    before = snapshot(d)
    with store_lock(d, 0):
        with pytest.raises(StoreError, match="another tvbasis process is writing"):
            add_task(BasisStore.open(d), "task5", fts["task5"], pre_p, lock_timeout=0)
    assert snapshot(d) == before
    assert add_task(d, "task5", fts["task5"], pre_p).T == 6


def test_an_open_store_keeps_reading_its_generation(fam5, cluster_store):
    pre_p, fts, *_ = fam5
    d = fresh_copy(cluster_store)
    old = BasisStore.open(d)
    ref = values(old)
    new = add_task(old, "task5", fts["task5"], pre_p)  # rewrites the bases, removes the old files
    assert not (d / old.manifest.files.bases[0]).exists()
    assert torch.equal(values(old), ref)  # the old generation, from its held descriptors: no mix
    assert new.T == 6 and not torch.equal(values(new)[: ref.numel()], ref)


# ------------------------------------------------------------------------------------------- kill -9
_SERVER = r"""
import json, os, shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import tvbasis.store as S   # imported once; every job runs in a forked child (no torch op ran here before)
jobs = json.loads(sys.argv[1])
out = {}

def run(job, n):
    if n:
        os.environ["TVBASIS_FAULT_STEP"] = str(n)
    os.environ["TQDM_DISABLE"] = "1"
    if job["op"] == "add-task":
        S.add_task(job["dir"], job["name"], job["ft"], job["pre"])
    elif job["op"] == "build":
        S.build_store(job["pre"], job["fts"], job["method"], job["M"], job["dir"], force=job["force"])
    elif job["op"] == "upgrade":
        S.upgrade_store(job["dir"])

for key, job in jobs.items():
    if job["op"] == "concurrent":
        pids = []
        for sub in job["jobs"]:
            pid = os.fork()
            if pid == 0:
                try:
                    run(sub, 0)
                    os._exit(0)
                except BaseException as e:
                    print(repr(e), file=sys.stderr)
                    os._exit(3)
            pids.append(pid)
        out[key] = [os.waitpid(p, 0)[1] for p in pids]
        continue
    res = []
    for n in range(1, 60):
        work = Path(job["work"]) / f"n{n:02d}"
        shutil.copytree(job["pristine"], work)
        job["dir"] = str(work / job["name_in_work"])
        pid = os.fork()
        if pid == 0:
            try:
                run(job, n)
                os._exit(0)
            except BaseException as e:
                print(repr(e), file=sys.stderr)
                os._exit(3)
        status = os.waitpid(pid, 0)[1]
        res.append([n, str(work), status])
        if status == 0:
            break
    out[key] = res
print(json.dumps(out))
"""


def test_kill_9_between_any_two_steps_leaves_the_old_or_the_new_state(fam5, cluster_store, pca_store, tmp_path):
    pre_p, fts, *_ = fam5
    pristine = {}
    for key, store in (("cluster", cluster_store), ("pca", pca_store)):
        (tmp_path / key / "pristine").mkdir(parents=True)
        shutil.copytree(store.root, tmp_path / key / "pristine" / "s")
        pristine[key] = str(tmp_path / key / "pristine")
    (tmp_path / "v1" / "pristine").mkdir(parents=True)
    shutil.copytree(pca_store.root, tmp_path / "v1" / "pristine" / "s")
    make_v1(tmp_path / "v1" / "pristine" / "s")
    (tmp_path / "new" / "pristine").mkdir(parents=True)
    conc = tmp_path / "conc"
    shutil.copytree(cluster_store.root, conc)
    four = {k: str(v) for k, v in first(fts, 4).items()}
    jobs = {
        "add-cluster": {"op": "add-task", "pristine": pristine["cluster"], "name_in_work": "s", "name": "task5",
                        "ft": str(fts["task5"]), "pre": str(pre_p), "work": str(tmp_path / "cluster")},
        "add-pca": {"op": "add-task", "pristine": pristine["pca"], "name_in_work": "s", "name": "task5",
                    "ft": str(fts["task5"]), "pre": str(pre_p), "work": str(tmp_path / "pca")},
        "force-build": {"op": "build", "pristine": pristine["pca"], "name_in_work": "s", "fts": four,
                        "pre": str(pre_p), "method": "cluster", "M": 2, "force": True,
                        "work": str(tmp_path / "pcaforce")},
        "new-build": {"op": "build", "pristine": str(tmp_path / "new" / "pristine"), "name_in_work": "s",
                      "fts": four, "pre": str(pre_p), "method": "pca", "M": 2, "force": False,
                      "work": str(tmp_path / "new")},
        "upgrade": {"op": "upgrade", "pristine": str(tmp_path / "v1" / "pristine"), "name_in_work": "s",
                    "work": str(tmp_path / "v1")},
        "concurrent": {"op": "concurrent", "jobs": [
            {"op": "add-task", "dir": str(conc), "name": n, "ft": str(fts[f]), "pre": str(pre_p)}
            for n, f in (("a", "task5"), ("b", "task4"))]},
    }
    r = subprocess.run([sys.executable, "-c", _SERVER, json.dumps(jobs), SRC], capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # two concurrent add-tasks: both exit 0 and both tasks are there (no lost update)
    assert res.pop("concurrent") == [0, 0]
    both = BasisStore.open(conc)
    assert both.T == 7 and set(both.task_names) >= {"a", "b"} and both.verify() == []
    old_values = {"add-cluster": values(cluster_store), "add-pca": values(pca_store),
                  "force-build": values(pca_store), "upgrade": values(pca_store)}
    for key, runs in res.items():
        *killed, (n_done, done_dir, status) = runs
        assert status == 0 and len(killed) >= 3, (key, runs)
        new_values = values(BasisStore.open(Path(done_dir) / "s"))
        seen = set()
        for n, work, status in killed:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (key, n, status)
            root = Path(work) / "s"
            if key == "new-build" and not root.exists():
                seen.add("old")  # killed before the store moved in: no output, a stale temporary in its parent
                assert collect_garbage(Path(work)) and sorted(os.listdir(work)) == []
                continue
            store = BasisStore.open(root)
            got = values(store)
            state = ("new" if got.shape == new_values.shape and torch.equal(got, new_values) else
                     "old" if key in old_values and got.shape == old_values[key].shape
                     and torch.equal(got, old_values[key]) else None)
            if key == "upgrade":  # same values before and after: the format version tells
                state = "new" if store.manifest.format_version == 3 and state else "old" if state else None
            assert state is not None, (key, n)
            seen.add(state)
            assert store.verify() == [] or (key == "upgrade" and state == "old")
            store.close()
            collect_garbage(root)
            assert sorted(p.name for p in root.iterdir() if p.name != ".tvbasis.lock") == sorted(
                ["tvbasis.json", *BasisStore.open(root).manifest.files.all()]), (key, n)
        assert seen == {"old", "new"}, (key, seen)


def test_sigterm_cleans_up_and_exits_143_in_one_line(fam5, tmp_path):
    pre_p, fts, *_ = fam5
    env = {**os.environ, "TVBASIS_FAULT_STEP": "1", "TVBASIS_FAULT_SIGNAL": "TERM", "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "tvbasis.cli", "-q", "build", "--pretrained", str(pre_p),
                        *[a for n, p in first(fts, 3).items() for a in ("--finetuned", f"{n}={p}")],
                        "--method", "pca", "-M", "1", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300, check=False, env=env)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 143 and len(err) == 1 and "SIGTERM" in err[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == []  # no output, no temporary


def test_gc_removes_leftovers_of_dead_runs_and_nothing_else(pca_store, tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead = int(child.stdout)
    work = tmp_path / "w"
    shutil.copytree(pca_store.root, work / "s")
    for t in (work / f".s.tvbasis-tmp-{dead}-0badc0de",  # a build killed before its store moved in
              work / "s" / f".bases.tvbasis-tmp-{dead}-0badc0de"):  # an add-task's staging
        t.mkdir()
        (t / ".tvbasis-temp").write_text(t.name + "\n")  # the marker every tvbasis temporary holds (issue 27)
    (work / "s" / "bases.g9.safetensors").write_bytes(b"orphan")  # moved in, never committed
    (work / "s" / f".tvbasis.json.tvbasis-tmp-{os.getpid()}-00000000").write_text("live")  # a live process's
    (work / "s" / "mine.txt").write_text("foreign")
    (work / "other.txt").write_text("foreign")
    removed = collect_garbage(work)
    assert sorted(p.name for p in removed) == sorted([f".s.tvbasis-tmp-{dead}-0badc0de",
                                                      f".bases.tvbasis-tmp-{dead}-0badc0de", "bases.g9.safetensors"])
    assert sorted(os.listdir(work / "s")) == sorted([".tvbasis.lock", f".tvbasis.json.tvbasis-tmp-{os.getpid()}-00000000",
                                                     "bases.safetensors", "mean.safetensors", "mine.txt",
                                                     "tvbasis.json"])
    assert torch.equal(values(BasisStore.open(work / "s")), values(pca_store))


def test_disk_full_is_one_line_and_leaves_nothing(fam5, tmp_path, capsys, monkeypatch):
    import errno

    from tvbasis.cli import main
    from tvbasis.io.writer import PositionalShard
    pre_p, fts, *_ = fam5

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "s"))
    monkeypatch.setattr(PositionalShard, "write_elements", full)
    rc = main(["-q", "build", "--pretrained", str(pre_p),
               *[a for n, p in first(fts, 3).items() for a in ("--finetuned", f"{n}={p}")],
               "--method", "pca", "-M", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert sorted(os.listdir(tmp_path)) == []


def test_hyper_parameters_are_recorded(fam5, tmp_path):
    pre_p, fts, *_ = fam5
    s = build_store(pre_p, first(fts, 4), "cluster", 2, tmp_path / "s",
                    {"inner": "dare_ties", "inner_params": {"density": 0.5}})
    mf = json.loads((s.root / "tvbasis.json").read_text())
    assert mf["options"]["seed"] == 0  # defaults recorded
    inner = mf["groups"]["*"]["inner"]
    assert inner["method"] == "dare_ties" and inner["params"]["density"] == 0.5
    assert {"seed", "sign", "rescale"} <= set(inner["params"])  # the merge's own defaults, its seed included
    r = build_store(pre_p, first(fts, 4), "random", 2, tmp_path / "r")
    assert r.fits["*"].random_seed == r.manifest.options["seed"] == 0


def test_edit_model_card_records_the_outer_merge_and_coefficients(fam5, pca_store, tmp_path):
    from tvbasis.cli import main
    pre_p, *_ = fam5
    assert main(["-q", "edit", str(pca_store.root), "--pretrained", str(pre_p), "--add", "task0,task1", "--outer",
                 "dare_ties", "--density", "0.4", "--scaling-coef", "0.5", "--out", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    for text in ("dare_ties", "'density': 0.4", "'seed': 0", "'rescale': True", "scaling_coef", "store_manifest_sha256",
                 pca_store.manifest.manifest_sha256):
        assert text in card, text
    assert main(["-q", "edit", str(pca_store.root), "--pretrained", str(pre_p), "--combine", "task0=1,task2=-0.5",
                 "--scaling-coef", "1", "--out", str(tmp_path / "c")]) == 0
    assert "{'task0': 1.0, 'task2': -0.5}" in (tmp_path / "c" / "README.md").read_text()
    m = open_checkpoint(tmp_path / "c")
    assert all(math.isfinite(float(m.get(k).float().sum())) for k in m.keys() if m.spec(k).is_float)
