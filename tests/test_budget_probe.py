"""The probed budget (issue 22): damage curves, the allocation that equalises predicted damage, the build that
re-allocates from a probe of the written store, and the prediction probe's total variation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.test_budget import SHAPES, _family, _synthetic
from tvbasis.compress.budget import allocate, fit_damage
from tvbasis.errors import ConfigError
from tvbasis.store.budget import build_budget_store, store_size


# ------------------------------------------------------------------------------------------- damage curves
def test_fit_damage_one_point_and_secant() -> None:
    a, b = fit_damage([(0.5, 0.02)])
    assert b == 3.0 and a == pytest.approx(0.16)  # the measured prior exponent
    a, b = fit_damage([(0.5, 0.02)], exponent=2.0)
    assert b == 2.0 and a == pytest.approx(0.08)
    # two points on d = 3 ε^1.7: recovered exactly
    a, b = fit_damage([(0.4, 3 * 0.4 ** 1.7), (0.7, 3 * 0.7 ** 1.7)])
    assert b == pytest.approx(1.7) and a == pytest.approx(3.0)
    # a slope outside the bounds is clamped, and the curve still passes through the last point
    a, b = fit_damage([(0.4, 0.01), (0.5, 0.9)])
    assert b == 4.0 and a * 0.5 ** 4 == pytest.approx(0.9)
    # the same ε twice: the exponent of the one-point fit
    assert fit_damage([(0.5, 0.01), (0.5, 0.02)], exponent=1.0)[1] == 1.0
    with pytest.raises(ValueError):
        fit_damage([(0.0, 0.1), (0.3, 0.0)])


def _chosen_eps(cands: dict, norms2: dict, specs: dict) -> dict[str, float]:
    return {t: math.sqrt(sum(next(c.sqerr for c in cands[t][n] if c.spec == s) for n, s in specs[t].items())
                         / norms2[t]) for t in specs}


def test_damage_curves_move_bytes_to_the_sensitive_task() -> None:
    cands, norms2 = _synthetic()
    budget = 1300
    plain = allocate(cands, norms2, budget_bytes=budget)
    # task b is 8x as sensitive as the others, linear in ε
    curves = {"a": (1.0, 1.0), "b": (8.0, 1.0), "c": (1.0, 1.0)}
    probed = allocate(cands, norms2, budget_bytes=budget, damage=curves)
    assert probed.total_bytes <= budget
    eps = _chosen_eps(cands, norms2, probed.specs)
    assert eps == pytest.approx(probed.rel_errors)
    assert probed.task_bytes["b"] > plain.task_bytes["b"]
    assert eps["b"] < _chosen_eps(cands, norms2, plain.specs)["b"]
    # the worst predicted damage is no worse than under the plain allocation
    dmg = {t: curves[t][0] * eps[t] ** curves[t][1] for t in eps}
    eps0 = _chosen_eps(cands, norms2, plain.specs)
    dmg0 = {t: curves[t][0] * eps0[t] ** curves[t][1] for t in eps0}
    assert max(dmg.values()) <= max(dmg0.values()) + 1e-12
    # equal curves give exactly the plain allocation
    same = allocate(cands, norms2, budget_bytes=budget, damage={t: (2.5, 1.0) for t in cands})
    assert same.specs == plain.specs
    with pytest.raises(ValueError):
        allocate(cands, norms2, max_error=0.5, damage=curves)
    with pytest.raises(ValueError):
        allocate(cands, norms2, budget_bytes=budget, damage={"a": (1.0, 1.0)})


# ----------------------------------------------------------------------------------------------- the build
def test_probed_build_equalises_a_known_damage(tmp_path: Path) -> None:
    """A probe whose damage is a known function of each task's true relative error (task t2 four times as
    sensitive): the probed store brings the worst damage below the plain store's, within the same budget."""
    pre, fts, deltas = _family(tmp_path)
    sens = {"t0": 1.0, "t1": 1.0, "t2": 4.0, "t3": 1.0}
    calls: list[str] = []

    def rel(t: str, vhat: dict[str, torch.Tensor]) -> float:
        v = deltas[t]
        num = sum(float(((vhat[k].double() - x.double()) ** 2).sum()) for k, x in v.items())
        return math.sqrt(num / sum(float((x.double() ** 2).sum()) for x in v.values()))

    def probe(t: str, vhat: dict[str, torch.Tensor]) -> float:
        calls.append(t)
        return sens[t] * rel(t, vhat) ** 1.5

    plain, rp = build_budget_store(pre, fts, tmp_path / "plain", budget="10x")
    worst_plain = max(probe(t, dict(plain.reconstruct(t).items())) for t in deltas)
    calls.clear()
    store, report = build_budget_store(pre, fts, tmp_path / "probed", budget="10x", probe=probe, probe_rounds=2)
    fp32 = 4 * len(fts) * sum(math.prod(s) for s in SHAPES.values())
    assert store_size(tmp_path / "probed") == report.store_bytes <= fp32 / 10
    assert len(report.probe_rounds) >= 2 and len(calls) == 4 * len(report.probe_rounds)
    assert sum(1 for r in report.probe_rounds if r.get("kept")) == 1
    # round 0 probed the plain allocation
    assert report.probe_rounds[0]["rel_errors"] == pytest.approx(rp.allocation.rel_errors)
    worst = max(probe(t, dict(store.reconstruct(t).items())) for t in deltas)
    assert worst < worst_plain
    kept = next(r for r in report.probe_rounds if r.get("kept"))
    assert worst == pytest.approx(kept["worst"], rel=1e-6)  # the store on disk is the round kept
    # the sensitive task got more bytes than under the plain allocation
    assert report.allocation.task_bytes["t2"] > rp.allocation.task_bytes["t2"]


def test_probe_refusals(tmp_path: Path) -> None:
    pre, fts, _ = _family(tmp_path)
    with pytest.raises(ConfigError, match="--budget"):
        build_budget_store(pre, fts, tmp_path / "q", quality=0.9, probe=lambda t, d: 0.1)
    with pytest.raises(ConfigError, match="loss"):
        build_budget_store(pre, fts, tmp_path / "r", budget="10x", loss="relative", probe=lambda t, d: 0.1)
    with pytest.raises(ConfigError, match="rounds"):
        build_budget_store(pre, fts, tmp_path / "r", budget="10x", probe=lambda t, d: 0.1, probe_rounds=-1)
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------- the prediction probe
def test_total_variation_against_a_hand_computed_value() -> None:
    from tvbasis.eval.probe import total_variation

    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.5, 0.5]])
    # row 1: ½(0.1 + 0.1 + 0) = 0.1; row 2: ½(0.5 + 0 + 0.5) = 0.5
    assert total_variation(p, q) == pytest.approx(0.3)
    assert total_variation(p, p) == 0.0
