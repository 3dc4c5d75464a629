"""The paper's basis folders both ways (import-tvb / export-tvb), and mergekit configs (merge --config), end to end
on tiny models against dense references written here."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tinymodels import dense_vector, ft_args, make_family
from tvbasis.cli import main
from tvbasis.errors import CheckpointError, ConfigError, StoreError
from tvbasis.interop import export_tvb, import_tvb, read_tvb_folder
from tvbasis.io import open_checkpoint
from tvbasis.store import BasisStore, build_store

M = 2


class NotATensor:  # a pickled object that weights_only=True must refuse
    pass


# ------------------------------------------------------------------------------------------------ helpers
def vectors(fam) -> tuple[list[str], list[str], list[dict[str, torch.Tensor]]]:
    """Task names, the float tensor names (the paper's float_keys) and the float32 task vectors."""
    _, fts, pre, sds = fam
    tasks = list(fts)
    vs = [{k: v.float() for k, v in dense_vector(pre, sd).items()} for sd in sds]
    return tasks, list(vs[0]), vs


def write_ae_folder(root: Path, fam, seed: int = 0) -> dict:
    """A folder as the authors' AutoencoderBasisMethod.save_training_artifacts writes it (s_m = Σ_t B[t,m]·v_t)."""
    tasks, keys, vs = vectors(fam)
    T = len(tasks)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T, M, generator=g)
    tau = 5.0
    B = torch.softmax(A / tau, dim=0)
    W = torch.randn(M, T, generator=g)
    basis = [{k: sum(B[t, m] * vs[t][k] for t in range(T)) for k in keys} for m in range(M)]
    meta = {"model": "tiny", "finetuning_mode": "standard", "datasets": tasks, "M": M, "steps": 10, "lr": 0.01,
            "tau_init": tau, "anneal_every": None, "anneal_factor": None, "weight_decay": 1e-6, "grad_clip": None,
            "batch_cols": None, "device": "cpu", "seed": seed, "softmax_w": False, "encoder": "softmax",
            "w_activation": "linear", "gram_dtype": "float32", "notes": None, "task_scenario": None,
            "timestamp": "2025-01-01 00:00:00", "method": "AutoencoderBasisMethod"}
    root.mkdir(parents=True)
    torch.save({"A": A, "W": W, "B": B, "metadata": meta}, root / "AWB.pt")
    (root / "method_info.json").write_text(json.dumps(meta, indent=2))
    torch.save({"basis_vectors": basis, "num_basis": M, "method": "AutoencoderBasisMethod"}, root / "basis_vectors.pt")
    return {"tasks": tasks, "keys": keys, "vs": vs, "W": W, "B": B, "basis": basis}


def write_pca_folder(root: Path, fam) -> dict:
    """A folder as the authors' PCABasisMethod writes it: variance-scaled U·S bases, coefficients = Vh, the mean."""
    tasks, keys, vs = vectors(fam)
    shapes = {k: vs[0][k].shape for k in keys}
    V = torch.stack([torch.cat([v[k].flatten() for k in keys]) for v in vs], 1)  # (D, T)
    mean = V.mean(1)
    U, S, Vh = torch.linalg.svd(V - mean[:, None], full_matrices=False)

    def unflat(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for k in keys:
            n = shapes[k].numel()
            out[k] = x[at:at + n].reshape(shapes[k]).clone()
            at += n
        return out

    basis = [unflat(U[:, m] * S[m]) for m in range(M)]
    root.mkdir(parents=True)
    torch.save({"coefficients": Vh[:M].clone(), "mean_vector": mean, "singular_values": S[:M].clone(), "M_actual": M,
                "total_dim": V.shape[0], "keys_order": keys, "param_shapes": shapes, "dataset_names": tasks,
                "storage_info": {"compact_size_mb": 0.1, "full_matrix_size_gb": 0.0, "compression_ratio": 1.0}},
               root / "pca_components.pt")
    (root / "method_info.json").write_text(json.dumps({"method": "PCABasisMethod", "M": M, "seed": 0,
                                                       "datasets": tasks, "timestamp": "2025-01-01 00:00:00"}))
    torch.save({"basis_vectors": basis, "num_basis": M, "method": "PCABasisMethod"}, root / "basis_vectors.pt")
    return {"tasks": tasks, "keys": keys, "vs": vs, "W": Vh[:M], "basis": basis, "mean": unflat(mean)}


def paper_recovery(ref: dict, t: int) -> dict[str, torch.Tensor]:
    """The authors' recovery: v̂_t = Σ_m W[m, t]·s_m (+ μ for PCA)."""
    out = {}
    for k in ref["keys"]:
        x = sum(float(ref["W"][m, t]) * ref["basis"][m][k].double() for m in range(M))
        out[k] = x + ref["mean"][k].double() if "mean" in ref else x
    return out


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol * (1 + float(b.double().abs().max())))


