"""Fine-tunes given as PEFT LoRA adapters, checked against PEFT's own ``merge_and_unload`` of the same adapter."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

# PEFT flags a 1-D lora_B.bias (lora_bias=True) as a possibly unsharded save; it is the documented shape here
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:peft"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]
transformers = pytest.importorskip("transformers")

from tvbasis.cli import main  # noqa: E402
from tvbasis.errors import CheckpointError, StoreError, TensorMismatchError  # noqa: E402
from tvbasis.io import LoraCheckpoint, is_adapter, open_checkpoint, open_finetuned  # noqa: E402
from tvbasis.store import (  # noqa: E402
    BasisStore,
    add_task,
    build_store,
)
from tvbasis.vectors import TaskVector  # noqa: E402


def _bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _adapter(base: torch.nn.Module, out: Path, seed: int, **kw: object) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter of ``base`` with random (non-zero) B, biases and head; return PEFT's merged weights."""
    torch.manual_seed(seed)
    import copy
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # what the adapter trains (and saves): A, B, the biases and heads it was told to
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out))
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture()
def bert_family(tmp_path: Path):
    base = _bert()
    base.save_pretrained(str(tmp_path / "pre"))
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    variants = {
        "plain": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "full": dict(r=4, lora_alpha=16, target_modules=["query", "value", "word_embeddings", "dense"],
                     modules_to_save=["classifier"], bias="lora_only", alpha_pattern={"value": 4},
                     rank_pattern={"query": 2}),
        "rslora": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["key"], lora_bias=True),
    }
    merged = {name: _adapter(base, tmp_path / name, seed, **kw) for seed, (name, kw) in enumerate(variants.items())}
    return tmp_path, pre, merged


def test_adapter_reads_as_peft_merged_model(bert_family):
    root, pre, merged = bert_family
    pre_ck = open_checkpoint(root / "pre")
    for name, ref in merged.items():
        assert is_adapter(root / name)
        ck = open_finetuned(root / name, pre_ck)
        assert isinstance(ck, LoraCheckpoint)
        assert set(ck.keys()) == set(pre_ck.keys())
        changed = {k for k in ck.keys() if not torch.equal(ref[k], pre[k])}
        assert changed and changed <= ck.changed_tensors()  # every tensor PEFT changes is one the adapter touches
        for k in ck.keys():
            torch.testing.assert_close(ck.get(k).to(ref[k].dtype), ref[k], rtol=0, atol=2e-6, msg=k)
            if ck.spec(k).shape and ck.spec(k).shape[0] > 3:  # a row slice reads the same rows
                torch.testing.assert_close(ck.get_rows(k, 1, 3).to(ref[k].dtype), ref[k][1:3], rtol=0, atol=2e-6)
        again = pickle.loads(pickle.dumps(ck))  # as a Ray worker receives it
        k = sorted(ck.changed_tensors())[0]
        assert torch.equal(again.get(k), ck.get(k))


def test_task_vector_build_and_cli_take_adapters(bert_family, tmp_path):
    root, pre, merged = bert_family
    names = list(merged)
    tv = TaskVector.from_checkpoints(root / "pre", root / "full")
    for k in tv.keys():
        torch.testing.assert_close(tv.get(k), merged["full"][k].float() - pre[k].float(), rtol=0, atol=2e-6)
    store = build_store(root / "pre", {n: root / n for n in names}, method="pca", M=len(names) - 1,
                        out=tmp_path / "store")
    for n in names:  # pca with M = T − 1 is exact: the adapters' deltas come back from the store
        rec = BasisStore.open(store.root).reconstruct(n)
        err = sum(float((rec.get(k) - (merged[n][k].float() - pre[k].float())).pow(2).sum()) for k in rec.keys())
        assert err ** 0.5 < 1e-4
    out = tmp_path / "merged"
    assert main(["-q", "merge", "--pretrained", str(root / "pre"), "--finetuned", f"a={root / 'plain'}",
                 "--method", "task_arithmetic", "--scaling-coef", "1", "--out", str(out)]) == 0
    got = open_checkpoint(out)
    for k in got.keys():
        torch.testing.assert_close(got.get(k), merged["plain"][k], rtol=0, atol=2e-6)


