"""TaskVector algebra and apply, against dense in-memory references."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from tests.tinymodels import dense_vector, flat, make_family, pretrained_state, save_hf
from tvbasis.errors import NonFiniteError, TensorMismatchError
from tvbasis.io import open_checkpoint
from tvbasis.vectors import TaskVector


@pytest.fixture()
def family(tmp_path):
    return make_family(tmp_path, T=3)


def test_algebra_matches_dense(family):
    pre_p, fts, pre, sds = family
    a, b, c = (TaskVector.from_checkpoints(pre_p, fts[f"task{i}"]) for i in range(3))
    va, vb, vc = (dense_vector(pre, sd) for sd in sds)
    combo = c + (b - a) * 0.5 - (-a)
    for k in va:
        ref = vc[k] + 0.5 * (vb[k] - va[k]) + va[k]
        assert torch.allclose(combo.get(k).double(), ref, atol=1e-5)
    s = TaskVector.sum([a, b, c])
    assert torch.allclose(flat(s.to_state_dict()), flat({k: va[k] + vb[k] + vc[k] for k in va}), atol=1e-5)
    assert sum([a, b]).keys() == a.keys()
    assert "embeddings.position_ids" not in a  # integer buffers take no part
    assert math.isclose(a.dot(b), float(flat(va) @ flat(vb)), rel_tol=1e-6)
    assert math.isclose(a.norm(), float(flat(va).norm()), rel_tol=1e-6)
    assert math.isclose(a.cosine(b), float(flat(va) @ flat(vb) / flat(va).norm() / flat(vb).norm()), rel_tol=1e-6)


def test_include_exclude(family):
    pre_p, fts, *_ = family
    tv = TaskVector.from_checkpoints(pre_p, fts["task0"], exclude=["embeddings.*"])
    assert all(not k.startswith("embeddings") for k in tv.keys())
    tv = TaskVector.from_checkpoints(pre_p, fts["task0"], include=["re:layer\\.1\\."])
    assert tv.keys() and all(".layer.1." in k for k in tv.keys())


def test_save_load_apply_roundtrip(family, tmp_path):
    pre_p, fts, pre, sds = family
    tv = TaskVector.from_checkpoints(pre_p, fts["task0"])
    tv.save(tmp_path / "v.safetensors")
    back = TaskVector.load(tmp_path / "v.safetensors")
    assert back.keys() == tv.keys()
    out = (-back).apply_to(pre_p, 0.5, tmp_path / "neg")
    m = open_checkpoint(out)
    for k, v in pre.items():
        if v.is_floating_point():
            assert torch.allclose(m.get(k), v - 0.5 * (sds[0][k] - v), atol=1e-6)
        else:
            assert torch.equal(m.get(k), v)  # integer buffers copied
    assert (out / "config.json").is_file() and "scaling_coef" in (out / "README.md").read_text()


def test_bf16_checkpoints_keep_dtype(tmp_path):
    pre_p, fts, pre, sds = make_family(tmp_path, T=2, dtype=torch.bfloat16)
    tv = TaskVector.from_checkpoints(pre_p, fts["task0"])
    k = "pooler.dense.weight"
    assert tv.get(k).dtype == torch.float32
    out = open_checkpoint(tv.apply_to(pre_p, 1.0, tmp_path / "o"))
    assert out.spec(k).dtype == torch.bfloat16
    assert torch.equal(out.get(k), sds[0][k])  # θ0 + (θ1 − θ0) in fp32 rounds back to θ1 exactly
    out32 = open_checkpoint(tv.apply_to(pre_p, 1.0, tmp_path / "o32", dtype=torch.float32))
    assert out32.spec(k).dtype == torch.float32


def test_missing_extra_and_shape_mismatch(tmp_path):
    pre = pretrained_state()
    p = save_hf(pre, tmp_path / "pre")
    missing = dict(pre)
    missing.pop("pooler.dense.weight")
    missing["head.weight"] = torch.zeros(3)
    with pytest.raises(TensorMismatchError, match="pooler.dense.weight.*head.weight|missing.*pooler"):
        TaskVector.from_checkpoints(p, save_hf(missing, tmp_path / "m"))
    bad = dict(pre)
    bad["pooler.dense.weight"] = torch.zeros(4, 8)
    with pytest.raises(TensorMismatchError, match=r"pooler.dense.weight.*\(4, 8\).*\(8, 8\)"):
        TaskVector.from_checkpoints(p, save_hf(bad, tmp_path / "b"))


def test_nan_input_is_reported_and_nothing_written(tmp_path):
    pre = pretrained_state()
    p = save_hf(pre, tmp_path / "pre")
    bad = {k: v.clone() for k, v in pre.items()}
    bad["pooler.dense.weight"][0, 0] = float("nan")
    f = tmp_path / "nan"
    f.mkdir()
    save_file(bad, str(f / "model.safetensors"))
    tv = TaskVector.from_checkpoints(p, f)
    with pytest.raises(NonFiniteError, match="pooler.dense.weight"):
        tv.apply_to(p, 1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
