"""The frontier's LoRA rows (``tvbasis.bench.frontier_lora``) on tiny adapters in PEFT's layout written here: every
row's bytes against counts computed here, the adapters' ΔW and the lora-factors row's vectors against s·B·A
expanded here in float64, the rows assembled through a stand-in evaluator (normalized by each adapter's own
accuracy), the table and plot, and the CLI flags. The real-model run is ``tvbasis bench --frontier --lora``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from tvbasis.bench.bench import BenchConfig  # noqa: E402
from tvbasis.bench.frontier_lora import (  # noqa: E402
    JOINT_DIAG_K,
    JOINT_KS,
    Adapters,
    LoraContext,
    adapter_deltas,
    compress_lora,
    lora_configs,
    lora_markdown,
    lora_settings,
    make_lora_plot,
    measure_lora,
)
from tvbasis.errors import ConfigError  # noqa: E402
from tvbasis.eval.metrics import AdditionResult, NegationResult  # noqa: E402

f64 = torch.float64
PFX = "base_model.model."
R, ALPHA, T = 4, 8.0, 3
#: adapted modules -> (out m, in n) of the tiny BERT below
MODULES = {f"bert.encoder.layer.{i}.{m}": shape for i in range(2)
           for m, shape in (("attention.self.query", (32, 32)), ("attention.self.value", (32, 32)),
                            ("intermediate.dense", (48, 32)))}


def _write_adapter(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A LoRA adapter in PEFT's layout: B (m × r), A (r × n) per module, ΔW = ALPHA/R · B·A."""
    out.mkdir(parents=True)
    tensors = {}
    for module, (B, A) in factors.items():
        tensors[f"{PFX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PFX}{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["query", "value", "intermediate.dense"]}))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier-lora")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=64, max_position_embeddings=32, num_labels=3)
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(str(root / "pre"))
    g = torch.Generator().manual_seed(1)
    dirs, refs = {}, {}
    for t in range(T):
        fac = {m: (0.1 * torch.randn(s[0], R, generator=g), torch.randn(R, s[1], generator=g))
               for m, s in MODULES.items()}
        dirs[f"task{t}"] = root / f"ad{t}"
        _write_adapter(dirs[f"task{t}"], fac)
        refs[f"task{t}"] = {m + ".weight": ALPHA / R * B.to(f64) @ A.to(f64) for m, (B, A) in fac.items()}
    return root, root / "pre", dirs, refs


def _ctx(fam, keep: bool = False) -> LoraContext:
    root, pre, dirs, _ = fam
    tvs, per = adapter_deltas(pre, dirs)
    return LoraContext(list(dirs), tvs, pre, {n: str(d) for n, d in dirs.items()}, root / "stores", keep,
                       lambda v, t: 0.0, adapter_bytes=sum(per.values()))


def _close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float) -> None:
    assert set(got) == set(ref)
    for k, x in ref.items():
        torch.testing.assert_close(got[k].to(f64), x, rtol=0, atol=atol, msg=k)


def _rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[k].to(f64) - x).pow(2).sum()) for k, x in ref.items())
    return math.sqrt(num / sum(float(x.pow(2).sum()) for x in ref.values()))


def test_adapter_bytes_and_deltas(fam) -> None:
    _, pre, dirs, refs = fam
    tvs, per = adapter_deltas(pre, dirs)
    want = sum(R * (m + n) * 4 for m, n in MODULES.values())
    assert per == dict.fromkeys(dirs, want)
    for t in dirs:  # only the adapted tensors, each = s·B·A
        _close(tvs[t], refs[t], 1e-6)


