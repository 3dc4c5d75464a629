"""Fuzz tests (hypothesis) of every new untrusted input kind (issue 27): codec specs, coded manifest sections,
paper-layout folders, mergekit YAML, masks files, user data files. Each asserts what a user sees: a TvbasisError
(the CLI's one line, non-zero exit) or a correct result — never another exception, never a silently different
result, nothing written. Derandomized, so a run is reproducible."""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.storefiles import read_manifest
from tests.tinymodels import make_family
from tvbasis.codecs import parse_codec
from tvbasis.errors import TvbasisError
from tvbasis.store import BasisStore, build_store
from tvbasis.store.format import manifest_digest

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam"), T=3)


def scratch() -> Path:
    d = Path(tempfile.mkdtemp(prefix="tvb-fuzz-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def one_line(e: TvbasisError) -> None:
    assert "\n" not in " ".join(str(e).split()) and len(str(e)) < 2000


# ------------------------------------------------------------------------------------------------ codec specs
TOKENS = ["int8", "int4", "int2", "float16", "lowrank", "topk", "sparse-rows", "bogus", ":", "=", ",", "+", "rank",
          "group", "density", "scheme", "affine", "1", "0", "-1", "1e999", "nan", "9" * 30, "none", " ", ";"]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map("".join))
def test_codec_specs_parse_or_refuse_in_one_line(spec):
    try:
        codec = parse_codec(spec)
    except TvbasisError as e:
        one_line(e)
        return
    x = torch.randn(6, 5)
    try:
        enc = codec.encode(x)
    except TvbasisError as e:
        one_line(e)
        return
    y = codec.decode(enc)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())


# ------------------------------------------------------------------------------------------------ coded manifests
@pytest.fixture(scope="module")
def coded_store(fam, tmp_path_factory):
    pre_p, fts, *_ = fam
    return build_store(pre_p, fts, "pca", 1, tmp_path_factory.mktemp("coded") / "s", residual="lowrank:rank=2+int8")


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):
            yield from _paths(v, (*prefix, i))


def _reconstructions(store: BasisStore) -> torch.Tensor:
    return torch.cat([torch.cat([v.reshape(-1).float() for v in store.reconstruct(t).to_state_dict().values()])
                      for t in store.task_names])


@FUZZ
@given(data=st.data())
def test_coded_section_mutations_are_refused_caught_or_harmless(coded_store, data):
    """A mutation of the coded section (and the per-task numbers it is checked against), re-signed as an attacker
    would: open refuses, or verify reports it, or every reconstruction is what the intact store gives."""
    root = coded_store.root
    base = read_manifest(root)
    want = _reconstructions(coded_store)
    mf = copy.deepcopy(base)
    paths = [p for p in _paths({"coded": mf["coded"], "tasks": mf["tasks"]}) if len(p) > 1]
    path = data.draw(st.sampled_from(paths), label="path")
    node = mf
    for k in path[:-1]:
        node = node[k]
    key = path[-1]
    op = data.draw(st.sampled_from(["drop", "retype", "scale"]), label="op")
    old = node[key]
    if op == "drop":
        node.pop(key)
    elif op == "retype":
        node[key] = data.draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)), label="value")
    else:
        node[key] = old * data.draw(st.sampled_from([-1, 2, 0])) if isinstance(old, (int, float)) \
            and not isinstance(old, bool) else old
    d = scratch() / "s"
    shutil.copytree(root, d)
    try:
        mf["manifest_sha256"] = manifest_digest(mf)
    except (ValueError, TypeError):
        pass
    (d / "tvbasis.json").write_text(json.dumps(mf, allow_nan=True))
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".tvbasis.lock"}
    try:
        store = BasisStore.open(d)
        if store.verify():
            return
        got = _reconstructions(store)
    except TvbasisError as e:
        one_line(e)
        return
    finally:
        assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".tvbasis.lock"} == before
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6), path


