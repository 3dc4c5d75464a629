"""Reliability of the newer surfaces (issue 27): every writer validates what it is about to commit, one set of
output rules, gc removes only what it can prove it made, untrusted YAML/JSON under caps, coded data checked like
dense data (decoded, compared with the manifest's norms and errors), caps on work, no internal errors.

Each test states its reference independently of the code under test: the bytes of a store before and after, a
file's content, a norm computed here with numpy."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tests.storefiles import read_manifest, safetensors_layout, tensor_dtype
from tests.tinymodels import dense_vector, ft_args, make_family
from tvbasis.cli import main
from tvbasis.errors import CheckpointError, ConfigError, StoreError
from tvbasis.io.atomic import TEMP_MARKER, AtomicOutput, cleanup_stale_temps, temp_path
from tvbasis.io.reader import parse_safetensors_header
from tvbasis.store import BasisStore, build_store, collect_garbage, store_lock
from tvbasis.store.format import manifest_digest
from tvbasis.untrusted import load_json, load_yaml

DEEP = "lowrank+lowrank+lowrank+lowrank+lowrank+lowrank+lowrank+int8"  # deeper than the manifest validator allows


@pytest.fixture(scope="module")
def fam3(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam3"), T=3)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d (the writer lock excluded) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".tvbasis.lock"}


def siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "internal error" not in err and "Traceback" not in err, err
    return err


def build_args(fam, out: Path, *extra: str) -> list[str]:
    pre_p, fts, *_ = fam
    return ["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "1",
            "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------ validate before commit
@pytest.fixture()
def reader_stricter(monkeypatch):
    """The store's reader refuses any chained codec (as when writer and reader disagree): only the validation
    before the commit can stop such a store."""
    import tvbasis.store.format as fmt
    monkeypatch.setattr(fmt, "MAX_CODEC_DEPTH", 0)
    return "lowrank:rank=2+int8"


def test_build_force_with_a_spec_the_reader_refuses_keeps_the_old_store(fam3, tmp_path, capsys, reader_stricter):
    out = tmp_path / "s"
    assert main(build_args(fam3, out)) == 0
    before = snapshot(out)
    rc = main(build_args(fam3, out, "--force", "--residual", reader_stricter))
    assert rc != 0
    assert "nests deeper" in one_line_error(capsys)
    assert snapshot(out) == before  # the old generation: same files, same bytes
    assert BasisStore.open(out).T == 3
    assert siblings(out) == []  # no temporary left next to it


def test_build_without_force_commits_nothing_unreadable(fam3, tmp_path, capsys, reader_stricter):
    out = tmp_path / "new"
    assert main(build_args(fam3, out, "--residual", reader_stricter)) != 0
    one_line_error(capsys)
    assert not out.exists() and siblings(out) == []


def test_codec_specs_the_reader_would_refuse_are_refused_before_any_work(fam3, tmp_path, capsys):
    for spec in (DEEP, "int8:group=" + "9" * 30, "lowrank:rank=" + "9" * 5000, "int8+" * 400 + "int8"):
        assert main(build_args(fam3, tmp_path / "s", "--residual", spec)) != 0
        assert len(one_line_error(capsys)) < 400
    assert not (tmp_path / "s").exists()


def test_import_tvb_with_a_name_the_validator_refuses_keeps_the_store(fam3, tmp_path, capsys):
    from tests.test_interop import write_ae_folder
    pre_p, fts, pre, sds = fam3
    folder = tmp_path / "ae"
    write_ae_folder(folder, fam3)
    info = json.loads((folder / "method_info.json").read_text())
    info["datasets"] = ["a\nb", *info["datasets"][1:]]
    (folder / "method_info.json").write_text(json.dumps(info))
    import torch
    awb = torch.load(folder / "AWB.pt", weights_only=True)
    awb["metadata"]["datasets"] = info["datasets"]
    torch.save(awb, folder / "AWB.pt")
    out = tmp_path / "s"
    assert main(build_args(fam3, out)) == 0
    before = snapshot(out)
    rc = main(["-q", "import-tvb", str(folder), "--pretrained", str(pre_p), "--out", str(out), "--force"])
    assert rc != 0
    one_line_error(capsys)
    assert snapshot(out) == before
    rc = main(["-q", "import-tvb", str(folder), "--pretrained", str(pre_p), "--out", str(tmp_path / "n")])
    assert rc != 0 and not (tmp_path / "n").exists()


@pytest.fixture()
def validator_refuses_x(monkeypatch):
    """The manifest validator refuses task names starting with 'x'; the writers' own up-front checks do not (a
    writer and its reader disagreeing): only the validation before the commit can stop the write."""
    import tvbasis.store.format as fmt
    real = fmt.task_name_problem
    monkeypatch.setattr(fmt, "task_name_problem", lambda n: "starts with x" if str(n).startswith("x") else real(n))


@pytest.mark.parametrize("residual", [None, "int8"])
def test_add_task_and_rename_task_validate_before_commit(fam3, tmp_path, validator_refuses_x, residual):
    from tvbasis.store import add_task
    from tvbasis.store.lifecycle import rename_task
    pre_p, fts, *_ = fam3
    names = list(fts)
    store = build_store(pre_p, {n: fts[n] for n in names[:2]}, "pca", 1, tmp_path / "s", residual=residual)
    root = store.root
    store.close()
    before = snapshot(root)
    with pytest.raises(StoreError, match="refusing to commit.*starts with x"):
        add_task(root, "xnew", fts[names[2]], pre_p)
    assert snapshot(root) == before
    with pytest.raises(StoreError, match="refusing to commit.*starts with x"):
        rename_task(root, names[0], "xrenamed")
    assert snapshot(root) == before and BasisStore.open(root).verify() == []


def test_upgrade_refuses_implausible_version_1_data(fam3, tmp_path):
    from tvbasis.store.update import upgrade_store
    pre_p, fts, *_ = fam3
    build_store(pre_p, fts, "pca", 1, tmp_path / "s").close()
    root = tmp_path / "s"
    mf = json.loads((root / "tvbasis.json").read_text())
    for k in ("generation", "digests", "manifest_sha256"):
        mf.pop(k)
    mf["format_version"] = 1
    g = next(iter(mf["cross"]))
    mf["cross"][g]["K"][0][0] *= 4  # the data does not have the norm the manifest records
    (root / "tvbasis.json").write_text(json.dumps(mf))
    before = snapshot(root)
    with pytest.raises(StoreError, match="cannot be upgraded"):
        upgrade_store(root)
    assert snapshot(root) == before
    problems = BasisStore.open(root).verify()  # a version-1 store: no digests, but the decoded checks still run
    assert len(problems) == 2 and "no digests" in problems[0] and "basis 0" in problems[1]


def test_stored_norm_check_reads_the_bases_in_row_chunks(fam3, tmp_path, monkeypatch):
    """The check of the stored bases' norms against K reads row chunks (memory flat in M): with chunks of a few
    rows it still passes on a sound store and still catches a K that disagrees with the data."""
    import tvbasis.store.decoded as decoded
    from tvbasis.store.integrity import StoreData

    pre_p, fts, *_ = fam3
    build_store(pre_p, fts, "pca", 2, tmp_path / "s").close()
    root = tmp_path / "s"
    monkeypatch.setattr(decoded, "NORM_ROWS_ELEMENTS", 7)
    reads = []
    real = StoreData.read

    def counting(self, part, name, rows=None):
        reads.append((part, name, rows))
        return real(self, part, name, rows)

    monkeypatch.setattr(StoreData, "read", counting)
    store = BasisStore.open(root)
    assert store.verify() == []
    spans = [r for part, _n, r in reads if part == "bases"]
    assert spans and all(r is not None and r[1] - r[0] <= 7 for r in spans)  # never a whole multi-row tensor
    store.close()
    mf = json.loads((root / "tvbasis.json").read_text())
    g = next(iter(mf["cross"]))
    mf["cross"][g]["K"][1][1] *= 1.5
    resign(root, mf)
    problems = BasisStore.open(root).verify()
    assert any("basis 1" in p and "data and manifest disagree" in p for p in problems)


# ------------------------------------------------------------------------------------------ coded data checked
def coded_tensor_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    start, header = safetensors_layout(path)
    return start, {k: tuple(v["data_offsets"]) for k, v in header.items()}


def resign(root: Path, mf: dict) -> None:
    """Write a manifest with a matching manifest_sha256, as an attacker (or a buggy writer) would."""
    mf = dict(mf)
    mf["manifest_sha256"] = manifest_digest(mf)
    (root / "tvbasis.json").write_text(json.dumps(mf))


def tamper_coded_tensor(root: Path, key: str, fn) -> None:
    """Change the bytes of coded tensor ``key`` by ``fn(np.ndarray) -> np.ndarray`` (same dtype) and re-digest the
    tensor, its file and the manifest consistently: no digest can see it."""
    mf = read_manifest(root)
    for fname, f in mf["coded"]["files"].items():
        for t in f["tensors"]:
            if t[0] != key:
                continue
            path = root / fname
            start, offsets = coded_tensor_offsets(path)
            a, b = offsets[key]
            data = bytearray(path.read_bytes())
            dtype = tensor_dtype(safetensors_layout(path)[1][key]["dtype"])
            x = np.frombuffer(bytes(data[start + a:start + b]), dtype=dtype).copy()
            data[start + a:start + b] = fn(x).astype(dtype).tobytes()
            path.write_bytes(bytes(data))
            t[3] = f"{xxhash.xxh3_64_intdigest(bytes(data[start + a:start + b])):016x}"
            f["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
            resign(root, mf)
            return
    raise AssertionError(f"no coded tensor {key}")


@pytest.fixture()
def int8_store(fam3, tmp_path):
    pre_p, fts, *_ = fam3
    return build_store(pre_p, fts, "pca", 1, tmp_path / "s", residual="int8")


def scale_key(store: BasisStore) -> str:
    keys = [t.key for f in store.manifest.coded.files.values() for t in f.tensors if t.key.startswith("residual/")]
    return next(k for k in keys if k.endswith("/scale"))


def test_consistently_tampered_scales_are_caught_by_verify_add_task_and_not_used(fam3, int8_store, capsys):
    root = int8_store.root
    key = scale_key(int8_store)
    int8_store.close()
    assert BasisStore.open(root).verify() == []
    tamper_coded_tensor(root, key, lambda x: x * 3)
    store = BasisStore.open(root)  # every digest matches: only the data's norms can tell
    problems = store.verify()
    assert problems and "residual" in problems[0] and "disagree" in problems[0]
    assert main(["verify", str(root)]) != 0
    capsys.readouterr()
    pre_p, fts, *_ = fam3
    before = snapshot(root)
    rc = main(["-q", "add-task", str(root), f"x={next(iter(fts.values()))}", "--pretrained", str(pre_p)])
    assert rc != 0
    assert "fails verification" in one_line_error(capsys)
    assert snapshot(root) == before


def test_nan_in_coded_data_is_not_reported_finite(int8_store):
    root = int8_store.root
    key = scale_key(int8_store)
    int8_store.close()
    tamper_coded_tensor(root, key, lambda x: np.full_like(x, np.nan))
    problems = BasisStore.open(root).verify()
    assert problems and "NaN/Inf" in problems[0]


def test_an_empty_entry_with_stored_tensors_is_refused(int8_store):
    root = int8_store.root
    key = scale_key(int8_store).rsplit("/", 1)[0]
    int8_store.close()
    mf = read_manifest(root)
    mf["coded"]["entries"][key]["encoded"]["codec"] = "none"  # would decode to zeros
    resign(root, mf)
    with pytest.raises(StoreError, match="empty entry"):
        BasisStore.open(root)


def test_tampered_dense_basis_norm_is_caught(fam3, tmp_path):
    pre_p, fts, *_ = fam3
    store = build_store(pre_p, fts, "pca", 1, tmp_path / "s")
    root = store.root
    store.close()
    mf = read_manifest(root)
    g = next(iter(mf["cross"]))
    mf["cross"][g]["K"][0][0] *= 1.5  # the data no longer has the norm the manifest records
    resign(root, mf)
    problems = BasisStore.open(root).verify()
    assert problems and "basis 0" in problems[0]


def test_checks_agree_with_a_numpy_reference_on_an_intact_store(fam3, int8_store):
    """The residual check's identity: ‖r̂_t‖ lies within e_t of ‖v_t − U c_t‖ (both computed here)."""
    _, _, pre, sds = fam3
    store = int8_store
    mf = store.manifest
    fit = next(iter(mf.groups.values()))
    names = [s.name for s in mf.tensors]
    U = {k: store.data.read("bases", k).double().reshape(-1).numpy() for k in names}
    mu = {k: store.data.read("mean", k).double().reshape(-1).numpy() for k in names}
    for t, task in enumerate(mf.tasks):
        v = dense_vector(pre, sds[t])
        r = np.concatenate([v[k].reshape(-1).numpy() - fit.W[0, t] * U[k] - fit.mean_coef[t] * mu[k] for k in names])
        rhat = np.concatenate([store.coded.decode(f"residual/{task.name}/{k}").double().reshape(-1).numpy()
                               for k in names])
        e = task.rel_error * task.norm
        assert abs(np.linalg.norm(rhat) - np.linalg.norm(r)) <= e + 1e-6
        assert np.linalg.norm(rhat) > 0.5 * np.linalg.norm(r)
    assert store.verify() == []


