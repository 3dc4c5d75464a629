"""export-lora: every export loads in PEFT with no missing or unexpected key, and PEFT's own ``merge_and_unload``
equals θ₀ + the store's decoded task within the error the export records (exact where the task is held as
factors) — PEFT is the reference throughout."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]

from tests.servemodels import F64, full_family, lora_family, state  # noqa: E402
from tvbasis import export_lora  # noqa: E402
from tvbasis.cli import main  # noqa: E402
from tvbasis.errors import ConfigError  # noqa: E402
from tvbasis.store import BasisStore, build_store  # noqa: E402
from tvbasis.store.lora_factor_space import build_lora_store  # noqa: E402


def _peft_merge(base: torch.nn.Module, adapter: Path) -> dict[str, torch.Tensor]:
    """Load the adapter with PEFT (asserting no key is missing or unexpected) and return its merged weights."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    # the same through PEFT's state-dict loader, which names every key it could not place
    fresh = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_pretrained(str(adapter)))
    res = peft.set_peft_model_state_dict(fresh, load_file(str(adapter / "adapter_model.safetensors")))
    assert not res.unexpected_keys, res.unexpected_keys[:4]
    lost = [k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k]
    assert not lost, lost[:4]
    return state(model.merge_and_unload())


def _decoded(store: BasisStore, task: str) -> dict[str, torch.Tensor]:
    tv = store.reconstruct(task)
    return {k: tv.get(k).to(F64) for k in tv.keys()}


def _rel_to(merged: dict, pre: dict, decoded: dict, names: dict[str, str] | None = None) -> float:
    names = names or {k: k for k in decoded}
    num = sum(float((merged[names[k]].to(F64) - pre[names[k]].to(F64) - d).pow(2).sum()) for k, d in decoded.items())
    return (num / sum(float(d.pow(2).sum()) for d in decoded.values())) ** 0.5


@pytest.fixture(scope="module")
def bert_fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    pre_p, fts, pre, sds = full_family(root, T=2)
    base = transformers.BertForSequenceClassification.from_pretrained(str(pre_p)).eval()
    return root, pre_p, fts, pre, sds, base


def test_lowrank_store_exports_its_factors_with_embedding_keys(bert_fam, tmp_path):
    """The issue's case: -M 0 --residual lowrank: the word embedding as lora_embedding_A/B, nothing dropped."""
    _, pre_p, fts, pre, sds, base = bert_fam
    store = build_store(pre_p, fts, "pca", 0, tmp_path / "s", residual="lowrank:rank=4")
    res = export_lora(store, "task0", tmp_path / "ad", pre_p)
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    emb = "base_model.model.bert.embeddings.word_embeddings"
    assert f"{emb}.lora_embedding_A" in keys and f"{emb}.lora_embedding_B" in keys
    assert not any(k.startswith(emb + ".lora_A") for k in keys)
    assert res.rel_error == 0.0 and {r["how"] for r in res.tensors.values()} == {"factors", "modules_to_save"}
    merged = _peft_merge(base, tmp_path / "ad")
    assert _rel_to(merged, pre, _decoded(store, "task0")) < 1e-5
    # and against the fine-tune written here: the store's own error, no more
    num = sum(float((merged[k].to(F64) - sds["task0"][k].to(F64)).pow(2).sum()) for k in store.specs)
    den = sum(float((sds["task0"][k].to(F64) - pre[k].to(F64)).pow(2).sum()) for k in store.specs)
    assert (num / den) ** 0.5 == pytest.approx(store.rel_errors["task0"], rel=1e-3)
    # the reconstruct --peft-dir path writes the same layout
    assert main(["-q", "reconstruct", str(tmp_path / "s"), "task1", "--peft-dir", str(tmp_path / "ad1"),
                 "--pretrained", str(pre_p)]) == 0
    assert f"{emb}.lora_embedding_A" in load_file(str(tmp_path / "ad1" / "adapter_model.safetensors"))
    _peft_merge(base, tmp_path / "ad1")


@pytest.mark.parametrize("rank", [32, 2])
def test_dense_store_by_truncated_svd(bert_fam, tmp_path, rank):
    _, pre_p, fts, pre, _, base = bert_fam
    store = build_store(pre_p, fts, "pca", 1, tmp_path / "s")
    res = export_lora(store, "task1", tmp_path / "ad", pre_p, rank=rank)
    record = json.loads((tmp_path / "ad" / "tvbasis_export.json").read_text())
    assert record["rel_error"] == pytest.approx(res.rel_error)
    merged = _peft_merge(base, tmp_path / "ad")
    measured = _rel_to(merged, pre, _decoded(store, "task1"))
    if rank == 32:  # every matrix here has rank <= 32: the SVD is exact
        assert res.rel_error < 1e-6 and measured < 1e-5
    else:
        assert res.rel_error > 0.05
        assert measured == pytest.approx(res.rel_error, rel=1e-3)
        assert set(res.ranks.values()) == {2}