# ------------------------------------------------------------------------------------------------ import
def test_import_autoencoder_folder_without_fine_tunes(fam, tmp_path, capsys):
    pre_p, fts, pre, _ = fam
    ref = write_ae_folder(tmp_path / "ae", fam)
    assert main(["-q", "import-tvb", str(tmp_path / "ae"), "--pretrained", str(pre_p),
                 "--out", str(tmp_path / "store")]) == 0
    assert "reconstruction errors are unknown" in capsys.readouterr().out
    store = BasisStore.open(tmp_path / "store")
    assert store.method == "autoencoder" and store.M == M and store.task_names == ref["tasks"]
    assert store.manifest.gram_estimated_rows == ref["tasks"]
    assert not any(t.error_exact for t in store.manifest.tasks)
    for t, name in enumerate(ref["tasks"]):
        rec, want = store.reconstruct(name), paper_recovery(ref, t)
        assert all(close(rec.get(k), want[k]) for k in ref["keys"]), name
    # the paper's addition is the sum of the basis vectors: θ₀ + 0.5·Σ_m s_m
    out = tmp_path / "added"
    assert main(["-q", "edit", str(tmp_path / "store"), "--pretrained", str(pre_p), "--add", "all",
                 "--scaling-coef", "0.5", "--out", str(out)]) == 0
    model = open_checkpoint(out)
    for k in ref["keys"]:
        assert close(model.get(k), pre[k].double() + 0.5 * sum(b[k].double() for b in ref["basis"]))
    assert torch.equal(model.get("embeddings.position_ids"), pre["embeddings.position_ids"])


def test_import_with_fine_tunes_measures_exact_errors(fam, tmp_path):
    pre_p, fts, _, _ = fam
    ref = write_ae_folder(tmp_path / "ae", fam, seed=3)
    store = import_tvb(tmp_path / "ae", pre_p, tmp_path / "store", finetuned=fts)
    assert store.manifest.gram_estimated_rows == [] and all(t.error_exact for t in store.manifest.tasks)
    V = torch.stack([torch.cat([v[k].flatten().double() for k in ref["keys"]]) for v in ref["vs"]], 1)
    assert torch.allclose(torch.as_tensor(store.gram), V.T @ V, rtol=1e-5)
    for t, name in enumerate(ref["tasks"]):
        rec = paper_recovery(ref, t)
        err = torch.cat([(ref["vs"][t][k].double() - rec[k]).flatten() for k in ref["keys"]]).norm()
        assert store.rel_errors[name] == pytest.approx(float(err / V[:, t].norm()), rel=1e-4)
    stats = store.fits["__all__"].stats if "__all__" in store.fits else next(iter(store.fits.values())).stats
    assert stats["loss"] >= stats["lower_bound"] > 0