# ------------------------------------------------------------------------------------------ outputs
def test_eval_and_tune_json_never_overwrite_an_input_or_an_unnamed_file(fam3, tmp_path, capsys):
    pre_p, fts, *_ = fam3
    data = tmp_path / "bank.csv"
    data.write_text("text,label\nhello,a\nbye,b\n")
    before = data.read_bytes()
    for force in ([], ["--force"]):
        rc = main(["-q", "eval", str(pre_p), "--task", f"bank={data}", "--json", str(data), *force])
        assert rc != 0 and "input" in one_line_error(capsys) and data.read_bytes() == before
        rc = main(["-q", "tune", "--pretrained", str(pre_p), *ft_args(fts), "--task", f"bank={data}",
                   "--json", str(data), *force])
        assert rc != 0 and "input" in one_line_error(capsys) and data.read_bytes() == before
    other = tmp_path / "results.json"
    other.write_text("keep")
    rc = main(["-q", "eval", str(pre_p), "--task", f"bank={data}", "--json", str(other)])
    assert rc != 0 and "already exists" in one_line_error(capsys) and other.read_text() == "keep"


def test_batch_size_zero_and_huge_grids_are_refused_up_front(fam3, tmp_path, capsys):
    pre_p, fts, *_ = fam3
    data = tmp_path / "bank.csv"
    data.write_text("text,label\nhello,a\n")
    assert main(["-q", "eval", str(pre_p), "--task", f"bank={data}", "--batch-size", "0"]) == 2
    one_line_error(capsys)
    rc = main(["-q", "tune", "--pretrained", str(pre_p), *ft_args(fts), "--task", f"bank={data}",
               "--grid", "1e-12:1e6"])
    assert rc != 0 and "at most" in one_line_error(capsys)


