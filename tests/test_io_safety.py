"""Untrusted input and crash safety of tvbasis.io: malformed safetensors headers (refused as the official library
refuses them), shard indexes naming files outside their directory, symlinks in model directories, atomic outputs
(exchange, races, stale temporaries, kill -9) and NaN/Inf caught before an output appears."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tvbasis.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    OutputExistsError,
)
from tvbasis.io import (
    ModelWriter,
    TensorSpec,
    atomic_output,
    cleanup_stale_temps,
    confined_file,
    copy_model_files,
    exchange,
    open_checkpoint,
    write_single_file_atomic,
)
from tvbasis.io import atomic as atomic_mod
from tvbasis.io.writer import PositionalShard

F32 = {"dtype": "F32"}


def st_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def official_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


def t(shape: list[int], a: int, b: int, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}


BAD_HEADERS = {
    # case: (header, data bytes, tensor named in the error)
    "negative": ({"w": t([1], -4, 0)}, 8, "w"),
    "reversed": ({"w": t([1], 8, 4)}, 8, "w"),
    "overlap": ({"a": t([2], 0, 8), "b": t([1], 4, 8)}, 8, "b"),
    "gap": ({"a": t([1], 0, 4), "b": t([1], 8, 12)}, 12, "b"),
    "not-from-zero": ({"w": t([1], 4, 8)}, 8, "w"),
    "duplicate-range": ({"a": t([1], 0, 4), "b": t([1], 0, 4)}, 4, "b"),
    "nbytes-mismatch": ({"w": t([3], 0, 8)}, 8, "w"),
    "past-eof": ({"w": t([4], 0, 16)}, 8, "w"),
    "unknown-dtype": ({"w": t([2], 0, 8, "F33")}, 8, "w"),
    "float-offsets": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, 8, "w"),
    "three-offsets": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, "w"),
    "negative-shape": ({"w": t([-2], 0, 8)}, 8, "w"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_offsets_refused_like_the_official_library(tmp_path, case):
    header, nbytes, tensor = BAD_HEADERS[case]
    f = tmp_path / "bad.safetensors"
    f.write_bytes(st_bytes(header, b"\0" * nbytes))
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{tensor!r}"):
        open_checkpoint(f)
    assert official_refuses(f)


def test_trailing_bytes_after_the_data_refused_like_the_official_library(tmp_path):
    f = tmp_path / "trail.safetensors"
    f.write_bytes(st_bytes({"w": t([2], 0, 8)}, b"\0" * 12))
    with pytest.raises(CheckpointError, match=r"trail\.safetensors.*cover the data region"):
        open_checkpoint(f)
    assert official_refuses(f)


def test_header_over_100mb_refused_like_the_official_library(tmp_path):
    f = tmp_path / "big.safetensors"
    f.write_bytes(struct.pack("<Q", 100_000_001) + b"{}" + b" " * 64)
    with pytest.raises(CheckpointError, match=r"big\.safetensors.*limit of 100000000"):
        open_checkpoint(f)
    assert official_refuses(f)


def test_duplicate_json_keys_refused(tmp_path):
    raw = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    raw += b" " * (-len(raw) % 8)
    f = tmp_path / "dup.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"dup\.safetensors.*twice"):
        open_checkpoint(f)


def test_valid_unusual_headers_accepted_like_the_official_library(tmp_path):
    # header order differs from offset order; a zero-size tensor shares offset 0
    f = tmp_path / "ok.safetensors"
    data = struct.pack("<3f", 1.0, 2.0, 3.0)
    f.write_bytes(st_bytes({"b": t([2], 4, 12), "a": t([1], 0, 4), "z": t([0], 0, 0)}, data))
    ck = open_checkpoint(f)
    assert ck.keys() == ["z", "a", "b"]
    assert torch.equal(ck.get("b"), torch.tensor([2.0, 3.0])) and ck.get("z").shape == (0,)
    assert not official_refuses(f)


def test_positional_shard_files_pass_the_strict_reader(tmp_path):
    specs = [TensorSpec("a", (3, 2), torch.float32), TensorSpec("b", (5,), torch.float16)]
    sh = PositionalShard(tmp_path / "s.safetensors", specs)
    sh.create()
    sh.write_elements("b", 0, torch.arange(5.0), torch.float16)
    ck = open_checkpoint(tmp_path / "s.safetensors")
    assert torch.equal(ck.get("b"), torch.arange(5.0).half())
    assert not official_refuses(tmp_path / "s.safetensors")


# ------------------------------------------------------------------------------------------ shard indexes


def _sharded(d: Path, shard_name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard_name}}))
    return d


@pytest.mark.parametrize("entry", ["../x.safetensors", "/abs/path/x.safetensors", "sub/x.safetensors", "..", ""])
def test_index_naming_a_file_outside_its_directory_is_refused(tmp_path, entry):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))  # the target exists: only the rule refuses
    d = _sharded(tmp_path / "m", entry)
    (d / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "sub" / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map entry 'w'"):
        open_checkpoint(d)


def test_index_shard_symlinked_out_of_the_directory_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    d = _sharded(tmp_path / "m", "model-00001-of-00001.safetensors")
    (d / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map entry 'w'.*symlink to .*outside"):
        open_checkpoint(d)


def test_torch_bin_index_is_confined_too(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "x.bin")
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../x.bin"}}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: weight_map entry 'w'"):
        open_checkpoint(d)


def test_symlinks_inside_the_directory_and_hf_cache_blobs_are_accepted(tmp_path):
    # a Hugging Face cache snapshot: every file is a symlink to ../../blobs/<hash>
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(repo / "blobs" / "1111"))
    (repo / "blobs" / "2222").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/1111")
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/2222")
    assert torch.equal(open_checkpoint(snap).get("w"), torch.ones(2))
    # confined_file: a symlink resolving inside the directory is fine; the error class is the caller's
    (snap / "alias").symlink_to("model-00001-of-00001.safetensors")
    assert confined_file(snap, "alias", "x") == snap / "alias"
    with pytest.raises(ConfigError, match="manifest entry"):
        confined_file(snap, "../alias", "manifest entry", ConfigError)


# ------------------------------------------------------------------------------------------ copy_model_files


def test_copy_model_files_never_follows_symlinks_out_or_into_loops(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    src = tmp_path / "pre"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(secret)  # a COPY_FILES name pointing outside
    (src / "vocab.txt").symlink_to("config.json")  # inside the tree: copied as a regular file
    (src / "1_Pooling" / "config.json").write_text("{\"pooling\": 1}")
    (src / "1_Pooling" / "loop").symlink_to(src / "1_Pooling")  # a symlink loop
    (src / "1_Pooling" / "leak.txt").symlink_to(secret)
    (src / "2_Normalize").symlink_to(tmp_path)  # a symlinked folder out of the tree
    dst = tmp_path / "out"
    dst.mkdir()
    copied = copy_model_files(src, dst)
    assert sorted(copied) == ["1_Pooling", "config.json", "vocab.txt"]
    assert not (dst / "tokenizer.json").exists() and not (dst / "2_Normalize").exists()
    assert sorted(p.name for p in (dst / "1_Pooling").iterdir()) == ["config.json"]
    assert (dst / "vocab.txt").read_text() == "{}" and not (dst / "vocab.txt").is_symlink()
    assert not any(p.is_symlink() for p in dst.rglob("*"))
    assert all("private" not in p.read_text() for p in dst.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ atomic outputs


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "g").write_text("B")
    exchange(a, b)
    assert (a / "g").read_text() == "B" and (b / "f").read_text() == "A"
    assert not (a / "f").exists() and not (b / "g").exists()


def test_exchange_fallback_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_mod, "_find_renameat2", lambda: None)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("file B")
    (a / "f").write_text("A")
    exchange(a, b)
    assert a.read_text() == "file B" and (b / "f").read_text() == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_atomic_output_inside_an_input_is_refused_and_creates_nothing(tmp_path):
    inp = tmp_path / "pre"
    inp.mkdir()
    before = sorted(tmp_path.rglob("*"))
    for out, how in [(inp / "merged", "lies inside"), (inp, "is"), (tmp_path, "contains")]:
        with pytest.raises(ConfigError, match=rf"output .* {how} the input .*pre"), \
                atomic_output(out, force=True, inputs=[inp]):
            pytest.fail("the block must not run")
    assert sorted(tmp_path.rglob("*")) == before


def test_atomic_output_refuses_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="created by someone else"), atomic_output(out, force=False) as tmp:
        (tmp / "model.safetensors").write_text("ours")
        out.mkdir()  # another process wins the race
        (out / "theirs").write_text("intruder")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"] and (out / "theirs").read_text() == "intruder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temp is gone


def test_atomic_output_refuses_an_intruder_without_renameat2_too(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_mod, "_find_renameat2", lambda: None)
    for directory in (True, False):
        out = tmp_path / f"out-{directory}"
        with pytest.raises(OutputExistsError), atomic_output(out, directory=directory) as tmp:
            if directory:
                (tmp / "f").write_text("ours")
            else:
                tmp.write_text("ours")
            out.mkdir()
            (out / "theirs").write_text("intruder")
        assert (out / "theirs").read_text() == "intruder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-False", "out-True"]


def test_atomic_output_replaces_with_force_and_cleans_up_on_interrupt(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    (out / "README.md").write_text("# Model written by tvbasis\n")  # a model output of tvbasis: replaceable
    with pytest.raises(KeyboardInterrupt), atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old").read_text() == "old"
    with atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a non-empty directory tvbasis did not write is never replaced, --force or not (issue 27)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not write"), atomic_output(out, force=True):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in out.iterdir()) == ["new", "notes.txt"]


def test_stale_temp_of_a_dead_pid_is_removed_and_a_live_one_kept(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".out.tvbasis-tmp-{child.pid}-0badc0de"
    live = tmp_path / f".out.tvbasis-tmp-{os.getpid()}-0badc0de"
    other = tmp_path / f".other.tvbasis-tmp-{child.pid}-0badc0de"
    dead.mkdir()
    (dead / ".tvbasis-temp").write_text(dead.name + "\n")  # the marker every tvbasis temporary holds
    (dead / "shard").write_text("partial")
    live.mkdir()
    (live / ".tvbasis-temp").write_text(live.name + "\n")
    other.write_text("x")
    assert cleanup_stale_temps(tmp_path, "out") == [dead]
    assert live.is_dir() and other.exists() and not dead.exists()
    # a file, or a directory without the marker, merely named like a temporary is not proven ours (issue 27)
    unmarked = tmp_path / f".x.tvbasis-tmp-{child.pid}-0badc0de"
    unmarked.mkdir()
    assert cleanup_stale_temps(tmp_path) == [] and other.exists() and unmarked.is_dir()
    assert cleanup_stale_temps(tmp_path, in_store=True) == [other]  # in a locked store, files are ours


_CHILD = """
import os, signal, sys
from pathlib import Path
from tvbasis.io import atomic
out = Path(sys.argv[1])
if sys.argv[2] == "after-swap":
    atomic._remove = lambda p: os.kill(os.getpid(), signal.SIGKILL)  # die between the swap and the clean-up
