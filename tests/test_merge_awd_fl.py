"""AWD and the one-shot-FL aggregation rules against dense references written here from the papers' definitions
(numpy, loops over coordinates; AWD's redundant vector optimised directly in parameter space)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tinymodels import make_family
from tvbasis.cli import main
from tvbasis.errors import ConfigError
from tvbasis.io import open_checkpoint
from tvbasis.merge import MergeContext, MergeSpec, get_merger
from tvbasis.merge.awd import awd_coefficients, awd_loss

RNG = np.random.default_rng(0)


def run(method, x, w=None, **params):
    w = torch.ones(x.shape[0]) if w is None else torch.tensor(w, dtype=torch.float32)
    return get_merger(MergeSpec(method, params)).merge(torch.as_tensor(x, dtype=torch.float32), w,
                                                        MergeContext(name="t")).numpy()


# ---------------------------------------------------------------- one-shot FL (Tao et al. 2411.18607)

def test_fednova_reweights_by_local_steps():
    x = RNG.standard_normal((3, 5, 4))
    steps = [100.0, 200.0, 400.0]
    ref = np.zeros((5, 4))
    for t in range(3):
        ref += (np.mean(steps) / steps[t]) / 3 * x[t]
    assert np.allclose(run("fednova", x, steps="100,200,400"), ref, atol=1e-5)
    assert np.allclose(run("fednova", x), x.mean(0), atol=1e-5)  # equal steps: FedAvg's mean
    with pytest.raises(ConfigError, match="2 values for 3 tasks"):
        run("fednova", x, steps="1,2")
    with pytest.raises(ConfigError, match="steps"):
        run("fednova", x, steps="1,0,2")


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_fedgma_soft_sign_agreement_mask(rho):
    x = RNG.standard_normal((5, 7, 3))
    x[:, 0, 0] = np.abs(x[:, 0, 0])  # full agreement somewhere
    w = [1.0, 0.5, 2.0, 1.0, 1.5]
    ref = np.zeros((7, 3))
    for i in range(7):
        for j in range(3):
            v = [w[t] * x[t, i, j] for t in range(5)]
            agree = abs(sum(np.sign(v))) / 5
            ref[i, j] = (1.0 if agree >= rho else agree) * sum(v)
    assert np.allclose(run("fedgma", x, w, rho=rho), ref, atol=1e-5)


@pytest.mark.parametrize("T", [3, 4])
def test_median_is_the_lower_middle_value(T):
    x = RNG.standard_normal((T, 6, 2))
    ref = np.zeros((6, 2))
    for i in range(6):
        for j in range(2):
            ref[i, j] = sorted(x[:, i, j])[(T - 1) // 2]
    assert np.allclose(run("median", x), ref, atol=1e-6)


def test_cclip_clips_each_task_to_rho():
    x = RNG.standard_normal((4, 5, 3)) * np.array([0.5, 1.0, 2.0, 4.0]).reshape(4, 1, 1)
    norms = [float(np.sqrt((x[t] ** 2).sum())) for t in range(4)]

    def ref(rho, norms):
        return sum(x[t] * min(1.0, rho / norms[t]) for t in range(4))

    assert np.allclose(run("cclip", x, rho=3.0), ref(3.0, norms), atol=1e-5)
    # rho = 0: at rho_frac along [min norm, max norm] (0: every task scaled to the smallest norm)
    assert np.allclose(run("cclip", x), ref(min(norms), norms), atol=1e-5)
    mid = min(norms) + 0.5 * (max(norms) - min(norms))
    assert np.allclose(run("cclip", x, rho_frac=0.5), ref(mid, norms), atol=1e-5)
    # global norms given (the whole vectors' norms, not this tensor's)
    g = [10.0, 1.0, 5.0, 2.0]
    assert np.allclose(run("cclip", x, rho=2.0, norms="10,1,5,2"), ref(2.0, g), atol=1e-5)
    with pytest.raises(ConfigError, match="cclip norms"):
        run("cclip", x, norms="1,2,x,4")


# ---------------------------------------------------------------- AWD (Xiong et al. 2411.18729)

def explicit_loss(delta, tau, alpha):
    """The AWD objective with explicit vectors: mean |cos| over pairs of τ_i − δ, + α‖δ‖²/mean ‖τ_t‖²."""
    T = tau.shape[0]
    u = tau - delta
    cs = []
    for i in range(T):
        for j in range(i + 1, T):
            cs.append(abs(u[i] @ u[j]) / (np.linalg.norm(u[i]) * np.linalg.norm(u[j])))
    return np.mean(cs) + alpha * (delta @ delta) / np.mean([t @ t for t in tau])


def correlated_tasks(T=4, D=40, shared=1.5, seed=1):
    g = np.random.default_rng(seed)
    common = g.standard_normal(D)
    return np.stack([shared * common + g.standard_normal(D) for _ in range(T)])


def test_awd_loss_in_coefficient_space_equals_the_explicit_loss():
    tau = correlated_tasks()
    G = torch.tensor(tau @ tau.T)
    for _ in range(3):
        b = RNG.standard_normal(4) * 0.2
        got = float(awd_loss(torch.tensor(b), G, 0.7))
        assert got == pytest.approx(explicit_loss(b @ tau, tau, 0.7), rel=1e-9)


def full_space_optimum(tau, alpha, steps=800):
    """Reference: the AWD objective minimised over δ ∈ R^D directly (explicit vectors, Adam on δ from 0)."""
    t = torch.tensor(tau)
    d = torch.zeros(t.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.01 * float(t.norm(dim=1).mean()) / np.sqrt(t.shape[1]))
    iu = torch.triu_indices(len(t), len(t), 1)
    for _ in range(steps):
        u = t - d
        n = u.norm(dim=1)
        c = (u @ u.T) / (n[:, None] * n[None])
        loss = c[iu[0], iu[1]].abs().mean() + alpha * (d @ d) / (t * t).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return explicit_loss(d.detach().numpy(), tau, alpha)


def test_awd_redundant_vector_reaches_the_parameter_space_optimum():
    tau = correlated_tasks(T=3, D=12)
    alpha = 0.5
    b = awd_coefficients(torch.tensor(tau @ tau.T), alpha=alpha).numpy()
    ours = explicit_loss(b @ tau, tau, alpha)
    assert ours <= full_space_optimum(tau, alpha) + 5e-3  # the span restriction loses nothing here
    before = explicit_loss(np.zeros(tau.shape[1]), tau, alpha)
    assert ours < 0.5 * before  # the remainders are much closer to orthogonal


def test_awd_merge_subtracts_the_redundant_vector():
    tau = correlated_tasks(T=3, D=24).reshape(3, 6, 4)
    flat = tau.reshape(3, -1)
    w = [1.0, 2.0, 0.5]
    b = awd_coefficients(torch.tensor(flat @ flat.T), alpha=1.0).numpy()
    delta = np.tensordot(b, tau, axes=1)
    ref = sum(w[t] * (tau[t] - delta) for t in range(3))
    got = run("awd", tau, w)  # per-tensor form: this tensor is the whole vector here
    assert np.allclose(got, ref, atol=1e-4)
    coefs = ",".join(str(v) for v in b)
    assert np.allclose(run("awd", tau, w, coefs=coefs), ref, atol=1e-4)  # global form: b given
    # inner TIES on the disentangled vectors
    ties = run("ties", tau - delta[None], w, density=0.5)
    assert np.allclose(run("awd", tau, w, coefs=coefs, inner="ties", density=0.5), ties, atol=1e-5)
    with pytest.raises(ConfigError, match="inner"):
        run("awd", tau, inner="median")


def test_cli_merge_with_the_new_methods(tmp_path):
    pre_p, fts, pre, sds = make_family(tmp_path, T=3, clusters=2)
    k = "pooler.dense.weight"
    x = np.stack([(sd[k] - pre[k]).numpy() for sd in sds])
    ref = {"median": np.sort(x, axis=0)[1], "fedgma": None}
    agree = np.abs(np.sign(x).sum(0)) / 3
    ref["fedgma"] = np.where(agree >= 0.5, 1.0, agree) * x.sum(0)
    for method, want in ref.items():
        out = tmp_path / method
        args = ["-q", "merge", "--pretrained", str(pre_p), "--method", method, "--out", str(out)]
        for n, p in fts.items():
            args += ["--finetuned", f"{n}={p}"]
        assert main(args) == 0
        got = open_checkpoint(out).get(k) - pre[k]
        assert np.allclose(got.numpy(), want, atol=1e-5)
    bad = ["-q", "merge", "--pretrained", str(pre_p), "--method", "fednova", "--param", "steps=1,2",
           "--out", str(tmp_path / "bad")]
    for n, p in fts.items():
        bad += ["--finetuned", f"{n}={p}"]
    assert main(bad) != 0 and not (tmp_path / "bad").exists()