def test_force_never_deletes_a_user_directory_or_another_kind_of_output(fam3, tmp_path, capsys):
    pre_p, fts, *_ = fam3
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    a = f"a={next(iter(fts.values()))}"
    rc = main(["-q", "merge", "--pretrained", str(pre_p), "--finetuned", a, "--out", str(user), "--force"])
    assert rc != 0 and "did not write" in one_line_error(capsys)
    assert (user / "notes.txt").read_text() == "precious"
    # a model output of tvbasis is replaced with --force; a store is not a model output
    model = tmp_path / "model"
    assert main(["-q", "merge", "--pretrained", str(pre_p), "--finetuned", a, "--out", str(model)]) == 0
    assert main(["-q", "merge", "--pretrained", str(pre_p), "--finetuned", a, "--out", str(model),
                 "--force"]) == 0
    store = tmp_path / "store"
    assert main(build_args(fam3, store)) == 0
    before = snapshot(store)
    rc = main(["-q", "merge", "--pretrained", str(pre_p), "--finetuned", a, "--out", str(store), "--force"])
    assert rc != 0 and "store" in one_line_error(capsys) and snapshot(store) == before


def test_export_tvb_onto_its_own_store_is_refused(fam3, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(build_args(fam3, store)) == 0
    before = snapshot(store)
    rc = main(["-q", "export-tvb", str(store), "--out", str(store), "--force"])
    assert rc != 0 and "input" in one_line_error(capsys) and snapshot(store) == before
    user = tmp_path / "mine"
    user.mkdir()
    (user / "x").write_text("1")
    assert main(["-q", "export-tvb", str(store), "--out", str(user), "--force"]) != 0
    one_line_error(capsys)
    assert (user / "x").read_text() == "1"


def test_inspect_plot_never_overwrites_a_picture(fam3, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    store = tmp_path / "store"
    assert main(build_args(fam3, store)) == 0
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "cosine.png").write_bytes(b"mine")
    assert main(["inspect", str(store), "--plot", str(plots)]) != 0
    one_line_error(capsys)
    assert (plots / "cosine.png").read_bytes() == b"mine"
    assert main(["inspect", str(store), "--plot", str(store / "plots")]) != 0


def test_atomic_file_output_leaves_no_temporary(tmp_path):
    out = tmp_path / "f.json"
    with AtomicOutput(out, directory=False) as tmp:
        tmp.write_text("1")
    assert out.read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    with pytest.raises(RuntimeError), AtomicOutput(out, force=True, directory=False) as tmp:
        tmp.write_text("2")
        raise RuntimeError
    assert out.read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# ------------------------------------------------------------------------------------------ gc
DEAD_PID = 2**22 + 12345  # above the default pid_max of 4194304: never a live process


def test_gc_removes_only_marked_temporaries_and_never_follows_symlinks(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    user_dir = d / f".data.tvbasis-tmp-{DEAD_PID}-deadbeef"  # a user's folder with a matching name
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("mine")
    user_file = d / f".x.tvbasis-tmp-{DEAD_PID}-cafe0001"
    user_file.write_text("mine")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / TEMP_MARKER).write_text(f".y.tvbasis-tmp-{DEAD_PID}-00000001\n")
    (d / f".y.tvbasis-tmp-{DEAD_PID}-00000001").symlink_to(target)
    ours = d / f".z.tvbasis-tmp-{DEAD_PID}-0000abcd"
    ours.mkdir()
    (ours / TEMP_MARKER).write_text(ours.name + "\n")
    (ours / "shard.safetensors").write_bytes(b"x")
    removed = collect_garbage(d)
    assert removed == [ours]
    assert (user_dir / "keep.txt").read_text() == "mine" and user_file.read_text() == "mine"
    assert target.is_dir() and (d / f".y.tvbasis-tmp-{DEAD_PID}-00000001").is_symlink()


def test_temp_dirs_carry_the_marker_and_cleanup_removes_them(tmp_path):
    t = temp_path(tmp_path / "out")
    t.mkdir()
    assert (t / TEMP_MARKER).read_text().strip() == t.name
    dead = tmp_path / t.name.replace(f"-{os.getpid()}-", f"-{DEAD_PID}-")
    os.rename(t, dead)
    (dead / TEMP_MARKER).write_text(dead.name + "\n")
    assert cleanup_stale_temps(tmp_path) == [dead]


def test_gc_skips_a_locked_store_goes_on_and_leaves_no_lock_in_a_non_store(fam3, tmp_path, caplog):
    d = tmp_path / "work"
    d.mkdir()
    assert main(build_args(fam3, d / "a")) == 0
    assert main(build_args(fam3, d / "b")) == 0
    (d / "b" / "bases.g9.safetensors").write_bytes(b"leftover")
    fake = d / "c"
    fake.mkdir()
    (fake / "tvbasis.json").write_text('{"not": "a manifest"}')
    with store_lock(d / "a", 0):
        removed = collect_garbage(d, lock_timeout=0)
    assert removed == [d / "b" / "bases.g9.safetensors"]
    assert any("skipped" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in fake.iterdir()) == ["tvbasis.json"]


# ------------------------------------------------------------------------------------------ untrusted documents
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    cfg = tmp_path / "merge.yml"
    cfg.write_text("models: *i\n" + bomb)
    assert len(cfg.read_bytes()) < 1200
    assert main(["-q", "merge", "--config", str(cfg), "--out", str(tmp_path / "o")]) != 0
    err = one_line_error(capsys)
    assert "anchors" in err or "aliases" in err
    assert len(err) < 400 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,what", [("a: 1\na: 2\n", "twice"), ("[" * 100 + "]" * 100, "deeper"),
                                       ("a: " + "9" * 5000 + "\n", "digits")])