def test_import_pca_folder_matches_the_papers_recovery_and_tvbasis_pca(fam, tmp_path):
    pre_p, fts, _, _ = fam
    ref = write_pca_folder(tmp_path / "pca", fam)
    store = import_tvb(tmp_path / "pca", pre_p, tmp_path / "store", finetuned=fts)
    own = build_store(pre_p, fts, "pca", M, tmp_path / "own")
    assert store.method == "pca" and store.manifest.files.mean
    for t, name in enumerate(ref["tasks"]):
        want = paper_recovery(ref, t)
        rec, rec_own = store.reconstruct(name), own.reconstruct(name)
        for k in ref["keys"]:
            assert close(rec.get(k), want[k]), (name, k)
            assert close(rec_own.get(k), want[k], 1e-4), (name, k)  # the same rank-M centred subspace
        assert store.rel_errors[name] == pytest.approx(own.rel_errors[name], rel=1e-3, abs=1e-6)


def test_folder_errors_are_clear(fam, tmp_path):
    pre_p, _, _, _ = fam
    with pytest.raises(ConfigError, match="not a directory"):
        read_tvb_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="method_info.json: missing"):
        read_tvb_folder(tmp_path / "empty")

    write_ae_folder(tmp_path / "random", fam)
    info = json.loads((tmp_path / "random" / "method_info.json").read_text())
    (tmp_path / "random" / "method_info.json").write_text(json.dumps({**info, "method": "RandomBasisMethod"}))
    with pytest.raises(ConfigError, match="RandomBasisMethod is not supported"):
        read_tvb_folder(tmp_path / "random")

    write_ae_folder(tmp_path / "pickle", fam)
    torch.save({"basis_vectors": [NotATensor()], "num_basis": 1}, tmp_path / "pickle" / "basis_vectors.pt")
    with pytest.raises(CheckpointError, match="refused to load.*weights_only=True"):
        read_tvb_folder(tmp_path / "pickle")

    write_ae_folder(tmp_path / "shape", fam)
    awb = torch.load(tmp_path / "shape" / "AWB.pt", weights_only=True)
    torch.save({**awb, "W": awb["W"][:, :3]}, tmp_path / "shape" / "AWB.pt")
    with pytest.raises(CheckpointError, match=r"'W' has shape \(2, 3\), expected \(2, 6\)"):
        read_tvb_folder(tmp_path / "shape")

    write_ae_folder(tmp_path / "names", fam)
    data = torch.load(tmp_path / "names" / "basis_vectors.pt", weights_only=True)
    data["basis_vectors"] = [{"model." + k: v for k, v in b.items()} for b in data["basis_vectors"]]
    torch.save(data, tmp_path / "names" / "basis_vectors.pt")
    rc = main(["import-tvb", str(tmp_path / "names"), "--pretrained", str(pre_p), "--out", str(tmp_path / "s")])
    assert rc != 0 and not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("method", ["autoencoder", "pca"])
