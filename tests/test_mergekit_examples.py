"""mergekit's own examples/*.yml, in their shapes, on tiny Llama-named models written here: each runs through
``tvbasis merge --config`` and matches a float64 reference written here from mergekit's definitions (gradients
over the layer index, filters by tensor name, per-model densities), or is refused for its documented reason
(docs/mergekit.md lists them)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tvbasis.cli import main

L = 3  # layers: mergekit's layer position t = i / (L - 1) = 0, 0.5, 1; non-layer tensors t = 0
SHAPES = {"model.embed_tokens.weight": (12, 4), "model.norm.weight": (4,), "lm_head.weight": (12, 4)}
for _i in range(L):
    SHAPES |= {f"model.layers.{_i}.self_attn.q_proj.weight": (4, 4),
               f"model.layers.{_i}.mlp.up_proj.weight": (6, 4),
               f"model.layers.{_i}.input_layernorm.weight": (4,)}
LAYER_T = {f"model.layers.{i}.": i / (L - 1) for i in range(L)}


def position(name: str) -> float:
    return next((t for p, t in LAYER_T.items() if name.startswith(p)), 0.0)


def state(seed: int, base: dict[str, torch.Tensor] | None = None, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in SHAPES.items():
        r = torch.randn(s, generator=g)
        out[k] = r if base is None else base[k] + scale * r
    return out


def save(sd: dict[str, torch.Tensor], d: Path) -> None:
    d.mkdir(parents=True)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": L,
                                               "torch_dtype": "float32"}))


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """Every model the examples name, as tiny fine-tunes of one base (TheBloke/Llama-2-13B-fp16)."""
    monkeypatch.chdir(tmp_path)
    base = state(0)
    models = {"TheBloke/Llama-2-13B-fp16": base, "mistralai/Mistral-7B-v0.1": base}
    for i, name in enumerate(["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardLM-13B-V1.2",
                              "WizardLM/WizardMath-13B-V1.0", "mistralai/Mistral-7B-Instruct-v0.2",
                              "BioMistral/BioMistral-7B", "model_a", "model_b"]):
        models[name] = state(i + 1, base)
    for name, sd in models.items():
        if not (tmp_path / name).exists():
            save(sd, tmp_path / name)
    return {k: {n: v.double() for n, v in sd.items()} for k, sd in models.items()}


def merge_config(text: str, out: str = "out") -> tuple[int, dict[str, np.ndarray]]:
    Path("merge.yml").write_text(textwrap.dedent(text))
    rc = main(["-q", "merge", "--config", "merge.yml", "--out", out])
    if rc != 0:
        return rc, {}
    sd: dict[str, torch.Tensor] = {}
    for f in Path(out).glob("*.safetensors"):
        sd |= load_file(str(f))
    return rc, {k: v.double().numpy() for k, v in sd.items()}


def grad(values: list[float], t: float) -> float:
    """mergekit's gradient: piecewise-linear through the values, evenly spaced over t in [0, 1]."""
    s = t * (len(values) - 1)
    i = int(s)
    j = min(len(values) - 1, i + 1)
    return (1 - (s - i)) * values[i] + (s - i) * values[j]


def topk(d: np.ndarray, density: float) -> np.ndarray:
    """mergekit's per-tensor trim: the int(density*n) largest |d| (tvbasis maps it to rounding=floor)."""
    if density >= 1:
        return d
    flat = d.ravel()
    k = max(1, int(density * flat.size))
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(d.shape)