def test_yaml_caps(text, what):
    with pytest.raises(ConfigError, match=what):
        load_yaml(text, "cfg.yml", ConfigError)


def test_deep_safetensors_header_and_overflowing_manifest_numbers_are_one_line(tmp_path, pca_store_path):
    header = ("[" * 100000 + "]" * 100000).encode()
    f = tmp_path / "deep.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="deeper"):
        parse_safetensors_header(f)
    text = (pca_store_path / "tvbasis.json").read_text()
    mf = json.loads(text)
    mf["task_vectors_bytes"] = 1
    (pca_store_path / "tvbasis.json").write_text(json.dumps(mf).replace('"task_vectors_bytes": 1',
                                                                       '"task_vectors_bytes": 1e999'))
    with pytest.raises(StoreError, match="overflows"):
        BasisStore.open(pca_store_path)
    with pytest.raises(StoreError, match="digits"):
        load_json("[" + "7" * 5000 + "]", "x", StoreError, 10**6)


@pytest.fixture()
def pca_store_path(fam3, tmp_path):
    pre_p, fts, *_ = fam3
    build_store(pre_p, fts, "pca", 1, tmp_path / "p").close()
    return tmp_path / "p"


# ------------------------------------------------------------------------------------------ caps on imported work
def _pca_folder(fam3, tmp_path):
    from tests.test_interop import write_pca_folder
    folder = tmp_path / "pca"
    write_pca_folder(folder, fam3)
    return folder


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.__setitem__("mean_vector", d["mean_vector"][:-3]), "fewer"),
    (lambda d: d["param_shapes"].__setitem__(d["keys_order"][0], "8x8"), "list of integers"),
    (lambda d: d.__setitem__("coefficients", d["coefficients"][:, :1].expand(d["coefficients"].shape)),
     "stride-0"),
])
def test_paper_folder_malformed_pca_components_are_one_line(fam3, tmp_path, capsys, mutate, match):
    import torch
    folder = _pca_folder(fam3, tmp_path)
    d = torch.load(folder / "pca_components.pt", weights_only=True)
    mutate(d)
    torch.save(d, folder / "pca_components.pt")
    pre_p = fam3[0]
    assert main(["-q", "import-tvb", str(folder), "--pretrained", str(pre_p), "--out", str(tmp_path / "s")]) != 0
    assert match in one_line_error(capsys)
    assert not (tmp_path / "s").exists()