with atomic.atomic_output(out, force=True) as tmp:
    (tmp / "weights").write_text("new")
    (tmp / "tvbasis-model.json").write_text("{}")
    if sys.argv[2] == "before-swap":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["before-swap", "after-swap"])
def test_kill_9_leaves_the_old_output_or_the_new_one_whole(tmp_path, when):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    (out / "tvbasis-model.json").write_text("{}")  # an output of tvbasis: --force may replace it
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out), when], capture_output=True, timeout=120,
                       check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == ["tvbasis-model.json", "weights"]
    assert (out / "weights").read_text() == ("old" if when == "before-swap" else "new")
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftovers) == 1 and ".out.tvbasis-tmp-" in leftovers[0].name
    # the next write to the same output removes the dead process's temp
    with atomic_output(out, force=True) as tmp:
        (tmp / "weights").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "weights").read_text() == "newer"


# ------------------------------------------------------------------------------------------ NaN/Inf


def test_fp16_overflow_in_model_writer_raises_and_leaves_no_output(tmp_path):
    specs = [TensorSpec("ok", (2,), torch.float16), TensorSpec("big", (3,), torch.float16)]
    with pytest.raises(NonFiniteError, match=r"out.*'big'.*1 NaN/Inf.*float16"), \
            ModelWriter(tmp_path / "out", specs) as w:
        w.write("ok", torch.ones(2))
        w.write("big", torch.tensor([1.0, 7e4, 2.0]))  # 70000 > 65504: Inf in float16
        w.finalize()
    assert list(tmp_path.iterdir()) == []


def test_nan_in_single_file_write_raises_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "tv.safetensors"
    out.write_bytes(b"old")
    specs = [TensorSpec("w", (2,), torch.float32)]
    with pytest.raises(NonFiniteError, match=r"tv\.safetensors.*'w'"):
        write_single_file_atomic(out, specs, [("w", torch.tensor([0.0, float("nan")]))], force=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["tv.safetensors"]