def test_bf16_pretrained_keeps_the_lora_delta_exact(tmp_path):
    base = _bert().to(torch.bfloat16)
    base.save_pretrained(str(tmp_path / "pre"))
    _adapter(base.float(), tmp_path / "ad", 3, r=4, lora_alpha=8, target_modules=["query"])
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    stem = "base_model.model.bert.encoder.layer.0.attention.self.query"
    want = 2.0 * sd[f"{stem}.lora_B.weight"] @ sd[f"{stem}.lora_A.weight"]
    tv = TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ad")
    # rounded to bf16, W + ΔW would lose ~1e-3 of |W| (≈ the delta itself); kept in float32 it does not
    torch.testing.assert_close(tv.get(key), want, rtol=0, atol=1e-6)


def test_bad_adapters_are_refused_clearly(bert_family, tmp_path):
    root, *_ = bert_family
    pre_ck = open_checkpoint(root / "pre")
    cfg = json.loads((root / "plain" / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((root / "plain" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="DoRA"):
        open_finetuned(dora, pre_ck)
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="IA3"):
        open_finetuned(ia3, pre_ck)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="adapter weights not found"):
        open_finetuned(empty, pre_ck)
    # an adapter of a wider model: the shape it gives the pretrained tensor is named with both shapes
    wide_cfg = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=48, vocab_size=64, max_position_embeddings=32, num_labels=3)
    wide = transformers.BertForSequenceClassification(wide_cfg)
    _adapter(wide, tmp_path / "wide", 5, r=4, lora_alpha=8, target_modules=["query"])
    with pytest.raises(TensorMismatchError, match=r"query\.weight.*\(48, 48\).*\(32, 32\)"):
        open_finetuned(tmp_path / "wide", pre_ck)
    assert main(["-q", "vector", "--pretrained", str(root / "pre"), "--finetuned", str(tmp_path / "wide"),
                 "--out", str(tmp_path / "v.safetensors")]) != 0
    assert not (tmp_path / "v.safetensors").exists()


def test_fan_in_fan_out_conv1d_adapter(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(str(tmp_path / "pre"))
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    ref = _adapter(base, tmp_path / "ad", 7, r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                   fan_in_fan_out=True)
    tv = TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ad")
    touched = [k for k in tv.keys() if "c_attn.weight" in k or "c_fc.weight" in k]
    assert touched and all(tv.get(k).abs().max() > 0 for k in touched)
    for k in tv.keys():
        torch.testing.assert_close(tv.get(k), ref[k].float() - pre[k].float(), rtol=0, atol=2e-6, msg=k)


def test_conv_adapter(tmp_path):
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 2)

    torch.manual_seed(0)
    base = Net()
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    ref = _adapter(base, tmp_path / "ad", 2, r=2, lora_alpha=6, target_modules=["conv"])
    tv = TaskVector.from_checkpoints(tmp_path / "pre.safetensors", tmp_path / "ad")
    assert tv.get("conv.weight").abs().max() > 0
    for k in tv.keys():
        torch.testing.assert_close(tv.get(k), ref[k].float() - pre[k].float(), rtol=0, atol=2e-6, msg=k)


def test_adapter_stores_cover_only_what_the_adapters_change(bert_family, tmp_path):
    root, pre, merged = bert_family
    pre_ck = open_checkpoint(root / "pre")
    adapted = {n: open_finetuned(root / n, pre_ck).changed_tensors() for n in ("plain", "full")}
    store = build_store(root / "pre", {n: root / n for n in ("plain", "full")}, method="pca", M=1,
                        out=tmp_path / "store")
    assert set(store.specs) == adapted["plain"] | adapted["full"] < set(pre)  # no zero bases of other tensors
    # editing writes the whole model: untouched tensors come from the pretrained model
    out = tmp_path / "edited"
    assert main(["-q", "edit", str(store.root), "--pretrained", str(root / "pre"), "--combine", "plain=1,full=-0.5",
                 "--scaling-coef", "1", "--out", str(out)]) == 0
    got = open_checkpoint(out)
    assert set(got.keys()) == set(pre_ck.keys())
    for k in got.keys():
        want = pre[k].float() + (merged["plain"][k].float() - pre[k].float()) \
            - 0.5 * (merged["full"][k].float() - pre[k].float())
        torch.testing.assert_close(got.get(k).float(), want, rtol=0, atol=2e-6, msg=k)  # pca M = T − 1: exact
    # a new adapter fits when the store covers what it changes; one that changes other tensors is refused
    assert main(["-q", "add-task", str(store.root), f"q={root / 'plain'}", "--pretrained", str(root / "pre")]) == 0
    assert "q" in BasisStore.open(store.root).task_names
    with pytest.raises(StoreError, match="does not cover"):
        add_task(BasisStore.open(store.root), "k", root / "rslora", root / "pre")