def test_paper_folder_claiming_a_million_tasks_or_huge_bases_is_refused_up_front(fam3, tmp_path, capsys):
    import torch
    folder = _pca_folder(fam3, tmp_path)
    info = json.loads((folder / "method_info.json").read_text())
    info["datasets"] = [f"t{i}" for i in range(10**6)]
    (folder / "method_info.json").write_text(json.dumps(info))
    pre_p = fam3[0]
    assert main(["-q", "import-tvb", str(folder), "--pretrained", str(pre_p), "--out", str(tmp_path / "s")]) != 0
    assert "at most" in one_line_error(capsys)
    folder = _pca_folder(fam3, tmp_path / "b")
    d = torch.load(folder / "basis_vectors.pt", weights_only=True)
    k = next(iter(d["basis_vectors"][0]))
    d["basis_vectors"][0][k] = torch.zeros(1).expand(2**20, 2**20)  # 4 bytes claiming 4 TiB
    torch.save(d, folder / "basis_vectors.pt")
    assert main(["-q", "import-tvb", str(folder), "--pretrained", str(pre_p), "--out", str(tmp_path / "s")]) != 0
    one_line_error(capsys)
    assert not (tmp_path / "s").exists()


def test_a_fifo_named_as_a_data_file_is_refused_not_waited_on(fam3, tmp_path):
    pre_p, fts, *_ = fam3
    build_store(pre_p, fts, "pca", 1, tmp_path / "s").close()
    (tmp_path / "s" / "mean.safetensors").unlink()
    os.mkfifo(tmp_path / "s" / "mean.safetensors")
    with pytest.raises(StoreError, match="not a regular file"):
        BasisStore.open(tmp_path / "s")


