"""Clustering bases (the paper's first form): spectral clustering of the task vectors on their cosine
similarity, one basis per cluster made by an inner merge of its members.

Affinity = cosine clipped at 0 (zero diagonal). M defaults to the largest eigengap of the normalised graph
Laplacian. Linear inner merges (mean, task_arithmetic) give B as the (normalised) cluster indicator; other
inner merges (ties, topk, dare_*, fisher, consensus) form each basis per tensor during materialisation. W maps
each task to its cluster's basis, scaled by the least-squares coefficient ⟨v_t, s_m⟩/‖s_m‖² (exact, from the
cross-Grams of the materialisation pass) unless ``rescale`` is off.

Options where tvbasis and the paper differ (docs/paper-options.md):

* ``eigengap`` — how M is chosen without -M. ``tvbasis`` (default): the largest gap among the eigenvalues of the
  normalised Laplacian I − D^{-1/2}AD^{-1/2} of A = max(C, 0) with a zero diagonal, the graph the clustering itself
  uses. ``paper``: the paper's code (v1 src/nlp_merge.py ``spectral_clustering_from_cosine``): the unnormalised
  L = diag(S·1) − S of the raw cosine matrix S (negative cosines kept; S's unit diagonal cancels in L), k =
  argmax(diff(eigenvalues)) + 1 over all T − 1 gaps.
* ``singletons`` — the basis of a one-member cluster under a non-linear inner merge. ``keep`` (default, the
  paper's MERS_exp.ipynb ``compute_cluster_centroids``: a cluster of one point is its own centroid): the basis is
  the member's task vector, unmerged. ``merge``: the inner merge applied to the one member (TIES/top-k trim it to
  ``density``, DARE drops and rescales), which loses part of the vector with no interference to resolve.
  Linear inner merges are unaffected (their singleton basis is the member, times its weight).

``assignment=random`` is the control of the paper's v1 experiment (spectral clusters against random clusters of
the same k): the spectral labels are permuted over the tasks with ``seed``, so the random clusters have exactly
the spectral clusters' number and sizes and differ only in which tasks share a basis. Everything after the
labels (inner merge, scales, singletons) is the same as for spectral clusters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvbasis.bases.base import BasisFit, BasisMethod, check_M, cosine_from_gram, eckart_young_bound, reconstruction_loss
from tvbasis.errors import ConfigError
from tvbasis.merge import MergeSpec, get_merger


def normalized_laplacian(affinity: np.ndarray) -> np.ndarray:
    """I − D^{-1/2}·A·D^{-1/2}, with a zero row and column for a vertex of degree 0 (as scipy's
    ``csgraph.laplacian(normed=True)``, which sklearn's spectral clustering uses): an isolated task is its own
    connected component, so it adds an eigenvalue 0 — one more cluster for the eigengap — not an eigenvalue 1."""
    d = affinity.sum(axis=1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    return np.diag((d > 0).astype(float)) - inv[:, None] * affinity * inv[None, :]


def eigengap_k(affinity: np.ndarray) -> tuple[int, list[float]]:
    """Number of clusters at the largest gap among the Laplacian's smallest eigenvalues (1 ≤ k ≤ T − 1)."""
    T = affinity.shape[0]
    ev = np.sort(np.linalg.eigvalsh(normalized_laplacian(affinity)))
    if T <= 2:
        return 1, ev.tolist()
    gaps = np.diff(ev[:T])  # gaps[k-1] = λ_{k+1} − λ_k
    k = int(np.argmax(gaps[: T - 1])) + 1
    return max(1, min(k, T - 1)), ev.tolist()


def paper_eigengap_k(S: np.ndarray) -> tuple[int, list[float]]:
    """The paper's eigengap rule on the raw cosine matrix S: eigenvalues of L = diag(S·1) − S, ascending;
    k = argmax of their T − 1 successive gaps, plus one (clipped to 1 ≤ k ≤ T − 1)."""
    S = np.asarray(S, dtype=np.float64)
    T = S.shape[0]
    ev = np.linalg.eigvalsh(np.diag(S.sum(axis=1)) - S)
    if T <= 2:
        return 1, ev.tolist()
    k = int(np.argmax(np.diff(ev))) + 1
    return max(1, min(k, T - 1)), ev.tolist()


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Plain Lloyd k-means with k-means++ seeding and restarts (tiny inputs: T points)."""
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    n = x.shape[0]
    for _ in range(n_init):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centres.append(x[rng.choice(n, p=p)])
        c = np.asarray(centres)
        labels = np.zeros(n, dtype=int)
        for _ in range(iters):
            labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.asarray([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        cost = float(((x - c[labels]) ** 2).sum())
        if len(set(labels.tolist())) == k and cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    if best is None:
        raise ConfigError(f"cluster: could not form {k} non-empty clusters")
    return best


def canonical_labels(labels: np.ndarray) -> list[int]:
    """Relabel clusters in order of first appearance, so results do not depend on k-means' numbering."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(lab), len(mapping)) for lab in labels]


def random_assignment(labels: list[int], seed: int) -> list[int]:
    """``labels`` permuted over the tasks with ``seed`` (same clusters and sizes, members drawn at random)."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    return canonical_labels(np.asarray(labels)[perm])


def spectral_clusters(C: np.ndarray, k: int, seed: int) -> list[int]:
    """Spectral clustering of T tasks into ``k`` groups from their cosine matrix ``C``: negative similarities
    clipped to 0, the normalised Laplacian's first k eigenvectors, rows normalised, seeded k-means; canonical
    labels (first task in cluster 0, ...)."""
    A = np.clip(C, 0.0, None)
    np.fill_diagonal(A, 0.0)
    L = normalized_laplacian(A)
    _, vecs = np.linalg.eigh(L)
    emb = vecs[:, :k]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    return canonical_labels(kmeans(emb, k, seed))


class ClusterBasis(BasisMethod):
    name = "cluster"
    options: dict[str, Any] = {"inner": "mean", "inner_params": {}, "rescale": True, "seed": 0,
                               "eigengap": "tvbasis",  # tvbasis (normalised Laplacian, clipped) | paper (D − S, raw)
                               "singletons": "keep",   # keep (a one-member cluster's basis is its task vector) | merge
                               "assignment": "spectral"}  # spectral | random (spectral sizes, members permuted)
    choices = {"eigengap": ("tvbasis", "paper"), "singletons": ("keep", "merge"), "assignment": ("spectral", "random")}

    def fit(self, G: np.ndarray, M: int | None) -> BasisFit:
        T = G.shape[0]
        C = cosine_from_gram(G)
        A = np.clip(C, 0.0, None)
        np.fill_diagonal(A, 0.0)
        k_tv, spectrum_tv = eigengap_k(A)
        k_paper, spectrum_paper = paper_eigengap_k(C)
        rule = str(self.params["eigengap"])
        k_gap, spectrum = (k_paper, spectrum_paper) if rule == "paper" else (k_tv, spectrum_tv)
        M = check_M(k_gap if M is None else M, T, self.name)
        labels = [0] * T if M == 1 else spectral_clusters(C, M, int(self.params["seed"]))
        if self.params["assignment"] == "random":
            labels = random_assignment(labels, int(self.params["seed"]))
        inner = str(self.params["inner"])
        params = dict(self.params["inner_params"] or {})
        merger = get_merger(MergeSpec(inner, params))  # validates the inner merge and its parameters up front
        W = np.zeros((M, T))
        W[labels, np.arange(T)] = 1.0
        sizes = np.bincount(labels, minlength=M)
        stats: dict[str, Any] = {"eigengap_M": k_gap, "eigengap_rule": rule,
                                 "eigengap_M_by_rule": {"tvbasis": k_tv, "paper": k_paper},
                                 "assignment": str(self.params["assignment"]),
                                 "laplacian_spectrum": spectrum, "cluster_sizes": sizes.tolist(),
                                 "lower_bound": eckart_young_bound(G, M)}
        refit = "cluster_scale" if self.params["rescale"] else None
        if merger.linear:
            B = np.zeros((T, M))
            w = params.get("weight")
            weights = np.ones(T) if w is None else np.asarray(w, dtype=float)
            for t, m in enumerate(labels):
                B[t, m] = weights[t]
            if merger.normalizes:
                B = B / np.maximum(B.sum(axis=0, keepdims=True), 1e-300)
            if self.params["rescale"]:
                # exact least-squares scale of each task onto its cluster's basis, from G alone
                S = G @ B  # ⟨v_t, s_m⟩
                K = np.diag(B.T @ G @ B)  # ‖s_m‖²
                W = np.zeros((M, T))
                for t, m in enumerate(labels):
                    W[m, t] = S[t, m] / K[m] if K[m] > 0 else 0.0
            stats["loss"] = reconstruction_loss(G, B @ W)
            return BasisFit(M=M, B=B, W=W, labels=labels, inner=MergeSpec(inner, merger.params), refit=refit,
                            stats=stats)
        stats["singletons"] = str(self.params["singletons"])
        return BasisFit(M=M, B=None, W=W, labels=labels, inner=MergeSpec(inner, merger.params), refit=refit,
                        stats=stats)
