"""``build --budget`` / ``--quality``: the byte budget, the candidates' exact bytes and errors, the allocation
(against brute force), and whole stores (size on disk, every task's error against the dense task vector)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from tests.tinymodels import save_hf
from tvbasis.cli import main
from tvbasis.compress.budget import Budget, Candidate, allocate, ladder, measure, quality_to_error, sparse_ladder
from tvbasis.errors import ConfigError
from tvbasis.store import BasisStore
from tvbasis.store.budget import build_budget_store, store_size

SHAPES = {"embeddings.word_embeddings.weight": (300, 48), "encoder.layer.0.attention.query.weight": (48, 48),
          "encoder.layer.0.attention.query.bias": (48,), "encoder.layer.0.intermediate.dense.weight": (192, 48),
          "encoder.layer.0.output.dense.weight": (48, 192), "encoder.layer.1.output.LayerNorm.weight": (48,)}


def _family(root: Path, ranks: tuple[int, ...] = (2, 4, 8, 16)) -> tuple[Path, dict[str, Path], dict]:
    """Fine-tunes whose matrix deltas are rank r_t plus a little noise (task t harder as r_t grows), embedding
    deltas on 30 rows, small bias/norm deltas."""
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) * 0.5 for k, s in SHAPES.items()}
    save_hf(pre, root / "pre")
    fts, deltas = {}, {}
    for t, r in enumerate(ranks):
        d = {}
        for k, v in pre.items():
            if "word" in k:
                x = torch.zeros_like(v)
                x[torch.randperm(v.shape[0], generator=g)[:30]] = 0.01 * torch.randn(30, v.shape[1], generator=g)
            elif v.ndim == 2:
                x = (torch.randn(v.shape[0], r, generator=g) @ torch.randn(r, v.shape[1], generator=g)) * 0.01 / r ** 0.5
                x += 0.0005 * torch.randn(v.shape, generator=g)
            else:
                x = 0.01 * torch.randn(v.shape, generator=g)
            d[k] = x
        ft = {k: pre[k] + d[k] for k in pre}
        save_hf(ft, root / f"ft{t}")
        # the task vector as the reader sees it: (θ₀ + δ) − θ₀ in float32
        deltas[f"t{t}"] = {k: ft[k] - pre[k] for k in pre}
        fts[f"t{t}"] = root / f"ft{t}"
    return root / "pre", fts, deltas


def _rel(v: dict[str, torch.Tensor], vhat: dict[str, torch.Tensor]) -> float:
    num = sum(float(((vhat[k].double() - x.double()) ** 2).sum()) for k, x in v.items())
    den = sum(float((x.double() ** 2).sum()) for x in v.values())
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------------------------- the budget
def test_budget_parse() -> None:
    assert Budget.parse("128x").ratio == 128.0
    assert Budget.parse("12.5X").ratio == 12.5
    assert Budget.parse("20MB").nbytes == 20_000_000
    assert Budget.parse("2MiB").nbytes == 2 * 2 ** 20
    assert Budget.parse("128x").target(128_000) == 1000
    for bad in ("", "x", "0.5x", "-3x", "lots", "1e999x", "nanx"):
        with pytest.raises(ConfigError):
            Budget.parse(bad)
    assert quality_to_error(0.91) == pytest.approx(0.3)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError):
            quality_to_error(bad)


# ------------------------------------------------------------------------------------------- the candidates
@pytest.mark.parametrize("shape", [(40, 24), (128, 256)])  # 128 x 256: every factor codec's groups align with rows
def test_measure_exact_bytes_and_errors(shape: tuple[int, int]) -> None:
    """(128 x 256 takes the shared-rows path: each factor codec codes the largest rank's factors once and every rank
    reads its errors off the first rows; checked here against coding each candidate on its own.)"""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape[0], shape[1], generator=g) @ torch.diag(torch.linspace(2, 0.01, shape[1]))
    cands = {c.spec: c for c in measure("encoder.w", x, "residual/encoder.w/a")}
    assert set(cands) == {c for c in (_canon(s) for s in ladder("encoder.w", x.shape))}
    # float16: the error is the float16 rounding error, computed here independently
    f16 = cands["float16"]
    assert f16.sqerr == pytest.approx(float(((x.double() - x.half().double()) ** 2).sum()), rel=1e-6)
    assert f16.nbytes > 2 * x.numel()  # data + the entry's manifest/header bytes
    # a low-rank candidate loses at least the Eckart–Young tail and not much more at 8 bits
    s = torch.linalg.svdvals(x.double())
    for r in (1, 4):
        c = cands[_canon(f"lowrank:rank={r}+int8:group=128,scheme=symmetric")]
        tail = float((s[r:] ** 2).sum())
        assert tail * (1 - 1e-6) <= c.sqerr <= tail + 1e-3 * float((x.double() ** 2).sum())
        assert c.nbytes > r * sum(shape)  # one byte per factor entry at least
    # the predicted error of quantised factors is the decoded one within a few %; bytes exactly the encoding's
    from tvbasis.codecs import parse_codec
    from tvbasis.compress.budget import _encode, entry_overhead
    from tvbasis.compress.svd import SVDCache
    for spec, c in cands.items():
        codec = parse_codec(spec)
        enc = _encode(codec, x, "k", SVDCache(192))
        exact = float(((x.double() - codec.decode(enc).double()) ** 2).sum())
        assert c.sqerr == pytest.approx(exact, rel=0.05, abs=1e-9), spec
        flat, desc = enc.to_tensors("")
        assert c.nbytes == enc.nbytes + entry_overhead("residual/encoder.w/a", desc, list(flat)), spec
    # lower ranks cost fewer bytes
    assert cands[_canon("lowrank:rank=1+int4:group=32,scheme=affine")].nbytes < \
        cands[_canon("lowrank:rank=4+int4:group=32,scheme=affine")].nbytes


def test_measure_sparse_rows_codes_only_the_touched_rows() -> None:
    """An embedding table's candidates code its touched rows once split; bytes and errors are those of coding the
    whole table (exact, or within a few % for quantised low-rank rows), computed here by encode/decode."""
    from tvbasis.codecs import parse_codec
    from tvbasis.compress.budget import entry_overhead
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(500, 24)
    rows = torch.randperm(500, generator=g)[:37]
    x[rows] = torch.randn(37, 6, generator=g) @ torch.randn(6, 24, generator=g) + 0.05 * torch.randn(37, 24,
                                                                                                    generator=g)
    name = "embeddings.word_embeddings.weight"
    cands = measure(name, x, "residual/t/e")
    assert {c.spec for c in cands} == {_canon(s) for s in ladder(name, x.shape) + sparse_ladder(name, x)}
    assert any("lowrank" in c.spec for c in cands) and any(c.spec == _canon("sparse-rows+float16") for c in cands)
    for c in cands:
        codec = parse_codec(c.spec)
        enc = codec.encode(x)
        flat, desc = enc.to_tensors("")
        assert c.nbytes == enc.nbytes + entry_overhead("residual/t/e", desc, list(flat)), c.spec
        exact = float(((x.double() - codec.decode(enc).double()) ** 2).sum())
        # quantised low-rank rows: the second-order estimate of _lowrank_candidate (here up to ~10 % off where the
        # rank exceeds the rows' true rank and rounding dominates); anything else exact
        tol = 0.15 if "lowrank" in c.spec else 1e-6
        assert c.sqerr == pytest.approx(exact, rel=tol, abs=1e-9), c.spec
        if "lowrank:rank=" in c.spec:  # never below the Eckart–Young tail of the touched rows
            r = int(c.spec.split("lowrank:rank=")[1].split(",")[0].split("+")[0])
            s = torch.linalg.svdvals(x[rows.sort().values].double())
            assert c.sqerr >= float((s[r:] ** 2).sum()) * (1 - 1e-6), c.spec


def _canon(spec: str) -> str:
    from tvbasis.codecs import parse_codec
    return parse_codec(spec).spec


# ------------------------------------------------------------------------------------------- the allocation
def _synthetic() -> tuple[dict[str, dict[str, list[Candidate]]], dict[str, float]]:
    g = torch.Generator().manual_seed(3)
    cands: dict[str, dict[str, list[Candidate]]] = {}
    norms2 = {}
    for t in ("a", "b", "c"):
        cands[t] = {}
        total = 0.0
        for n in ("x", "y"):
            e0 = float(torch.rand(1, generator=g)) * 10 + 1
            total += e0
            pts = []
            for k in range(4):
                nbytes = int(100 * (k + 1) + int(torch.randint(0, 50, (1,), generator=g)))
                pts.append(Candidate(f"{n}{k}", nbytes, e0 * 0.5 ** (k * (1 + (t == "c")))))
            cands[t][n] = pts
        norms2[t] = total
    return cands, norms2


def _brute(cands: dict, norms2: dict, budget: int) -> float:
    best = math.inf
    tasks = list(cands)
    per_task = {t: list(itertools.product(*[list(cands[t][n]) for n in cands[t]])) for t in tasks}
    options = {t: [(sum(c.nbytes for c in combo), math.sqrt(sum(c.sqerr for c in combo) / norms2[t]))
                   for combo in per_task[t]] for t in tasks}
    for choice in itertools.product(*[options[t] for t in tasks]):
        if sum(b for b, _ in choice) <= budget:
            best = min(best, max(e for _, e in choice))
    return best


@pytest.mark.parametrize("budget", [850, 1000, 1300, 1700, 2200])
def test_allocate_meets_the_budget_and_the_brute_force_minimax(budget: int) -> None:
    cands, norms2 = _synthetic()
    a = allocate(cands, norms2, budget_bytes=budget)
    chosen = {t: {n: next(c for c in cands[t][n] if c.spec == s) for n, s in a.specs[t].items()} for t in cands}
    total = sum(c.nbytes for t in chosen for c in chosen[t].values())
    assert total <= budget and total == a.total_bytes
    worst = max(math.sqrt(sum(c.sqerr for c in chosen[t].values()) / norms2[t]) for t in chosen)
    assert worst == pytest.approx(max(a.rel_errors.values()))
    # hull steps cannot always hit the exact discrete optimum; they must stay close to it
    opt = _brute(cands, norms2, budget)
    assert worst <= opt * 1.35 + 1e-12


def test_allocate_quality_mode_and_monotone() -> None:
    cands, norms2 = _synthetic()
    q = allocate(cands, norms2, max_error=0.4)
    assert q.feasible and not allocate(cands, norms2, max_error=0.3).feasible
    assert max(q.rel_errors.values()) <= 0.4
    # nothing much cheaper reaches 0.4 on every task (brute force over the whole product per task)
    for t in cands:
        combos = itertools.product(*[cands[t][n] for n in cands[t]])
        ok = [sum(c.nbytes for c in cb) for cb in combos
              if math.sqrt(sum(c.sqerr for c in cb) / norms2[t]) <= 0.4]
        assert q.task_bytes[t] <= min(ok) * 1.35
    worst = [max(allocate(cands, norms2, budget_bytes=b).rel_errors.values()) for b in (900, 1200, 1600, 2400)]
    assert worst == sorted(worst, reverse=True)
    floor = sum(min(c.nbytes for c in cands[t][n]) for t in cands for n in cands[t])
    assert not allocate(cands, norms2, budget_bytes=floor - 1).feasible
    assert allocate(cands, norms2, budget_bytes=floor).feasible


# ----------------------------------------------------------------------------------------------- whole stores
def test_budget_store_fits_and_every_task_matches_its_dense_vector(tmp_path: Path) -> None:
    pre, fts, deltas = _family(tmp_path)
    fp32 = 4 * len(fts) * sum(math.prod(s) for s in SHAPES.values())
    store, report = build_budget_store(pre, fts, tmp_path / "s", budget="10x")
    size = store_size(tmp_path / "s")
    assert size == report.store_bytes
    assert size <= fp32 / 10
    assert report.M == 0
    worst = 0.0
    for t, v in deltas.items():
        vhat = store.reconstruct(t).to_state_dict()
        err = _rel(v, {k: vhat[k] for k in v})
        assert err == pytest.approx(store.rel_errors[t], rel=1e-4, abs=1e-6)   # the build records it exactly
        assert err == pytest.approx(report.allocation.rel_errors[t], rel=0.05)  # low-rank errors are predicted
        worst = max(worst, err)
    # the hardest task (rank 16 deltas) gets the most bytes
    tb = report.allocation.task_bytes
    assert tb["t3"] == max(tb.values()) and tb["t0"] < tb["t3"]
    # one codec for every task (a hand-written plan) leaves a worse worst task than a budget store of its size
    plan = tmp_path / "plan"
    from tvbasis.store import build_store
    uni = build_store(pre, fts, "pca", 0, plan, residual="embedding=sparse-rows+int4:group=32,scheme=affine;"
                      "matrix=lowrank:rank=12+int4:group=32,scheme=affine;vector=float16")
    same, _ = build_budget_store(pre, fts, tmp_path / "same", budget=str(store_size(plan)))
    assert store_size(tmp_path / "same") <= store_size(plan)
    assert max(uni.rel_errors.values()) > max(same.rel_errors.values())
    BasisStore.open(tmp_path / "s").close()


def test_quality_store_and_add_task_keep_the_error(tmp_path: Path) -> None:
    pre, fts, deltas = _family(tmp_path)
    first = {k: fts[k] for k in ("t0", "t1", "t2")}
    store, report = build_budget_store(pre, first, tmp_path / "q", quality=0.96)  # ε = 0.2
    assert all(e <= 0.2 + 1e-9 for e in store.rel_errors.values())
    from tvbasis.store import add_task
    store = add_task(tmp_path / "q", "t3", fts["t3"], pretrained=pre)
    vhat = store.reconstruct("t3").to_state_dict()
    assert _rel(deltas["t3"], {k: vhat[k] for k in deltas["t3"]}) <= 0.2 + 1e-6


def test_cli_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pre, fts, _ = _family(tmp_path, ranks=(2, 8))
    args = ["build", "--pretrained", str(pre), *sum((["--finetuned", f"{k}={v}"] for k, v in fts.items()), [])]
    assert main(["-q", *args, "--budget", "8x", "--json", "--out", str(tmp_path / "s")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["store_bytes"] <= out["budget_bytes"]
    assert set(out["plan"]) == {"t0", "t1"} and set(out["plan"]["t0"]) == set(SHAPES)
    # what the tool chooses itself cannot be given too; nothing is written
    assert main(["-q", *args, "--budget", "8x", "--method", "pca", "--out", str(tmp_path / "x")]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["-q", *args, "--budget", "8x", "--quality", "0.9", "--out", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err
    # a budget below the smallest store: one line, nothing written
    assert main(["-q", *args, "--budget", "100x", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "smallest store" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main(["-q", *args, "--budget", "lots", "--out", str(tmp_path / "x")]) == 2
    assert main(["-q", *args[:3], "--out", str(tmp_path / "x")]) == 2  # neither --method nor --budget


def test_relative_loss_weighs_errors_by_the_pretrained_scale(tmp_path: Path) -> None:
    from tvbasis.compress.budget import weighted
    from tvbasis.store.budget import pretrained_scale

    # two tensors with the same candidates; weighting one 100x moves the bytes to it
    cands = {"a": {"x": [Candidate("x0", 100, 4.0), Candidate("x1", 200, 1.0)],
                   "y": [Candidate("y0", 100, 4.0), Candidate("y1", 200, 1.0)]}}
    wc, n2 = weighted(cands, {"a": {"x": 100.0, "y": 1.0}}, {"a": {"x": 5.0, "y": 5.0}})
    assert n2 == {"a": 505.0} and wc["a"]["x"][0].sqerr == 400.0
    a = allocate(wc, n2, budget_bytes=300)
    assert a.specs["a"] == {"x": "x1", "y": "y0"}
    # the scale: whole tensor, or the touched rows of an embedding table; floored at the change itself
    W0 = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    x = torch.zeros(4, 3)
    x[1] = 0.1
    rows_sq = torch.tensor([sum(float(v) ** 2 for v in row) for row in W0], dtype=torch.float64)  # Σ per row
    assert pretrained_scale("enc.dense.weight", rows_sq, x) == pytest.approx(float((W0 ** 2).sum()))
    assert pretrained_scale("embeddings.word_embeddings.weight", rows_sq, x) == pytest.approx(3 ** 2 + 4 ** 2 + 5 ** 2)
    assert pretrained_scale("enc.bias", torch.zeros(1, dtype=torch.float64), torch.ones(3)) == pytest.approx(3.0)
    # a whole build with the relative loss: same budget rule, errors reported as the task vectors' own
    pre, fts, deltas = _family(tmp_path)
    store, report = build_budget_store(pre, fts, tmp_path / "r", budget="10x", loss="relative")
    assert report.store_bytes <= report.fp32_bytes / 10
    for t, v in deltas.items():
        vhat = store.reconstruct(t).to_state_dict()
        assert _rel(v, {k: vhat[k] for k in v}) == pytest.approx(report.allocation.rel_errors[t], rel=0.05)
    with pytest.raises(ConfigError, match="loss"):
        build_budget_store(pre, fts, tmp_path / "z", budget="10x", loss="accuracy")


def test_sparse_fine_tunes_get_sparse_codes(tmp_path: Path) -> None:
    """Task vectors 3 % dense (a sparse fine-tune's): full rank, so no low-rank candidate can follow them, while
    their largest entries at 2–8 bits with varint-gap positions fit 40x with every task within 10 %."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    pre = {k: torch.randn(s, generator=g) * 0.5 for k, s in SHAPES.items()}
    save_hf(pre, tmp_path / "pre")
    fts, deltas = {}, {}
    for t in range(3):
        d = {k: 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.03)
             if v.ndim == 2 else 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        ft = {k: pre[k] + d[k] for k in pre}
        save_hf(ft, tmp_path / f"ft{t}")
        fts[f"t{t}"] = tmp_path / f"ft{t}"
        deltas[f"t{t}"] = {k: ft[k] - pre[k] for k in pre}
    fp32 = 4 * len(fts) * sum(math.prod(s) for s in SHAPES.values())
    store, _ = build_budget_store(tmp_path / "pre", fts, tmp_path / "s", budget="40x")
    assert store_size(tmp_path / "s") <= fp32 / 40
    for t, v in deltas.items():
        vhat = store.reconstruct(t).to_state_dict()
        assert _rel(v, {k: vhat[k] for k in v}) <= 0.1, t
        for k, x in v.items():
            if x.ndim == 2:
                assert not torch.any((x == 0) & (vhat[k] != 0)), k  # nothing outside the support: not low rank
                s = np.linalg.svd(x.double().numpy(), compute_uv=False)  # numpy: the best rank-4 fit is poor
                assert math.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()) > 0.5, k


