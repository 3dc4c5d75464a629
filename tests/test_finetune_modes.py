"""Fine-tuning modes on a tiny BERT built here (the bundled tokenizer, 1 layer, hidden 16): the linearised model
against finite differences, sparse diffs against the top-k of the dense diff, and trained subsets by name."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tvbasis.cli import main
from tvbasis.eval.encoder import Encoder, default_model_dir
from tvbasis.eval.finetune import FinetuneSettings, finetune, load_state
from tvbasis.eval.finetune_modes import linear_forward, linearized
from tvbasis.eval.tasks import load_task

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    import transformers

    d = tmp_path_factory.mktemp("tinybert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(str(d), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (default_model_dir() / name).is_file():
            shutil.copy(default_model_dir() / name, d / name)
    return d


@pytest.fixture(scope="module")
def task():
    return load_task("mcid", max_train=48, max_dev=8, max_test=8, seed=0)


def settings(tiny: Path, **kw) -> FinetuneSettings:
    return FinetuneSettings(model_dir=str(tiny), max_train=48, max_length=16, batch_size=16, lr=5e-3, **kw)


def test_linearised_model_is_the_first_order_expansion(tiny):
    enc = Encoder(tiny, max_length=16)
    inputs = enc.collate(enc.tokenize(["open the door please", "what is the weather", "hi"]), [0, 1, 2])
    g = torch.Generator().manual_seed(1)
    d = {n: 1e-2 * torch.randn(p.shape, generator=g) for n, p in enc.model.named_parameters()}

    def f(scale: float) -> torch.Tensor:  # the non-linear model at θ₀ + scale·d
        enc.set_delta(d, scale)
        with torch.no_grad():
            return Encoder.forward(enc, inputs).double()

    f0 = f(0.0)
    eps = 0.05
    fd = (f(eps) - f(-eps)) / (2 * eps)  # central finite difference of the directional derivative J·d
    lin = linear_forward(enc)
    enc.set_delta(d, 1.0)
    with torch.no_grad():
        jd = lin(inputs).double() - f0
        enc.set_delta(d, 2.0)
        jd2 = lin(inputs).double() - f0
    assert torch.allclose(jd, fd, rtol=1e-2, atol=2e-4), (jd - fd).abs().max()
    assert torch.allclose(jd2, 2 * jd, atol=1e-5)  # exactly linear in θ − θ₀ ...
    assert (f(2.0) - f0 - 2 * (f(1.0) - f0)).abs().max() > 1e-4  # ... which the model itself is not
    # the encoder evaluates the linearised model inside the context (set_delta applies τ to it), not outside
    texts = ["open the door please", "what is the weather"]
    enc.set_delta(d, 1.0)
    plain = enc.encode(texts)
    with linearized(enc):
        lin_emb = enc.encode(texts)
    assert torch.allclose(enc.encode(texts), plain)
    enc.reset()
    base = enc.encode(texts)
    expected = torch.nn.functional.normalize(base, dim=-1)  # at θ₀ both coincide
    with linearized(enc):
        assert torch.allclose(enc.encode(texts), expected, atol=1e-6)
    assert not torch.allclose(lin_emb, plain, atol=1e-4)


def test_sparse_diff_keeps_the_top_magnitudes_of_the_dense_diff(tiny, task, tmp_path):
    dense = finetune(task, tmp_path, settings(tiny), progress=False)
    sparse = finetune(task, tmp_path, settings(tiny, sparse_diff=0.005), progress=False)
    assert sparse.path != dense.path and "sparse0.005" in str(sparse.path)
    pre = load_state(tmp_path / "pretrained")
    td = {k: (load_state(dense.path)[k] - pre[k]).numpy().ravel() for k in pre if pre[k].is_floating_point()}
    ts = {k: (load_state(sparse.path)[k] - pre[k]).numpy().ravel() for k in td}
    flat_d = np.concatenate([td[k] for k in sorted(td)])
    flat_s = np.concatenate([ts[k] for k in sorted(td)])
    k = math.ceil(0.005 * flat_d.size)
    assert np.count_nonzero(flat_d) > 2 * k  # the cut lies inside the dense diff's support
    top = set(np.argsort(-np.abs(flat_d), kind="stable")[:k].tolist())
    support = set(np.flatnonzero(flat_s).tolist())
    assert 0.9 * k <= len(support) <= k and support <= top
    assert sparse.meta["train"]["nonzero"] == k
    assert not np.allclose(flat_s[sorted(support)], flat_d[sorted(support)])  # re-trained on the support


def test_train_layers_and_linearised_fine_tunes(tiny, task, tmp_path):
    pattern = r"layer\.0\.attention\.self\.(query|key)"
    sub = finetune(task, tmp_path, settings(tiny, train_layers=pattern), progress=False)
    pre = load_state(tmp_path / "pretrained")
    tv = {k: load_state(sub.path)[k] - pre[k] for k in pre if pre[k].is_floating_point()}
    for k, v in tv.items():
        if re.search(pattern, k):
            assert v.abs().sum() > 0, k
        else:
            assert torch.count_nonzero(v) == 0, k
    lin = finetune(task, tmp_path, settings(tiny, linearized=True), progress=False)
    assert "linear" in lin.path.parts and lin.meta["linearized"] is True
    assert lin.meta["train"]["steps"] == 3
    std = finetune(task, tmp_path, settings(tiny), progress=False)
    assert std.path != lin.path and "linear" not in std.path.parts  # both cached side by side
    assert any(torch.count_nonzero(load_state(lin.path)[k] - pre[k]) for k in tv)


def test_cli_rejects_bad_modes(tmp_path, capsys):
    rc = main(["finetune", "--tasks", "mcid", "--work", str(tmp_path / "w"), "--sparse-diff", "1.5"])
    assert rc != 0 and "--sparse-diff" in capsys.readouterr().err
    assert not (tmp_path / "w" / "finetuned").exists()


def test_bench_fine_tunes_in_the_mode_asked(tmp_path, capsys):
    from tvbasis.bench.bench import BenchConfig

    s = BenchConfig(sparse_diff=0.01, train_layers="encoder").finetune_settings()
    assert (s.sparse_diff, s.train_layers) == (0.01, "encoder")
    assert s.mode_tag().startswith("sparse0.01-layers-")  # cached apart from the dense fine-tunes
    for argv, word in ((["--frontier", "--sparse-diff", "1.5"], "--sparse-diff"),
                       (["--sparse-diff", "-0.1"], "--sparse-diff"),
                       (["--frontier", "--lora", "--sparse-diff", "0.05"], "--lora")):
        rc = main(["bench", "--work", str(tmp_path / "w"), *argv])
        assert rc != 0 and word in capsys.readouterr().err, argv
        assert not (tmp_path / "w" / "finetuned").exists()