# ------------------------------------------------------------------------------------------------ paper folders
PCA_KEYS = ["coefficients", "mean_vector", "keys_order", "param_shapes", "dataset_names"]
VALUES = st.one_of(SCALARS, st.lists(st.integers(-3, 10**6), max_size=4),
                   st.builds(lambda n, k: torch.zeros(n, k), st.integers(0, 4), st.integers(0, 4)),
                   st.builds(lambda n: torch.zeros(1).expand(n), st.integers(1, 10**9)))


@pytest.fixture(scope="module")
def pca_folder(fam, tmp_path_factory):
    from tests.test_interop import write_pca_folder
    folder = tmp_path_factory.mktemp("pca") / "f"
    write_pca_folder(folder, fam)
    return folder


@FUZZ
@given(key=st.sampled_from(PCA_KEYS), value=VALUES, sub=st.booleans())
def test_paper_folder_mutations_refuse_in_one_line(pca_folder, fam, key, value, sub):
    from tvbasis.interop import import_tvb
    d = scratch() / "f"
    shutil.copytree(pca_folder, d)
    comps = torch.load(d / "pca_components.pt", weights_only=True)
    if sub and isinstance(comps[key], dict):
        comps[key][next(iter(comps[key]))] = value
    else:
        comps[key] = value
    torch.save(comps, d / "pca_components.pt")
    out = d.parent / "out"
    try:
        import_tvb(d, fam[0], out)
    except TvbasisError as e:
        one_line(e)
        assert not out.exists()
        return
    BasisStore.open(out).close()  # accepted: then it is a valid store


# ------------------------------------------------------------------------------------------------ mergekit YAML
YAML_TOKENS = ["merge_method: ", "ties", "linear", "models:\n", "  - model: ", "base_model: ", "parameters:\n",
               "    weight: ", "    density: ", "&a ", "*a ", "[", "]", "{", "}", ", ", "1", "0.5", ".nan", "-1",
               "9" * 50, "\n", "  ", "? ", ": ", "!!python/object:os.system ", "'x'", "dtype: float16\n"]


@FUZZ
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=20).map("".join))
def test_mergekit_yaml_parses_or_refuses_in_one_line(tmp_path_factory, text):
    from tvbasis.interop.mergekit import load_mergekit_config
    f = scratch() / "merge.yml"
    f.write_text(text)
    try:
        load_mergekit_config(f, check_paths=False)
    except TvbasisError as e:
        one_line(e)


# ------------------------------------------------------------------------------------------------ masks files
@pytest.fixture(scope="module")
def masks_file(fam, tmp_path_factory):
    from tvbasis.stitch.localize import localize
    pre_p, fts, *_ = fam
    out = tmp_path_factory.mktemp("masks") / "m.safetensors"
    localize(pre_p, fts, out=out)
    return out


@FUZZ
@given(key=st.sampled_from(["tasks", "masks", "mask_of", "tensors", "settings", "stats", "values_dtype",
                            "format_version"]),
       value=st.one_of(st.text(max_size=20), SCALARS.map(json.dumps),
                       st.lists(SCALARS, max_size=3).map(lambda v: json.dumps(v, allow_nan=True)),
                       st.just('{"a": [[3, 3], "x"]}'), st.just("[" * 5000 + "]" * 5000)))
def test_masks_file_metadata_mutations_refuse_in_one_line(masks_file, key, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tvbasis.stitch.format import MaskSet
    with safe_open(str(masks_file), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta[key] = value
    d = scratch() / "m.safetensors"
    save_file(tensors, str(d), meta)
    try:
        ms = MaskSet(d)
        for t in ms.tasks:
            ms.support(t)
    except TvbasisError as e:
        one_line(e)


# ------------------------------------------------------------------------------------------------ user data files
@FUZZ
@given(body=st.text(max_size=200), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_user_data_files_load_or_refuse_in_one_line(body, suffix):
    pytest.importorskip("transformers")
    from tvbasis.eval.userdata import load_user_task
    f = scratch() / f"data{suffix}"
    f.write_text(("text,label\n" if suffix == ".csv" else "text\tlabel\n" if suffix == ".tsv" else "") + body)
    try:
        load_user_task("t", {"dev": f})
    except TvbasisError as e:
        one_line(e)
