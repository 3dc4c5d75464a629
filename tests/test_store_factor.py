"""Factor-space stores of LoRA adapters (``tvbasis.store.lora_factor_space``) against dense references
written here: every ΔW = s·B·A expanded in float64 from the adapter files (or PEFT's own merge), its Gram,
Σ α_t ΔW_t, errors measured densely; PEFT itself loads the exported adapters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

from tests.storefiles import read_manifest  # noqa: E402
from tvbasis.cli import main  # noqa: E402
from tvbasis.errors import ConfigError, StoreError  # noqa: E402
from tvbasis.io import LoraCheckpoint, open_checkpoint  # noqa: E402
from tvbasis.store import BasisStore, add_task, build_store  # noqa: E402
from tvbasis.store.format import MANIFEST, manifest_digest  # noqa: E402
from tvbasis.store.lora_factor_space import build_lora_store, export_peft  # noqa: E402

f64 = torch.float64
PFX = "base_model.model."
LAYER = "bert.encoder.layer.{}.attention.self.{}"


# ------------------------------------------------------------------------------------------------ the family
def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _peft_adapter(base: torch.nn.Module, out: Path, seed: int, **kw: object) -> dict[str, torch.Tensor]:
    """A PEFT adapter with random trained values; returns PEFT's merged state (the dense reference)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _write_adapter(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> None:
    """An adapter in PEFT's layout from given B (out × r), A (r × in) per module (ΔW = alpha/r · B·A)."""
    out.mkdir(parents=True)
    tensors = {}
    for module, (B, A) in factors.items():
        tensors[f"{PFX}{module}.lora_A.weight"] = A.to(torch.float32).contiguous()
        tensors[f"{PFX}{module}.lora_B.weight"] = B.to(torch.float32).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in factors})}))