def test_export_writes_the_papers_layout_and_round_trips(fam, tmp_path, method):
    pre_p, fts, _, _ = fam
    store = build_store(pre_p, fts, method, M, tmp_path / "store", {"steps": 300} if method == "autoencoder" else {})
    assert main(["-q", "export-tvb", str(tmp_path / "store"), "--out", str(tmp_path / "tvb")]) == 0
    folder = tmp_path / "tvb"
    info = json.loads((folder / "method_info.json").read_text())
    assert info["datasets"] == store.task_names and info["M"] == M
    data = torch.load(folder / "basis_vectors.pt", weights_only=True)
    assert data["num_basis"] == M and len(data["basis_vectors"]) == M
    fit = next(iter(store.fits.values()))
    for m, b in enumerate(data["basis_vectors"]):
        assert set(b) == set(store.specs)
        assert all(torch.equal(b[k], store.bases_rows(k)[m]) for k in b)
    if method == "autoencoder":
        assert info["method"] == "AutoencoderBasisMethod"
        awb = torch.load(folder / "AWB.pt", weights_only=True)
        assert torch.allclose(awb["W"].double(), torch.as_tensor(fit.W), atol=1e-6)
        assert torch.allclose(awb["B"].double(), torch.as_tensor(fit.B), atol=1e-6)
        tau = awb["metadata"]["tau_final"]
        assert torch.allclose(torch.softmax(awb["A"] / tau, dim=0), awb["B"], atol=1e-5)  # B = softmax(A/τ)
        assert all(k in awb["metadata"] for k in ("M", "steps", "lr", "tau_init", "seed", "softmax_w"))
        ref = {"keys": list(store.specs), "W": awb["W"], "basis": data["basis_vectors"]}
    else:
        assert info["method"] == "PCABasisMethod"
        pca = torch.load(folder / "pca_components.pt", weights_only=True)
        assert torch.allclose(pca["coefficients"].double(), torch.as_tensor(fit.W), atol=1e-6)
        keys, shapes = pca["keys_order"], pca["param_shapes"]
        mean, at = {}, 0
        for k in keys:
            n = shapes[k].numel()
            mean[k] = pca["mean_vector"][at:at + n].reshape(shapes[k])
            at += n
        assert at == pca["total_dim"]
        norms = [torch.cat([b[k].flatten() for k in keys]).norm() for b in data["basis_vectors"]]
        assert torch.allclose(pca["singular_values"], torch.stack(norms), rtol=1e-5)
        ref = {"keys": keys, "W": pca["coefficients"], "basis": data["basis_vectors"], "mean": mean}
    back = import_tvb(folder, pre_p, tmp_path / "back")
    for t, name in enumerate(store.task_names):
        want = paper_recovery(ref, t)
        for k in ref["keys"]:
            assert close(store.reconstruct(name).get(k), want[k])
            assert close(back.reconstruct(name).get(k), want[k])


def test_export_refuses_what_the_layout_cannot_hold(fam, tmp_path):
    pre_p, fts, _, _ = fam
    build_store(pre_p, fts, "random", M, tmp_path / "random", {"seed": 1})
    with pytest.raises(StoreError, match="random store"):
        export_tvb(tmp_path / "random", tmp_path / "out")
    build_store(pre_p, fts, "pca", M, tmp_path / "lw", layerwise=True)
    with pytest.raises(StoreError, match="layerwise"):
        export_tvb(tmp_path / "lw", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ mergekit
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("mk"), T=3, clusters=None)


def yaml_config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(textwrap.dedent(text))
    return p


def mergekit_ties(base: dict, fts: list[dict], weights: list[float], density: float, lam: float = 1.0,
                  normalize: bool = True) -> dict[str, torch.Tensor]:
    """mergekit's generalized task arithmetic for ties, written out densely: magnitude sparsify each delta to
    int(density·n), weight, elect the sign of the sum, sum the agreeing entries, divide by their weights."""
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        deltas = []
        for ft in fts:
            d = (ft[k] - b).double().flatten()
            keep = int(density * d.numel())
            mask = torch.zeros_like(d)
            mask[torch.topk(d.abs(), keep).indices] = 1
            deltas.append(d * mask)
        x = torch.stack(deltas)
        w = torch.tensor(weights, dtype=torch.float64)[:, None]
        wx = x * w
        sign = (wx.sum(0) >= 0).double() * 2 - 1
        agree = (wx.sign() == sign).double()
        mixed = (wx * agree).sum(0)
        if normalize:
            div = (w * agree).sum(0)
            div[div == 0] = 1
            mixed = mixed / div
        out[k] = b.double() + lam * mixed.reshape(b.shape)
    return out