def test_bytes_of_every_row(fam) -> None:
    """Each row's stored bytes against closed forms, and what each row gives back."""
    ctx = _ctx(fam)
    refs = fam[3]
    sum_r = T * R
    D = sum(m * n for m, n in MODULES.values())
    adapters = T * sum(R * (m + n) * 4 for m, n in MODULES.values())
    int8 = T * sum(R * m + 2 * math.ceil(R * m / 128) + R * n + 2 * math.ceil(R * n / 128)
                   for m, n in MODULES.values())

    def joint_full(k: int) -> int:
        return sum(4 * (m * min(k, m, sum_r) + n * min(k, n, sum_r) + T * min(k, m, sum_r) * min(k, n, sum_r))
                   for m, n in MODULES.values())

    def joint_diag(k: int) -> int:
        kk = min(k, sum_r)
        return sum(4 * (kk * (m + n) + T * kk) for m, n in MODULES.values())

    M = T // 2
    want = {"adapters as they are": adapters, "lora-factors fp32": adapters, "lora-factors int8": int8,
            **{f"lora-joint full k={k}": joint_full(k) for k in JOINT_KS},
            f"lora-joint diag k={JOINT_DIAG_K}": joint_diag(JOINT_DIAG_K),
            f"pca M={M} (dense ΔW)": 4 * (M + 1) * D + 4 * T * (M + 1),
            f"pca M=0 + res lowrank:rank={R}": T * sum(4 * R * (m + n) for m, n in MODULES.values())}
    configs = lora_configs(T, R)
    assert [c.label for c in configs] == list(want)
    got = {}
    for c in configs:
        got[c.label] = comp = compress_lora(c, ctx)
        assert comp.nbytes == want[c.label], c.label
    full = got["adapters as they are"]
    assert full.exact and full.vectors == ctx.tvs  # the adapters' own ΔW, stored as they are
    for t in ctx.tasks:
        _close(got["lora-factors fp32"].vectors[t], refs[t], 1e-6)  # the expanded s·B·A, from the store
        assert _rel(got["lora-factors int8"].vectors[t], refs[t]) < 0.02
        assert _rel(got[f"pca M=0 + res lowrank:rank={R}"].vectors[t], refs[t]) < 1e-5  # rank-R SVD of a rank-R ΔW
        for k in JOINT_KS[1:]:  # k ≥ Σr: the shared bases span every adapter (joint_compress caps k at Σr)
            assert _rel(got[f"lora-joint full k={k}"].vectors[t], refs[t]) < 1e-4
        assert _rel(got[f"lora-joint diag k={JOINT_DIAG_K}"].vectors[t], refs[t]) < 0.5
    assert got["lora-factors fp32"].extra["store"]["method"] == "factors"
    assert got["lora-joint full k=8"].extra["store"] == {"builder": "build_lora_store", "method": "joint", "k": 8,
                                                         "cores": "full"}
    assert not (ctx.stores / "frontier-lora-factors-fp32").exists()  # removed once read back


class StandIn:
    """Accuracy of θ₀ + λ·δ on task t: base_t − ‖λδ − ΔW_t‖ / (2‖ΔW_t‖) (ΔW_t the adapter's own)."""

    def __init__(self, refs):
        self.refs = refs
        self.base = {t: 0.6 + 0.1 * i for i, t in enumerate(refs)}

    def acc(self, delta, scale, t) -> float:
        v = self.refs[t]
        num = sum(float((scale * delta.get(k, torch.zeros(())).to(f64) - x).pow(2).sum()) for k, x in v.items())
        return self.base[t] - math.sqrt(num / sum(float(x.pow(2).sum()) for x in v.values())) / 2

    def with_delta(self, delta, scale, split, tasks):
        return {t: self.acc(delta, scale, t) for t in tasks}

    def search_addition(self, delta, grid, finetuned_dev, finetuned_test, search):
        lam = max(grid)
        test = {t: self.acc(delta, lam, t) for t in self.refs}
        return AdditionResult(lam, test, test, {t: test[t] / finetuned_test[t] for t in test})

    def search_negation(self, delta, target, control, grid, early_stop):
        a = self.acc(delta, -1.0, target)
        return NegationResult(target, control, 1.0, a, 0.9, a, 0.9, 0.5, 0.9, 0.9, True)


