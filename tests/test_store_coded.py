"""Coded stores (``residual=``, ``codec=``, ``M = 0``, ``method="tall"``, ``method="tsvc"``) against dense references
computed here, in float64, from the fine-tuned and pretrained states themselves: PCA projections by numpy SVD,
truncated SVDs by ``torch.linalg.svd``, int8 error bounds, TALL masks and TSV-C ranks re-implemented from their
definitions. Plus the coded files' integrity checks, add-task, sharding, the scratch path, refusals and the CLI."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from tests.storefiles import ITEMSIZE, ST_DTYPE, read_manifest, safetensors_layout, write_manifest
from tests.tinymodels import dense_vector, make_family, save_hf
from tvbasis.cli import main
from tvbasis.errors import ConfigError, StoreError
from tvbasis.io import open_checkpoint
from tvbasis.merge import MergeSpec
from tvbasis.passes import WHOLE_VECTOR
from tvbasis.store import BasisStore, add_task, build_store

#: tolerance for "exact": float32 storage of values of size ~0.5 (one float32 ulp there is 6e-8); a basis or
#: residual that were off by one int8 step of the bases (~1e-4 here) or dropped would be far outside it
EXACT = 1e-6


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fam4(tmp_path_factory):
    """4 fine-tunes in 2 planted clusters (TSV-C at T = 4 keeps k = 2 of the 8 singular triplets)."""
    return make_family(tmp_path_factory.mktemp("fam4"), T=4, clusters=2)


@pytest.fixture(scope="module")
def fam9(tmp_path_factory):
    """9 fine-tunes: more tasks than any matrix has rows or columns (TSV-C's k = 0)."""
    return make_family(tmp_path_factory.mktemp("fam9"), T=9, clusters=3)


# ------------------------------------------------------------------------------------------------ helpers
Vec = dict[str, torch.Tensor]


def true_vectors(pre: dict, sds: list[dict]) -> list[Vec]:
    """The task vectors, float64, from the states (the int buffer position_ids is not part of them)."""
    return [dense_vector(pre, sd) for sd in sds]


def recon(store: BasisStore, task: str) -> Vec:
    return {k: v.double() for k, v in store.reconstruct(task).to_state_dict().items()}


def state(tv) -> Vec:
    return {k: v.double() for k, v in tv.to_state_dict().items()}


def max_abs_diff(a: Vec, b: Vec) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def lin(coefs: list[float], vs: list[Vec]) -> Vec:
    return {k: sum(c * v[k] for c, v in zip(coefs, vs)) for k in vs[0]}


def rel_error(x: Vec, ref: Vec) -> float:
    num = sum(float(((x[k].double() - ref[k]) ** 2).sum()) for k in ref)
    den = sum(float((ref[k] ** 2).sum()) for k in ref)
    return math.sqrt(num / den)


def truncation(x: torch.Tensor, r: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(best rank-r approximation of ``x``, the tolerance to hold a float32 pipeline's one to). 0-d/1-d: (x, 1e-6).

    The store computes its input in float32 (the fine-tune minus the pretrained, minus a float32 v̂), so the
    matrix it truncates is x + δ with ‖δ‖₂ ≲ a few ulps of ``scale``'s norm (``scale``: the tensor the float32
    values come from, default x), and TSV-C's float32 LAPACK SVD adds backward error of the same order. A rank-r
    truncation moves by about ‖δ‖·σ₁/(σ_r − σ_{r+1}) under such a perturbation (Wedin), so the tolerance is 1e-6
    plus 8 float32 ulps of ‖scale‖₂·σ₁/gap: tight where the r-th gap is clear, loose only where the rank-r
    approximation itself is ill-conditioned. Keeping one component more or less moves it by σ_r or σ_{r+1}, far
    beyond it (the tests check that the rank was not chosen at a near-zero gap)."""
    if x.ndim < 2:
        return x.double().clone(), 1e-6
    m = x.double().reshape(x.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    out = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(x.shape)
    if r == 0 or r >= s.numel():
        return out, 1e-6
    big = float(torch.linalg.matrix_norm((x if scale is None else scale).double().reshape(x.shape[0], -1), 2))
    gap = float(s[r - 1] - s[r])
    assert gap > 1e-3 * float(s[0]), (r, s)  # a rank chosen at a near-tie would make any reference arbitrary
    return out, 1e-6 + 8 * 2**-24 * big * float(s[0]) / gap


def assert_close(got: Vec, ref: Vec, tol: dict[str, float] | float, what: str = "") -> None:
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    for k in ref:
        t = tol if isinstance(tol, float) else tol[k]
        err = float((got[k].double() - ref[k].double()).abs().max())
        assert err <= t, (what, k, err, t)


def pca_projection(vs: list[Vec], M: int, keys: list[str] | None = None) -> list[Vec]:
    """v̂_t = μ + P(v_t − μ): μ the mean task vector, P the projection onto the top-M principal directions of
    the centred vectors, flattened over ``keys`` (default all tensors); numpy float64 SVD."""
    keys = sorted(vs[0]) if keys is None else keys
    X = np.stack([np.concatenate([v[k].numpy().ravel() for k in keys]) for v in vs])  # (T, n)
    mu = X.mean(0)
    Xc = X - mu
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    # the subspace (hence the reference) is well defined only with a clear gap after the M-th direction
    assert S[M - 1] > 3 * S[M], S
    P = Vt[:M]
    Xhat = mu + (Xc @ P.T) @ P
    out = []
    for t in range(len(vs)):
        d, pos = {}, 0
        for k in keys:
            n = vs[t][k].numel()
            d[k] = torch.from_numpy(Xhat[t, pos:pos + n].copy()).reshape(vs[t][k].shape)
            pos += n
        out.append(d)
    return out


def layer_of(name: str) -> str:
    """Layer group of --layerwise, written out: encoder.layer.N, else the top-level module."""
    m = re.match(r"^(.*?\.layers?\.\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def names_of(fts: dict, n: int | None = None) -> dict:
    return dict(list(fts.items())[:n]) if n else dict(fts)


def stored_vhat(store: BasisStore, t: int, name: str) -> torch.Tensor:
    """Σ_m W[m, t]·s_m (+ mean_coef[t]·μ) from the store's dense bases/mean files read as plain safetensors
    (not through BasisStore) and the fit recorded in the manifest: the v̂_t a residual is relative to."""
    fit = store.fits[store.group_of.get(name, WHOLE_VECTOR)]
    root = store.root
    [bfile] = [f for f in store.manifest.files.bases]
    S = open_checkpoint(root / bfile).get(name).double()
    out = torch.tensordot(torch.as_tensor(fit.W[:, t]), S, dims=1)
    if fit.mean_coef is not None:
        [mfile] = store.manifest.files.mean
        out = out + float(fit.mean_coef[t]) * open_checkpoint(root / mfile).get(name).double()
    return out


def fresh_copy(store: BasisStore, dest: Path) -> Path:
    shutil.copytree(store.root, dest)
    return dest


def assert_refused(store: BasisStore, base: dict, edit, pattern: str, dest: Path) -> None:
    """A copy of ``store`` at ``dest`` whose manifest is ``base`` changed by ``edit`` (and re-signed) is refused at
    open with a StoreError matching ``pattern``."""
    d = fresh_copy(store, dest)
    mf = copy.deepcopy(base)
    edit(mf)
    write_manifest(d, mf)
    with pytest.raises(StoreError, match=pattern):
        BasisStore.open(d)


def flip_byte(path: Path, pos: int) -> None:
    b = bytearray(path.read_bytes())
    b[pos] ^= 0xFF
    path.write_bytes(bytes(b))


# --------------------------------------------------------------------------------------- 1. lossless residual
@pytest.mark.parametrize("kw", [{}, {"codec": "int8"}, {"dtype": "float16"}],
                         ids=["dense-bases", "int8-bases", "fp16-bases"])
def test_lossless_residual_gives_every_task_exactly(fam, tmp_path, kw):
    """residual=float32: v̂_t + (v_t − v̂_t) = v_t whatever v̂_t is, so the coding error of int8 bases, or the
    float16 rounding of dense bases, must be absorbed by the residual (it is measured against what a reader
    rebuilds, not against the exact bases)."""
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s", residual="float32", **kw)
    assert store.M == 2 and store.T == 6
    c = store.manifest.coded
    assert c is not None and c.mode == "add" and c.residual_codec == "float32"
    if "codec" in kw:
        assert c.bases_codec == "int8:group=128,scheme=symmetric"
        assert store.manifest.files.bases == [] and store.manifest.files.mean == []
        assert store.summary()["coded"]["bases_bytes"] > 0
    else:
        assert c.bases_codec is None and store.manifest.files.bases and store.manifest.files.mean
    names = store.task_names
    for t, name in enumerate(names):
        assert max_abs_diff(recon(store, name), vs[t]) < EXACT, name
        assert store.rel_errors[name] < 1e-6
        assert store.manifest.tasks[t].error_exact
    assert max_abs_diff(state(store.addition()), lin([1.0] * 6, vs)) < 6 * EXACT
    assert max_abs_diff(state(store.addition(tasks=["task1", "task4"])), lin([1, 1], [vs[1], vs[4]])) < 2 * EXACT
    assert max_abs_diff(state(store.combine({"task0": 1, "task2": -0.5})), lin([1, -0.5], [vs[0], vs[2]])) < 2 * EXACT
    # an outer merge of a non-task-like store runs over the reconstructions, residuals included
    assert max_abs_diff(state(store.addition(outer=MergeSpec("mean"))), lin([1 / 6] * 6, vs)) < EXACT
    assert store.verify() == []


def test_without_residual_the_int8_bases_are_lossy(fam, tmp_path):
    """Control for the test above: the same PCA M=2 store without the residual does not reproduce the tasks
    (so 'exact' above is the residual's doing), and its int8 bases differ from the dense store's bases."""
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    coded = build_store(pre_p, fts, "pca", 2, tmp_path / "c", codec="int8")
    dense = build_store(pre_p, fts, "pca", 2, tmp_path / "d")
    assert coded.manifest.coded is not None and not coded.manifest.has_residuals
    proj = pca_projection(vs, 2)
    for t, name in enumerate(coded.task_names):
        a, b = recon(coded, name), recon(dense, name)
        assert max_abs_diff(b, proj[t]) < 1e-5  # the dense store is the PCA projection
        assert max_abs_diff(a, vs[t]) > 1e-3
        # int8 bases: each basis element within half a step (≤ max|s|/254 per group), so v̂ moves only a little
        assert 0 < max_abs_diff(a, b) < 1e-2


# --------------------------------------------------------------------------------- 2. lossy residual (lowrank)
def test_pca_plus_lowrank_residual_matches_dense_reference(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s", residual="lowrank:rank=2")
    assert store.manifest.coded.residual_codec == "lowrank:rank=2,energy=none,fraction=none"
    proj = pca_projection(vs, 2)
    for t, name in enumerate(store.task_names):
        ref, tol = {}, {}
        for k, v in vs[t].items():
            # the store's v̂_t is a float32 projection (bases rounded to float32), the reference's float64: the
            # residual it truncates differs by float32 ulps of v_t, passed on amplified by σ₁/gap (``truncation``);
            # observed ≤ ~1e-7. A rank-1 or rank-3 residual, or one taken against other bases, is off by ≥ 1e-4.
            r, tol[k] = truncation(v - proj[t][k], 2, scale=v)
            ref[k] = proj[t][k] + r
        got = recon(store, name)
        assert_close(got, ref, tol, name)
        for k in vs[t]:
            if vs[t][k].ndim == 1:  # 1-d tensors are stored exactly (float32 fallback)
                assert float((got[k] - vs[t][k]).abs().max()) < EXACT, k
        measured = rel_error(got, vs[t])
        assert measured > 1e-4  # the residual is really lossy here
        assert abs(store.rel_errors[name] - measured) < 1e-6 + 1e-4 * measured, (name, store.rel_errors[name], measured)


def test_codec_plan_residual_with_a_none_kind(fam, tmp_path):
    """A plan: embeddings not stored (their residual decodes to zeros: ṽ = v̂ there), matrices rank 2,
    vectors float32."""
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s",
                        residual="embedding=none;matrix=lowrank:rank=2;vector=float32")
    proj = pca_projection(vs, 2)
    emb = "embeddings.word_embeddings.weight"
    entries = store.manifest.coded.entries
    assert entries[f"residual/task0/{emb}"].encoded["codec"] == "none"
    assert store.summary()["coded"]["per_task_bytes_by_task"]["task0"] == (
        sum(4 * 2 * sum(v.shape) for k, v in vs[0].items() if v.ndim == 2 and k != emb)
        + sum(4 * v.numel() for v in vs[0].values() if v.ndim == 1))
    for t, name in enumerate(store.task_names):
        got = recon(store, name)
        ref, tol = {}, {}
        for k, v in vs[t].items():
            r = v - proj[t][k]
            rhat, tol[k] = (torch.zeros_like(r), 1e-6) if k == emb else truncation(r, 2, scale=v)
            ref[k] = proj[t][k] + rhat
        assert_close(got, ref, tol, name)
        measured = rel_error(got, vs[t])
        assert abs(store.rel_errors[name] - measured) < 1e-6 + 1e-4 * measured


# --------------------------------------------------------------------------------------------------- 3. M = 0
def test_M0_stores_each_task_through_its_codec_alone(fam4, tmp_path):
    pre_p, fts, pre, sds = fam4
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "pca", 0, tmp_path / "s", residual="lowrank:rank=2")
    assert store.M == 0
    assert store.manifest.files.bases == [] and store.manifest.files.mean == [] and store.manifest.files.coded
    cut = [{k: truncation(v, 2) for k, v in vt.items()} for vt in vs]
    refs = [{k: c[0] for k, c in ct.items()} for ct in cut]
    for t, name in enumerate(store.task_names):
        got = recon(store, name)
        # the SVD of v_t itself from its float32 values (float64 Gram inside the store); observed ~1e-8
        assert_close(got, refs[t], {k: c[1] for k, c in cut[t].items()}, name)
        measured = rel_error(got, vs[t])
        assert abs(store.rel_errors[name] - measured) < 1e-6 + 1e-4 * measured
    # no bases: the default addition is the sum of the reconstructions; the paper's sum of bases does not exist
    assert max_abs_diff(state(store.addition()), lin([1.0] * 4, refs)) < 4e-6
    assert max_abs_diff(state(store.combine({"task1": 2, "task3": -1})), lin([2, -1], [refs[1], refs[3]])) < 4e-6
    assert max_abs_diff(state(store.addition(outer=MergeSpec("mean"))), lin([0.25] * 4, refs)) < 1e-6
    with pytest.raises(ConfigError, match="M = 0"):
        store.addition(mode="paper")


def test_M0_refusals(fam4, tmp_path):
    pre_p, fts, *_ = fam4
    with pytest.raises(ConfigError, match="--codec"):
        build_store(pre_p, fts, "pca", 0, tmp_path / "a", residual="lowrank:rank=2", codec="int8")
    with pytest.raises(ConfigError, match="--residual"):
        build_store(pre_p, fts, "pca", 0, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------- 4. int8 residual
def test_int8_residual_error_within_half_a_step_of_its_group(fam, tmp_path):
    """ṽ_t − v_t = r̂_t − r_t (+ float32 rounding) with r_t = v_t − v̂_t. Symmetric int8 with groups of 128
    consecutive elements of the flattened residual: scale s_g = max|r_g|/127 rounded *up* to float16, so
    s_g ≤ max|r_g|/127·(1 + 2⁻¹⁰) + 2⁻²⁴ (relative float16 spacing, or its subnormal spacing), and every element
    is within s_g/2. v̂_t is computed here from the store's bases file and the manifest's W (the autoencoder's
    bases cannot be recomputed independently); float32 rounding of v̂_t, r_t and the final sum is bounded by a
    few ulps of Σ_m |W[m,t]·s_m| + |v_t|. (The bound max|v_t|/127 would not be valid: |r_t| is not bounded by
    |v_t| when v̂_t overshoots.)"""
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "autoencoder", 2, tmp_path / "s", {"steps": 200}, residual="int8")
    assert store.manifest.coded.residual_codec == "int8:group=128,scheme=symmetric"
    fit = store.fits[WHOLE_VECTOR]
    worst = 0.0
    for t, name in enumerate(store.task_names):
        got = recon(store, name)
        for k, v in vs[t].items():
            vhat = stored_vhat(store, t, k)
            r = (v - vhat).reshape(-1)
            pad = -r.numel() % 128
            g = torch.cat([r.abs(), r.new_zeros(pad)]).view(-1, 128).amax(1)
            step = g / 127 * (1 + 2**-10) + 2**-24
            half = step.repeat_interleave(128)[: r.numel()] / 2
            S = open_checkpoint(store.root / store.manifest.files.bases[0]).get(k).double()
            mag = sum(abs(float(fit.W[m, t])) * S[m].abs() for m in range(store.M)).reshape(-1) + v.abs().reshape(-1)
            bound = half + 4 * 2**-24 * mag
            err = (got[k] - v).reshape(-1).abs()
            assert bool((err <= bound).all()), (name, k, float((err - bound).max()))
            worst = max(worst, float((err / bound).max()))
        measured = rel_error(got, vs[t])
        assert 0 < measured < 0.05
        assert abs(store.rel_errors[name] - measured) < 1e-4 * measured + 1e-7, (store.rel_errors[name], measured)
    assert worst > 0.5  # the bound is tight, not vacuous: elements use most of their half step (observed 0.998)


# --------------------------------------------------------------------------------------------------- 5. TALL
def tall_reference(vs: list[Vec], lambdas: list[float]) -> tuple[Vec, list[Vec], list[Vec]]:
    """τ_MTL = Σ_t τ_t; m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t|; and per task the elements where float32 rounding could
    decide the comparison either way (both sides within 1e-5 relative: the store computes in float32)."""
    mtl = {k: sum(v[k] for v in vs) for k in vs[0]}
    masks, unsure = [], []
    for v, lam in zip(vs, lambdas):
        lhs = {k: v[k].abs() for k in v}
        rhs = {k: lam * (mtl[k] - v[k]).abs() for k in v}
        masks.append({k: lhs[k] >= rhs[k] for k in v})
        unsure.append({k: (lhs[k] - rhs[k]).abs() <= 1e-5 * (lhs[k] + rhs[k]) + 1e-12 for k in v})
    return mtl, masks, unsure


@pytest.mark.parametrize("options,lambdas", [
    ({}, [0.4] * 6),
    ({"lambda": 0.3, "lambdas": {"task0": 0.1, "task4": 0.9}}, [0.1, 0.3, 0.3, 0.3, 0.9, 0.3]),
], ids=["default-lambda", "per-task-lambdas"])
def test_tall_masks_and_reconstructions(fam, tmp_path, options, lambdas):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "tall", None, tmp_path / "s", options)
    assert store.M == 1 and store.masks and store.manifest.coded.mode == "mask"
    mtl, masks, unsure = tall_reference(vs, lambdas)
    total = sum(v.numel() for v in vs[0].values())
    for t, name in enumerate(store.task_names):
        got = recon(store, name)
        n_unsure = sum(int(u.sum()) for u in unsure[t].values())
        assert n_unsure <= total // 100
        for k in vs[t]:
            sure = ~unsure[t][k]
            stored_mask = store.task_rows(name, k)
            assert set(torch.unique(stored_mask).tolist()) <= {0.0, 1.0}
            assert torch.equal(stored_mask.bool()[sure], masks[t][k][sure]), (name, k)
            ref = torch.where(masks[t][k], mtl[k], torch.zeros_like(mtl[k]))
            assert float((got[k] - ref)[sure].abs().max()) < EXACT, (name, k)
            # where float32 could decide either way the element is 0 or τ_MTL
            on_mtl = (got[k] - mtl[k]).abs() < EXACT
            assert bool((on_mtl | (got[k] == 0))[~sure].all())
        measured = rel_error(got, vs[t])
        assert abs(store.rel_errors[name] - measured) < 1e-6 + 1e-4 * measured
    # the λs given are the λs used: the mask density follows them (smaller λ keeps more)
    kept = [sum(int(m.sum()) for m in masks[t].values()) for t in range(6)]
    got_kept = [sum(int(store.task_rows(n, k).sum()) for k in vs[0]) for n in store.task_names]
    assert all(abs(a - b) <= total // 100 for a, b in zip(kept, got_kept)), (kept, got_kept)
    if options:
        assert got_kept[0] > got_kept[1] > got_kept[4]
    # the paper's addition of a TALL store is task arithmetic: the one stored vector τ_MTL = Σ_t τ_t
    assert max_abs_diff(state(store.addition()), mtl) < 6 * EXACT
    for t, name in [(0, "task0"), (3, "task3")]:
        neg = state(store.combine({name: -1}))
        ref = {k: -torch.where(masks[t][k], mtl[k], torch.zeros_like(mtl[k])) for k in mtl}
        assert max(float((neg[k] - ref[k])[~unsure[t][k]].abs().max()) for k in mtl) < EXACT
    both = state(store.combine({"task1": 1, "task2": 0.5}))
    ref = {k: (masks[1][k].double() + 0.5 * masks[2][k].double()) * mtl[k] for k in mtl}
    assert max(float((both[k] - ref[k])[~(unsure[1][k] | unsure[2][k])].abs().max()) for k in mtl) < 2 * EXACT
    # bytes: τ_MTL dense, one bit per element per task
    s = store.summary()["coded"]
    assert s["per_task_bytes"] == 6 * sum(math.ceil(v.numel() / 8) for v in vs[0].values())
    assert s["bases_bytes"] == 0 and s["residual_codec"] == "mask"
    assert store.verify() == []


def test_tall_refusals(fam, tmp_path):
    pre_p, fts, *_ = fam
    store = build_store(pre_p, names_of(fts, 5), "tall", None, tmp_path / "s")
    with pytest.raises(ConfigError, match="tall"):
        add_task(store, "task5", fts["task5"], pre_p)
    assert BasisStore.open(tmp_path / "s").T == 5
    with pytest.raises(ConfigError, match="-M must be 1"):
        build_store(pre_p, fts, "tall", 2, tmp_path / "a")
    with pytest.raises(ConfigError, match="--residual"):
        build_store(pre_p, fts, "tall", None, tmp_path / "b", residual="int8")
    with pytest.raises(ConfigError, match="lambdas"):
        build_store(pre_p, fts, "tall", None, tmp_path / "c", {"lambdas": {"nosuch": 0.3}})
    with pytest.raises(ConfigError, match="lambda"):
        build_store(pre_p, fts, "tall", None, tmp_path / "d", {"lambda": -1})
    with pytest.raises(ConfigError, match="layer-wise"):
        build_store(pre_p, fts, "tall", None, tmp_path / "e", layerwise=True)
    for d in "abcde":
        assert not (tmp_path / d).exists()


# -------------------------------------------------------------------------------------------------- 6. TSV-C
@pytest.mark.parametrize("family", ["fam4", "fam", "fam9"])
def test_tsvc_truncated_svd_and_bytes(request, tmp_path, family):
    pre_p, fts, pre, sds = request.getfixturevalue(family)
    vs = true_vectors(pre, sds)
    T = len(vs)
    store = build_store(pre_p, fts, "tsvc", None, tmp_path / "s")
    assert store.M == 0 and store.manifest.coded.residual_codec == "tsvc"

    def k_of(shape):
        return int(min(shape) * (1 / T))  # the reference code's int(len(s) * (1 / T))

    for t, name in enumerate(store.task_names):
        got = recon(store, name)
        # TSV-C's SVD is float32 LAPACK: see ``truncation`` for the tolerance (observed 1e-7 .. 5e-6)
        cut = {k: truncation(v, k_of(v.shape)) if v.ndim == 2 else (v, 1e-6) for k, v in vs[t].items()}
        assert_close(got, {k: c[0] for k, c in cut.items()}, {k: c[1] for k, c in cut.items()}, name)
        measured = rel_error(got, vs[t])
        assert abs(store.rel_errors[name] - measured) < 1e-6 + 1e-4 * measured
    per_task = sum(4 * k_of(v.shape) * sum(v.shape) if v.ndim == 2 else 4 * v.numel() for v in vs[0].values())
    s = store.summary()["coded"]
    assert s["per_task_bytes"] == T * per_task
    assert s["per_task_bytes_by_task"] == dict.fromkeys(store.task_names, per_task)
    if family == "fam9":  # k = 0 everywhere: every matrix comes back as zeros
        assert all(k_of(v.shape) == 0 for v in vs[0].values() if v.ndim == 2)
        assert all(float(x.abs().max()) == 0 for x in recon(store, "task0").values() if x.ndim == 2)
    assert store.verify() == []
    assert max_abs_diff(state(store.addition()), {k: sum(state(store.reconstruct(n))[k] for n in store.task_names)
                                                  for k in vs[0]}) < 1e-6


def test_tsvc_refuses_options_and_M(fam4, tmp_path):
    pre_p, fts, *_ = fam4
    with pytest.raises(ConfigError, match="tsvc"):
        build_store(pre_p, fts, "tsvc", None, tmp_path / "a", {"k": 2})
    with pytest.raises(ConfigError, match="-M must be 0"):
        build_store(pre_p, fts, "tsvc", 2, tmp_path / "b")


# ---------------------------------------------------------------------------------------------- 7. integrity
@pytest.fixture(scope="module")
def int8_store(fam4, tmp_path_factory):
    """M = 0, every task through int8 (coded entries ``residual/{task}/{param}/{q,scale}``)."""
    pre_p, fts, *_ = fam4
    return build_store(pre_p, fts, "pca", 0, tmp_path_factory.mktemp("i8") / "s", residual="int8")


@pytest.fixture(scope="module")
def coded_bases_store(fam4, tmp_path_factory):
    """PCA M = 2 with int8 bases and mean and float32 residuals (entries ``bases/…``, ``mean/…``, ``residual/…``)."""
    pre_p, fts, *_ = fam4
    return build_store(pre_p, fts, "pca", 2, tmp_path_factory.mktemp("cb") / "s", codec="int8", residual="float32")


@pytest.mark.parametrize("which,key,affected", [
    ("int8_store", "residual/task1/pooler.dense.weight/q", ["task1"]),
    ("int8_store", "residual/task2/embeddings.word_embeddings.weight/scale", ["task2"]),
    ("coded_bases_store", "bases/1/encoder.layer.0.attention.query.weight/q", ["task0", "task1", "task2", "task3"]),
    ("coded_bases_store", "mean/encoder.layer.1.output.LayerNorm.weight/scale", ["task0", "task3"]),
    ("coded_bases_store", "residual/task3/encoder.layer.0.output.dense.weight/value", ["task3"]),
])
def test_flipped_coded_byte_is_caught_on_read_and_by_verify(request, tmp_path, which, key, affected):
    store = request.getfixturevalue(which)
    assert store.verify() == []
    d = fresh_copy(store, tmp_path / "s")
    param = key.split("/")[-2]
    files = [f for f in store.manifest.files.coded if key in safetensors_layout(d / f)[1]]
    assert len(files) == 1
    start, header = safetensors_layout(d / files[0])
    a, b = header[key]["data_offsets"]
    assert b > a
    flip_byte(d / files[0], start + (a + b) // 2)
    s = BasisStore.open(d)  # opening checks sizes and headers only
    for task in affected:
        with pytest.raises(StoreError, match="corrupt"):
            s.reconstruct(task).get(param)
    others = [n for n in s.specs if n != param]
    for task in s.task_names:
        for n in others[:3]:
            s.reconstruct(task).get(n)  # the rest of the store still reads
    if which == "int8_store":
        s.reconstruct("task0").get(param)  # another task's entry of the same tensor is intact
    problems = s.verify()
    assert problems and any(files[0] in p for p in problems), problems
    assert any(key in p for p in problems), problems


def test_flipped_coded_header_byte_and_truncation_are_refused_at_open(int8_store, tmp_path):
    f = int8_store.manifest.files.coded[0]
    d = fresh_copy(int8_store, tmp_path / "a")
    flip_byte(d / f, 20)
    with pytest.raises(StoreError, match="header"):
        BasisStore.open(d)
    d = fresh_copy(int8_store, tmp_path / "b")
    raw = (d / f).read_bytes()
    (d / f).write_bytes(raw[:-1])
    with pytest.raises(StoreError, match="truncated"):
        BasisStore.open(d)
    d = fresh_copy(int8_store, tmp_path / "c")
    (d / f).unlink()
    with pytest.raises(StoreError, match="does not exist"):
        BasisStore.open(d)


def test_manifest_edits_of_the_coded_section_are_refused(int8_store, tmp_path):
    base = read_manifest(int8_store.root)
    entries = base["coded"]["entries"]
    key = "residual/task1/pooler.dense.weight"
    assert key in entries

    def refused(edit, pattern, name):
        assert_refused(int8_store, base, edit, pattern, tmp_path / name)

    # control: rewriting the unchanged manifest this way opens fine
    d = fresh_copy(int8_store, tmp_path / "same")
    write_manifest(d, copy.deepcopy(base))
    BasisStore.open(d)

    refused(lambda mf: mf["coded"]["entries"].pop(key), r"'coded\.entries'.*missing", "del")
    refused(lambda mf: mf["coded"]["entries"].update({"residual/nosuch/pooler.dense.weight": entries[key]}),
            r"'coded\.entries'.*unexpected", "extra")
    refused(lambda mf: mf["coded"]["entries"][key]["encoded"].update(shape=[8, 4, 2]),
            r"coded\.entries\.residual/task1/pooler\.dense\.weight\.encoded\.shape", "shape")
    refused(lambda mf: mf["coded"]["entries"][key]["encoded"].update(shape=[64]), r"encoded\.shape", "shape2")
    refused(lambda mf: mf["coded"]["entries"][key]["encoded"].update(codec="nosuch"), r"codec", "codec")
    refused(lambda mf: mf["coded"]["entries"][key]["encoded"]["tensors"].append("extra"), r"tensors", "tensors")
    refused(lambda mf: mf["coded"].update(mode="mask"), r"mask", "mode")
    refused(lambda mf: mf["coded"].update(residual_codec=None), r"coded", "nocodec")

    # a coded file name with a path separator: refused, even though the named file exists outside the store
    f = base["files"]["coded"][0]
    for bad in ("../" + f, "sub/" + f, str((tmp_path / f).resolve())):
        d = fresh_copy(int8_store, tmp_path / f"path{len(bad)}")
        shutil.copy(d / f, d.parent / f)
        (d / "sub").mkdir()
        shutil.copy(d / f, d / "sub" / f)
        shutil.copy(d / f, tmp_path / f)
        mf = copy.deepcopy(base)
        mf["files"]["coded"] = [bad]
        mf["coded"]["files"] = {bad: mf["coded"]["files"][f]}
        for e in mf["coded"]["entries"].values():
            e["file"] = bad
        write_manifest(d, mf)
        with pytest.raises(StoreError, match="files.coded"):
            BasisStore.open(d)

    # a tensor digest changed in the (re-signed) manifest: the header still matches, the read is refused
    d = fresh_copy(int8_store, tmp_path / "digest")
    mf = copy.deepcopy(base)
    for t in mf["coded"]["files"][f]["tensors"]:
        if t[0] == key + "/q":
            t[3] = format(int(t[3], 16) ^ 1, "016x")
    write_manifest(d, mf)
    s = BasisStore.open(d)
    with pytest.raises(StoreError, match="corrupt"):
        s.reconstruct("task1").get("pooler.dense.weight")


# ---------------------------------------------------------------------------------------------- 8. add-task
def test_add_task_to_a_lossless_residual_store(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, names_of(fts, 4), "pca", 2, tmp_path / "s", residual="float32")
    before = {n: store.reconstruct(n).to_state_dict() for n in store.task_names}
    store = add_task(store, "task4", fts["task4"], pre_p)
    store = add_task(store, "task5", fts["task5"], pre_p)
    assert store.T == 6 and store.task_names == [f"task{i}" for i in range(6)]
    assert len(store.manifest.files.coded) == 3  # one new coded file per added task
    for t, name in enumerate(store.task_names):
        assert max_abs_diff(recon(store, name), vs[t]) < EXACT, name
        assert store.rel_errors[name] < 1e-6
    for n, old in before.items():
        new = store.reconstruct(n).to_state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), n
    assert max_abs_diff(state(store.addition()), lin([1.0] * 6, vs)) < 6 * EXACT
    assert store.verify() == []


@pytest.mark.parametrize("kw", [{"M": 0, "residual": "lowrank:rank=2"},
                                {"M": 2, "codec": "int8", "residual": "float32"}], ids=["M0-lowrank", "int8-bases"])
def test_add_task_to_other_residual_stores(fam, tmp_path, kw):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    M = kw.pop("M")
    store = build_store(pre_p, names_of(fts, 4), "pca", M, tmp_path / "s", **kw)
    before = {n: store.reconstruct(n).to_state_dict() for n in store.task_names}
    store = add_task(store, "task4", fts["task4"], pre_p)
    got = recon(store, "task4")
    cut = {k: truncation(v, 2) if M == 0 else (v, EXACT) for k, v in vs[4].items()}
    assert_close(got, {k: c[0] for k, c in cut.items()}, {k: c[1] for k, c in cut.items()})
    measured = rel_error(got, vs[4])
    assert abs(store.rel_errors["task4"] - measured) < 1e-6 + 1e-4 * measured
    for n, old in before.items():
        new = store.reconstruct(n).to_state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), n


def test_add_task_to_a_tsvc_store_keeps_the_built_rank(fam4, tmp_path):
    """The new task is coded at the rank of the T the store was built with (its coder is recorded as 'tsvc')."""
    pre_p, fts, pre, sds = fam4
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, names_of(fts, 3), "tsvc", None, tmp_path / "s")
    store = add_task(store, "task3", fts["task3"], pre_p)
    cut = {k: truncation(v, int(min(v.shape) * (1 / 3))) for k, v in vs[3].items()}
    assert_close(recon(store, "task3"), {k: c[0] for k, c in cut.items()}, {k: c[1] for k, c in cut.items()})
    by_task = store.summary()["coded"]["per_task_bytes_by_task"]
    assert len(set(by_task.values())) == 1


def test_add_task_to_a_cluster_store_with_lowrank_residual(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, names_of(fts, 4), "cluster", 2, tmp_path / "s", residual="lowrank:rank=2")
    assert store.manifest.has_residuals and store.labels is not None
    before = {n: store.reconstruct(n).to_state_dict() for n in store.task_names}
    bases_before = {f: (store.root / f).read_bytes() for f in store.manifest.files.bases}
    store = add_task(store, "task4", fts["task4"], pre_p)
    assert store.T == 5 and store.manifest.tasks[-1].cluster is not None
    # the bases are fixed: the same files, bit for bit, and every old reconstruction unchanged
    assert {f: (store.root / f).read_bytes() for f in store.manifest.files.bases} == bases_before
    for n, old in before.items():
        new = store.reconstruct(n).to_state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), n
    got = recon(store, "task4")
    measured = rel_error(got, vs[4])
    assert measured > 1e-4
    assert abs(store.rel_errors["task4"] - measured) < 1e-6 + 1e-4 * measured, (store.rel_errors["task4"], measured)
    # and the new task is v̂ + rank-2 SVD of v − v̂, v̂ from the stored bases and its new coefficients
    for k, v in vs[4].items():
        vhat = stored_vhat(store, 4, k)
        r, tol = truncation(v - vhat, 2, scale=v)
        assert float((got[k] - (vhat + r)).abs().max()) <= tol, k
    # the old tasks' recorded errors are still their measured ones
    for t in range(4):
        m = rel_error(recon(store, f"task{t}"), vs[t])
        assert abs(store.rel_errors[f"task{t}"] - m) < 1e-6 + 1e-4 * m


# ---------------------------------------------------------------------------------------------- 9. sharding
def test_sharded_coded_files_read_the_same(fam4, tmp_path):
    pre_p, fts, *_ = fam4
    one = build_store(pre_p, fts, "pca", 2, tmp_path / "one", residual="float32")
    many = build_store(pre_p, fts, "pca", 2, tmp_path / "many", residual="float32", max_shard_size=2000)
    assert len(one.manifest.files.coded) == 1
    assert len(many.manifest.files.coded) > 1
    for fname, cf in many.manifest.coded.files.items():
        data = sum(t.spec.nbytes for t in cf.tensors)
        entries = {t.key.rsplit("/", 1)[0] for t in cf.tensors}
        assert data <= 2000 or len(entries) == 1, (fname, data)
    for n in one.task_names:
        a, b = one.reconstruct(n).to_state_dict(), many.reconstruct(n).to_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert many.verify() == []
    assert BasisStore.open(tmp_path / "many").manifest.files.coded == many.manifest.files.coded


# ------------------------------------------------------------------------------------------ 10. scratch path
def test_memory_mapped_scratch_gives_the_same_store(fam4, tmp_path, monkeypatch):
    import tvbasis.store.residual_pass as cp
    pre_p, fts, *_ = fam4
    mem = build_store(pre_p, fts, "pca", 2, tmp_path / "mem", residual="lowrank:rank=2+int8")
    calls = []
    real = np.memmap

    def counting(*a, **k):
        calls.append(a[0] if a else k.get("filename"))
        return real(*a, **k)

    monkeypatch.setattr(cp, "SCRATCH_BYTES", 0)
    monkeypatch.setattr(cp.np, "memmap", counting)
    mapped = build_store(pre_p, fts, "pca", 2, tmp_path / "mapped", residual="lowrank:rank=2+int8")
    assert len(calls) >= len(mem.specs)  # every tensor went through a scratch file
    assert all(not Path(p).exists() for p in calls)  # and each was removed
    for n in mem.task_names:
        a, b = mem.reconstruct(n).to_state_dict(), mapped.reconstruct(n).to_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert mem.rel_errors == mapped.rel_errors
    assert sorted(p.name for p in mapped.root.iterdir()) == sorted(p.name for p in mem.root.iterdir())


def test_float64_products_match_numpy_at_any_chunking(monkeypatch):
    """The materialisation pass's cross-Grams and squared distances against numpy in float64, with chunks that do
    not divide the length (so the chunk loop's edges are exercised)."""
    import tvbasis.store.residual_pass as cp
    rng = np.random.default_rng(3)
    A = rng.standard_normal((3, 1001)).astype(np.float32)
    B = rng.standard_normal((5, 1001)).astype(np.float32)
    x = rng.standard_normal(1001).astype(np.float32) * 100
    y = x + rng.standard_normal(1001).astype(np.float32) * 1e-3  # a tiny difference of large values
    for chunk in (1 << 20, 97, 8):
        monkeypatch.setattr(cp, "PRODUCT_CHUNK", chunk)
        tA, tB = torch.from_numpy(A), torch.from_numpy(B)
        np.testing.assert_allclose(cp._gram64(tA, tB), A.astype(np.float64) @ B.astype(np.float64).T, rtol=1e-12,
                                   atol=1e-10)
        np.testing.assert_allclose(cp._gram64(tA, tA), A.astype(np.float64) @ A.astype(np.float64).T, rtol=1e-12,
                                   atol=1e-10)
        want = float(((x.astype(np.float64) - y.astype(np.float64)) ** 2).sum())
        assert cp.sq_dist64(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(want, rel=1e-6)
        assert cp.sq_dist64(torch.from_numpy(x), 0.0) == pytest.approx(float((x.astype(np.float64) ** 2).sum()),
                                                                         rel=1e-12)


# ---------------------------------------------------------------------------------------------- 11. refusals
@pytest.mark.parametrize("method,options,kw,pattern", [
    ("random", {}, {"residual": "int8"}, r"--residual: random bases"),
    ("random", {}, {"codec": "int8"}, r"--codec: random bases"),
    ("cluster", {"inner": "ties"}, {"residual": "int8"}, r"--residual: bases made by a non-linear inner merge"),
    ("pca", {}, {"residual": "nosuch"}, r"--residual: .*nosuch"),
    ("pca", {}, {"codec": "nosuch:rank=2"}, r"--codec: .*nosuch"),
    ("pca", {}, {"residual": "lowrank:rank=0"}, r"--residual: .*rank"),
    ("pca", {}, {"residual": "matrix=lowrank;tensor=int8"}, r"--residual: .*KIND=SPEC"),
])
def test_unsupported_combinations_are_one_config_error(fam4, tmp_path, method, options, kw, pattern):
    pre_p, fts, *_ = fam4
    with pytest.raises(ConfigError, match=pattern) as e:
        build_store(pre_p, fts, method, 2, tmp_path / "s", options, **kw)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging directory left


# ------------------------------------------------------------------------------------------------- 12. CLI
@pytest.mark.parametrize("args,check", [
    (["--method", "pca", "-M", "2", "--residual", "lowrank:rank=4"],
     lambda s: s.manifest.coded.residual_codec == "lowrank:rank=4,energy=none,fraction=none"),
    (["--method", "autoencoder", "-M", "2", "--residual", "int8", "--steps", "100"],
     lambda s: s.manifest.options["steps"] == 100 and s.manifest.coded.residual_codec.startswith("int8")),
    (["--method", "pca", "-M", "0", "--residual", "lowrank:rank=2"],
     lambda s: s.M == 0 and not s.manifest.files.bases),
    (["--method", "pca", "-M", "2", "--codec", "int8"],
     lambda s: s.manifest.coded.bases_codec.startswith("int8") and not s.manifest.has_residuals),
    (["--method", "tall"], lambda s: s.masks and s.M == 1),
    (["--method", "tsvc"], lambda s: s.M == 0 and s.manifest.coded.residual_codec == "tsvc"),
], ids=["pca-lowrank", "ae-int8", "M0", "codec", "tall", "tsvc"])
def test_cli_build_and_reconstruct(fam4, tmp_path, capsys, args, check):
    pre_p, fts, *_ = fam4
    named = dict(zip("abcd", fts.values()))
    ft = [a for n, p in named.items() for a in ("--finetuned", f"{n}={p}")]
    S, F = tmp_path / "S", tmp_path / "F.safetensors"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft, *args, "--out", str(S)]) == 0
    out = capsys.readouterr().out
    assert "coded:" in out
    store = BasisStore.open(S)
    assert store.task_names == list("abcd") and check(store)
    assert main(["-q", "reconstruct", str(S), "a", "--out", str(F)]) == 0
    f = open_checkpoint(F)
    ref = store.reconstruct("a").to_state_dict()
    assert sorted(f.keys()) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(f.get(k), v), k


# ------------------------------------------------------------------------------------------- 13. layer-wise
def test_layerwise_lossless_residual(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s", layerwise=True, residual="float32")
    assert store.manifest.layerwise and len(store.fits) == 4
    for t, name in enumerate(store.task_names):
        assert max_abs_diff(recon(store, name), vs[t]) < EXACT, name
    assert max_abs_diff(state(store.addition()), lin([1.0] * 6, vs)) < 6 * EXACT


def test_layerwise_lowrank_residual_matches_per_group_pca(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    vs = true_vectors(pre, sds)
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "s", layerwise=True, residual="lowrank:rank=2")
    groups: dict[str, list[str]] = {}
    for k in sorted(vs[0]):
        groups.setdefault(layer_of(k), []).append(k)
    assert sorted(groups) == sorted(store.fits)
    assert all(store.group_of[k] == g for g, ks in groups.items() for k in ks)
    proj: list[Vec] = [{} for _ in vs]
    for ks in groups.values():
        for t, p in enumerate(pca_projection(vs, 2, ks)):
            proj[t].update(p)
    for t, name in enumerate(store.task_names):
        cut = {k: truncation(v - proj[t][k], 2, scale=v) for k, v in vs[t].items()}
        assert_close(recon(store, name), {k: proj[t][k] + c[0] for k, c in cut.items()},
                     {k: c[1] for k, c in cut.items()}, name)


# ------------------------------------------------------------------------------------------- more: row reads
@pytest.mark.parametrize("method,M,kw", [
    ("pca", 2, {"residual": "int8"}),
    ("pca", 2, {"codec": "int8", "residual": "lowrank:rank=2"}),
    ("pca", 0, {"residual": "lowrank:rank=2"}),
    ("tall", None, {}),
], ids=["dense-bases", "coded-bases", "M0", "tall"])
def test_row_slices_read_the_same_as_whole_tensors(fam4, tmp_path, method, M, kw):
    """Streaming readers ask for row ranges: bases, mean, residual and mask rows must be sliced consistently."""
    pre_p, fts, *_ = fam4
    store = build_store(pre_p, fts, method, M, tmp_path / "s", **kw)
    for tv in (store.reconstruct("task1"), store.combine({"task0": 1, "task2": -0.5}), store.addition()):
        for n, spec in store.specs.items():
            full = tv.get(n)
            for a, b in [(0, 1), (1, 3), (2, spec.shape[0])]:
                assert torch.equal(tv.get(n, (a, b)), full[a:b]), (n, a, b)


# ---------------------------------------------------------------------------------- more: files on disk
def test_symlinked_coded_file_is_refused(int8_store, tmp_path):
    d = fresh_copy(int8_store, tmp_path / "s")
    f = int8_store.manifest.files.coded[0]
    shutil.move(d / f, tmp_path / "outside.safetensors")
    (d / f).symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(StoreError, match="symlink"):
        BasisStore.open(d)


def test_force_rebuild_switches_between_dense_coded_and_tall(fam4, tmp_path):
    """--force over an existing store writes a new generation: coded files renamed with it, and the files of the
    previous generation (dense or coded) removed."""
    pre_p, fts, pre, sds = fam4
    vs = true_vectors(pre, sds)
    out = tmp_path / "s"
    for method, M, kw in [("pca", 2, {}), ("pca", 2, {"residual": "float32", "codec": "int8"}), ("tall", None, {}),
                          ("pca", 0, {"residual": "float32"}), ("pca", 2, {})]:
        store = build_store(pre_p, fts, method, M, out, force=True, **kw)
        again = BasisStore.open(out)
        assert sorted(p.name for p in out.iterdir() if p.name != ".tvbasis.lock") == sorted(
            ["tvbasis.json", *again.manifest.files.all()])
        assert again.verify() == []
        if kw.get("residual") == "float32":
            for t, name in enumerate(again.task_names):
                assert max_abs_diff(recon(again, name), vs[t]) < EXACT
        assert store.manifest.manifest_sha256 == again.manifest.manifest_sha256


def test_cli_add_task_verify_and_inspect_of_a_residual_store(fam4, tmp_path, capsys):
    pre_p, fts, pre, sds = fam4
    vs = true_vectors(pre, sds)
    named = dict(zip("abcd", fts.values()))
    ft = [a for n, p in list(named.items())[:3] for a in ("--finetuned", f"{n}={p}")]
    S = tmp_path / "S"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft, "--method", "pca", "-M", "2", "--residual",
                 "float32", "--out", str(S)]) == 0
    assert main(["-q", "add-task", str(S), f"d={named['d']}", "--pretrained", str(pre_p)]) == 0
    assert main(["-q", "reconstruct", str(S), "d", "--out", str(tmp_path / "d.safetensors")]) == 0
    f = open_checkpoint(tmp_path / "d.safetensors")
    assert max_abs_diff({k: f.get(k) for k in f.keys()}, vs[3]) < EXACT
    assert main(["verify", str(S)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(S), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["coded"]["residual_codec"] == "float32" and s["tasks"] == list("abcd")
    assert s["coded"]["per_task_bytes_by_task"]["d"] == s["coded"]["per_task_bytes_by_task"]["a"] > 0


# ------------------------------------------------------------------ regressions: bugs found while reviewing
@pytest.mark.parametrize("spec", ["int8:group=64,scheme=symmetric", "int8:group=256,scheme=symmetric"])
def test_codec_parameters_inconsistent_with_the_stored_tensors_are_refused(int8_store, tmp_path, spec):
    emb = "embeddings.word_embeddings.weight"  # 400 elements: 4 groups of 128 stored
    key = f"residual/task0/{emb}"
    d = fresh_copy(int8_store, tmp_path / "s")
    mf = read_manifest(d)
    assert mf["coded"]["entries"][key]["encoded"]["codec"] == "int8:group=128,scheme=symmetric"
    mf["coded"]["entries"][key]["encoded"]["codec"] = spec
    write_manifest(d, mf)
    try:
        BasisStore.open(d).reconstruct("task0").get(emb)
    except StoreError as e:
        # refused for a reason, not because the uninitialised memory happened to hold a NaN/Inf
        assert "NaN/Inf" not in str(e), str(e)
        return
    pytest.fail("an int8 entry whose group size disagrees with its stored scales was read")


def test_per_task_bytes_with_a_task_name_that_prefixes_another(fam4, tmp_path):
    pre_p, fts, *_ = fam4
    named = dict(zip(["a", "a/b", "c", "d"], fts.values()))
    store = build_store(pre_p, named, "pca", 0, tmp_path / "s", residual="float32")
    per = 4 * sum(s.numel for s in store.specs.values())  # float32: 4 bytes per element and task
    s = store.summary()["coded"]
    assert s["per_task_bytes"] == 4 * per
    assert s["per_task_bytes_by_task"] == dict.fromkeys(named, per)


def test_task_names_with_a_slash_do_not_collide_with_tensor_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    pre = {"x": torch.randn(4, 4, generator=g), "b/x": torch.randn(4, 4, generator=g)}
    fts, sds = {}, []
    for i, n in enumerate(["a", "a/b", "c"]):
        sds.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()})
        fts[n] = save_hf(sds[-1], tmp_path / f"ft{i}")
    pre_p = save_hf(pre, tmp_path / "pre")
    try:
        store = build_store(pre_p, fts, "pca", 0, tmp_path / "s", residual="float32")
    except ConfigError:
        return  # refusing such a task name up front is a fix too
    for n, v in zip(fts, true_vectors(pre, sds)):
        assert max_abs_diff(recon(store, n), v) < EXACT, n


# ------------------------------------------------------------------------------- format version 3: blob + packed
def _as_version_2(root: Path) -> None:
    """Rewrite a store to what format version 2 wrote, by the rules of docs/store-format.md (done here, not by
    tvbasis): every coded file with one safetensors header entry per stored tensor (metadata {"format": "pt"},
    offsets in listing order, header padded with spaces to a multiple of 8), the coded section in plain form."""
    mf = read_manifest(root)
    for fname, f in mf["coded"]["files"].items():
        start, _ = safetensors_layout(root / fname)
        data = (root / fname).read_bytes()[start:]
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for key, dtype, shape, _ in f["tensors"]:
            size = math.prod(shape) * ITEMSIZE[dtype]
            header[key] = {"dtype": ST_DTYPE[dtype], "shape": shape, "data_offsets": [off, off + size]}
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        new = len(raw).to_bytes(8, "little") + raw + data
        (root / fname).write_bytes(new)
        f.pop("layout")
        f["size"], f["sha256"] = len(new), hashlib.sha256(new).hexdigest()
    mf["format_version"] = 2
    write_manifest(root, mf)


def test_version_3_packs_the_coded_section_and_blobs_the_files(int8_store):
    raw = json.loads((int8_store.root / "tvbasis.json").read_text())
    assert raw["format_version"] == 3 and set(raw["coded"]) == {"mode", "bases_codec", "residual_codec", "packed"}
    plain = read_manifest(int8_store.root)["coded"]
    assert len(raw["coded"]["packed"]) * 5 < len(json.dumps({k: plain[k] for k in ("files", "entries")}))
    f = int8_store.manifest.files.coded[0]
    n = int.from_bytes((int8_store.root / f).read_bytes()[:8], "little")
    header = json.loads((int8_store.root / f).read_bytes()[8:8 + n])
    assert set(header) == {"__metadata__", "coded"} and header["coded"]["dtype"] == "U8"
    assert plain["files"][f]["layout"] == "blob" and len(plain["files"][f]["tensors"]) > 1


def test_a_version_2_store_reads_and_its_next_generation_is_version_3(fam4, int8_store, tmp_path):
    pre_p, fts, *_ = fam4
    d = fresh_copy(int8_store, tmp_path / "v2")
    _as_version_2(d)
    old = BasisStore.open(d)
    assert old.manifest.format_version == 2 and old.verify() == []
    for t in old.task_names:
        got, want = old.reconstruct(t).to_state_dict(), int8_store.reconstruct(t).to_state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    old.close()
    new = add_task(d, "again", fts["task0"], pretrained=pre_p)
    assert new.manifest.format_version == 3 and new.verify() == []
    layouts = {f: c.layout for f, c in new.manifest.coded.files.items()}
    assert sorted(layouts.values()) == ["blob", "tensors"]  # the old file kept, the new one a blob
    got = new.reconstruct("task1").to_state_dict()
    want = int8_store.reconstruct("task1").to_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert "packed" in json.loads((d / "tvbasis.json").read_text())["coded"]


def test_bad_packed_sections_and_blobs_in_version_2_are_refused(int8_store, tmp_path, monkeypatch):
    raw = json.loads((int8_store.root / "tvbasis.json").read_text())

    def refused(edit, pattern, name):
        assert_refused(int8_store, raw, edit, pattern, tmp_path / name)

    def pack(obj) -> str:
        return base64.b64encode(zstandard.ZstdCompressor().compress(json.dumps(obj).encode())).decode()

    refused(lambda mf: mf["coded"].update(packed="not base64!"), r"coded\.packed.*base64", "b64")
    refused(lambda mf: mf["coded"].update(packed=base64.b64encode(b"plain bytes").decode()),
            r"coded\.packed.*zstd", "zstd")
    refused(lambda mf: mf["coded"].update(packed=pack({"files": {}})), r"coded\.packed.*'files' and 'entries'",
            "keys")
    refused(lambda mf: mf["coded"].update(packed=pack([1, 2])), r"coded\.packed", "list")
    refused(lambda mf: mf["coded"].update(files={}), r"both 'packed' and", "both")
    refused(lambda mf: mf.update(format_version=2), r"coded\.packed.*version 3", "v2packed")
    plain = read_manifest(int8_store.root)
    f = plain["files"]["coded"][0]

    def blob_in_v2(mf):
        mf.update(format_version=2, coded=copy.deepcopy(plain["coded"]))

    refused(blob_in_v2, r"layout.*'blob' needs format version 3", "v2blob")
    refused(lambda mf: mf.update(coded={**copy.deepcopy(plain["coded"]), "files": {
        f: {**plain["coded"]["files"][f], "layout": "zip"}}}), r"layout", "layout")
    # a frame that expands beyond the manifest limit is refused while it is read, not allocated whole
    import tvbasis.store.format as fmt
    monkeypatch.setattr(fmt, "MAX_MANIFEST_BYTES", 4096)
    refused(lambda mf: mf["coded"].update(packed=base64.b64encode(
        zstandard.ZstdCompressor().compress(b" " * 10**6)).decode()), r"coded\.packed.*exceeds", "bomb")
