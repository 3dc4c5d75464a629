"""The paper-faithful options (docs/paper-options.md), each against an independent dense reference written here:
PCA and random addition as the paper's code sums its bases, the paper's eigengap rule, spectral clustering
against scikit-learn, the autoencoder's weight decay against torch's Adam, singleton clusters, and the weight
r_t of every task in the paper's sum Σ_m s_m (summary and ``tvbasis inspect``)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.sparse.csgraph import laplacian

from tests.tinymodels import dense_V, dense_vector, flat
from tvbasis.bases import get_basis_method, paper_eigengap_k, random_rows, spectral_clusters
from tvbasis.bases.cluster import canonical_labels, eigengap_k, normalized_laplacian
from tvbasis.cli import main
from tvbasis.errors import ConfigError
from tvbasis.io import open_checkpoint
from tvbasis.store import build_store


# ------------------------------------------------------------------------------------------------ helpers
def planted_gram(seed: int, noise: float | None = None, common: float = 0.0) -> tuple[np.ndarray, list[int], int]:
    """The Gram matrix of task vectors planted around k random centres (unequal sizes and norms), plus ``common``
    times a direction shared by all (which makes every cosine positive, as between fine-tunes of one model)."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    sizes = rng.integers(1, 5, size=k)
    sizes[0] = max(2, sizes[0])
    labels = np.repeat(np.arange(k), sizes)
    rng.shuffle(labels)
    centres = rng.standard_normal((k, 300))
    sigma = rng.uniform(0.3, 0.6) if noise is None else noise
    shared = rng.standard_normal(300)
    X = np.stack([centres[c] + sigma * rng.standard_normal(300) + common * shared for c in labels])
    X *= rng.uniform(0.5, 2.0, size=(len(labels), 1))
    return X @ X.T, labels.tolist(), k


def cosine(G: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.diag(G))
    return G / np.outer(n, n)


def paper_eigengap(S: np.ndarray) -> int:
    """The paper's code (v1 src/nlp_merge.py, spectral_clustering_from_cosine), verbatim in numpy/scipy."""
    lap = np.diag(S.sum(axis=1)) - S
    eigenvalues, _ = scipy.linalg.eigh(lap)
    eigengaps = np.diff(eigenvalues)
    return int(np.argmax(eigengaps) + 1)


def sklearn_labels(affinity: np.ndarray, k: int) -> list[int]:
    from sklearn.cluster import SpectralClustering
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the raw cosines' negative entries
        return canonical_labels(SpectralClustering(n_clusters=k, affinity="precomputed",
                                                   random_state=0).fit_predict(affinity))


