"""The trained L&S localizer: on a tiny torch model built here it lowers the task loss below the dataless mask of
the same sparsity; one epoch's update matches a reference computed here by autograd through the mask; the
harness's few-shot choice; and ``tvbasis localize --data`` end to end on the bundled encoder cut to one layer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tvbasis.cli import main
from tvbasis.eval.localize import data_task, few_shot, initial_masks
from tvbasis.eval.tasks import Split
from tvbasis.io import open_checkpoint
from tvbasis.stitch import MaskTraining, open_masks, train_mask


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(10, 32)
        self.l2 = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def ref_loss(theta: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task loss written out: mean cross-entropy of the two-layer tanh network with weights ``theta``."""
    h = torch.tanh(X @ theta["l1.weight"].T + theta["l1.bias"])
    return torch.nn.functional.cross_entropy(h @ theta["l2.weight"].T + theta["l2.bias"], y)


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    X = torch.randn(256, 10)
    y = (X @ torch.randn(10, 4)).argmax(1)
    model = Tiny()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft = Tiny()
    ft.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(ft.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ft(X), y).backward()
        opt.step()
    tau = {n: p.detach() - theta0[n] for n, p in ft.named_parameters()}
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    return model, theta0, tau, X, y, batches


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / 256


def masked(theta0, tau, mask):
    return {n: theta0[n] + mask[n].float() * tau[n] for n in theta0}


def test_trained_mask_lowers_the_loss_below_the_dataless_mask_of_the_same_size(task) -> None:
    model, theta0, tau, X, y, batches = task
    s = 0.05
    init = initial_masks(tau, s, "tensor")
    k = sum(int(m.sum()) for m in init.values())
    assert k == sum(math.ceil(s * t.numel()) for t in tau.values())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks, stats = train_mask(model, tau, init, batches, loss_fn, MaskTraining(epochs=10, lr=10.0, budget="topk"))
    assert sum(int(m.sum()) for m in masks.values()) == k  # the same sparsity
    dataless = float(ref_loss(masked(theta0, tau, init), X, y))
    trained = float(ref_loss(masked(theta0, tau, masks), X, y))
    assert trained < dataless - 0.05, (trained, dataless)
    assert math.isclose(stats["loss_initial_mask"], dataless, rel_tol=1e-4)
    assert math.isclose(stats["loss_final_mask"], trained, rel_tol=1e-4)
    # the model is back at θ₀ with its flags
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n]) and p.requires_grad == flags[n] and p.grad is None


def test_one_epoch_matches_autograd_through_the_mask(task) -> None:
    model, theta0, tau, X, y, batches = task
    s, b, lr, l1 = 0.1, 3.0, 200.0, 0.5
    init = initial_masks(tau, s, "tensor")
    S0 = {n: torch.where(m, b, -b) for n, m in init.items()}
    m = {n: torch.sigmoid(v).requires_grad_(True) for n, v in S0.items()}
    loss = ref_loss({n: theta0[n] + m[n] * tau[n] for n in theta0}, X, y)
    loss.backward()
    G = {n: m[n].grad for n in m}  # ∂ℓ/∂m
    k = sum(int(v.sum()) for v in init.values())
    g0 = torch.cat([g.abs().reshape(-1) for g in G.values()]).sort(descending=True).values[k - 1]
    S1 = {n: S0[n] - lr * torch.sigmoid(S0[n]) * (1 - torch.sigmoid(S0[n])) * (G[n] / g0 + l1) for n in S0}
    ref = {n: v > 0 for n, v in S1.items()}
    got, stats = train_mask(model, tau, init, batches, loss_fn, MaskTraining(b, 1, lr, l1, "round"))
    assert math.isclose(stats["g0"], float(g0), rel_tol=1e-4)
    changed = sum(int((ref[n] != init[n]).sum()) for n in ref)
    assert changed > 0
    assert sum(int((got[n] != ref[n]).sum()) for n in ref) <= max(1, changed // 100)  # float ties at S = 0 aside


def test_few_shot_choice_is_balanced_and_seeded() -> None:
    split = Split([f"t{i}" for i in range(30)], [i % 3 for i in range(27)] + [0, 0, 0])
    a = few_shot(split, 4, seed=1)
    assert sorted(a.labels) == [0] * 4 + [1] * 4 + [2] * 4 and a.texts == few_shot(split, 4, seed=1).texts
    capped = few_shot(split, 50, seed=1, max_examples=7)
    assert len(capped) == 7 and all(capped.labels.count(c) >= 2 for c in range(3))
    assert [int(t[1:]) for t in capped.texts] == sorted(int(t[1:]) for t in capped.texts)  # file order kept


def test_cli_trained_localize_on_the_bundled_encoder(tmp_path, capsys) -> None:
    from tvbasis.eval.encoder import Encoder

    enc = Encoder(num_layers=1, max_length=16)
    enc.save_pretrained(tmp_path / "pre")
    g = torch.Generator().manual_seed(0)
    fts = {}
    for name in ("a", "b"):
        with torch.no_grad():
            for n, p in enc.model.named_parameters():
                if "encoder.layer" in n:
                    p.add_(1e-2 * torch.randn(p.shape, generator=g))
        enc.save_pretrained(tmp_path / name)
        enc.reset()
        fts[name] = tmp_path / name
    (tmp_path / "a.tsv").write_text("text\tlabel\n" + "".join(f"my card {i} was charged\tcard_payment\n"
                                                             f"where is my parcel {i}\tdelivery\n" for i in range(4)))
    masks = tmp_path / "masks.safetensors"
    rc = main(["-q", "localize", "--pretrained", str(tmp_path / "pre"), "--finetuned", f"a={fts['a']}",
               "--finetuned", f"b={fts['b']}", "--data", f"a={tmp_path / 'a.tsv'}", "--data", "b=banking",
               "--include", "encoder.layer.*", "--sparsity", "0.01", "--shots", "2", "--epochs", "2",
               "--max-length", "16", "--budget", "topk", "--out", str(masks)])
    assert rc == 0, capsys.readouterr().err
    ms = open_masks(masks)
    s = ms.settings
    assert s["localizer"] == "trained" and s["shots"] == 2 and s["epochs"] == 2 and s["sigmoid_bias"] == 3.0
    assert s["training"]["a"]["examples"] == 4 and s["training"]["b"]["examples"] == 2 * s["training"]["b"]["classes"]
    assert all(n.startswith("encoder.layer.") for n in ms.specs)
    for t in ("a", "b"):  # topk: exactly the dataless size, per tensor ceil(s·n) summed
        assert ms.support(t) == sum(math.ceil(0.01 * sp.numel) for sp in ms.specs.values())
    assert main(["-q", "stitch", "--pretrained", str(tmp_path / "pre"), "--finetuned", f"a={fts['a']}",
                 "--finetuned", f"b={fts['b']}", "--masks", str(masks), "--out", str(tmp_path / "model")]) == 0
    name = next(iter(ms.specs))
    pre, out = open_checkpoint(tmp_path / "pre"), open_checkpoint(tmp_path / "model")
    x = torch.stack([open_checkpoint(fts[t]).get(name) - pre.get(name) for t in ("a", "b")])
    m = ms.stacked_masks(["a", "b"], name).float()
    ref = pre.get(name) + (m * x).sum(0) / m.sum(0).clamp(min=1)
    assert torch.allclose(out.get(name), ref, atol=1e-6)
    assert json.loads(open_checkpoint(masks).metadata()["settings"])["budget"] == "topk"
    assert data_task("b", "banking").num_classes == 77
