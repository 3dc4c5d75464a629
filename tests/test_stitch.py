"""Localize-and-Stitch: dataless masks, the masks file, stitching, SharedMask and StitchTwice — each checked
against a dense reference computed here from the fine-tunes held in memory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.tinymodels import ft_args, make_family
from tvbasis.cli import main
from tvbasis.errors import ConfigError, TvbasisError
from tvbasis.io import open_checkpoint
from tvbasis.stitch import (
    exactly_one_masks,
    localize,
    localized_vector,
    majority_masks,
    open_masks,
    stitch,
    stitch_weights,
)

LABELS = [0, 1, 2, 0, 1, 2]  # the family's planted clusters: task t around centre t % 3


@pytest.fixture(scope="module")
def fam6(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam6"), T=6, clusters=3)


def taus(pre: dict, sds: list[dict]) -> dict[str, torch.Tensor]:
    """{tensor: (T, *shape) float32} dense task vectors."""
    return {k: torch.stack([sd[k].float() - pre[k].float() for sd in sds]) for k in pre if pre[k].is_floating_point()}


def ref_topk(x: torch.Tensor, s: float) -> torch.Tensor:
    """Per row of (T, n): the ceil(s·n) largest |x| (sorted, lowest index first among equals), never x = 0."""
    T, n = x.shape
    k = math.ceil(s * n)
    out = torch.zeros((T, n), dtype=torch.bool)
    for t in range(T):
        order = sorted(range(n), key=lambda i: (-abs(float(x[t, i])), i))[:k]
        out[t, order] = True
    return out & (x != 0)


def ref_stitch(masks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_t m_t τ_t / n per coordinate, written as a loop over coordinates."""
    flat_m, flat_x = masks.reshape(masks.shape[0], -1), x.reshape(x.shape[0], -1)
    out = torch.zeros(flat_x.shape[1])
    for i in range(flat_x.shape[1]):
        on = [t for t in range(flat_m.shape[0]) if flat_m[t, i]]
        if on:
            out[i] = sum(float(flat_x[t, i]) for t in on) / len(on)
    return out.reshape(x.shape[1:])


# ---------------------------------------------------------------------------------------------- mask rules
def test_stitch_weights_majority_vote_and_exactly_one_on_known_masks() -> None:
    m = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    w = stitch_weights(m)
    assert torch.allclose(w, torch.tensor([[.5, 1, 0, 0, 1 / 3], [.5, 0, .5, 0, 1 / 3], [0, 0, .5, 0, 1 / 3]]))
    # clusters {0, 1} and {2}: a 2-member cluster keeps what one of its two members has (mean ≥ ½)
    assert majority_masks(m, [0, 0, 1]).tolist() == [[True, True, True, False, True], m[2].tolist()]
    # a 3-member cluster keeps what at least 2 of 3 have
    assert majority_masks(m, [0, 0, 0]).tolist() == [[True, False, True, False, True]]
    # exactly one member of the cluster claims it
    assert exactly_one_masks(m, [0, 0, 1]).tolist() == [[False, True, False, False, False],
                                                         [False, False, True, False, False], m[2].tolist()]
    assert exactly_one_masks(m, [0, 0, 0]).tolist() == [[False, True, False, False, False],
                                                         [False, False, False, False, False],
                                                         [False, False, False, False, False]]


def test_majority_vote_matches_a_float_mean_reference() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.rand((7, 200), generator=g) < 0.4
    labels = [0, 1, 0, 2, 1, 0, 1]
    got = majority_masks(m, labels)
    for c in range(3):
        members = m[[t for t, lab in enumerate(labels) if lab == c]].double()
        assert torch.equal(got[c], members.mean(0) >= 0.5)