def test_gpt2_conv1d_as_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(str(tmp_path / "pre"))
    pre = state(base)
    fts = {}
    for t in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m.save_pretrained(str(tmp_path / f"ft{t}"))
        fts[f"t{t}"] = tmp_path / f"ft{t}"
    store = build_store(tmp_path / "pre", fts, "pca", 1, tmp_path / "s", residual="float32")
    res = export_lora(store, "t0", tmp_path / "ad", tmp_path / "pre", rank=4)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    layouts = {r["layout"] for r in res.tensors.values() if "layout" in r}
    assert layouts == {"fan_in_fan_out", "embedding"}
    merged = _peft_merge(base, tmp_path / "ad")
    assert _rel_to(merged, pre, _decoded(store, "t0")) == pytest.approx(res.rel_error, rel=1e-3)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 12, 1)
        self.norm = torch.nn.LayerNorm(12)
        self.head = torch.nn.Linear(12, 5)


def test_conv_and_modules_to_save_from_a_given_model(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = _Net()
    pre = state(base)
    save_file(pre, str(tmp_path / "pre.safetensors"))
    fts = {}
    for t in range(2):
        sd = {k: v + 0.05 * torch.randn_like(v) for k, v in pre.items()}
        save_file(sd, str(tmp_path / f"ft{t}.safetensors"))
        fts[f"t{t}"] = tmp_path / f"ft{t}.safetensors"
    store = build_store(tmp_path / "pre.safetensors", fts, "pca", 0, tmp_path / "s", residual="float32")
    res = export_lora(store, "t1", tmp_path / "ad", tmp_path / "pre.safetensors", rank=3, model=_Net())
    assert res.tensors["conv.weight"]["layout"] == "conv" and res.tensors["head.weight"]["layout"] == "linear"
    assert res.modules_to_save == ["norm"]
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert keys["base_model.model.conv.lora_A.weight"].shape == (3, 6, 1, 1)
    assert keys["base_model.model.conv.lora_B.weight"].shape == (12, 3, 1, 1)
    merged = _peft_merge(base, tmp_path / "ad")
    assert _rel_to(merged, pre, _decoded(store, "t1")) == pytest.approx(res.rel_error, rel=1e-3)
    # without a model the names and ranks decide, with the same result here
    res2 = export_lora(store, "t1", tmp_path / "ad2", tmp_path / "pre.safetensors", rank=3)
    assert res2.tensors["conv.weight"]["layout"] == "conv"


def test_lora_factor_store_is_exact_against_the_adapters(tmp_path):
    pre_p, ads, pre, merged_ref = lora_family(tmp_path, T=2)
    base = transformers.BertForSequenceClassification.from_pretrained(str(pre_p)).eval()
    store = build_lora_store(pre_p, ads, tmp_path / "f", method="factors")
    for task in ads:
        res = export_lora(store, task, tmp_path / f"ad-{task}")
        assert res.rel_error == 0.0
        merged = _peft_merge(base, tmp_path / f"ad-{task}")
        for k in store.specs:  # PEFT's merge of the original adapter
            torch.testing.assert_close(merged[k], merged_ref[task][k], rtol=0, atol=2e-6, msg=k)


def test_refusals_and_cli(bert_fam, tmp_path, capsys):
    _, pre_p, fts, pre, _, base = bert_fam
    store = build_store(pre_p, fts, "pca", 1, tmp_path / "s")
    with pytest.raises(ConfigError, match="rank"):
        export_lora(store, "task0", tmp_path / "x", pre_p, rank=0)
    with pytest.raises(ConfigError, match="--pretrained"):
        export_lora(store, "task0", tmp_path / "x", rank=4)
    assert not (tmp_path / "x").exists()
    assert main(["-q", "export-lora", str(tmp_path / "s"), "task0", "--out", str(tmp_path / "cli"), "--rank", "4",
                 "--pretrained", str(pre_p)]) == 0
    out = capsys.readouterr().out
    assert "relative error of the adapter" in out
    _peft_merge(base, tmp_path / "cli")
    capsys.readouterr()  # PEFT's own warnings
    assert main(["-q", "export-lora", str(tmp_path / "s"), "task0", "--out", str(tmp_path / "cli"), "--rank", "4",
                 "--pretrained", str(pre_p)]) != 0
    assert main(["-q", "export-lora", str(tmp_path / "s"), "nosuch", "--out", str(tmp_path / "y")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "nosuch" in err[1]