# ------------------------------------------------------------------------------------------ wrong-model inputs
def test_masks_file_from_another_pretrained_of_the_same_shapes_is_refused(fam3, tmp_path, capsys):
    pre_p, fts, *_ = fam3
    other = make_family(tmp_path / "other", T=1, seed=7)[0]  # same names, shapes and dtypes, other weights
    masks = tmp_path / "m.safetensors"
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--out", str(masks)]) == 0
    out = tmp_path / "stitched"
    assert main(["-q", "stitch", "--pretrained", str(other), "--masks", str(masks), "--out", str(out)]) != 0
    err = one_line_error(capsys)
    assert "checksum" in err or "weights differ" in err
    assert str(masks) in err and not out.exists()
    assert main(["-q", "stitch", "--pretrained", str(pre_p), "--masks", str(masks), "--out", str(out)]) == 0


def test_saved_task_vector_onto_another_pretrained_of_the_same_shapes_is_refused(fam3, tmp_path, capsys):
    pre_p, fts, *_ = fam3
    other = make_family(tmp_path / "other", T=1, seed=7)[0]
    vec = tmp_path / "a.safetensors"
    assert main(["-q", "vector", "--pretrained", str(pre_p), "--finetuned", str(next(iter(fts.values()))),
                 "--out", str(vec)]) == 0
    out = tmp_path / "applied"
    assert main(["-q", "apply", "--pretrained", str(other), "--vector", f"{vec}=1", "--out", str(out)]) != 0
    err = one_line_error(capsys)
    assert str(vec) in err and "weights differ" in err and not out.exists()
    assert main(["-q", "apply", "--pretrained", str(pre_p), "--vector", f"{vec}=1", "--out", str(out)]) == 0


@pytest.mark.parametrize("alpha,nan", [(1e300, False), (8, True)])
def test_lora_adapter_with_huge_alpha_or_nan_factors_is_one_line(fam3, tmp_path, capsys, alpha, nan):
    import torch
    from safetensors.torch import save_file
    pre_p = fam3[0]
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": alpha,
                                                       "target_modules": ["query"]}))
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    if nan:
        A[0, 0] = float("nan")
    pre = "base_model.model.encoder.layer.0.attention.query"
    save_file({f"{pre}.lora_A.weight": A, f"{pre}.lora_B.weight": B}, str(d / "adapter_model.safetensors"))
    out = tmp_path / "v.safetensors"
    assert main(["-q", "vector", "--pretrained", str(pre_p), "--finetuned", str(d), "--out", str(out)]) != 0
    assert str(d) in one_line_error(capsys) and not out.exists()


def test_export_tvb_on_a_full_disk_is_one_line_and_leaves_nothing(fam3, tmp_path, capsys, monkeypatch):
    import torch
    store = tmp_path / "store"
    assert main(build_args(fam3, store)) == 0

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nmore")
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "tvb"
    assert main(["-q", "export-tvb", str(store), "--out", str(out)]) != 0
    assert "nothing written" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
