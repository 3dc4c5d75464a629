"""Fitting the tools users already have (issue 25): written configs state the written dtype, warnings, JSON output
and dry runs, hub ids through the local Hugging Face cache, the small fixes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvbasis.cli import main

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ a real tiny model
def _tiny_bert(root: Path, T: int = 2, legacy_key: bool = False) -> tuple[Path, dict[str, Path]]:
    """A float32 BertModel that transformers really loads, and T fine-tunes of it (weights perturbed in the test).
    ``legacy_key``: the config names its dtype with ``torch_dtype`` (older transformers) instead of ``dtype``."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertModel(cfg)
    pre = root / "base"
    model.save_pretrained(pre)
    if legacy_key:
        c = json.loads((pre / "config.json").read_text())
        c.pop("dtype", None)
        c["torch_dtype"] = "float32"
        (pre / "config.json").write_text(json.dumps(c))
    fts = {}
    for t in range(T):
        g = torch.Generator().manual_seed(100 + t)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in model.state_dict().items()}
        ft = transformers.BertModel(cfg)
        ft.load_state_dict(sd)
        ft.save_pretrained(root / f"ft{t}")
        fts[f"t{t}"] = root / f"ft{t}"
    return pre, fts


def _ft_args(fts: dict[str, Path]) -> list[str]:
    out: list[str] = []
    for n, p in fts.items():
        out += ["--finetuned", f"{n}={p}"]
    return out


def _param_dtypes(path: Path) -> set[torch.dtype]:
    model = transformers.AutoModel.from_pretrained(path)
    return {p.dtype for p in model.parameters()}


def _file_dtypes(path: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(path / "model.safetensors").values() if t.is_floating_point()}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return _tiny_bert(tmp_path_factory.mktemp("bert"))