def _expand(out: Path, r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Dense ΔW of an adapter written by ``_write_adapter``, from its file, in float64."""
    t = load_file(str(out / "adapter_model.safetensors"))
    return {k[len(PFX):].replace("lora_A.weight", "weight"): alpha / r * t[k.replace("lora_A", "lora_B")].to(f64)
            @ t[k].to(f64) for k in t if k.endswith("lora_A.weight")}


def _shared_family(root: Path, T: int, k: int, seed: int, offset: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """T adapters ΔW_t = U diag(d_t) Vᵀ per module with orthonormal U, V (32 × k) shared by all: a joint store of
    k (full or diagonal cores) holds them exactly."""
    g = torch.Generator().manual_seed(seed)
    modules = [LAYER.format(i, m) for i in range(2) for m in ("query", "value")]
    bases = {m: (torch.linalg.qr(torch.randn(32, k, generator=g, dtype=f64))[0],
                 torch.linalg.qr(torch.randn(32, k, generator=g, dtype=f64))[0]) for m in modules}
    refs = {}
    for t in range(T):
        d = root / f"s{t + offset}"
        fac = {m: ((U * (0.1 * torch.randn(k, generator=g, dtype=f64) + 0.2)).float(), V.T.float())
               for m, (U, V) in bases.items()}
        _write_adapter(d, fac, k, k)
        refs[f"s{t + offset}"] = _expand(d, k, k)
    return refs


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("factor")
    base = _bert()
    base.save_pretrained(str(root / "pre"))
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    variants = {
        "a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["query", "key", "word_embeddings"], modules_to_save=["classifier"],
                  bias="lora_only"),
        "c": dict(r=4, lora_alpha=16, target_modules=["query", "value"], rank_pattern={"value": 2}),
    }
    refs = {}
    for seed, (n, kw) in enumerate(variants.items()):
        merged = _peft_adapter(base, root / n, seed, **kw)
        refs[n] = {k: merged[k].to(f64) - pre[k].to(f64) for k in pre if not torch.equal(merged[k], pre[k])}
    shared = _shared_family(root, 4, 3, seed=5)
    return {"root": root, "base": base, "pre": pre, "refs": refs, "shared": shared}


def _ads(fam, names) -> dict[str, Path]:
    return {n: fam["root"] / n for n in names}


def _dense(store: BasisStore, tv) -> dict[str, torch.Tensor]:
    return {n: tv.get(n).to(f64) for n in store.specs}


def _close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    for n, x in got.items():
        torch.testing.assert_close(x, ref.get(n, torch.zeros_like(x)).reshape(x.shape), rtol=0, atol=atol, msg=n)
    assert set(ref) <= set(got)


def _gram_dense(refs: list[dict[str, torch.Tensor]]) -> np.ndarray:
    names = sorted(set().union(*refs))
    return np.array([[sum(float((a[n] * b[n]).sum()) for n in names if n in a and n in b) for b in refs]
                     for a in refs])


def _rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[n] - ref.get(n, torch.zeros_like(got[n])).reshape(got[n].shape)).square().sum())
              for n in got)
    return (num / sum(float(v.square().sum()) for v in ref.values())) ** 0.5


@pytest.fixture()
def no_expansion(monkeypatch):
    """Reading a low-rank product of an adapter as a dense tensor fails: builds must stay in factor space."""
    orig = LoraCheckpoint._value

    def guard(self, name, rows):
        if name in self._deltas and name not in self._replaced:
            raise AssertionError(f"ΔW of {name} expanded")
        return orig(self, name, rows)
    monkeypatch.setattr(LoraCheckpoint, "_value", guard)


# ------------------------------------------------------------------------------------------------ lora-factors
def test_factor_store_is_exact_and_combines(fam, tmp_path, no_expansion, monkeypatch):
    refs = fam["refs"]
    st = build_lora_store(fam["root"] / "pre", _ads(fam, "abc"), tmp_path / "s")
    assert st.method == "lora-factors" and st.M == 0
    assert set(st.specs) == set().union(*refs.values())  # the tensors the adapters change, nothing else
    for t in "abc":
        _close(_dense(st, st.reconstruct(t)), refs[t])
        assert st.rel_errors[t] < 1e-7
    codecs = {e.encoded["codec"] for e in st.manifest.coded.entries.values()}
    assert {"none", "float32"} <= codecs and any(c.startswith("lowrank:rank=2,") for c in codecs)
    assert st.manifest.coded.residual_codec.startswith("lowrank:rank=4,")
    alpha = {"a": 1.0, "b": -0.5, "c": 2.0}
    want = {n: sum(a * refs[t].get(n, torch.zeros(st.specs[n].shape, dtype=f64)) for t, a in alpha.items())
            for n in st.specs}
    _close(_dense(st, st.combine(alpha)), want)
    np.testing.assert_allclose(st.gram, _gram_dense([refs[t] for t in "abc"]), rtol=1e-6, atol=1e-9)
    # stored bytes: the factors as they are (float32, like the adapters), no expanded ΔW
    adapters = sum((fam["root"] / t / "adapter_model.safetensors").stat().st_size for t in "abc")
    assert st.manifest.coded.nbytes() < adapters
    # the pretrained checksum is a dense build's, so edit/apply check the model as for every store
    monkeypatch.undo()  # the dense build expands ΔW
    dense = build_store(fam["root"] / "pre", _ads(fam, "abc"), "pca", 1, tmp_path / "pca")
    assert st.manifest.pretrained.to_json() == dense.manifest.pretrained.to_json()
    out = st.combine({"a": 1.0}).apply_to(fam["root"] / "pre", 1.0, tmp_path / "edited")
    got = open_checkpoint(out).get(LAYER.format(0, "query") + ".weight").to(f64)
    ref = fam["pre"][LAYER.format(0, "query") + ".weight"].to(f64) + refs["a"][LAYER.format(0, "query") + ".weight"]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_factor_codec_errors_are_exact(fam, tmp_path):
    refs = fam["refs"]
    st = build_lora_store(fam["root"] / "pre", _ads(fam, "ac"), tmp_path / "s", factor_codec="int8")
    assert st.manifest.coded.residual_codec.endswith("+int8:group=128,scheme=symmetric")
    assert st.manifest.options == {"factor_codec": "int8:group=128,scheme=symmetric"}
    for t in "ac":
        measured = _rel(_dense(st, st.reconstruct(t)), refs[t])
        assert 1e-4 < measured < 0.05
        assert st.rel_errors[t] == pytest.approx(measured, rel=1e-4)
    with pytest.raises(ConfigError, match="factor_codec applies to method factors"):
        build_lora_store(fam["root"] / "pre", _ads(fam, "ac"), tmp_path / "j", method="joint", k=2,
                         factor_codec="int8")


# ------------------------------------------------------------------------------------------------ lora-joint
@pytest.mark.parametrize("cores", ["full", "diagonal"])
def test_joint_store_exact_when_adapters_share_their_subspace(fam, tmp_path, cores, no_expansion):
    refs = fam["shared"]
    names = list(refs)
    st = build_lora_store(fam["root"] / "pre", _ads(fam, names), tmp_path / "j", method="joint", k=3, cores=cores)
    assert st.method == "lora-joint" and st.joint and st.manifest.coded.mode == "joint"
    mf = st.manifest
    assert {k for k in mf.coded.entries if k.startswith("shared/")} == {f"shared/0/{n}" for n in st.specs}
    assert all(t.cluster == 0 for t in mf.tasks)
    core = mf.coded.files[mf.coded.entries[f"residual/s0/{next(iter(st.specs))}"].file]
    assert [t.shape for t in core.tensors if t.key.startswith("residual/s0/")][0] == ((3, 3) if cores == "full"
                                                                                      else (3,))
    for t in names:
        _close(_dense(st, st.reconstruct(t)), refs[t], atol=1e-6)
        assert st.rel_errors[t] < 1e-5
    alpha = {"s0": 1.0, "s1": -2.0, "s3": 0.5}
    want = {n: sum(a * refs[t][n] for t, a in alpha.items()) for n in st.specs}
    _close(_dense(st, st.combine(alpha)), want, atol=1e-5)
    np.testing.assert_allclose(st.gram, _gram_dense([refs[t] for t in names]), rtol=1e-6)
    assert st.manifest.coded.nbytes() < sum((fam["root"] / t / "adapter_model.safetensors").stat().st_size
                                            for t in names)


def test_joint_clusters_and_errors_equal_measured(fam, tmp_path):
    # two groups of adapters in different subspaces: two clusters, one shared basis each, exact
    other = _shared_family(fam["root"] / "other", 2, 3, seed=9, offset=10)
    refs = {**fam["shared"], **other}
    ads = {**_ads(fam, fam["shared"]), **{n: fam["root"] / "other" / n for n in other}}
    st = build_lora_store(fam["root"] / "pre", ads, tmp_path / "j", method="joint", k=3, clusters=2,
                          affinity="subspace")
    labels = {t.name: t.cluster for t in st.manifest.tasks}
    assert len(set(labels.values())) == 2 and labels["s10"] == labels["s11"] != labels["s0"]
    assert {k.split("/")[1] for k in st.manifest.coded.entries if k.startswith("shared/")} == {"0", "1"}
    for t in refs:
        _close(_dense(st, st.reconstruct(t)), refs[t], atol=1e-6)
    # random adapters do not share a subspace: the stored errors are the measured ones
    lossy = build_lora_store(fam["root"] / "pre", _ads(fam, "ac"), tmp_path / "l", method="joint", k=2)
    for t in "ac":
        measured = _rel(_dense(lossy, lossy.reconstruct(t)), fam["refs"][t])
        assert measured > 0.05
        assert lossy.rel_errors[t] == pytest.approx(measured, rel=1e-5)
    both = _dense(lossy, lossy.combine({"a": 2.0, "c": -1.0}))
    ra, rc = _dense(lossy, lossy.reconstruct("a")), _dense(lossy, lossy.reconstruct("c"))
    _close(both, {n: 2 * ra[n] - rc[n] for n in ra}, atol=1e-6)


# ------------------------------------------------------------------------------------------------ add-task
def test_add_task(fam, tmp_path, no_expansion):
    refs, pre = fam["refs"], fam["root"] / "pre"
    st = build_lora_store(pre, _ads(fam, "ab"), tmp_path / "f")
    st2 = add_task(st, "c", fam["root"] / "c", pre)
    assert st2.task_names == ["a", "b", "c"] and st2.rel_errors["c"] < 1e-7
    _close(_dense(st2, st2.reconstruct("c")), refs["c"])
    _close(_dense(st2, st2.reconstruct("a")), refs["a"])
    np.testing.assert_allclose(st2.gram, _gram_dense([refs[t] for t in "abc"]), rtol=1e-6, atol=1e-9)
    assert "c" not in st2.manifest.gram_estimated_rows  # every old task stored exactly: the Gram row is exact
    assert st2.manifest.tasks[-1].added
    # joint: a new adapter in the shared subspace projects exactly; one outside it has its measured error
    shared = fam["shared"]
    j = build_lora_store(pre, _ads(fam, ["s0", "s1", "s2"]), tmp_path / "j", method="joint", k=3)
    j2 = add_task(j, "s3", fam["root"] / "s3", pre)
    assert j2.rel_errors["s3"] < 1e-5 and j2.manifest.tasks[-1].cluster == 0
    assert j2.manifest.coded.entries["residual/s3/" + LAYER.format(0, "query") + ".weight"].encoded["codec"] \
        == "joint-core"
    _close(_dense(j2, j2.reconstruct("s3")), shared["s3"], atol=1e-6)
    j3 = add_task(j2, "a", fam["root"] / "a", pre)
    measured = _rel(_dense(j3, j3.reconstruct("a")), refs["a"])
    assert 0.05 < measured and j3.rel_errors["a"] == pytest.approx(measured, rel=1e-5)
    _close(_dense(j3, j3.combine({"s3": 1.0, "s0": -1.0})),
           {n: shared["s3"][n] - shared["s0"][n] for n in j3.specs}, atol=1e-5)
    assert "a" not in j3.manifest.gram_estimated_rows  # s-tasks are stored exactly up to float32 rounding
    np.testing.assert_allclose(j3.gram[-1, :-1], [float(sum((refs["a"][n] * shared[t][n]).sum() for n in shared[t]))
                                                  for t in ["s0", "s1", "s2", "s3"]], rtol=1e-5, atol=1e-9)
    j4 = add_task(j3, "c", fam["root"] / "c", pre)
    assert "c" in j4.manifest.gram_estimated_rows  # ⟨c, ã⟩ from a's lossy projection
    with pytest.raises(StoreError, match="does not cover"):  # b adapts tensors the joint store does not hold
        add_task(j3, "b", fam["root"] / "b", pre)


# ------------------------------------------------------------------------------------------------ PEFT export
def _peft_merged(fam, adapter_dir: Path) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(fam["base"]), str(adapter_dir))
    return {k: v.detach().to(f64) for k, v in model.merge_and_unload().state_dict().items()}


def test_peft_export_round_trip(fam, tmp_path, capsys):
    pre_p, pre, refs = fam["root"] / "pre", fam["pre"], fam["refs"]
    st = build_lora_store(pre_p, _ads(fam, "abc"), tmp_path / "s")
    for t in "abc":  # b: an embedding LoRA, LoRA biases and modules_to_save classifier
        out = export_peft(st, t, tmp_path / f"peft-{t}", pre_p)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["lora_alpha"] == cfg["r"] and set(cfg["alpha_pattern"].values()) <= {2}
        merged = _peft_merged(fam, out)
        for k, v in pre.items():
            want = v.to(f64) + refs[t].get(k, torch.zeros_like(v, dtype=f64))
            torch.testing.assert_close(merged[k], want, rtol=0, atol=2e-6, msg=k)
        ours = LoraCheckpoint(out, open_checkpoint(pre_p))  # tvbasis's own reader agrees
        for k in refs[t]:
            torch.testing.assert_close(ours.get(k).to(f64) - pre[k].to(f64), refs[t][k], rtol=0, atol=2e-6)
    with pytest.raises(ConfigError, match="pass the pretrained model"):
        export_peft(st, "b", tmp_path / "nope")
    # a joint store: U Σ_t as lora_B, Vᵀ as lora_A (rank k)
    j = build_lora_store(pre_p, _ads(fam, fam["shared"]), tmp_path / "j", method="joint", k=3)
    assert main(["-q", "reconstruct", str(j.root), "s1", "--peft-dir", str(tmp_path / "peft-s1")]) == 0
    merged = _peft_merged(fam, tmp_path / "peft-s1")
    for k, d in fam["shared"]["s1"].items():
        torch.testing.assert_close(merged[k] - pre[k].to(f64), d, rtol=0, atol=2e-6)
    dense = build_store(pre_p, _ads(fam, "ab"), "pca", 1, tmp_path / "pca")
    with pytest.raises(ConfigError, match="low-rank entries"):
        export_peft(dense, "a", tmp_path / "x")


# ------------------------------------------------------------------------------------------------ integrity, CLI
def test_tampered_shared_entry_is_refused(fam, tmp_path):
    j = build_lora_store(fam["root"] / "pre", _ads(fam, fam["shared"]), tmp_path / "j", method="joint", k=3)
    mf = j.manifest.coded
    key = "shared/0/" + LAYER.format(1, "value") + ".weight"
    fname = mf.entries[key].file
    # the data: flip bytes inside U
    path = j.root / fname
    raw = bytearray(path.read_bytes())
    pos = 8 + int.from_bytes(raw[:8], "little")  # safetensors: header length, header, then the tensors in order
    for t in mf.files[fname].tensors:
        if t.key == f"{key}/u":
            break
        pos += t.spec.nbytes
    raw[pos:pos + 4] = b"\x01\x02\x03\x04"
    path.write_bytes(bytes(raw))
    st = BasisStore.open(j.root)
    with pytest.raises(StoreError, match="corrupt"):
        st.reconstruct("s0").get(LAYER.format(1, "value") + ".weight")
    assert any("corrupt" in p for p in st.verify())
    # the manifest: a shared entry removed (digest recomputed) or a core over a cluster without bases
    for edit in ("drop", "cluster"):
        d = read_manifest(j.root)
        if edit == "drop":
            d["coded"]["entries"].pop(key)
        else:
            d["tasks"][0]["cluster"] = 1
            d["options"]["clusters"] = 2
        d["manifest_sha256"] = manifest_digest(d)
        bad = tmp_path / f"bad-{edit}"
        bad.mkdir()
        for f in j.root.iterdir():
            if f.name != MANIFEST and f.is_file():
                (bad / f.name).write_bytes(f.read_bytes())
        (bad / MANIFEST).write_text(json.dumps(d))
        with pytest.raises(StoreError, match="coded"):
            BasisStore.open(bad)


def test_cli_build(fam, tmp_path, capsys):
    pre = str(fam["root"] / "pre")
    args = ["--finetuned", f"a={fam['root'] / 'a'}", "--finetuned", f"c={fam['root'] / 'c'}"]
    assert main(["-q", "build", "--method", "lora-factors", "--pretrained", pre, *args, "--factor-codec", "int8",
                 "--out", str(tmp_path / "f")]) == 0
    assert BasisStore.open(tmp_path / "f").manifest.options["factor_codec"].startswith("int8")
    assert main(["-q", "build", "--method", "lora-joint", "--pretrained", pre, *args, "-k", "2", "--cores",
                 "diagonal", "--out", str(tmp_path / "j")]) == 0
    assert BasisStore.open(tmp_path / "j").manifest.options["cores"] == "diagonal"
    full = tmp_path / "full"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=48, vocab_size=64)).save_pretrained(str(full))
    capsys.readouterr()
    cases = [(["--method", "lora-factors", "--finetuned", f"x={full}"], str(full)),
             (["--method", "lora-joint", *args], "needs k"),
             (["--method", "lora-factors", *args, "-M", "2"], "-M does not apply"),
             (["--method", "pca", *args, "-k", "2"], "-k applies to --method lora")]
    for extra, what in cases:
        rc = main(["-q", "build", "--pretrained", pre, *extra, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and what in err, err
        assert not (tmp_path / "bad").exists()