# ---------------------------------------------------------------------------------------------- dataless masks
@pytest.mark.parametrize("chunk", [None, 24])
def test_dataless_masks_and_values_per_tensor(fam6, tmp_path, chunk) -> None:
    pre_p, fts, pre, sds = fam6
    ms = localize(pre_p, fts, tmp_path / "m.safetensors", sparsity=0.1, chunk_elements=chunk)
    X = taus(pre, sds)
    assert set(ms.specs) == set(X) and ms.tasks == list(fts) and ms.masks == list(fts)
    total = 0
    for name, x in X.items():
        flat = x.reshape(6, -1)
        ref = ref_topk(flat, 0.1)
        assert torch.equal(ms.stacked_masks(ms.tasks, name).reshape(6, -1), ref), name
        total += int(ref.sum())
        for t, task in enumerate(ms.tasks):  # values: τ on the support, 0 elsewhere
            assert torch.allclose(ms.values(task, name).reshape(-1), flat[t] * ref[t], atol=0)
            if x.dim() > 1 and x.shape[1] > 1:  # a row range starting mid-byte
                rows = ms.values(task, name, (1, x.shape[1] // 2 + 1))
                assert torch.equal(rows, (x[t] * ref[t].reshape(x.shape[1:]))[1: x.shape[1] // 2 + 1])
    # storage: masks bit-packed, float32 values on the supports only
    n = sum(x[0].numel() for x in X.values())
    assert ms.mask_bytes == 6 * sum(math.ceil(x[0].numel() / 8) for x in X.values())
    assert ms.value_bytes == 4 * total
    assert ms.nbytes > ms.mask_bytes + ms.value_bytes and ms.num_parameters == n
    assert sum(ms.support(t) for t in ms.tasks) == total
    assert ms.settings["sparsity"] == 0.1 and ms.settings["localizer"] == "dataless"


def test_dataless_masks_global_scope(fam6, tmp_path) -> None:
    pre_p, fts, pre, sds = fam6
    ms = localize(pre_p, fts, tmp_path / "g.safetensors", sparsity=0.05, trim_scope="global")
    X = taus(pre, sds)
    names = sorted(X)
    full = torch.cat([X[k].reshape(6, -1) for k in names], 1)
    k = math.ceil(0.05 * full.shape[1])
    th = full.abs().sort(1, descending=True).values[:, k - 1: k]
    ref = (full.abs() >= th) & (full != 0)
    got = torch.cat([ms.stacked_masks(ms.tasks, n).reshape(6, -1) for n in names], 1)
    assert torch.equal(got, ref)
    assert all(ms.support(t) == k for t in ms.tasks)  # no ties in random data


# ---------------------------------------------------------------------------------------------- stitching
def test_stitch_matches_the_dense_reference_from_fine_tunes_and_from_stored_values(fam6, tmp_path) -> None:
    pre_p, fts, pre, sds = fam6
    ms = localize(pre_p, fts, tmp_path / "m.safetensors", sparsity=0.2)
    X = taus(pre, sds)
    a, b = stitch(pre_p, fts, ms), stitch(None, None, ms)
    for name, x in X.items():
        m = ms.stacked_masks(ms.tasks, name)
        ref = ref_stitch(m, x)
        assert torch.allclose(a.get(name), ref, atol=1e-6) and torch.allclose(b.get(name), ref, atol=1e-6)
    # a subset of the tasks: n counts only the masks being stitched
    sub = {k: fts[k] for k in ("task1", "task4")}
    c = stitch(pre_p, sub, ms)
    name = "encoder.layer.0.output.dense.weight"
    m = ms.stacked_masks(["task1", "task4"], name)
    assert torch.allclose(c.get(name), ref_stitch(m, X[name][[1, 4]]), atol=1e-6)
    # each task's own localized vector m_t ⊙ τ_t
    lv = localized_vector(ms, "task2")
    assert torch.allclose(lv.get(name), X[name][2] * ms.task_mask("task2", name), atol=0)
    # written model = θ₀ + stitched delta; tensors outside the masks and integer buffers copied
    a.apply_to(pre_p, out=tmp_path / "model")
    out = open_checkpoint(tmp_path / "model")
    assert torch.allclose(out.get(name), pre[name] + ref_stitch(ms.stacked_masks(ms.tasks, name), X[name]), atol=1e-6)
    assert torch.equal(out.get("embeddings.position_ids"), pre["embeddings.position_ids"])


def test_stitching_in_row_chunks_is_the_same(fam6, tmp_path) -> None:
    pre_p, fts, _, _ = fam6
    ms = localize(pre_p, fts, tmp_path / "m.safetensors", sparsity=0.3)
    whole, chunked = stitch(pre_p, fts, ms), stitch(pre_p, fts, ms, chunk_elements=10)
    for name in ms.specs:
        assert torch.allclose(whole.get(name), chunked.get(name), atol=1e-7)
        if ms.specs[name].shape and ms.specs[name].shape[0] > 3:
            assert torch.allclose(whole.get(name, (2, 5)), chunked.get(name)[2:5], atol=1e-7)


def test_shared_mask_against_the_dense_reference(fam6, tmp_path) -> None:
    pre_p, fts, pre, sds = fam6
    ms = localize(pre_p, fts, tmp_path / "m.safetensors", sparsity=0.2)
    clusters = dict(zip(fts, LABELS))
    X = taus(pre, sds)
    a = stitch(pre_p, fts, ms, shared_mask=True, clusters=clusters)
    # the same from a masks file of M shared masks (written by localize --shared-mask), with no fine-tunes
    shared = localize(pre_p, fts, tmp_path / "s.safetensors", sparsity=0.2, shared_mask=True, clusters=clusters)
    assert shared.masks == ["cluster0", "cluster1", "cluster2"] and shared.mask_of == clusters
    assert shared.mask_bytes * 2 == ms.mask_bytes  # M = 3 masks instead of T = 6
    b = stitch(None, None, shared)
    for name, x in X.items():
        m = ms.stacked_masks(ms.tasks, name).reshape(6, -1)
        votes = {c: m[[t for t in range(6) if LABELS[t] == c]].double().mean(0) >= 0.5 for c in range(3)}
        eff = torch.stack([votes[LABELS[t]] for t in range(6)]).reshape(x.shape)
        ref = ref_stitch(eff, x)
        assert torch.allclose(a.get(name), ref, atol=1e-6) and torch.allclose(b.get(name), ref, atol=1e-6), name
        assert torch.equal(shared.mask(1, name).reshape(-1), votes[1])
    # a task's localized vector under SharedMask: its τ on its cluster's mask
    name = "pooler.dense.weight"
    lv = localized_vector(shared, "task3")
    assert torch.equal(lv.get(name), X[name][3] * shared.mask(0, name))
    # from per-task stored values a shared mask reaches beyond them: refused
    with pytest.raises(ConfigError, match="beyond"):
        stitch(None, None, ms, shared_mask=True, clusters=clusters)


def test_stitch_twice_against_the_dense_reference(fam6, tmp_path) -> None:
    pre_p, fts, pre, sds = fam6
    ms = localize(pre_p, fts, tmp_path / "m.safetensors", sparsity=0.25)
    clusters = dict(zip(fts, LABELS))
    X = taus(pre, sds)
    a = stitch(pre_p, fts, ms, stitch_twice=True, clusters=clusters)
    b = stitch(None, None, ms, stitch_twice=True, clusters=LABELS)  # from the stored values
    twice = localize(pre_p, fts, tmp_path / "t.safetensors", sparsity=0.25, stitch_twice=True, clusters=clusters)
    c = stitch(None, None, twice)  # the pruned masks stored: a plain stitch of them is StitchTwice
    for name, x in X.items():
        m = ms.stacked_masks(ms.tasks, name).reshape(6, -1)
        first = torch.zeros_like(m)
        for t in range(6):  # stage 1: claimed by exactly one member of the cluster
            count = sum(m[u].int() for u in range(6) if LABELS[u] == LABELS[t])
            first[t] = m[t] & (count == 1)
        ref = ref_stitch(first.reshape(x.shape), x)  # stage 2: overlap averaging across all tasks
        for v in (a, b, c):
            assert torch.allclose(v.get(name), ref, atol=1e-6), name
        assert torch.equal(twice.stacked_masks(twice.tasks, name).reshape(6, -1), first)


def test_clusters_are_validated(fam6, tmp_path) -> None:
    pre_p, fts, _, _ = fam6
    ms = localize(pre_p, fts, tmp_path / "m.safetensors", sparsity=0.1)
    with pytest.raises(ConfigError, match="no cluster given"):
        stitch(pre_p, fts, ms, shared_mask=True, clusters={"task0": 0})
    with pytest.raises(ConfigError, match="clusters"):
        stitch(pre_p, fts, ms, stitch_twice=True)
    with pytest.raises(ConfigError, match="one of"):
        stitch(pre_p, fts, ms, shared_mask=True, stitch_twice=True, clusters=LABELS)
    with pytest.raises(ConfigError, match="no mask for task"):
        stitch(pre_p, {**fts, "extra": fts["task0"]}, ms)
    with pytest.raises(ConfigError, match="sparsity"):
        localize(pre_p, fts, tmp_path / "x.safetensors", sparsity=0.0)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_exact_forms_and_the_rules(tmp_path, capsys) -> None:
    pre_p, fts, pre, sds = make_family(tmp_path / "fam", T=4, clusters=2)
    masks, model = tmp_path / "MASKS.safetensors", tmp_path / "MODEL"
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--sparsity", "0.01",
                 "--out", str(masks)]) == 0
    assert "density" in capsys.readouterr().out
    assert main(["-q", "stitch", "--pretrained", str(pre_p), *ft_args(fts), "--masks", str(masks),
                 "--out", str(model)]) == 0
    ms = open_masks(masks)
    X = taus(pre, sds)
    name = "encoder.layer.1.output.dense.weight"
    ref = pre[name] + ref_stitch(ms.stacked_masks(ms.tasks, name), X[name])
    assert torch.allclose(open_checkpoint(model).get(name), ref, atol=1e-6)
    # every setting recorded
    meta = open_checkpoint(masks).metadata()
    settings = json.loads(meta["settings"])
    assert settings["sparsity"] == 0.01 and settings["trim_scope"] == "tensor" and settings["rule"] == "stitch"
    assert meta["tvbasis"] == "tvbasis.masks" and json.loads(meta["tasks"]) == list(fts)
    # SharedMask with the clusters of a cluster store; StitchTwice with --clusters; from stored values
    store = tmp_path / "store"
    assert main(["-q", "build", "--pretrained", str(pre_p), *ft_args(fts), "--method", "cluster", "-M", "2",
                 "--out", str(store)]) == 0
    assert main(["-q", "stitch", "--pretrained", str(pre_p), *ft_args(fts), "--masks", str(masks), "--shared-mask",
                 "--store", str(store), "--out", str(tmp_path / "shared")]) == 0
    labels = json.loads(open_checkpoint(masks).metadata()["tasks"])
    from tvbasis.store import open_store
    lab = dict(zip(open_store(store).task_names, open_store(store).labels))
    m = ms.stacked_masks(labels, name).reshape(4, -1)
    lab_list = [lab[t] for t in labels]
    votes = {c: m[[t for t in range(4) if lab_list[t] == c]].double().mean(0) >= 0.5 for c in set(lab_list)}
    eff = torch.stack([votes[lab_list[t]] for t in range(4)]).reshape(X[name].shape)
    assert torch.allclose(open_checkpoint(tmp_path / "shared").get(name), pre[name] + ref_stitch(eff, X[name]),
                          atol=1e-6)
    assert main(["-q", "stitch", "--pretrained", str(pre_p), "--masks", str(masks), "--stitch-twice",
                 "--clusters", "task0=0,task1=1,task2=0,task3=1", "--out", str(tmp_path / "twice")]) == 0
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--sparsity", "0.2", "--shared-mask",
                 "--clusters", "task0=0,task1=1,task2=0,task3=1", "--json", "--out", str(tmp_path / "s.safetensors")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["masks"] == ["cluster0", "cluster1"] and summary["rule"] == "shared"
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--out", str(tmp_path / "m.st")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    pre_p, fts, _, _ = make_family(tmp_path / "fam", T=2)
    masks = tmp_path / "m.safetensors"
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--shared-mask",
                 "--out", str(masks)]) == 2
    assert "needs the clusters" in capsys.readouterr().err
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--data", "task0=nothing-here",
                 "--data", "task1=nothing-here", "--out", str(masks)]) == 2
    assert "neither a file nor a benchmark task" in capsys.readouterr().err
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--out", str(masks)]) == 0
    assert main(["-q", "localize", "--pretrained", str(pre_p), *ft_args(fts), "--out", str(masks)]) == 2
    assert "exists" in capsys.readouterr().err
    with pytest.raises(TvbasisError, match="not a tvbasis masks file"):
        open_masks(pre_p / "model.safetensors")
