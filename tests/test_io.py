"""Checkpoint I/O: every layout reads back exactly; writes are atomic; bad input is a clear error."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.tinymodels import pretrained_state, save_hf
from tvbasis.errors import CheckpointError, OutputExistsError
from tvbasis.io import ModelWriter, TensorSpec, open_checkpoint, parse_size, plan_shards

LAYOUTS = ["safetensors", "sharded", "bin", "bin-sharded", "pt-wrapped", "file"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_exactly(tmp_path, layout):
    sd = pretrained_state(3)
    path = save_hf(sd, tmp_path / "m", layout)
    ckpt = open_checkpoint(path)
    assert set(ckpt.keys()) == set(sd)
    for k, v in sd.items():
        assert ckpt.spec(k).shape == tuple(v.shape)
        assert ckpt.spec(k).dtype == v.dtype
        assert torch.equal(ckpt.get(k), v)
    w = "encoder.layer.0.output.dense.weight"
    assert torch.equal(ckpt.get_rows(w, 3, 7), sd[w][3:7])


def test_writer_shards_index_config_and_card(tmp_path):
    sd = pretrained_state(1)
    src = save_hf(sd, tmp_path / "src")
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with ModelWriter(tmp_path / "out", specs, max_shard_size=1000) as w:
        for k, v in sd.items():
            w.write(k, v)
        w.finalize(copy_from=src, card="card")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "README.md").read_text() == "card"
    back = open_checkpoint(out)
    for k, v in sd.items():
        assert torch.equal(back.get(k), v)
    assert not list(tmp_path.glob(".out*"))


def test_writer_refuses_existing_output_and_cleans_up_on_error(tmp_path):
    (tmp_path / "out").mkdir()
    spec = [TensorSpec("a", (2,), torch.float32)]
    with pytest.raises(OutputExistsError, match="already exists"):
        ModelWriter(tmp_path / "out", spec)
    with pytest.raises(RuntimeError), ModelWriter(tmp_path / "new", spec):
        raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new*"))


def test_plan_shards_and_sizes():
    specs = [TensorSpec(str(i), (10,), torch.float32) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(specs, 100)] == [2, 2, 1]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("512") == 512


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")


def test_truncated_and_corrupt_safetensors(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(100)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        open_checkpoint(f)
    f.write_bytes(b"garbage that is not safetensors at all")
    with pytest.raises(CheckpointError, match="m.safetensors"):
        open_checkpoint(f)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    f = tmp_path / "evil.bin"
    with f.open("wb") as fh:
        pickle.dump({"a": _Evil()}, fh)
    torch.save({"w": torch.zeros(2), "obj": _Evil()}, tmp_path / "evil2.pt")
    for p in (f, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="weights_only|not a readable"):
            open_checkpoint(p)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model weights"):
        open_checkpoint(tmp_path)


def test_checkpoint_pickles_as_its_path(tmp_path):
    path = save_hf(pretrained_state(), tmp_path / "m")
    ck = pickle.loads(pickle.dumps(open_checkpoint(path)))
    assert ck.keys() and torch.equal(ck.get("pooler.dense.weight"), pretrained_state()["pooler.dense.weight"])
