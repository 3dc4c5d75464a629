"""LoRA-to-LoRA merges (``merge --out-format peft``) against PEFT's own ``add_weighted_adapter``: the merged
adapter's ΔW per module equals PEFT's for the same adapters, weights and combination, and PEFT loads it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

from tvbasis.cli import main  # noqa: E402
from tvbasis.errors import ConfigError  # noqa: E402
from tvbasis.lora.merge_peft import merge_adapters  # noqa: E402
from tvbasis.merge.dare import dare_mask  # noqa: E402

ADAPTERS = {  # different ranks, scales, rsLoRA, an embedding, modules only some adapters touch
    "a": dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"]),
    "b": dict(r=2, lora_alpha=6, target_modules=["query", "dense"], rank_pattern={"dense": 3}),
    "c": dict(r=3, lora_alpha=3, use_rslora=True, target_modules=["value", "key"]),
}
SAME_RANK = {"a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
             "b": dict(r=4, lora_alpha=4, target_modules=["query", "value"])}


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                  vocab_size=40, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("lora_merge")
    base = _bert()
    base.save_pretrained(str(root / "pre"))
    for seed, (name, kw) in enumerate({**ADAPTERS, **{f"s{k}": v for k, v in SAME_RANK.items()}}.items()):
        torch.manual_seed(seed + 1)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        model.save_pretrained(str(root / name))
    return root, base


def peft_reference(root: Path, base: torch.nn.Module, names: list[str], weights: list[float], method: str,
                   **kw: object) -> dict[str, torch.Tensor]:
    """ΔW per adapted module of PEFT's add_weighted_adapter (the '.weight' tensor names of the base model)."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(root / n), adapter_name=n)
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kw)
    return deltas_of(model, "merged")


def deltas_of(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and (adapter in mod.lora_A or adapter in mod.lora_embedding_A):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = mod.get_delta_weight(adapter).detach().double()
    return out


def ours(root: Path, base: torch.nn.Module, out: Path) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out), adapter_name="mine")
    return deltas_of(model, "mine")


def close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize(("method", "kw"), [
    ("cat", {}),
    ("svd", {"svd_rank": 3}),
    ("svd", {}),
    ("ties_svd", {"density": 0.5, "svd_rank": 16}),
    ("ties_svd", {"density": 0.3, "majority_sign_method": "frequency", "svd_rank": 2}),
    ("magnitude_prune_svd", {"density": 0.4, "svd_rank": 16}),
    ("dare_linear_svd", {"density": 1.0, "svd_rank": 4}),
    ("dare_ties_svd", {"density": 1.0, "svd_rank": 16}),
])
def test_matches_peft_add_weighted_adapter(family, tmp_path, method, kw):
    root, base = family
    names, weights = ["a", "b", "c"], [1.0, -0.5, 2.0]
    ref = peft_reference(root, base, names, weights, method, **kw)
    res = merge_adapters(root / "pre", {n: root / n for n in names}, tmp_path / "out", method,
                         dict(zip(names, weights)), rank=kw.get("svd_rank"), density=kw.get("density", 1.0),
                         sign=kw.get("majority_sign_method", "total"))
    close(ours(root, base, tmp_path / "out"), ref)
    if method == "cat":
        assert res.rel_error == 0.0 and res.ranks["encoder.layer.0.attention.self.query"] == 4 + 2
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_rslora"]


def test_linear_matches_peft(family, tmp_path):
    root, base = family
    ref = peft_reference(root, base, ["sa", "sb"], [0.7, -1.3], "linear")
    merge_adapters(root / "pre", {"sa": root / "sa", "sb": root / "sb"}, tmp_path / "out", "linear",
                   {"sa": 0.7, "sb": -1.3})
    close(ours(root, base, tmp_path / "out"), ref)
    with pytest.raises(ConfigError, match="needs one rank"):
        merge_adapters(root / "pre", {n: root / n for n in "ab"}, tmp_path / "o2", "linear")


def test_dare_drops_with_seeded_masks(family, tmp_path):
    # the drops are tvbasis's seeded masks (PEFT's come from torch's global generator): reference built from them
    root, base = family
    names = ["a", "c"]
    merge_adapters(root / "pre", {n: root / n for n in names}, tmp_path / "out", "dare_linear_svd",
                   {"a": 1.0, "c": 0.5}, rank=16, density=0.5, seed=3)
    full = [deltas_of(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / n), adapter_name=n), n)
            for n in names]
    got = ours(root, base, tmp_path / "out")
    for k in got:
        ref = torch.zeros_like(got[k])
        for i, (d, w) in enumerate(zip(full, [1.0, 0.5])):
            if k in d:
                ref += w * torch.where(dare_mask(tuple(d[k].shape), 0.5, 3, k, i), d[k] / 0.5, 0.0)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=2e-5, msg=k)