def ties(deltas: list[np.ndarray], weights: list[float], densities: list[float], normalize: bool) -> np.ndarray:
    wx = np.stack([w * topk(d, de) for d, w, de in zip(deltas, weights, densities)])
    sign = np.where(wx.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wx) == sign
    total = np.where(agree, wx, 0.0).sum(0)
    if not normalize:
        return total
    den = (np.array(weights).reshape(-1, *[1] * (wx.ndim - 1)) * agree).sum(0)
    return total / np.where(den == 0, 1.0, den)


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = (a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = np.arccos(cos)
    return (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)


def near(got: np.ndarray, ref: np.ndarray, dtype_tol: float) -> None:
    np.testing.assert_allclose(got, ref, atol=dtype_tol, rtol=dtype_tol)


# ---------------------------------------------------------------------------------------------- runs
def test_linear_example(zoo):
    rc, out = merge_config("""\
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              weight: 1.0
          - model: WizardLM/WizardLM-13B-V1.2
            parameters:
              weight: 0.3
          - model: garage-bAInd/Platypus2-13B
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
        """)
    assert rc == 0
    o, w, p = (zoo[m] for m in ("psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2",
                                "garage-bAInd/Platypus2-13B"))
    for k in SHAPES:
        near(out[k], ((1.0 * o[k] + 0.3 * w[k] + 0.5 * p[k]) / 1.8).numpy(), 2e-3)


def test_bio_merge_example(zoo):
    rc, out = merge_config("""\
        models:
          - model: mistralai/Mistral-7B-Instruct-v0.2
            parameters:
              density: 0.5
              weight: 0.5
          - model: BioMistral/BioMistral-7B
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: mistralai/Mistral-7B-v0.1
        parameters:
          normalize: false
          int8_mask: true
        dtype: float16
        """)
    assert rc == 0
    base = zoo["mistralai/Mistral-7B-v0.1"]
    a, b = zoo["mistralai/Mistral-7B-Instruct-v0.2"], zoo["BioMistral/BioMistral-7B"]
    for k in SHAPES:
        ref = base[k].numpy() + ties([(a[k] - base[k]).numpy(), (b[k] - base[k]).numpy()], [0.5, 0.5],
                                     [0.5, 0.5], False)
        near(out[k], ref, 2e-3)


def test_ties_example_gradients_filters_and_per_model_densities(zoo):
    rc, out = merge_config("""\
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: garage-bAInd/Platypus2-13B
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
        """)
    assert rc == 0
    base = zoo["TheBloke/Llama-2-13B-fp16"]
    fts = [zoo[m] for m in ("psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardMath-13B-V1.0")]
    for k in SHAPES:
        t = position(k)
        dens = [grad([1, 0.7, 0.1], t), 0.5, 0.33]
        ws = [1.0, grad([0, 0.3, 0.7, 1], t), 0.5 if "mlp" in k else 0.0]
        ref = base[k].numpy() + ties([(f[k] - base[k]).numpy() for f in fts], ws, dens, True)
        near(out[k], ref, 1e-5)
    # the gradient really varies over the layers: layer 0 keeps all of orca, layer 2 a tenth
    d0 = out["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.count_nonzero(d0) > 8


def test_gradient_slerp_example_slices_form(zoo):
    rc, out = merge_config(f"""\
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, {L}]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, {L}]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5 # fallback for rest of tensors
        dtype: float32
        """)
    assert rc == 0
    a, b = zoo["psmathur/orca_mini_v3_13b"], zoo["garage-bAInd/Platypus2-13B"]
    for k in SHAPES:
        t = position(k)
        tt = grad([0, 0.5, 0.3, 0.7, 1], t) if "self_attn" in k else grad([1, 0.5, 0.7, 0.3, 0], t) if "mlp" in k \
            else 0.5
        near(out[k], slerp(tt, a[k].numpy(), b[k].numpy()), 1e-5)
    q0 = "model.layers.0.self_attn.q_proj.weight"  # t = 0 there: the base model itself
    near(out[q0], a[q0].numpy(), 1e-6)


def test_gradient_slerp_models_form_and_wrong_layer_range(zoo):
    text = """\
        models:
          - model: psmathur/orca_mini_v3_13b
          - model: garage-bAInd/Platypus2-13B
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t: [0, 1]
        """
    rc, out = merge_config(text)
    assert rc == 0
    a, b = zoo["psmathur/orca_mini_v3_13b"], zoo["garage-bAInd/Platypus2-13B"]
    k = "model.layers.1.mlp.up_proj.weight"  # t = 0.5 there
    near(out[k], slerp(0.5, a[k].numpy(), b[k].numpy()), 1e-5)
    rc, _ = merge_config("""\
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, 40]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, 40]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters: {t: 0.5}
        """, out="out2")
    assert rc != 0 and not Path("out2").exists()


def test_new_methods_from_configs(zoo):
    base = zoo["TheBloke/Llama-2-13B-fp16"]
    a, b, c = (zoo[m] for m in ("psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
                                "WizardLM/WizardLM-13B-V1.2"))
    rc, out = merge_config("""\
        merge_method: model_stock
        base_model: TheBloke/Llama-2-13B-fp16
        models:
          - model: psmathur/orca_mini_v3_13b
          - model: garage-bAInd/Platypus2-13B
          - model: WizardLM/WizardLM-13B-V1.2
        """, out="ms")
    assert rc == 0
    for k in SHAPES:
        V = np.stack([(m[k] - base[k]).numpy().ravel() for m in (a, b, c)])
        cs = [V[i] @ V[j] / np.linalg.norm(V[i]) / np.linalg.norm(V[j]) for i in range(3) for j in range(i + 1, 3)]
        t = 3 * np.mean(cs) / (1 + 2 * np.mean(cs))
        near(out[k].ravel(), base[k].numpy().ravel() + t * V.mean(0), 1e-5)
    rc, out = merge_config("""\
        merge_method: nuslerp
        base_model: TheBloke/Llama-2-13B-fp16
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters: {weight: 1}
          - model: garage-bAInd/Platypus2-13B
            parameters: {weight: 3}
        """, out="nu")
    assert rc == 0
    for k in SHAPES:
        da, db = (a[k] - base[k]).numpy(), (b[k] - base[k]).numpy()
        near(out[k], base[k].numpy() + slerp(0.75, da, db), 1e-5)
    rc, out = merge_config("""\
        merge_method: breadcrumbs_ties
        base_model: TheBloke/Llama-2-13B-fp16
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters: {weight: 1, density: 0.5, gamma: 0.1}
          - model: garage-bAInd/Platypus2-13B
            parameters: {weight: 0.5, density: 0.75}
        parameters: {normalize: true, lambda: 0.5}
        """, out="bc")
    assert rc == 0
    for k in SHAPES:
        sp = []
        for m, d, g in ((a, 0.5, 0.1), (b, 0.75, 0.01)):
            x = (m[k] - base[k]).numpy().ravel()
            n = x.size
            keep, top = int(d * n), int(g * n)
            bot = n - keep - top
            if bot < 0:
                top, bot = top + bot, 0
            r = np.empty(n)
            r[np.argsort(np.abs(x), kind="stable")] = np.arange(n)
            sp.append(np.where((r >= bot) & (r < n - top), x, 0.0).reshape(SHAPES[k]))
        wx = np.stack([sp[0], 0.5 * sp[1]])
        sign = np.where(wx.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(wx) == sign
        den = (np.array([1.0, 0.5]).reshape(2, *[1] * len(SHAPES[k])) * agree).sum(0)
        near(out[k], base[k].numpy() + 0.5 * np.where(agree, wx, 0).sum(0) / np.where(den == 0, 1, den), 1e-5)
    rc, out = merge_config("""\
        merge_method: della
        base_model: TheBloke/Llama-2-13B-fp16
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters: {weight: 1, density: 0.5, epsilon: 0.1}
          - model: garage-bAInd/Platypus2-13B
            parameters: {weight: 1, density: 1.0}
        """, out="della")
    assert rc == 0
    k = "model.layers.1.mlp.up_proj.weight"
    kept = out[k] - base[k].numpy()
    assert np.isfinite(kept).all() and not np.allclose(kept, ((a[k] + b[k]) / 2 - base[k]).numpy())


def test_arcee_fusion_example(zoo):
    rc, out = merge_config("""\
        models:
          - model: model_a
          - model: model_b
        merge_method: arcee_fusion
        base_model: model_a
        dtype: bfloat16
        """)
    assert rc == 0
    a, b = zoo["model_a"], zoo["model_b"]
    kept_some = dropped_some = False
    for k in SHAPES:
        base, tau = a[k].numpy(), (b[k] - a[k]).numpy()

        def softmax(v: np.ndarray) -> np.ndarray:
            e = np.exp(v - v.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        p, q = softmax(base + tau) + 1e-8, softmax(base) + 1e-8
        importance = np.abs(tau) * (p * np.log(p / q)).sum(-1, keepdims=True)
        srt = np.sort(importance.ravel())
        q1, med, q3 = (srt[int(qq * (srt.size - 1))] for qq in (0.25, 0.5, 0.75))  # mergekit's: no interpolation
        keep = importance >= med + 1.5 * (q3 - q1)
        kept_some |= bool(keep.any())
        dropped_some |= bool((~keep).any())
        near(out[k], base + np.where(keep, tau, 0.0), 2e-2)  # bfloat16 output
    assert kept_some and dropped_some


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("text", "fragment"), [
    ("""\
        slices:
          - sources:
            - model: psmathur/orca_mini_v3_13b
              layer_range: [0, 24]
          - sources:
            - model: garage-bAInd/Platypus2-13B
              layer_range: [20, 40]
        merge_method: passthrough
        dtype: float16
        """, "merge_method: mergekit's method 'passthrough' is not supported (it copies or stacks layers"),
])
def test_refused_examples(zoo, capsys, text, fragment):
    rc, _ = merge_config(text)
    err = capsys.readouterr().err
    assert rc != 0 and fragment in err and "Traceback" not in err and not Path("out").exists()


def test_docs_list_every_example():
    doc = (Path(__file__).parents[1] / "docs" / "mergekit.md").read_text()
    for ex in ("linear.yml", "bio-merge.yml", "ties.yml", "gradient-slerp.yml", "orcamini-platy-44layer.yml",
               "arcee_fusion.yml"):
        assert f"examples/{ex}" in doc, ex
