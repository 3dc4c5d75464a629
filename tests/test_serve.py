"""A task used straight from a store: ``apply_into``, ``swapped``, ``load_task`` and ``tvbasis get``, checked
against the fine-tunes themselves (exact stores), against each store's reported error measured here with the
dense task vectors (lossy stores), and against PEFT's own merge (LoRA stores)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

from tests.servemodels import bert, full_family, lora_family, rel, state  # noqa: E402
from tvbasis import load_task  # noqa: E402
from tvbasis.cli import main  # noqa: E402
from tvbasis.errors import ConfigError, StoreError, TensorMismatchError, UnknownTaskError  # noqa: E402
from tvbasis.store import BasisStore, build_store  # noqa: E402

EXACT = {"residual-f32": dict(method="pca", M=2, residual="float32"),
         "lowrank-M0-full": dict(method="pca", M=0, residual="lowrank:rank=32")}
LOSSY = {"pca": dict(method="pca", M=1),
         "int8-bases": dict(method="pca", M=2, codec="int8"), "random": dict(method="random", M=2),
         "residual-lowrank": dict(method="pca", M=1, residual="lowrank:rank=2"),
         "all-lowrank": dict(method="pca", M=2, codec="lowrank:rank=4", residual="lowrank:rank=2"),
         "tall": dict(method="tall", M=None)}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    pre_p, fts, pre, sds = full_family(root, T=3)
    stores = {}
    for name, kw in {**EXACT, **LOSSY}.items():
        kw = dict(kw)
        stores[name] = build_store(pre_p, fts, kw.pop("method"), kw.pop("M"), root / f"s-{name}", **kw)
    return root, pre_p, fts, pre, sds, stores


def _model(pre_p: Path) -> torch.nn.Module:
    return transformers.BertForSequenceClassification.from_pretrained(str(pre_p)).eval()


@pytest.mark.parametrize("kind", list(EXACT))
def test_exact_stores_give_the_finetune(fam, kind):
    _, pre_p, _, pre, sds, stores = fam
    store = stores[kind]
    model = _model(pre_p)
    changed = store.apply_into(model, "task1", check=True)
    assert set(changed) == set(store.specs)
    got = state(model)
    for k, v in sds["task1"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-6, msg=k)


@pytest.mark.parametrize("kind", list(LOSSY))
def test_lossy_stores_match_their_reported_error(fam, kind):
    _, pre_p, _, pre, sds, stores = fam
    store = stores[kind]
    for task in store.task_names:
        model = _model(pre_p)
        store.apply_into(model, task)
        measured = rel(state(model), sds[task], pre, list(store.specs))
        assert measured == pytest.approx(store.rel_errors[task], rel=1e-3, abs=1e-5), task


@pytest.mark.parametrize("kind", ["pca", "residual-lowrank", "all-lowrank", "tall", "residual-f32"])
def test_a_combination_equals_the_written_model(fam, tmp_path, kind):
    """apply_into of an analogy with a scale equals the same edit written to disk and read back."""
    _, pre_p, _, pre, sds, stores = fam
    store = stores[kind]
    alpha = {"task0": 1.0, "task1": 1.0, "task2": -1.0}
    model = _model(pre_p)
    store.apply_into(model, alpha, scale=0.4)
    store.combine(alpha).apply_to(pre_p, 0.4, out=tmp_path / "edit")
    ref = state(_model(tmp_path / "edit"))
    got = state(model)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    if kind == "residual-f32":  # exact store: the analogy of the fine-tunes themselves, written here
        for k in store.specs:
            want = pre[k] + 0.4 * (sds["task0"][k] + sds["task1"][k] - sds["task2"][k] - pre[k])
            torch.testing.assert_close(got[k], want, rtol=0, atol=2e-6, msg=k)


def test_prefix_matching_and_mismatches(fam, tmp_path):
    """A store of BertForSequenceClassification checkpoints applies to a bare BertModel (no ``bert.`` prefix)."""
    _, pre_p, fts, pre, sds, _ = fam
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s", residual="float32", exclude=["classifier*"])
    inner = _model(pre_p).bert
    store.apply_into(inner, "task2")
    got = inner.state_dict()
    for k in store.specs:
        torch.testing.assert_close(got[k.removeprefix("bert.")], sds["task2"][k], rtol=0, atol=2e-6)
    other = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                           intermediate_size=48, vocab_size=64,
                                                           max_position_embeddings=32))
    before = state(other)
    with pytest.raises(TensorMismatchError, match="shape"):
        store.apply_into(other, "task0")
    assert all(torch.equal(before[k], v) for k, v in state(other).items())
    with pytest.raises(UnknownTaskError):
        store.apply_into(_model(pre_p), "nosuch")
    with pytest.raises(ConfigError):
        store.apply_into(_model(pre_p), "task0", scale=float("nan"))


def test_check_refuses_another_model(fam):
    _, pre_p, _, _, _, stores = fam
    wrong = bert(seed=5)
    before = state(wrong)
    with pytest.raises(StoreError, match="checksum"):
        stores["pca"].apply_into(wrong, "task0", check=True)
    assert all(torch.equal(before[k], v) for k, v in state(wrong).items())


def test_swapped_restores_bf16_exactly(tmp_path):
    pre_p, fts, pre, sds = full_family(tmp_path, T=2, dtype=torch.bfloat16)
    store = build_store(pre_p, fts, "pca", 0, tmp_path / "s", residual="lowrank:rank=4+int8")
    model = _model(pre_p).to(torch.bfloat16)
    theta0 = state(model)
    ref_dir = store.reconstruct("task1").apply_to(pre_p, 1.0, out=tmp_path / "t1")
    ref = {k: v for k, v in state(_model(ref_dir).to(torch.bfloat16)).items()}
    for i in range(20):
        task = ("task0", "task1")[i % 2]
        with store.swapped(model, task):
            if task == "task1":
                got = state(model)
                for k in store.specs:  # the same bf16 rounding as the written model: at most one ulp apart
                    torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=2**-7, atol=1e-6, msg=k)
        after = state(model)
        assert all(torch.equal(after[k], theta0[k]) for k in theta0), i
    for mode in ("subtract",):  # bf16 tensors are copied back even in subtract mode
        with store.swapped(model, "task1", restore=mode):
            pass
        assert all(torch.equal(state(model)[k], theta0[k]) for k in theta0)
    with pytest.raises(ConfigError, match="restore"):
        with store.swapped(model, "task1", restore="undo"):
            pass


def test_swapped_subtract_float32_and_rollback_on_corruption(fam, tmp_path):
    _, pre_p, fts, pre, sds, _ = fam
    store = build_store(pre_p, fts, "pca", 0, tmp_path / "s", residual="lowrank:rank=4")
    model = _model(pre_p)
    theta0 = state(model)
    for _ in range(10):
        with store.swapped(model, {"task0": 0.5, "task2": 0.5}, restore="subtract"):
            pass
    after = state(model)
    for k in theta0:
        torch.testing.assert_close(after[k], theta0[k], rtol=0, atol=1e-5)
    # a corrupt chunk in the last tensor's entry: the tensors already changed are restored exactly
    coded = sorted((tmp_path / "s").glob("coded*.safetensors"))[0]
    last = list(store.specs)[-1]
    pl = store.coded.places[f"residual/task1/{last}/us"]
    raw = bytearray(coded.read_bytes())
    raw[pl.offset] ^= 0xFF
    coded.write_bytes(bytes(raw))
    broken = BasisStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="corrupt"):
        with broken.swapped(model, "task1"):
            pass
    assert all(torch.equal(state(model)[k], after[k]) for k in after)
    # a bare apply_into of a combination: the tensor that failed midway (task0's term added, task1's corrupt) and
    # the ones before it are rolled back by subtraction, within float32 rounding
    with pytest.raises(StoreError, match="restored by subtraction"):
        broken.apply_into(model, {"task0": 1.0, "task1": 1.0})
    for k, v in state(model).items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6)


def test_load_task(fam, tmp_path):
    _, pre_p, fts, pre, sds, stores = fam
    model = load_task(stores["residual-f32"], "task0", pre_p)
    assert isinstance(model, transformers.BertForSequenceClassification)
    for k, v in state(model).items():
        torch.testing.assert_close(v, sds["task0"][k], rtol=0, atol=2e-6, msg=k)
    # a directory transformers cannot load: a state dict of every tensor
    from safetensors.torch import save_file
    (tmp_path / "raw").mkdir()
    save_file(pre, str(tmp_path / "raw" / "model.safetensors"))
    sd = load_task(stores["residual-f32"], "task0", tmp_path / "raw")
    assert isinstance(sd, dict) and set(sd) == set(pre)
    for k, v in sd.items():
        torch.testing.assert_close(v, sds["task0"][k], rtol=0, atol=2e-6, msg=k)
    # another pretrained model: refused before anything is loaded
    bert(seed=3).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(StoreError, match="checksum"):
        load_task(stores["pca"], "task0", tmp_path / "other")


def test_lora_factor_and_joint_stores(tmp_path):
    pytest.importorskip("peft")
    from tvbasis.store.lora_factor_space import build_lora_store

    pre_p, ads, pre, merged = lora_family(tmp_path, T=3)
    factors = build_lora_store(pre_p, ads, tmp_path / "f", method="factors")
    joint = build_lora_store(pre_p, ads, tmp_path / "j", method="joint", k=6)
    for task in ads:
        model = _model(pre_p)
        factors.apply_into(model, task)
        got = state(model)
        for k in factors.specs:  # PEFT's merge_and_unload of the same adapter
            torch.testing.assert_close(got[k], merged[task][k], rtol=0, atol=2e-6, msg=k)
        model = _model(pre_p)
        joint.apply_into(model, task)
        assert rel(state(model), merged[task], pre, list(joint.specs)) == pytest.approx(joint.rel_errors[task],
                                                                                        rel=1e-3, abs=1e-5)


def test_get_cli(fam, tmp_path, capsys):
    _, pre_p, _, pre, sds, stores = fam
    root = stores["residual-f32"].root
    assert main(["-q", "get", str(root), "task2", "--pretrained", str(pre_p), "--out", str(tmp_path / "t2")]) == 0
    got = state(_model(tmp_path / "t2"))
    for k, v in sds["task2"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-6, msg=k)
    assert (tmp_path / "t2" / "config.json").is_file()
    capsys.readouterr()
    assert main(["-q", "get", str(root), "task2", "--pretrained", str(pre_p), "--out", str(tmp_path / "t2")]) != 0
    assert main(["-q", "get", str(root), "nosuch", "--pretrained", str(pre_p), "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "nosuch" in err[1]
    assert not (tmp_path / "x").exists()


def test_a_state_dict_as_a_module(fam):
    """A model given as a module whose state dict is plain tensors (the state-dict path of load_task)."""
    _, pre_p, _, pre, sds, stores = fam
    from tvbasis.store.apply import StateModule

    holder = StateModule(copy.deepcopy(pre))
    stores["residual-f32"].apply_into(holder, "task1")
    for k in stores["residual-f32"].specs:
        torch.testing.assert_close(holder.state[k], sds["task1"][k], rtol=0, atol=2e-6)