def test_merge_config_task_arithmetic_weights_lambda_dtype(family, tmp_path, capsys):
    pre_p, fts, pre, sds = family
    cfg = yaml_config(tmp_path, f"""\
        merge_method: task_arithmetic
        base_model: {pre_p}
        models:
          - model: {fts['task0']}
            parameters: {{weight: 0.7}}
          - model: {fts['task1']}
            parameters: {{weight: -0.3}}
          - model: {fts['task2']}
            parameters: {{weight: 1.2}}
        parameters:
          lambda: 0.5
        dtype: float16
        """)
    assert main(["-q", "merge", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert "float16" in capsys.readouterr().err  # the dtype note
    m = open_checkpoint(tmp_path / "out")
    for k, b in pre.items():
        if not b.is_floating_point():
            assert torch.equal(m.get(k), b)
            continue
        want = b.double() + 0.5 * sum(w * (sd[k].double() - b.double()) for w, sd in zip((0.7, -0.3, 1.2), sds))
        assert m.spec(k).dtype == torch.float16
        assert torch.allclose(m.get(k).double(), want, atol=2e-3), k


def test_merge_config_linear_includes_the_base(family, tmp_path):
    pre_p, fts, pre, sds = family
    cfg = yaml_config(tmp_path, f"""\
        merge_method: linear
        base_model: {pre_p}
        models:
          - model: {pre_p}
            parameters: {{weight: 1.0}}
          - model: {fts['task0']}
            parameters: {{weight: 2.0}}
          - model: {fts['task2']}
            parameters: {{weight: 1.0}}
        """)
    assert main(["-q", "merge", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    m = open_checkpoint(tmp_path / "out")
    for k, b in pre.items():
        if b.is_floating_point():  # Σ w_i·θ_i / Σ w_i over base, task0, task2
            want = (1.0 * b.double() + 2.0 * sds[0][k].double() + 1.0 * sds[2][k].double()) / 4.0
            assert torch.allclose(m.get(k).double(), want, atol=1e-5), k


def test_merge_config_ties_matches_mergekits_arithmetic(family, tmp_path):
    pre_p, fts, pre, sds = family
    cfg = yaml_config(tmp_path, f"""\
        models:
          - model: {fts['task0']}
            parameters: {{density: 0.5, weight: 1.0}}
          - model: {fts['task1']}
            parameters: {{density: 0.5, weight: 0.5}}
          - model: {fts['task2']}
            parameters: {{density: 0.5, weight: 0.8}}
        merge_method: ties
        base_model: {pre_p}
        parameters:
          normalize: true
          int8_mask: true
        """)
    assert main(["-q", "merge", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    m = open_checkpoint(tmp_path / "out")
    want = mergekit_ties(pre, sds, [1.0, 0.5, 0.8], 0.5)  # every tensor here has an even size: int = ceil
    for k, v in want.items():
        assert torch.allclose(m.get(k).double(), v, atol=1e-5), k


def test_merge_config_refusals_are_one_line(family, tmp_path, capsys):
    pre_p, fts, _, _ = family
    cfg = yaml_config(tmp_path, f"""\
        merge_method: ties
        base_model: {pre_p}
        slices:
          - sources: [{{model: {fts['task0']}, layer_range: [0, 2]}}]
        """)
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert "slices" in err and len(err.splitlines()) == 1
    ok = yaml_config(tmp_path, f"""\
        merge_method: task_arithmetic
        base_model: {pre_p}
        models: [{{model: {fts['task0']}, parameters: {{weight: 1.0}}}}]
        """)
    for extra in (["--pretrained", str(pre_p)], [*ft_args({"a": fts["task1"]})], ["--method", "ties"],
                  ["--scaling-coef", "0.3"], ["--density", "0.2"]):
        assert main(["merge", "--config", str(ok), *extra, "--out", str(tmp_path / "out")]) != 0
        err = capsys.readouterr().err
        assert "--config" in err and extra[0] in err, extra
    assert not (tmp_path / "out").exists()
    assert main(["merge", "--out", str(tmp_path / "out")]) != 0
    assert "--pretrained" in capsys.readouterr().err
