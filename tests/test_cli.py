"""The tvbasis command end to end, including its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tinymodels import make_family, pretrained_state, save_hf
from tvbasis.cli import main
from tvbasis.io import open_checkpoint


@pytest.fixture()
def fam(tmp_path):
    return make_family(tmp_path, T=4, clusters=2)


def ft_args(fts):
    out = []
    for n, p in fts.items():
        out += ["--finetuned", f"{n}={p}"]
    return out


def test_merge_exact_form_and_vector(fam, tmp_path, capsys):
    pre_p, fts, pre, sds = fam
    rc = main(["-q", "merge", "--pretrained", str(pre_p), *ft_args(fts), "--method", "ties", "--density", "0.2",
               "--scaling-coef", "0.5", "--out", str(tmp_path / "merged")])
    assert rc == 0
    m = open_checkpoint(tmp_path / "merged")
    k = "pooler.dense.weight"
    assert m.get(k).shape == pre[k].shape and not torch.equal(m.get(k), pre[k])
    assert (tmp_path / "merged" / "config.json").is_file()
    rc = main(["-q", "vector", "--pretrained", str(pre_p), "--finetuned", str(fts["task0"]),
               "--out", str(tmp_path / "v.safetensors")])
    assert rc == 0
    v = open_checkpoint(tmp_path / "v.safetensors")
    assert torch.allclose(v.get(k), sds[0][k] - pre[k], atol=1e-6)
    # apply with a negative coefficient = negation
    rc = main(["-q", "apply", "--pretrained", str(pre_p), "--vector", f"{tmp_path / 'v.safetensors'}=-1",
               "--scaling-coef", "0.5", "--out", str(tmp_path / "neg")])
    assert rc == 0
    assert torch.allclose(open_checkpoint(tmp_path / "neg").get(k), pre[k] - 0.5 * (sds[0][k] - pre[k]), atol=1e-6)
    assert main(["info", str(tmp_path / "v.safetensors"), "--norms", "--json"]) == 0


def test_store_commands(fam, tmp_path, capsys):
    pre_p, fts, pre, sds = fam
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "cluster",
                 "--out", str(store)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(store), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["M"] == 2 and s["T"] == 4 and len(s["cosine"]) == 4
    assert main(["inspect", str(store)]) == 0
    assert "cosine" in capsys.readouterr().out
    assert main(["-q", "reconstruct", str(store), "task1", "--out", str(tmp_path / "r.safetensors")]) == 0
    for args in (["--add", "all"], ["--add", "task0,task1", "--outer", "ties", "--density", "0.5"],
                 ["--negate", "task2"], ["--combine", "task0=1,task1=-0.5"]):
        out = tmp_path / ("e" + str(abs(hash(tuple(args)))))
        assert main(["-q", "edit", str(store), "--pretrained", str(pre_p), *args, "--scaling-coef", "0.3",
                     "--out", str(out)]) == 0, args
        assert open_checkpoint(out).keys()
    extra = make_family(tmp_path / "more", T=5, clusters=2)
    # a fine-tune from the same pretrained (same seed → same pretrained weights)
    assert main(["-q", "add-task", str(store), f"new={extra[1]['task4']}", "--pretrained", str(pre_p)]) == 0
    assert "added task new" in capsys.readouterr().out


def test_errors_are_one_line_and_nonzero(fam, tmp_path, capsys):
    pre_p, fts, *_ = fam
    rc = main(["vector", "--pretrained", str(tmp_path / "missing"), "--finetuned", str(fts["task0"]),
               "--out", str(tmp_path / "v.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "no such file" in err and len(err.splitlines()) == 1
    (tmp_path / "exists").mkdir()
    rc = main(["merge", "--pretrained", str(pre_p), *ft_args(fts), "--out", str(tmp_path / "exists")])
    assert rc != 0 and "--force" in capsys.readouterr().err
    rc = main(["build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "4",
               "--out", str(tmp_path / "s")])
    assert rc != 0 and "M < T" in capsys.readouterr().err and not (tmp_path / "s").exists()
    rc = main(["merge", "--pretrained", str(pre_p), *ft_args(fts), "--method", "ties", "--density", "1.5",
               "--out", str(tmp_path / "m")])
    assert rc != 0 and "density" in capsys.readouterr().err and not (tmp_path / "m").exists()
    other = save_hf(pretrained_state(seed=5), tmp_path / "other")
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "pca", "-M", "2",
                 "--out", str(tmp_path / "s2")]) == 0
    capsys.readouterr()
    rc = main(["-q", "edit", str(tmp_path / "s2"), "--pretrained", str(other), "--add", "all",
               "--scaling-coef", "1", "--out", str(tmp_path / "bad")])
    assert rc != 0 and "checksum" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    rc = main(["-q", "edit", str(tmp_path / "s2"), "--pretrained", str(pre_p), "--negate", "nope",
               "--scaling-coef", "1", "--out", str(tmp_path / "bad")])
    assert rc != 0 and "nope" in capsys.readouterr().err