# ------------------------------------------------------------------------------------------------ config dtype
def test_merge_bf16_config_states_bf16(bert: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    pre, fts = bert
    assert json.loads((pre / "config.json").read_text()).get("dtype") == "float32"
    out = tmp_path / "merged"
    assert main(["-q", "merge", "--pretrained", str(pre), *_ft_args(fts), "--method", "ties",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert _file_dtypes(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # transformers, left to itself, loads the parameters in the written dtype
    assert _param_dtypes(out) == {torch.bfloat16}
    # and a merge in the pretrained's own dtype keeps float32
    out32 = tmp_path / "merged32"
    assert main(["-q", "merge", "--pretrained", str(pre), *_ft_args(fts), "--out", str(out32)]) == 0
    assert _param_dtypes(out32) == {torch.float32}


def test_legacy_torch_dtype_key_and_mergekit_yaml(tmp_path: Path) -> None:
    pre, fts = _tiny_bert(tmp_path / "m", legacy_key=True)
    yml = tmp_path / "merge.yml"
    yml.write_text(f"merge_method: task_arithmetic\nbase_model: {pre}\nmodels:\n"
                   + "".join(f"  - model: {p}\n    parameters:\n      weight: 0.5\n" for p in fts.values())
                   + "dtype: float16\n")
    out = tmp_path / "merged"
    assert main(["-q", "merge", "--config", str(yml), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and "dtype" not in cfg
    assert _file_dtypes(out) == {torch.float16}
    assert _param_dtypes(out) == {torch.float16}


def test_apply_and_edit_configs_state_written_dtype(bert: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    pre, fts = bert
    vec = tmp_path / "v.safetensors"
    assert main(["-q", "vector", "--pretrained", str(pre), "--finetuned", str(fts["t0"]), "--out", str(vec)]) == 0
    assert main(["-q", "apply", "--pretrained", str(pre), "--vector", f"{vec}=-1", "--dtype", "float16",
                 "--out", str(tmp_path / "applied")]) == 0
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre), *_ft_args(fts), "--method", "pca", "-M", "1",
                 "--out", str(store)]) == 0
    assert main(["-q", "edit", str(store), "--pretrained", str(pre), "--add", "all", "--scaling-coef", "0.5", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "edited")]) == 0
    for name, want in (("applied", torch.float16), ("edited", torch.bfloat16)):
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == str(want).split(".")[1]
        assert _param_dtypes(tmp_path / name) == {want}, name


def test_config_dtype_nested_and_untrusted(tmp_path: Path) -> None:
    from tvbasis.io.hfconfig import set_config_dtype, written_dtype
    from tvbasis.io.specs import TensorSpec

    p = tmp_path / "config.json"
    p.write_text(json.dumps({"dtype": "float32", "text_config": {"torch_dtype": "float32", "hidden_size": 4},
                             "vision_config": {"hidden_size": 2}}))
    assert set_config_dtype(p, torch.bfloat16)
    c = json.loads(p.read_text())
    assert c == {"dtype": "bfloat16", "text_config": {"torch_dtype": "bfloat16", "hidden_size": 4},
                 "vision_config": {"hidden_size": 2}}
    p.write_text(json.dumps({"model_type": "bert"}))  # no dtype key: torch_dtype is added
    assert set_config_dtype(p, torch.float16)
    assert json.loads(p.read_text()) == {"model_type": "bert", "torch_dtype": "float16"}
    for bad in ("[1, 2]", "{not json"):
        p.write_text(bad)
        assert not set_config_dtype(p, torch.float16)
        assert p.read_text() == bad
    # mixed dtypes: the one holding most bytes; integer buffers do not count
    specs = [TensorSpec("a", (10,), torch.float16), TensorSpec("b", (3,), torch.float32),
             TensorSpec("i", (100,), torch.int64)]
    assert written_dtype(specs) == torch.float16
    assert written_dtype([TensorSpec("i", (4,), torch.int64)]) is None


# ------------------------------------------------------------------------------------------------ small items
def test_broken_pipe_exits_zero_quietly(tmp_path: Path) -> None:
    """`tvbasis info FILE | head`: the reader leaves before tvbasis writes; tvbasis exits 0 with nothing on stderr."""
    import subprocess
    import sys

    from safetensors.torch import save_file
    f = tmp_path / "v.safetensors"
    save_file({f"t{i}": torch.ones(2) for i in range(200)}, str(f))
    p = subprocess.Popen([sys.executable, "-m", "tvbasis.cli", "info", str(f), "--norms"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # long before the child has imported torch and printed anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert err == ""


def test_merge_card_tags_method_and_progress_counts_all_models(bert: tuple[Path, dict[str, Path]], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import tvbasis.engine.local as local

    pre, fts = bert
    totals: dict[str, int] = {}
    real = local.progress_bar

    def record(total: int, desc: str | None, *a: object) -> object:
        totals[str(desc)] = total
        return real(total, desc, False, *a[1:])  # type: ignore[arg-type]

    monkeypatch.setattr(local, "progress_bar", record)
    out = tmp_path / "ties"
    assert main(["-q", "merge", "--pretrained", str(pre), *_ft_args(fts), "--method", "ties", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "- ties" in front and "task-arithmetic" not in front
    # the apply bar counts the bytes of every model read: the pretrained and the T = 2 fine-tunes
    model_bytes = sum(t.numel() * t.element_size() for t in load_file(pre / "model.safetensors").values())
    assert totals["apply"] == 3 * model_bytes
    out = tmp_path / "ta"
    assert main(["-q", "merge", "--pretrained", str(pre), *_ft_args(fts), "--out", str(out)]) == 0
    assert "- task-arithmetic" in (out / "README.md").read_text().split("---")[1]


def test_spectrum_axis_shows_every_eigenvalue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    plots = pytest.importorskip("tvbasis.eval.plots")
    figs: list[object] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(50, 6, generator=g, dtype=torch.float64) * torch.tensor([30.0, 10, 3, 1, 0.1, 0.01],
                                                                             dtype=torch.float64)
    G = (V.T @ V).numpy()
    plots.plot_spectrum(G, 2, tmp_path / "s.png", loss=1.0)
    ax = figs[0].axes[0]  # type: ignore[attr-defined]
    lo, hi = ax.get_ylim()
    ev = np.linalg.eigvalsh(G)  # the reference: numpy's eigenvalues, all positive here
    assert lo <= ev.min() and ev.max() <= hi
    assert hi <= 3 * ev.max()  # not 30x: the axis is the eigenvalues', not a text box's
    import matplotlib.pyplot as plt
    plt.close("all")


# ------------------------------------------------------------------------------------------------ JSON and warnings
def _one_json(out: str) -> dict:
    """stdout must be exactly one JSON object."""
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict, list[dict]]:
    from tests.tinymodels import make_family
    return make_family(tmp_path_factory.mktemp("tiny"), T=4, clusters=2)


def test_build_inspect_add_task_json_and_useless_task_warning(tiny: tuple, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.tinymodels import ft_args, save_hf
    pre_p, fts, pre, sds = tiny
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "1",
                 "--out", str(store), "--json"]) == 0
    got = _one_json(capsys.readouterr().out)
    assert got["command"] == "build" and got["store"] == str(store) and got["M"] == 1 and got["T"] == 4
    assert set(got["rel_errors"]) == set(fts) and isinstance(got["warnings"], list)
    # a new task that changes only a tensor no old task changes: its reconstruction (in the old tasks' span, or
    # zero there) has disjoint support, so ‖v − v̂‖² = ‖v‖² + ‖v̂‖² ≥ ‖v‖²: relative error ≥ 1, which is useless
    # (the tiny fine-tunes change every tensor: old tasks with the pooler left as pretrained, a new one changing
    # only the pooler)
    new = {k: v.clone() for k, v in pre.items()}
    olds = [{k: (pre[k] if k == "pooler.dense.weight" else v) for k, v in sd.items()} for sd in sds]
    fam2 = {f"o{i}": save_hf(sd, tmp_path / f"o{i}") for i, sd in enumerate(olds)}
    store2 = tmp_path / "store2"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fam2), "--method", "pca", "-M", "1",
                 "--out", str(store2)]) == 0
    new["pooler.dense.weight"] = new["pooler.dense.weight"] + 0.3
    capsys.readouterr()
    assert main(["-q", "add-task", str(store2), f"new={save_hf(new, tmp_path / 'new')}", "--pretrained", str(pre_p),
                 "--json"]) == 0
    cap = capsys.readouterr()
    res = _one_json(cap.out)
    assert res["task"] == "new" and res["rel_error"] >= 1 - 1e-6
    assert res["warnings"] and all("task new" in w for w in res["warnings"])
    assert any(line.startswith("warning: task new: relative error") for line in cap.err.splitlines())
    # inspect --json carries the same warning, and the text inspect names the PCA bound honestly
    assert main(["inspect", str(store2), "--json"]) == 0
    ins = _one_json(capsys.readouterr().out)
    assert ins["command"] == "inspect" and any("task new" in w for w in ins["warnings"])
    assert ins["rel_errors"]["new"] == pytest.approx(res["rel_error"])
    assert main(["inspect", str(store2)]) == 0
    assert "PCA also keeps the mean" in capsys.readouterr().out
    # verify, reconstruct and gc answer in JSON too
    assert main(["verify", str(store2), "--json"]) == 0
    v = _one_json(capsys.readouterr().out)
    assert v["ok"] is True and v["problems"] == []
    assert main(["-q", "reconstruct", str(store2), "o1", "--out", str(tmp_path / "r.safetensors"), "--json"]) == 0
    r = _one_json(capsys.readouterr().out)
    assert r["out"] == str(tmp_path / "r.safetensors") and (tmp_path / "r.safetensors").is_file()


def test_unknown_errors_print_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    from tvbasis.cli.store import _json_summary, _print_errors
    s = {"tasks": ["a", "b"], "errors_exact": {"a": True, "b": False}, "norms": {"a": 1.0, "b": 2.0},
         "rel_errors": {"a": 0.25, "b": 0.0}, "errors_unknown": ["b"], "labels": None, "warnings": []}
    _print_errors(s)
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows == {"a": "0.2500", "b": "unknown"}
    assert _json_summary(s)["rel_errors"] == {"a": 0.25, "b": None}


def test_adapter_bytes_against_the_adapters_files(tmp_path: Path) -> None:
    from tvbasis.store.notes import adapter_bytes
    sizes = []
    for i, n in enumerate((10, 30)):
        d = tmp_path / f"ad{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"x" * n)
        sizes.append(n)
    assert adapter_bytes([tmp_path / "ad0", tmp_path / "ad1"]) == sum(sizes)
    assert adapter_bytes([tmp_path / "ad0", tmp_path]) is None  # one source is not an adapter
    assert adapter_bytes([]) is None


# ------------------------------------------------------------------------------------------------ dry runs
def test_dry_runs_plan_and_write_nothing(tiny: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.tinymodels import SHAPES, ft_args
    pre_p, fts, pre, sds = tiny
    floats = {k: v for k, v in pre.items() if v.is_floating_point()}
    n_float = sum(v.numel() for v in floats.values())
    # merge: the model it would write, in bf16
    out = tmp_path / "merged"
    assert main(["-q", "merge", "--pretrained", str(pre_p), *ft_args(fts), "--method", "ties", "--dtype", "bfloat16",
                 "--out", str(out), "--dry-run", "--json"]) == 0
    plan = _one_json(capsys.readouterr().out)
    assert not out.exists()
    assert plan["dry_run"] is True and plan["command"] == "merge" and plan["T"] == 4
    ints = sum(v.numel() * v.element_size() for v in pre.values() if not v.is_floating_point())
    assert plan["write_bytes"] == 2 * n_float + ints
    assert sum(r["parameters"] for r in plan["kinds"]) == n_float
    kinds = {r["kind"]: r["tensors"] for r in plan["kinds"]}
    assert kinds == {"embedding": 1, "matrix": sum(len(s) == 2 for s in SHAPES.values()) - 1,
                     "vector": sum(len(s) == 1 for s in SHAPES.values()) - 1}  # position_ids is an int buffer
    # build: M bases densely, T residuals through int8 (>= 1 byte per value, < 4)
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "2",
                 "--residual", "int8", "--out", str(store), "--dry-run", "--json"]) == 0
    plan = _one_json(capsys.readouterr().out)
    assert not store.exists()
    assert sum(r["dense_bytes"] for r in plan["bases"]) == 2 * 4 * n_float
    coded = sum(r["coded_bytes"] for r in plan["residuals"])
    assert 4 * n_float <= coded < 4 * 4 * n_float
    assert all(r["codec"].startswith("int8") for r in plan["residuals"])
    # the text form says so too
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "2",
                 "--out", str(store), "--dry-run"]) == 0
    assert "nothing written" in capsys.readouterr().out and not store.exists()
    # edit and add-task on a real store: nothing changes
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(dict(list(fts.items())[:3])), "--method", "pca",
                 "-M", "1", "--out", str(store)]) == 0
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["-q", "edit", str(store), "--pretrained", str(pre_p), "--add", "all", "--scaling-coef", "0.5",
                 "--out", str(tmp_path / "edited"), "--dry-run", "--json"]) == 0
    plan = _one_json(capsys.readouterr().out)
    assert not (tmp_path / "edited").exists() and plan["write_bytes"] == 4 * n_float + ints
    assert main(["-q", "add-task", str(store), f"task3={fts['task3']}", "--pretrained", str(pre_p),
                 "--dry-run", "--json"]) == 0
    plan = _one_json(capsys.readouterr().out)
    assert plan["T_after"] == 4 and plan["task"] == "task3"
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------------------------------------ hub ids
def _fake_hub_cache(cache: Path, repo: str, src: Path, commit: str) -> Path:
    """``src``'s files laid out as huggingface_hub caches a download: blobs/, refs/main, snapshots/<commit>/ with
    relative symlinks into blobs/."""
    import hashlib
    import os
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def test_hub_ids_resolve_through_the_local_cache(tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tvbasis.io import open_checkpoint
    pre_p, fts, pre, sds = tiny
    cache = tmp_path / "hf"
    c1, c2 = "a" * 40, "b" * 40
    _fake_hub_cache(cache, "org/base", pre_p, c1)
    _fake_hub_cache(cache, "org/ft0", fts["task0"], c2)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named org/
    ckpt = open_checkpoint("org/base")
    k = "pooler.dense.weight"
    assert torch.equal(ckpt.get(k), pre[k])
    assert torch.equal(open_checkpoint(f"org/ft0@{c2}").get(k), sds[0][k])  # a revision given as a commit
    out = tmp_path / "merged"
    assert main(["-q", "merge", "--pretrained", "org/base", "--finetuned", "a=org/ft0@main",
                 "--finetuned", f"b={fts['task1']}", "--out", str(out)]) == 0
    want = pre[k] + (sds[0][k] - pre[k]) + (sds[1][k] - pre[k])
    assert torch.allclose(open_checkpoint(out).get(k), want, atol=1e-6)
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
    capsys.readouterr()
    # not cached: one line saying so, nothing written
    assert main(["-q", "merge", "--pretrained", "org/missing", "--finetuned", "a=org/ft0", "--out",
                 str(tmp_path / "m2")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/missing" in err and "not in the local Hugging Face cache" in err
    assert not (tmp_path / "m2").exists()
    # an unknown revision of a cached model is not cached either
    with pytest.raises(Exception, match="not in the local Hugging Face cache"):
        open_checkpoint("org/base@v9")


# ------------------------------------------------------------------------------------------------ docstrings
def test_every_public_callable_has_a_docstring() -> None:
    """The package's public API (tvbasis.__all__): every function, class, and public method or property of those
    classes has a docstring (pdoc's API reference, docs/api, is built from them)."""
    import inspect

    import tvbasis
    missing = []
    for name in tvbasis.__all__:
        obj = getattr(tvbasis, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for m, v in vars(obj).items():
                f = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
                if m.startswith("_") or not (callable(f) or isinstance(v, property)):
                    continue
                if not (getattr(f, "__doc__", None) or "").strip():
                    missing.append(f"{name}.{m}")
    assert not missing, missing


def test_get_writes_the_dtype_it_states_and_dry_run_writes_nothing(bert: tuple[Path, dict[str, Path]],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pre, fts = bert
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre), *_ft_args(fts), "--method", "pca", "-M", "1",
                 "--out", str(store)]) == 0
    out = tmp_path / "got"
    assert main(["-q", "get", str(store), "t1", "--pretrained", str(pre), "--dtype", "bfloat16", "--out", str(out),
                 "--dry-run"]) == 0
    assert "nothing written" in capsys.readouterr().out and not out.exists()
    assert main(["-q", "get", str(store), "t1", "--pretrained", str(pre), "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _param_dtypes(out) == {torch.bfloat16}


def test_lora_store_is_compared_with_the_adapters_files(bert: tuple[Path, dict[str, Path]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    peft = pytest.importorskip("peft")
    pre, _ = bert
    ads = {}
    for i in range(2):
        torch.manual_seed(i)
        model = peft.get_peft_model(transformers.AutoModel.from_pretrained(pre),
                                    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(str(tmp_path / f"ad{i}"))
        ads[f"a{i}"] = tmp_path / f"ad{i}"
    files = sum((d / "adapter_model.safetensors").stat().st_size for d in ads.values())
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre), *_ft_args(ads), "--method", "lora-factors",
                 "--out", str(store), "--json"]) == 0
    got = _one_json(capsys.readouterr().out)
    assert got["adapter_bytes"] == files
    assert got["compression_vs_adapters"] == pytest.approx(files / got["bytes_on_disk"])
    assert main(["inspect", str(store)]) == 0
    assert "of the adapters' weight files" in capsys.readouterr().out


def test_error_warnings_say_why() -> None:
    from types import SimpleNamespace

    from tvbasis.store.format import TaskEntry
    from tvbasis.store.notes import error_warnings

    def fake(method: str, errors: dict[str, float], added: tuple[str, ...] = (), masks: bool = False) -> object:
        tasks = [TaskEntry(t, "src", 1.0, e, added=t in added) for t, e in errors.items()]
        return SimpleNamespace(method=method, masks=masks, task_names=list(errors),
                               manifest=SimpleNamespace(tasks=tasks, gram_estimated_rows=[]))

    w = error_warnings(fake("tall", {"a": 1.3, "b": 0.2}, masks=True))  # type: ignore[arg-type]
    assert len(w) == 1 and w[0].startswith("task a: relative error 1.3000 > 1") and "TALL" in w[0]
    w = error_warnings(fake("pca", {"a": 1.05, "n": 0.95, "m": 0.9, "ok": 0.89}, added=("n",)))  # type: ignore[arg-type]
    assert [x.split(":")[0] for x in w] == ["task a", "task n", "task m"]
    assert "mean" in w[0] and "add-task" in w[1] and "--residual" in w[2]


def test_imported_basis_errors_are_unknown_not_zero(tiny: tuple, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_interop import write_ae_folder
    pre_p, fts, pre, sds = tiny
    ref = write_ae_folder(tmp_path / "ae", tiny)
    assert main(["-q", "import-tvb", str(tmp_path / "ae"), "--pretrained", str(pre_p), "--out", str(tmp_path / "s"),
                 "--json"]) == 0
    got = _one_json(capsys.readouterr().out)
    assert got["rel_errors"] == {t: None for t in ref["tasks"]}
    assert main(["inspect", str(tmp_path / "s")]) == 0
    cap = capsys.readouterr()
    T = len(ref["tasks"])
    rows = [line.split("|") for line in cap.out.splitlines() if line.startswith("| task") and "‖" not in line][:T]
    assert [r[1].strip() for r in rows] == ref["tasks"]  # the errors table comes first, the cosine matrix after
    assert all(r[3].strip() == "unknown" for r in rows)
    assert "are unknown" in cap.err


# ------------------------------------------------------------------------------------------------ the torch requirement
def test_torch_is_a_floor_and_the_exact_pin_is_a_constraint() -> None:
    """Installing tvbasis keeps a user's torch: the package asks for torch>=, the exact CI version lives in
    constraints.txt, which the README's set-up commands and .ci/run both use."""
    import re
    import tomllib
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = [d for d in deps if re.match(r"torch\b", d)]
    assert len(torch_req) == 1 and re.fullmatch(r"torch>=[0-9.]+", torch_req[0].replace(" ", "")), torch_req
    pins = [ln.strip() for ln in (root / "constraints.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert any(re.fullmatch(r"torch==[0-9.]+", p) for p in pins), pins
    floor = torch_req[0].split(">=")[1]
    pinned = next(p for p in pins if p.startswith("torch==")).split("==")[1]
    assert tuple(map(int, pinned.split("."))) >= tuple(map(int, floor.split(".")))
    readme = (root / "README.md").read_text()
    installs = re.findall(r"pip install -e \"[^\"]*\"[^&\n]*", readme.split("## The command line")[0])
    assert len(installs) == 2 and all("-c constraints.txt" in i for i in installs), installs
    assert "Python ≥ 3.11" in readme
    assert "-c constraints.txt" in (root / ".ci" / "run").read_text()