# ----------------------------------------------------------------------------- SVDs kept from measure to write
def test_kept_factors_only_for_the_same_matrix_and_within_their_memory() -> None:
    import pickle

    import numpy as np

    from tvbasis.compress.svd import KeptFactors

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=g)
    u, s, vh = np.linalg.svd(x.numpy().astype(np.float64), full_matrices=False)
    f = (torch.from_numpy(u[:, :8]).float(), torch.from_numpy(s[:8]).float(), torch.from_numpy(vh[:8]).float(),
         torch.from_numpy(s).float())
    size = sum(t.numel() * 4 for t in f)
    kept = KeptFactors(max_bytes=size)
    assert kept.offer("a", x, f) and kept.nbytes == size
    assert not kept.offer("b", x, f)  # over the memory given
    got = kept.get("a", x.clone())
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got, f, strict=True))
    y = x.clone()
    y[5, 7] = torch.nextafter(y[5, 7], torch.tensor(10.0))  # one ulp: another matrix
    assert kept.get("a", y) is None and kept.get("b", x) is None and kept.get("a", x[:, :23]) is None
    with pytest.raises(TypeError, match="stays in the process"):
        pickle.dumps(kept)
    kept.clear()
    assert kept.get("a", x) is None and kept.nbytes == 0


def test_write_pass_reusing_the_measured_svds_writes_the_same_store(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The write pass takes each matrix's SVD from the measuring pass; with no memory for that (every SVD computed
    again, as before) the store's every entry is the same tensor for tensor."""
    import tvbasis.compress.budget as cb
    import tvbasis.store.budget as sb

    pre, fts, _ = _family(tmp_path)
    calls: list[str] = []
    real = cb.encode_chosen

    def spy(spec, x, scale=None, factors=None, row_factors=None):
        calls.append("kept" if factors is not None else "computed")
        return real(spec, x, scale, factors, row_factors)

    monkeypatch.setattr(cb, "encode_chosen", spy)
    a, report = build_budget_store(pre, fts, tmp_path / "a", budget="10x")
    reused = calls.count("kept")
    monkeypatch.setattr(sb, "KEPT_SVD_BYTES", 0)
    calls.clear()
    b, _ = build_budget_store(pre, fts, tmp_path / "b", budget="10x")
    # in every write, each task's 3 matrices (4 tasks) had their SVD kept; none without memory
    assert reused == report.attempts * 4 * 3 and "kept" not in calls
    for t in fts:
        va, vb = a.reconstruct(t).to_state_dict(), b.reconstruct(t).to_state_dict()
        assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


def test_shape_forms_count_the_bytes_of_a_real_encoding() -> None:
    """The measuring pass takes a candidate's bytes and stored names from its shape's form; for float16 that form is
    a zero-stride view (no memory): its bytes and description are a real encoding's."""
    from tvbasis.codecs import parse_codec
    from tvbasis.compress.budget import _form

    x = torch.randn(70, 33)
    for spec in ("float16", "int3:group=64,scheme=affine", "int8:group=128,scheme=symmetric"):
        codec = parse_codec(spec)
        real, form = codec.encode(x), _form(codec, (70, 33))
        assert form.nbytes == real.nbytes == sum(t.numel() * t.element_size() for t in real.tensors.values())
        (ft, fd), (rt, rd) = form.to_tensors(""), real.to_tensors("")
        assert fd == rd and {k: (tuple(v.shape), v.dtype) for k, v in ft.items()} == \
            {k: (tuple(v.shape), v.dtype) for k, v in rt.items()}