def test_rows_normalized_by_each_adapter(fam, tmp_path: Path) -> None:
    root, pre, dirs, refs = fam
    ev = StandIn(refs)
    names = list(dirs)
    cfg = BenchConfig(tasks=("banking", "clinc"), grid=(0.5, 1.0), pairs=((names[0], names[1]),), progress=False)
    ads = Adapters(dict(dirs), dict.fromkeys(dirs, True), lora_settings(R), 0.0)
    lora = measure_lora(ads, pre, names, ev, cfg, tmp_path / "stores")
    own = {t: ev.base[t] for t in names}  # the adapters' own ΔW at λ = 1: the stand-in's best
    assert lora["adapters"] == pytest.approx(own, abs=1e-6)
    adapters_bytes = T * sum(R * (m + n) * 4 for m, n in MODULES.values())
    assert lora["adapter_bytes"] == adapters_bytes
    rows = {r["label"]: r for r in lora["rows"]}
    a = rows["adapters as they are"]
    assert a["per_task"] == dict.fromkeys(names, 1.0) and a["per_task_accuracy"] == lora["adapters"]
    assert a["rel_errors"] == dict.fromkeys(names, 0.0) and a["bytes_stored"] == adapters_bytes
    assert a["compression"] == 1.0 and a["relative_size"] == 1.0 and a["family"] == "LoRA"
    # addition normalized by the adapters' own accuracies, not by a full fine-tune's
    total = {k: sum(ev.refs[t][k] for t in names).float() for k in ev.refs[names[0]]}
    want = sum(ev.acc(total, 1.0, t) / own[t] for t in names) / T
    assert a["addition"]["mean_normalized_test"] == pytest.approx(want, rel=1e-6)
    f = rows["lora-factors fp32"]
    assert f["per_task_min"] == pytest.approx(1.0, abs=1e-5) and f["bytes_stored"] == adapters_bytes
    assert max(f["rel_errors"].values()) < 1e-6
    j = rows["lora-joint full k=8"]
    for t in names:  # per-task = stand-in accuracy of the reconstruction / the adapter's own
        assert j["per_task"][t] == pytest.approx(j["per_task_accuracy"][t] / own[t])
        assert j["per_task_accuracy"][t] == pytest.approx(own[t] - j["rel_errors"][t] / 2, abs=1e-6)
    assert j["relative_size"] == pytest.approx(j["bytes_stored"] / adapters_bytes)
    assert "lora-factors fp32" in lora["goal"] and "adapters as they are" not in lora["goal"]
    assert len(a["negation"]) == 1
    # the table and the plot
    result = {"lora": lora, "zero_shot": {"test": {t: 0.3 for t in names}}, "finetuned": {"test": {t: 0.9 for t in names}}}
    md = lora_markdown(result)
    assert "each adapter's own test accuracy" in md and "| adapters as they are |" in md
    assert "| lora-factors fp32 | " in md and f"| {names[0]} | 30.0 | 90.0 | 60.0 | 66.7 |" in md
    p = make_lora_plot(result, tmp_path)
    assert p.name == "frontier_lora.png" and p.stat().st_size > 5000


def test_cli_lora_flags() -> None:
    from tvbasis.cli.bench import register

    p = argparse.ArgumentParser(prog="tvbasis")
    register(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["bench", "--frontier", "--lora", "--lora-rank", "4"])
    assert a.frontier and a.lora and a.lora_rank == 4
    assert lora_settings(4).r == 4 and lora_settings(4).alpha == 8.0 and lora_settings().r == 8
    for argv, match in ((["bench", "--lora"], "--lora adds LoRA rows"),
                        (["bench", "--full", "--lora"], "with --frontier"),
                        (["bench", "--frontier", "--lora-rank", "4"], "--lora-rank"),
                        (["bench", "--frontier", "--lora", "--lora-rank", "0"], ">= 1")):
        a = p.parse_args(argv)
        with pytest.raises(ConfigError, match=match):  # refused before any fine-tuning or loading
            a.fn(a)