def test_cli_writes_a_loadable_adapter_and_refuses_clearly(family, tmp_path, capsys):
    root, base = family
    args = ["-q", "merge", "--pretrained", str(root / "pre"), "--finetuned", f"a={root / 'a'}",
            "--finetuned", f"b={root / 'b'}", "--weight", "a=0.5", "--out-format", "peft"]
    assert main([*args, "--out", str(tmp_path / "cat")]) == 0
    ref = peft_reference(root, base, ["a", "b"], [0.5, 1.0], "cat")
    close(ours(root, base, tmp_path / "cat"), ref)
    assert main([*args, "--method", "svd", "--rank", "2", "--out", str(tmp_path / "svd")]) == 0
    assert json.loads((tmp_path / "svd" / "tvbasis_merge.json").read_text())["rank"] == 2
    capsys.readouterr()
    for extra, fragment in [(["--method", "cat", "--rank", "2"], "--rank applies to the SVD merges"),
                            (["--method", "ties", "--trim-scope", "global"], "trim_scope=global is not supported"),
                            (["--method", "ties_svd", "--param", "x=1"], "drop --param"),
                            (["--scaling-coef", "2"], "drop --scaling-coef")]:
        assert main([*args, *extra, "--out", str(tmp_path / "bad")]) != 0
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    # a full model among the inputs; a PEFT method without --out-format peft
    assert main(["-q", "merge", "--pretrained", str(root / "pre"), "--finetuned", f"a={root / 'a'}",
                 "--finetuned", f"m={root / 'pre'}", "--out-format", "peft", "--out", str(tmp_path / "bad")]) != 0
    assert "is a full model" in capsys.readouterr().err
    assert main(["-q", "merge", "--pretrained", str(root / "pre"), "--finetuned", f"a={root / 'a'}",
                 "--method", "cat", "--out", str(tmp_path / "bad")]) != 0
    assert "add --out-format peft" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_json_and_dry_run(family, tmp_path, capsys):
    root, base = family
    args = ["merge", "--pretrained", str(root / "pre"), "--finetuned", f"a={root / 'a'}", "--finetuned",
            f"b={root / 'b'}", "--out-format", "peft", "--json"]
    assert main([*args, "--method", "cat", "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and not (tmp_path / "dry").exists()
    rows = {r["layout"]: r for r in plan["modules"]}
    # a: query, value, word_embeddings (r 4); b: query (r 2) and the 4 `dense` modules (attention output,
    # intermediate, output, pooler; r 3 by rank_pattern): cat ranks add up
    assert rows["embedding"]["modules"] == 1 and rows["embedding"]["output_rank"] == "4"
    assert rows["linear"]["modules"] == 1 + 1 + 4 and rows["linear"]["output_rank"] == "3,4,6"
    emb = 40 + 16  # vocab + hidden, rank 4, float32
    lin = 4 * (16 + 16) + 6 * (16 + 16) + 3 * ((16 + 16) + (24 + 16) + (16 + 24) + (16 + 16))
    assert plan["write_bytes"] == 4 * (4 * emb + lin)
    assert main([*args, "--method", "svd", "--rank", "2", "--out", str(tmp_path / "o")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out"] == str(tmp_path / "o") and set(out["ranks"].values()) == {2} and 0 < out["rel_error"] < 1


def test_tvbasis_method_on_each_modules_delta(family, tmp_path):
    # tvbasis's own TIES (weighted sign election, divided by the agreeing weights, ceil(density·n) kept) on the
    # adapters' ΔW of each module, then the rank cut (here the full rank: no cut)
    root, base = family
    names, w = ["a", "b", "c"], [1.0, -0.5, 2.0]
    res = merge_adapters(root / "pre", {n: root / n for n in names}, tmp_path / "out", "ties", dict(zip(names, w)),
                         rank=40, params={"density": 0.4})
    assert res.rel_error < 1e-6
    full = [deltas_of(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / n), adapter_name=n), n)
            for n in names]
    got = ours(root, base, tmp_path / "out")
    assert set(got) == set().union(*full)
    for k in got:
        X = torch.stack([d.get(k, torch.zeros_like(got[k])) for d in full])
        kept = torch.zeros_like(X)
        for t in range(3):
            flat = X[t].reshape(-1)
            n_keep = math.ceil(0.4 * flat.numel())
            idx = torch.argsort(flat.abs(), descending=True, stable=True)[:n_keep]
            kept[t].view(-1)[idx] = flat[idx]
        wx = kept * torch.tensor(w, dtype=torch.float64).view(3, 1, 1)
        sign = torch.where(wx.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(wx) == sign)
        den = (torch.tensor(w, dtype=torch.float64).view(3, 1, 1) * agree).sum(0)
        ref = (wx * agree).sum(0) / torch.where(den == 0, torch.ones_like(den), den)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=2e-5, msg=k)
    rec = json.loads((tmp_path / "out" / "tvbasis_merge.json").read_text())
    assert rec["parameters"]["density"] == 0.4 and rec["rank"] == 40