def vec(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return flat(sd)


#: the cosine matrix of the 8 task vectors of the committed --full benchmark run (benchmarks/results/bench-full,
#: rounded to 3 decimals): tvbasis's rule picks 2 clusters, the paper's 7
BENCH_COSINE = np.array([
    [1.000, 0.031, 0.014, -0.001, 0.004, 0.002, 0.000, 0.010],
    [0.031, 1.000, 0.019, -0.003, -0.003, 0.004, 0.001, 0.003],
    [0.014, 0.019, 1.000, -0.003, 0.008, 0.014, 0.013, -0.000],
    [-0.001, -0.003, -0.003, 1.000, 0.018, 0.011, 0.007, 0.004],
    [0.004, -0.003, 0.008, 0.018, 1.000, 0.051, 0.031, -0.006],
    [0.002, 0.004, 0.014, 0.011, 0.051, 1.000, 0.021, -0.006],
    [0.000, 0.001, 0.013, 0.007, 0.031, 0.021, 1.000, -0.002],
    [0.010, 0.003, -0.000, 0.004, -0.006, -0.006, -0.002, 1.000]])


# ------------------------------------------------------------------------------------------------ eigengap
@pytest.mark.parametrize("seed", range(8))
def test_paper_eigengap_equals_the_papers_code(seed):
    G, _, _ = planted_gram(seed, noise=0.3 + 0.1 * seed)
    S = cosine(G)
    want = min(paper_eigengap(S), len(S) - 1)
    assert paper_eigengap_k(S)[0] == want
    fit = get_basis_method("cluster", eigengap="paper").fit(G, None)
    assert fit.M == want and fit.stats["eigengap_M"] == want and fit.stats["eigengap_rule"] == "paper"
    assert fit.stats["eigengap_M_by_rule"]["paper"] == want


@pytest.mark.parametrize("seed", range(8))
def test_tvbasis_eigengap_equals_scipy_normalised_laplacian(seed):
    G, _, _ = planted_gram(seed)
    A = np.clip(cosine(G), 0.0, None)
    np.fill_diagonal(A, 0.0)
    ev = np.linalg.eigvalsh(laplacian(A, normed=True))
    want = min(int(np.argmax(np.diff(ev))) + 1, len(A) - 1)
    assert eigengap_k(A)[0] == want
    fit = get_basis_method("cluster").fit(G, None)
    assert fit.M == want and fit.stats["eigengap_rule"] == "tvbasis"


def test_isolated_task_counts_as_its_own_component():
    """A task with no positive cosine to any other is a connected component of its own: eigenvalue 0 of the
    normalised Laplacian (as scipy and sklearn have it), so the eigengap counts it."""
    A = np.zeros((5, 5))
    A[:2, :2] = A[2:4, 2:4] = 0.9
    np.fill_diagonal(A, 0.0)  # task 4 is isolated
    ev = np.linalg.eigvalsh(laplacian(A, normed=True))
    assert np.allclose(normalized_laplacian(A), laplacian(A, normed=True))
    assert np.isclose(ev, 0.0).sum() == 3
    assert eigengap_k(A)[0] == 3


def test_bench_cosines_tvbasis_two_paper_seven():
    S = BENCH_COSINE
    A = np.clip(S, 0.0, None)
    np.fill_diagonal(A, 0.0)
    assert eigengap_k(A)[0] == 2
    assert paper_eigengap_k(S)[0] == paper_eigengap(S) == 7
    assert get_basis_method("cluster", eigengap="paper").fit(S, None).M == 7


# ------------------------------------------------------------------------------------------------ clustering
@pytest.mark.parametrize("seed", range(12))
def test_spectral_clusters_match_sklearn(seed):
    G, truth, k = planted_gram(seed)
    C = cosine(G)
    A = np.clip(C, 0.0, None)
    np.fill_diagonal(A, 0.0)
    ours = spectral_clusters(C, k, 0)
    assert ours == sklearn_labels(A, k) == canonical_labels(np.asarray(truth))


@pytest.mark.parametrize("seed", range(6))
def test_spectral_clusters_match_the_papers_sklearn_call_on_positive_cosines(seed):
    """The paper calls SpectralClustering(affinity='precomputed') on the raw cosine matrix (unit diagonal, which
    sklearn ignores). With all cosines positive that is tvbasis's affinity; with negative ones sklearn's degrees
    can turn negative (NaN embedding) — tvbasis clips them at 0."""
    G, truth, k = planted_gram(seed, common=0.5)
    C = cosine(G)
    assert (C > 0).all()
    assert spectral_clusters(C, k, 0) == sklearn_labels(C, k) == canonical_labels(np.asarray(truth))


# ------------------------------------------------------------------------------------------------ PCA addition
def test_pca_addition_paper_is_the_sum_of_components(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    V, _ = dense_V(pre, sds)
    T = V.shape[1]
    mu = V.mean(1, keepdim=True)
    U, s, Vh = torch.linalg.svd(V - mu, full_matrices=False)
    sign = torch.sign(Vh[torch.arange(2), Vh[:2].abs().argmax(1)])  # tvbasis's sign: largest |r_m[t]| positive
    paper = (U[:, :2] * s[:2] * sign).sum(1)  # the paper saves basis_m = U[:, m]·S[m] and sums them
    default = build_store(pre_p, fts, "pca", 2, tmp_path / "d")
    store = build_store(pre_p, fts, "pca", 2, tmp_path / "p", {"addition": "paper"})
    assert store.manifest.options["addition"] == "paper" and default.manifest.options["addition"] == "reconstructions"
    got = vec(store.addition().to_state_dict())
    assert torch.allclose(got, paper, atol=1e-5)
    assert (got - V.sum(1)).norm() > 0.1 * V.sum(1).norm()
    # tvbasis's default: the reconstructions sum to T·μ = Σ_t v_t, task arithmetic exactly
    ta = vec(default.addition().to_state_dict())
    assert torch.allclose(ta, T * mu[:, 0], atol=1e-5) and torch.allclose(ta, V.sum(1), atol=1e-5)
    # the per-call override, both ways
    assert torch.allclose(vec(default.addition(mode="paper").to_state_dict()), paper, atol=1e-5)
    assert torch.allclose(vec(store.addition(mode="reconstructions").to_state_dict()), V.sum(1), atol=1e-5)
    # a subset: the default falls back to its reconstructions; asking for the paper's sum is an error
    sub = vec(store.addition(tasks=["task0", "task1"]).to_state_dict())
    rec = sum(vec(store.reconstruct(t).to_state_dict()) for t in ("task0", "task1"))
    assert torch.allclose(sub, rec, atol=1e-5)
    with pytest.raises(ConfigError, match="every task"):
        store.addition(tasks=["task0"], mode="paper")
    with pytest.raises(ConfigError, match="mode"):
        store.addition(mode="bogus")
    # r_t: Σ_m s_m = V·r, recovered by least squares from the dense V; PCA's weights sum to zero
    r = torch.linalg.lstsq(V, paper[:, None]).solution[:, 0].numpy()
    w = store.summary()["addition_weights"]
    assert np.allclose([w[t] for t in store.task_names], r, atol=1e-4)
    assert abs(sum(w.values())) < 1e-9


# ------------------------------------------------------------------------------------------------ random
def dense_random_rows(store, seed: int) -> np.ndarray:
    """The D×M raw seeded Gaussian directions, tensor by tensor in sorted order (as tinymodels.flat)."""
    cols = [random_rows(seed, n, store.specs[n].shape, store.M, store.total_params, 0, store.specs[n].shape[0])
            .reshape(store.M, -1) for n in sorted(store.specs)]
    return torch.cat(cols, 1).double().T.numpy()


def test_random_addition_paper_sums_orthonormalised_directions(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    V, _ = dense_V(pre, sds)
    store = build_store(pre_p, fts, "random", 3, tmp_path / "o", {"addition": "paper", "seed": 4})
    R = dense_random_rows(store, 4)
    Q, Rq = np.linalg.qr(R)  # the paper: torch.linalg.qr of the D×M Gaussian matrix
    Q = Q * np.sign(np.diag(Rq))  # columns signed as Gram–Schmidt
    assert np.allclose(Q.T @ Q, np.eye(3), atol=1e-10)
    got = vec(store.addition().to_state_dict()).numpy()
    assert np.allclose(got, Q.sum(1), atol=1e-5)
    assert np.linalg.norm(got) == pytest.approx(math.sqrt(3), rel=1e-5)
    raw = build_store(pre_p, fts, "random", 3, tmp_path / "r", {"addition": "paper", "seed": 4, "orthonormal": False})
    got_raw = vec(raw.addition().to_state_dict()).numpy()
    assert np.allclose(got_raw, R.sum(1), atol=1e-6)
    assert np.linalg.norm(got_raw - got) > 1e-3 * np.linalg.norm(got)  # D ≈ 900: orthogonal only to O(1/√D)
    # reconstructions do not depend on it (least squares on the same span); the default sums them
    for t in store.task_names:
        assert torch.allclose(vec(store.reconstruct(t).to_state_dict()), vec(raw.reconstruct(t).to_state_dict()),
                              atol=1e-5)
    default = build_store(pre_p, fts, "random", 3, tmp_path / "d", {"seed": 4})
    P = R @ np.linalg.solve(R.T @ R, R.T @ V.numpy())  # projections of the task vectors on the span
    assert np.allclose(vec(default.addition().to_state_dict()).numpy(), P.sum(1), atol=1e-5)
    assert default.summary()["addition_weights"] is None  # random bases are not linear in V


def test_random_layerwise_orthonormalised_per_group(fam, tmp_path):
    pre_p, fts, *_ = fam
    store = build_store(pre_p, fts, "random", 2, tmp_path / "s", {"addition": "paper"}, layerwise=True)
    got = store.addition().to_state_dict()
    groups: dict[str, list[str]] = {}
    for n in sorted(store.specs):
        groups.setdefault(store.group_of.get(n, "*"), []).append(n)
    assert len(groups) > 1
    for names in groups.values():
        R = torch.cat([random_rows(0, n, store.specs[n].shape, 2, store.total_params, 0, store.specs[n].shape[0])
                       .reshape(2, -1) for n in names], 1).double().T.numpy()
        Q, Rq = np.linalg.qr(R)
        ref = (Q * np.sign(np.diag(Rq))).sum(1)
        assert np.allclose(torch.cat([got[n].reshape(-1).double() for n in names]).numpy(), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------ autoencoder
def torch_adam_reference(G: np.ndarray, M: int, steps: int, wd: float, eps: float, tau: float = 5.0,
                         lr: float = 1e-2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The paper's GramTrainer: torch Adam(weight_decay=wd) on A and W, loss tr(EᵀGE)/T² of the raw G."""
    T = G.shape[0]
    A = torch.tensor(np.random.default_rng(seed).standard_normal((T, M)), requires_grad=True)
    W = torch.zeros((M, T), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([A, W], lr=lr, weight_decay=wd, eps=eps)
    Gt = torch.tensor(G)
    eye = torch.eye(T, dtype=torch.float64)
    for _ in range(steps):
        E = torch.softmax(A / tau, 0) @ W - eye
        loss = torch.sum(E * (Gt @ E)) / T**2
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.softmax(A / tau, 0).numpy(), W.numpy()


@pytest.mark.parametrize("normalize", [False, True])
def test_autoencoder_weight_decay_is_torch_adams(normalize):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 6)) * 3.0
    G = X.T @ X
    wd, steps = 0.05, 300
    fit = get_basis_method("autoencoder", steps=steps, weight_decay=wd, normalize_gram=normalize).fit(G, 3)
    scale = np.trace(G) / 6 if normalize else 1.0
    # on G/s tvbasis adds (wd/s)·p: the paper's raw-G update, with Adam's ε scaled alike
    B, W = torch_adam_reference(G, 3, steps, wd, 1e-8 * scale)
    np.testing.assert_allclose(fit.B, B, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.W, W, rtol=1e-6, atol=1e-9)
    plain = get_basis_method("autoencoder", steps=steps, normalize_gram=normalize).fit(G, 3)
    assert np.abs(plain.W - fit.W).max() > 1e-3  # the regulariser is not negligible here


# ------------------------------------------------------------------------------------------------ singletons
@pytest.mark.parametrize("singletons", ["keep", "merge"])
def test_singleton_cluster_basis(fam, tmp_path, singletons):
    pre_p, fts, pre, sds = fam
    opts = {"inner": "ties", "inner_params": {"density": 0.2}, "singletons": singletons}
    store = build_store(pre_p, fts, "cluster", 4, tmp_path / "s", opts)
    labels = store.labels
    sizes = np.bincount(labels, minlength=4)
    alone = [t for t in range(6) if sizes[labels[t]] == 1]
    assert alone, labels  # 3 planted pairs in 4 clusters: one pair is split
    bases = open_checkpoint(tmp_path / "s" / "bases.safetensors")
    for t in alone:
        v = dense_vector(pre, sds[t])
        for k, d in v.items():
            if singletons == "keep":  # the paper: a one-member cluster is its own centroid
                ref = d
            else:  # TIES of one task: its top ceil(0.2·n) magnitudes in each tensor
                keep = math.ceil(0.2 * d.numel())
                cut = d.abs().reshape(-1).topk(keep).values[-1]
                ref = torch.where(d.abs() >= cut, d, 0.0)
            assert torch.allclose(bases.get(k)[labels[t]].double(), ref, atol=1e-6), (k, singletons)
        err = store.rel_errors[f"task{t}"]
        assert err < 1e-6 if singletons == "keep" else err > 0.1


# ------------------------------------------------------------------------------------------------ r_t
def test_inspect_shows_each_tasks_weight_in_the_papers_sum(fam, tmp_path, capsys):
    pre_p, fts, pre, sds = fam
    V, _ = dense_V(pre, sds)
    store = build_store(pre_p, fts, "autoencoder", 3, tmp_path / "s", {"steps": 300})
    total = vec(store.addition().to_state_dict())  # Σ_m s_m, read from the store
    r = torch.linalg.lstsq(V, total.double()[:, None]).solution[:, 0].numpy()
    s = store.summary()
    assert np.allclose([s["addition_weights"][t] for t in store.task_names], r, atol=1e-4)
    assert s["addition_weights_range"] is None
    assert main(["inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "r_t" in line)
    col = [c.strip() for c in header.strip("|").split("|")].index("r_t (weight in Σ_m s_m)")
    lines = out.splitlines()
    first = lines.index(header)
    table = lines[first + 2: first + 2 + store.T]  # the task table: header, rule, one row per task
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table)}
    for t, want in zip(store.task_names, r):
        assert float(rows[t][col]) == pytest.approx(want, abs=2e-4)
    assert main(["inspect", "--json", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["addition_weights"] == s["addition_weights"]


def test_layerwise_weights_are_norm_weighted_over_groups(fam, tmp_path):
    pre_p, fts, pre, sds = fam
    store = build_store(pre_p, fts, "cluster", 3, tmp_path / "s", layerwise=True)
    vs = [dense_vector(pre, sd) for sd in sds]
    total = store.addition().to_state_dict()
    groups: dict[str, list[str]] = {}
    for n in sorted(store.specs):
        groups.setdefault(store.group_of.get(n, "*"), []).append(n)
    num, den, per = np.zeros(6), np.zeros(6), []
    for names in groups.values():
        Vg = torch.stack([torch.cat([v[n].reshape(-1) for n in names]) for v in vs], 1)
        sg = torch.cat([total[n].reshape(-1).double() for n in names])
        rg = torch.linalg.lstsq(Vg, sg[:, None]).solution[:, 0].numpy()
        wg = (Vg**2).sum(0).numpy()
        num, den = num + rg * wg, den + wg
        per.append(rg)
    s = store.summary()
    assert np.allclose([s["addition_weights"][t] for t in store.task_names], num / den, atol=1e-4)
    lo, hi = np.min(per, 0), np.max(per, 0)
    assert np.allclose([s["addition_weights_range"][t] for t in store.task_names], np.stack([lo, hi], 1), atol=1e-4)


def test_merged_cluster_store_has_no_linear_weights(fam, tmp_path):
    pre_p, fts, *_ = fam
    store = build_store(pre_p, fts, "cluster", 3, tmp_path / "s", {"inner": "ties"})
    assert store.summary()["addition_weights"] is None


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("method,opts", [("pca", {"addition": "sum"}), ("random", {"addition": "nope"}),
                                         ("random", {"orthonormal": "yes"}), ("cluster", {"eigengap": "max"}),
                                         ("cluster", {"singletons": "drop"}),
                                         ("autoencoder", {"weight_decay": -1.0})])
def test_bad_option_values(method, opts):
    G = np.eye(4) + 0.1
    with pytest.raises(ConfigError, match=next(iter(opts))):
        get_basis_method(method, **opts).fit(G, 2)


def test_random_cluster_assignment_keeps_sizes_and_breaks_the_planted_clusters(fam):
    """assignment=random: the spectral clusters' sizes, members permuted (the v1 control); the linear inner
    merge's B is the indicator of the random clusters, normalised (reference built here from the labels)."""
    pre_p, fts, pre, sds = fam
    V, _ = dense_V(pre, sds)
    G = (V.T @ V).numpy()
    truth = [t % 3 for t in range(6)]
    same = lambda labels: all((labels[i] == labels[j]) == (truth[i] == truth[j])  # noqa: E731
                              for i in range(6) for j in range(6))
    broken = 0
    for seed in range(4):
        fit = get_basis_method("cluster", seed=seed, assignment="random", rescale=False).fit(G, 3)
        assert sorted(np.bincount(fit.labels).tolist()) == [2, 2, 2]  # the planted clusters' sizes
        assert fit.stats["assignment"] == "random"
        B = np.zeros((6, 3))
        for t, m in enumerate(fit.labels):
            B[t, m] = 0.5
        assert np.allclose(fit.B, B)
        broken += not same(fit.labels)
    assert broken >= 3  # 1 partition of 15 equals the planted one: at most one seed may draw it
    with pytest.raises(Exception, match="assignment"):
        get_basis_method("cluster", assignment="shuffled").fit(G, 3)
