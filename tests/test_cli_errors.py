"""Every subcommand on a battery of bad inputs: one line on stderr, no traceback, a non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tinymodels import ft_args, make_family, pretrained_state, save_hf
from tvbasis.cli import build_parser, main
from tvbasis.store import build_store
from tvbasis.store.format import manifest_digest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Inputs good and bad, made once: a family, a store, a saved vector, broken files and adapters."""
    root = tmp_path_factory.mktemp("clierr")
    pre_p, fts, pre, sds = make_family(root / "fam", T=4, clusters=2)
    store = build_store(pre_p, fts, "pca", 2, root / "store")
    b = {"pre": pre_p, "fts": fts, "store": store.root, "root": root}
    vec = root / "v.safetensors"
    assert main(["-q", "vector", "--pretrained", str(pre_p), "--finetuned", str(fts["task0"]), "--out", str(vec)]) == 0
    b["vec"] = vec
    (root / "trunc.safetensors").write_bytes(vec.read_bytes()[:-9])
    (root / "absurd.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (root / "evil.bin").write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    for i in range(2):  # fine-tunes whose deltas overflow float16 (> 65504)
        big = pretrained_state()
        big["pooler.dense.weight"] = big["pooler.dense.weight"] + 1e5 * (i + 1)
        save_hf(big, root / f"big{i}")
    # stores with broken manifests
    for name, edit in {"nomanifest_M": lambda m: m.pop("M"), "listmanifest": None,
                       "version0": lambda m: m.__setitem__("format_version", 0)}.items():
        d = root / name
        d.mkdir()
        mf = json.loads((store.root / "tvbasis.json").read_text())
        if edit is None:
            mf = [mf]
        else:
            edit(mf)
            mf["manifest_sha256"] = manifest_digest(mf)  # as an attacker would: the fields themselves are checked
        (d / "tvbasis.json").write_text(json.dumps(mf))
    # LoRA adapters with bad configs
    r = 2
    ad = {"base_model.model.pooler.dense.lora_A.weight": torch.randn(r, 8),
          "base_model.model.pooler.dense.lora_B.weight": torch.randn(8, r)}
    for name, cfg, tensors in [
        ("alpha_abc", {"lora_alpha": "abc"}, ad),
        ("rank0", {"lora_alpha": 8}, {"base_model.model.pooler.dense.lora_A.weight": torch.randn(0, 8),
                                      "base_model.model.pooler.dense.lora_B.weight": torch.randn(8, 0)}),
        ("bad_regex", {"lora_alpha": 8, "alpha_pattern": {"(unclosed": 4}}, ad),
    ]:
        d = root / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, **cfg}))
        save_file(tensors, str(d / "adapter_model.safetensors"))
    other = save_hf(pretrained_state(seed=7), root / "otherpre")
    b["other"] = other
    corrupt = root / "corrupt"
    import shutil
    shutil.copytree(store.root, corrupt)
    data = bytearray((corrupt / "bases.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (corrupt / "bases.safetensors").write_bytes(bytes(data))
    b["corrupt"] = corrupt
    missing = root / "missing_shard"
    shutil.copytree(store.root, missing)
    (missing / "mean.safetensors").unlink()
    b["missing"] = missing
    return b


def _cases(b: dict) -> dict[str, list[str]]:
    pre, st, out = str(b["pre"]), str(b["store"]), str(b["root"] / "out")
    fa = ft_args(b["fts"])
    ft0 = str(b["fts"]["task0"])
    r = b["root"]
    return {
        "vector missing pretrained": ["vector", "--pretrained", str(r / "nope"), "--finetuned", ft0, "--out", out],
        "vector of a store": ["vector", "--pretrained", pre, "--finetuned", st, "--out", out],
        "vector out = input, force": ["vector", "--pretrained", pre, "--finetuned", ft0, "--out", ft0, "--force"],
        "merge weight nan": ["merge", "--pretrained", pre, *fa, "--weight", "task0=nan", "--out", out],
        "merge scaling nan": ["merge", "--pretrained", pre, *fa, "--scaling-coef", "nan", "--out", out],
        "merge density 1.5": ["merge", "--pretrained", pre, *fa, "--method", "ties", "--density", "1.5", "--out", out],
        "merge out inside input, force": ["merge", "--pretrained", pre, *fa, "--out", str(b["pre"] / "m"), "--force"],
        "merge out contains input, force": ["merge", "--pretrained", pre, *fa, "--out", str(r / "fam"), "--force"],
        "merge fp16 overflow": ["merge", "--pretrained", pre, *fa, "--scaling-coef", "1e6", "--dtype", "float16",
                                "--out", out],
        "apply vector nan": ["apply", "--pretrained", pre, "--vector", f"{b['vec']}=nan", "--out", out],
        "apply vector inf coef": ["apply", "--pretrained", pre, "--vector", f"{b['vec']}=inf", "--out", out],
        "apply truncated vector": ["apply", "--pretrained", pre, "--vector", str(r / "trunc.safetensors"), "--out", out],
        "info absurd header": ["info", str(r / "absurd.safetensors")],
        "info pickle": ["info", str(r / "evil.bin")],
        "build M 0": ["build", "--pretrained", pre, *fa, "--method", "pca", "-M", "0", "--out", out],
        "build out exists": ["build", "--pretrained", pre, *fa, "--method", "pca", "-M", "2", "--out", st],
        "build out dot": ["build", "--pretrained", pre, *fa, "--method", "pca", "-M", "2", "--out", "."],
        "build out dot force": ["build", "--pretrained", pre, *fa, "--method", "pca", "-M", "2", "--out", ".",
                                "--force"],
        "build out = pretrained, force": ["build", "--pretrained", pre, *fa, "--method", "pca", "-M", "2", "--out",
                                          pre, "--force"],
        "build unknown option": ["build", "--pretrained", pre, *fa, "--method", "pca", "-M", "2", "--option", "x=1",
                                 "--out", out],
        "build bad inner": ["build", "--pretrained", pre, *fa, "--method", "cluster", "--inner", "magic", "--out", out],
        "build fp16 overflow": ["build", "--pretrained", pre, "--finetuned", f"b0={r / 'big0'}", "--finetuned",
                                f"b1={r / 'big1'}", "--method", "random-sample", "-M", "1", "--dtype", "float16",
                                "--out", out],
        "inspect not a store": ["inspect", pre],
        "inspect missing M": ["inspect", str(r / "nomanifest_M")],
        "inspect manifest list": ["inspect", str(r / "listmanifest")],
        "inspect version 0": ["inspect", str(r / "version0")],
        "inspect missing shard": ["inspect", str(b["missing"])],
        "reconstruct unknown task": ["reconstruct", st, "nope", "--out", out],
        "reconstruct corrupt": ["reconstruct", str(b["corrupt"]), "task0", "--out", out],
        "reconstruct out inside store": ["reconstruct", st, "task0", "--out", str(b["store"] / "x.safetensors")],
        "edit combine nan": ["edit", st, "--pretrained", pre, "--combine", "task0=nan", "--scaling-coef", "1",
                             "--out", out],
        "edit scaling inf": ["edit", st, "--pretrained", pre, "--add", "all", "--scaling-coef", "inf", "--out", out],
        "edit other pretrained": ["edit", st, "--pretrained", str(b["other"]), "--add", "all", "--scaling-coef", "1",
                                  "--out", out],
        "edit no operation": ["edit", st, "--pretrained", pre, "--scaling-coef", "1", "--out", out],
        "edit corrupt": ["edit", str(b["corrupt"]), "--pretrained", pre, "--add", "all", "--scaling-coef", "1",
                         "--out", out],
        "add-task lora_alpha abc": ["add-task", st, f"x={r / 'alpha_abc'}", "--pretrained", pre],
        "add-task lora rank 0": ["add-task", st, f"x={r / 'rank0'}", "--pretrained", pre],
        "add-task alpha_pattern regex": ["add-task", st, f"x={r / 'bad_regex'}", "--pretrained", pre],
        "add-task name all": ["add-task", st, f"all={ft0}", "--pretrained", pre],
        "add-task existing name": ["add-task", st, f"task0={ft0}", "--pretrained", pre],
        "add-task zero vector": ["add-task", st, f"same={pre}", "--pretrained", pre],
        "add-task other pretrained": ["add-task", st, f"y={ft0}", "--pretrained", str(b["other"])],
        "verify corrupt": ["verify", str(b["corrupt"])],
        "verify missing": ["verify", str(r / "nope")],
        "upgrade not a store": ["upgrade", pre],
        "gc not a directory": ["gc", str(b["vec"])],
    }


def _check_one_line(capsys, rc: int, case: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc != 0, case
    assert "Traceback" not in err, (case, err)
    assert len(err.splitlines()) == 1, (case, err)
    return err


def test_every_bad_input_is_one_line_and_writes_nothing(env, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--out .` is this (empty) directory
    store_before = {p.name: p.read_bytes() for p in env["store"].iterdir() if p.is_file()}
    inputs_before = {p: p.read_bytes() for p in env["pre"].rglob("*") if p.is_file()}
    expect = {"merge weight nan": "not a finite number", "apply vector nan": "not a finite number",
              "edit combine nan": "not a finite number", "merge scaling nan": "finite",
              "edit scaling inf": "finite", "merge fp16 overflow": "NaN/Inf", "build fp16 overflow": "NaN/Inf",
              "add-task lora_alpha abc": "lora_alpha", "add-task lora rank 0": "rank",
              "add-task alpha_pattern regex": "regular expression", "inspect missing M": "'M'",
              "inspect manifest list": "must be an object", "inspect version 0": "format_version",
              "inspect missing shard": "mean file mean.safetensors (named by the manifest) does not exist",
              "build out dot force": "not a tvbasis store", "build out = pretrained, force": "input",
              "merge out inside input, force": "input", "merge out contains input, force": "input",
              "vector out = input, force": "input", "reconstruct corrupt": "corrupt", "edit corrupt": "corrupt",
              "verify corrupt": "problem", "info pickle": "refused", "add-task name all": "reserved",
              "reconstruct out inside store": "input"}
    (tmp_path / "keep.txt").write_text("mine")  # `--out . --force` must not delete it
    for case, argv in _cases(env).items():
        rc = main(["-q", *argv])
        err = _check_one_line(capsys, rc, case)
        if case in expect:
            assert expect[case] in err, (case, err)
        assert not (env["root"] / "out").exists(), case
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    assert {p.name: p.read_bytes() for p in env["store"].iterdir() if p.is_file() and p.name != ".tvbasis.lock"} \
        == store_before
    assert {p: p.read_bytes() for p in env["pre"].rglob("*") if p.is_file()} == inputs_before


def test_every_subcommand_gives_a_one_line_usage_error(capsys):
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"build", "add-task", "verify", "upgrade", "gc", "edit", "merge"} <= set(sub.choices)
    for name in sub.choices:
        assert main([name, "--no-such-flag"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, (name, err)
    assert main(["build", "--help"]) == 0 and "--lock-timeout" in capsys.readouterr().out


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(env, capsys, monkeypatch):
    import tvbasis.cli.store as store_cli

    def boom(args):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(store_cli, "cmd_inspect", boom)
    rc = main(["inspect", str(env["store"])])
    err = _check_one_line(capsys, rc, "boom")
    assert "internal error: ZeroDivisionError" in err and "-v for the traceback" in err
    rc = main(["-v", "inspect", str(env["store"])])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_what_is_fine_is_not_refused(env, capsys, tmp_path):
    """The checks do not refuse what is fine: an output next to (not inside) the inputs, a store holding a foreign
    file, verify of a good store."""
    (env["store"] / "README.txt").write_text("notes")
    try:
        assert main(["verify", str(env["store"])]) == 0
        assert "README.txt" in capsys.readouterr().out
        assert main(["-q", "reconstruct", str(env["store"]), "task1", "--out", str(tmp_path / "r.safetensors")]) == 0
    finally:
        (env["store"] / "README.txt").unlink()
    assert Path(tmp_path / "r.safetensors").is_file()
