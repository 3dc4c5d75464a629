"""Reading mergekit YAML configs (tvbasis.interop.mergekit): the mapping to tvbasis merges, and every refusal."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tvbasis.errors import ConfigError
from tvbasis.interop.mergekit import (
    MergekitConfig,
    load_mergekit_config,
    parse_mergekit_config,
)
from tvbasis.merge.base import MergeSpec

MODELS = ["base", "ft/a", "ft/b", "ft/c", "other/a", "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2",
          "BioMistral/BioMistral-7B", "psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2",
          "garage-bAInd/Platypus2-13B", "TheBloke/Llama-2-13B-fp16", "teknium/OpenHermes-2.5-Mistral-7B"]


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory holding every model path the configs name (mergekit resolves against the cwd)."""
    monkeypatch.chdir(tmp_path)
    for m in MODELS:
        (tmp_path / m).mkdir(parents=True)
    return tmp_path


def write(cwd: Path, text: str, name: str = "merge.yml") -> Path:
    p = cwd / name
    p.write_text(textwrap.dedent(text))
    return p


def load(cwd: Path, text: str) -> MergekitConfig:
    return load_mergekit_config(write(cwd, text))


def refused(cwd: Path, text: str, key: str, fragment: str) -> None:
    p = write(cwd, text)
    with pytest.raises(ConfigError) as e:
        load_mergekit_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}: "), msg
    assert fragment in msg, msg


# ------------------------------------------------------------------------------------------------ mappings
def test_bio_merge_example_ties(cwd: Path) -> None:
    # mergekit's examples/bio-merge.yml, verbatim
    cfg = load(cwd, """\
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
    assert cfg.method == "ties" and cfg.mergekit_method == "ties"
    assert cfg.base_model == cwd / "mistralai/Mistral-7B-v0.1"
    assert cfg.models == {"Mistral-7B-Instruct-v0.2": cwd / "mistralai/Mistral-7B-Instruct-v0.2",
                          "BioMistral-7B": cwd / "BioMistral/BioMistral-7B"}
    assert list(cfg.models) == ["Mistral-7B-Instruct-v0.2", "BioMistral-7B"]
    assert cfg.weights == {"Mistral-7B-Instruct-v0.2": 0.5, "BioMistral-7B": 0.5}
    assert cfg.spec == MergeSpec("ties", {"density": 0.5, "sign": "total", "normalize": False, "trim_scope": "tensor",
                                          "rounding": "floor"})
    assert cfg.dtype == "float16" and cfg.scaling_coef == 1.0
    assert cfg.source == str(cwd / "merge.yml")


def test_ties_base_listed_global_defaults_and_lambda(cwd: Path) -> None:
    # the README's style: the base listed without parameters; density and weight defaults under `parameters`
    cfg = load(cwd, """\
        models:
          - model: base
            # no parameters necessary for base model
          - model: ft/a
            parameters:
              weight: 0.7
          - model: ft/b
        merge_method: ties
        base_model: base
        parameters:
          density: 0.3
          weight: 0.4
          lambda: 0.8
        """)
    assert cfg.base_model == cwd / "base"
    assert cfg.models == {"a": cwd / "ft/a", "b": cwd / "ft/b"}
    assert cfg.weights == {"a": 0.7, "b": 0.4}
    assert cfg.spec == MergeSpec("ties", {"density": 0.3, "sign": "total", "normalize": True, "trim_scope": "tensor",
                                          "rounding": "floor"})
    assert cfg.scaling_coef == 0.8 and cfg.dtype is None


def test_ties_default_density_is_mergekits_and_above_one_keeps_all(cwd: Path) -> None:
    text = """\
        merge_method: ties
        base_model: base
        models:
          - model: ft/a
            parameters: {weight: 1.0%s}
        """
    assert load(cwd, text % "").spec.params["density"] == 1.0
    assert load(cwd, text % ", density: 1.5").spec.params["density"] == 1.0


def test_dare_ties_defaults_are_mergekits(cwd: Path) -> None:
    # mergekit's dare_ties normalizes by default NOT (tvbasis's own default is true): written explicitly
    cfg = load(cwd, """\
        merge_method: dare_ties
        base_model: TheBloke/Llama-2-13B-fp16
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters: {density: 0.6, weight: 0.5}
          - model: garage-bAInd/Platypus2-13B
            parameters: {density: 0.6, weight: 0.3}
        dtype: bfloat16
        """)
    assert cfg.spec == MergeSpec("dare_ties", {"density": 0.6, "rescale": True, "normalize": False, "sign": "total"})
    assert cfg.weights == {"orca_mini_v3_13b": 0.5, "Platypus2-13B": 0.3}
    assert cfg.dtype == "bfloat16" and cfg.scaling_coef == 1.0
    assert any("L1 norm" in n for n in cfg.notes)


def test_dare_linear(cwd: Path) -> None:
    cfg = load(cwd, """\
        merge_method: dare_linear
        base_model: base
        models:
          - model: ft/a
            parameters: {weight: 1}
          - model: ft/b
            parameters: {weight: 2}
        parameters:
          density: 0.25
          rescale: false
          normalize: true
          int8_mask: true
          lambda: 2
        out_dtype: torch.float32
        dtype: float16
        """)
    assert cfg.spec == MergeSpec("dare_linear", {"density": 0.25, "rescale": False, "normalize": True})
    assert cfg.weights == {"a": 1.0, "b": 2.0} and cfg.scaling_coef == 2.0
    assert cfg.dtype == "float32"  # out_dtype wins over dtype


def test_task_arithmetic(cwd: Path) -> None:
    cfg = load(cwd, """\
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: ft/a
            parameters: {weight: 1.0, density: 0.5}
          - model: ft/b
            parameters: {weight: -0.5}
        parameters:
          lambda: 0.5
          rescale: true
        """)
    assert cfg.spec == MergeSpec("task_arithmetic", {"normalize": False})
    assert cfg.weights == {"a": 1.0, "b": -0.5} and cfg.scaling_coef == 0.5
    assert any("density is ignored" in n for n in cfg.notes)


def test_linear_example_uses_first_model_as_base(cwd: Path) -> None:
    # mergekit's examples/linear.yml, verbatim: Σ w_i·θ_i / Σ w_i = θ_orca + Σ_{i>0} (w_i / 1.8)·τ_i
    cfg = load(cwd, """\
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
    assert cfg.mergekit_method == "linear" and cfg.method == "task_arithmetic"
    assert cfg.base_model == cwd / "psmathur/orca_mini_v3_13b"
    assert cfg.models == {"WizardLM-13B-V1.2": cwd / "WizardLM/WizardLM-13B-V1.2",
                          "Platypus2-13B": cwd / "garage-bAInd/Platypus2-13B"}
    assert cfg.weights == pytest.approx({"WizardLM-13B-V1.2": 0.3 / 1.8, "Platypus2-13B": 0.5 / 1.8})
    assert cfg.spec == MergeSpec("task_arithmetic", {"normalize": False})
    assert cfg.dtype == "float16" and cfg.scaling_coef == 1.0


def test_linear_base_added_with_global_weight(cwd: Path) -> None:
    # mergekit adds base_model to a linear merge's inputs; its weight comes from the global default
    cfg = load(cwd, """\
        merge_method: linear
        base_model: base
        models:
          - model: ft/a
          - model: ft/b
            parameters: {weight: 2.0}
        parameters:
          weight: 1.0
        """)
    assert cfg.base_model == cwd / "base"
    assert cfg.weights == pytest.approx({"a": 0.25, "b": 0.5})


def test_linear_unnormalized_summing_to_one(cwd: Path) -> None:
    cfg = load(cwd, """\
        merge_method: linear
        models:
          - model: base
            parameters: {weight: 0.5}
          - model: ft/a
            parameters: {weight: 0.25}
          - model: ft/b
            parameters: {weight: 0.25}
        parameters: {normalize: false}
        """)
    assert cfg.weights == {"a": 0.25, "b": 0.25}


def test_scalar_conditional_without_filter_and_name_dedup(cwd: Path) -> None:
    cfg = load(cwd, """\
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: ft/a
            parameters:
              weight: {value: 0.5}
          - model: other/a/
            parameters:
              weight: {filter: "*", value: 0.25}
          - model: ./ft/a/../b
            parameters: {weight: 1}
        """)
    assert cfg.models == {"a": cwd / "ft/a", "a_2": cwd / "other/a", "b": cwd / "ft/b"}
    assert cfg.weights == {"a": 0.5, "a_2": 0.25, "b": 1.0}


def test_paths_resolve_against_cwd_not_the_yaml_dir(cwd: Path) -> None:
    sub = cwd / "configs"
    sub.mkdir()
    (sub / "ft").mkdir()  # would match if resolved against the YAML's directory
    p = write(sub, """\
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: ft/c
            parameters: {weight: 1}
        """)
    assert load_mergekit_config(p).models == {"c": cwd / "ft/c"}


def test_parse_mapping_and_check_paths_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_mergekit_config({"merge_method": "ties", "base_model": "org/base",
                                 "models": [{"model": "org/x", "parameters": {"weight": 1, "density": 0.2}}]},
                                "inline", check_paths=False)
    assert cfg.base_model == tmp_path / "org/base" and cfg.models == {"x": tmp_path / "org/x"}
    with pytest.raises(ConfigError, match=r"^inline: base_model: model 'org/base' does not exist locally"):
        parse_mergekit_config({"merge_method": "ties", "base_model": "org/base", "models": [{"model": "org/x"}]},
                              "inline")


def test_sce_and_arcee_fusion_mappings(cwd: Path) -> None:
    cfg = load(cwd, """\
        merge_method: sce
        base_model: base
        models: [{model: ft/a}, {model: ft/b}, {model: ft/c}]
        parameters: {select_topk: 0.4, int8_mask: true}
        """)
    assert cfg.spec == MergeSpec("sce", {"select_topk": 0.4}) and cfg.weights == {"a": 1.0, "b": 1.0, "c": 1.0}
    cfg = load(cwd, "merge_method: arcee_fusion\nbase_model: ft/a\nmodels: [{model: ft/a}, {model: ft/b}]\n")
    assert cfg.spec == MergeSpec("arcee_fusion") and cfg.models == {"b": cwd / "ft/b"} and cfg.plan is None


def test_multislerp_and_nearswap_mappings(cwd: Path) -> None:
    cfg = load(cwd, """\
        merge_method: multislerp
        models:
          - {model: ft/a, parameters: {weight: 1}}
          - {model: ft/b, parameters: {weight: 2}}
        """)  # no base model: whole weights, ft/a serves as θ₀ and is a task (its τ = 0)
    assert cfg.base_model == cwd / "ft/a" and cfg.models == {"a": cwd / "ft/a", "b": cwd / "ft/b"}
    assert cfg.spec == MergeSpec("multislerp", {"normalize_weights": True, "on_weights": True})
    cfg = load(cwd, """\
        merge_method: multislerp
        base_model: base
        models:
          - {model: ft/a, parameters: {weight: 1}}
          - {model: ft/b, parameters: {weight: 2}}
        parameters: {normalize_weights: false}
        """)
    assert cfg.spec == MergeSpec("multislerp", {"normalize_weights": False, "on_weights": False})
    assert cfg.weights == {"a": 1.0, "b": 2.0}
    cfg = load(cwd, "merge_method: nearswap\nbase_model: base\nmodels: [{model: ft/a}]\nparameters: {t: 0.01}\n")
    assert cfg.spec == MergeSpec("nearswap", {"t": 0.01})
    cfg = load(cwd, "merge_method: karcher\nbase_model: base\nmodels: [{model: ft/a}, {model: ft/b}]\n")
    assert cfg.spec == MergeSpec("karcher", {"max_iter": 10, "tol": 1e-5, "include_base": True})
    cfg = load(cwd, "merge_method: karcher\nmodels: [{model: ft/a}, {model: ft/b}]\nparameters: {max_iter: 5}\n")
    assert cfg.base_model == cwd / "ft/a" and list(cfg.models) == ["a", "b"]
    assert cfg.spec == MergeSpec("karcher", {"max_iter": 5, "tol": 1e-5, "include_base": False})


def test_per_model_densities_give_a_plan(cwd: Path) -> None:
    # the final merge of mergekit's docs/multimerge.md: one density per model
    cfg = load(cwd, """\
        merge_method: dare_ties
        base_model: mistralai/Mistral-7B-v0.1
        models:
          - model: BioMistral/BioMistral-7B
            parameters:
              density: 0.6
              weight: 0.5
          - model: teknium/OpenHermes-2.5-Mistral-7B
            parameters:
              density: 0.8
              weight: 0.5
        """)
    assert cfg.plan is not None
    tm = cfg.plan.for_tensor("model.layers.0.mlp.up_proj.weight")
    assert tm.per_task == {"density": (0.6, 0.8)} and tm.weights == (0.5, 0.5)
    assert tm.spec == MergeSpec("dare_ties", {"density": 0.6, "rescale": True, "normalize": False, "sign": "total"})


def test_ties_example_plan_values_by_layer_and_filter(cwd: Path) -> None:
    (cwd / "WizardLM/WizardMath-13B-V1.0").mkdir(parents=True)
    cfg = load(cwd, """\
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters: {density: [1, 0.7, 0.1], weight: 1.0}
          - model: garage-bAInd/Platypus2-13B
            parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight: [{filter: mlp, value: 0.5}, {value: 0}]
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters: {normalize: true, lambda: [1, 2]}
        """)
    assert cfg.plan is not None and cfg.scaling_coef == 1.0
    names = [f"model.layers.{i}.{m}.weight" for i in range(5) for m in ("mlp.up_proj", "self_attn.q_proj")]
    plan = cfg.plan.bind(["model.embed_tokens.weight", *names])
    # layer 1 of 5: t = 0.25 → density 1 + (0.7 − 1)·0.5 = 0.85; weight 0 + (0.3 − 0)·0.75 = 0.225; λ 1.25
    tm = plan.for_tensor("model.layers.1.mlp.up_proj.weight")
    assert tm.weights == pytest.approx((1.0, 0.225, 0.5)) and tm.scale == pytest.approx(1.25)
    assert tm.per_task["density"] == pytest.approx((0.85, 0.5, 0.33))
    tm = plan.for_tensor("model.layers.4.self_attn.q_proj.weight")  # t = 1, no mlp: WizardMath's weight 0
    assert tm.weights == pytest.approx((1.0, 1.0, 0.0)) and tm.per_task["density"] == pytest.approx((0.1, 0.5, 0.33))
    tm = plan.for_tensor("model.embed_tokens.weight")  # outside the layers: t = 0
    assert tm.weights == pytest.approx((1.0, 0.0, 0.0)) and tm.scale == 1.0
    assert tm.per_task["density"] == pytest.approx((1.0, 0.5, 0.33))


# ------------------------------------------------------------------------------------------------ refusals
TA = textwrap.dedent("""\
    merge_method: ties
    base_model: base
    models:
      - model: ft/a
        parameters: {weight: 1, density: 0.5}
      - model: ft/b
        parameters: {weight: 1, density: 0.5}
    """)


@pytest.mark.parametrize(("text", "key", "fragment"), [
    (TA + "tokenizer_source: union\n", "tokenizer_source", "'union' is not supported"),
    (TA + "tokenizer_source: ft/a\n", "tokenizer_source", "is not supported"),
    (TA + "tokenizer: {source: base}\n", "tokenizer", "tokenizer configuration is not supported"),
    (TA + "chat_template: chatml\n", "chat_template", "not supported"),
    (TA + "modules: {}\n", "modules", "not supported"),
    (TA + "name: first-merge\n", "name", "unknown or unsupported key"),
    (TA + "dtype: int64\n", "dtype", "'int64' is not supported"),
    (TA + "out_dtype: fp8\n", "out_dtype", "'fp8' is not supported"),
    (TA + "parameters: {rescale: true}\n", "parameters.rescale", "not supported for ties"),
    (TA + "parameters: {gamma: 0.01}\n", "parameters.gamma", "not a parameter of mergekit's 'ties'"),
    (TA + "parameters: {normalize: 1}\n", "parameters.normalize", "must be true or false"),
    (TA + "parameters: {lambda: '0.5'}\n", "parameters.lambda", "must be a number"),
    (TA + "parameters: {lambda: .nan}\n", "parameters.lambda", "must be finite"),
    (TA + "parameters: [1]\n", "parameters", "must be a mapping"),
    (TA.replace("density: 0.5}\n  - model: ft/b", "density: 0.5, normalize: true}\n  - model: ft/b"),
     "models[0].parameters.normalize", "a merge-wide parameter"),
    (TA.replace("density: 0.5}\n  - model: ft/b", "density: [0.5, 0.5, 'x']}\n  - model: ft/b"),
     "models[0].parameters.density[2]", "a gradient list holds numbers"),
    (TA.replace("density: 0.5", "density: 0"), "models[0].parameters.density", "must be > 0"),
    (TA.replace("{weight: 1, density: 0.5}\n  - model: ft/b", "{density: 0.5}\n  - model: ft/b"),
     "models[0].parameters.weight", "mergekit requires a weight per model"),
    (TA.replace("weight: 1, density: 0.5}\n  - model: ft/b", "weight: {filter: 3, value: 1}}\n"
                "  - model: ft/b"), "models[0].parameters.weight.filter", "must be a string"),
    (TA.replace("weight: 1, density: 0.5}\n  - model: ft/b",
                "weight: [{filter: mlp, value: 1}, 0.5]}\n  - model: ft/b"),
     "models[0].parameters.weight", "mixes {filter, value} entries with plain values"),
    (TA.replace("weight: 1, density: 0.5}\n  - model: ft/b",
                "weight: [{filter: mlp, value: 1}]}\n  - model: ft/b"),
     "models[0].parameters.weight", "missing; mergekit requires a weight"),
    (TA.replace("weight: 1, density: 0.5}\n  - model: ft/b",
                "weight: [{filter: mlp, value: 1, op: x}]}\n  - model: ft/b"),
     "models[0].parameters.weight[0]", "expected {filter: NAME-PART, value: V}"),
    (TA + "parameters: {normalize: [true, false]}\n", "parameters.normalize", "a list of booleans"),
    (TA.replace("model: ft/a", "model: ft/a+ft/c"), "models[0].model", "LoRA references"),
    (TA.replace("model: ft/a", "model: ft/a@main"), "models[0].model", "revisions"),
    (TA.replace("model: ft/a", "model: {model: ft/a, lora: ft/c}"), "models[0].model.lora", "LoRA references"),
    (TA.replace("model: ft/a", "model: {model: {path: ft/a, revision: v1}}"), "models[0].model.model.revision",
     "revisions are not supported"),
    (TA.replace("model: ft/b", "model: ft/a"), "models[1].model", "listed twice (also models[0])"),
    (TA.replace("model: ft/b", "model: ft/missing"), "models[1].model", "'ft/missing' does not exist locally"),
    (TA.replace("base_model: base", "base_model: base@v2"), "base_model", "revisions"),
    (TA.replace("model: ft/a\n", "model: ft/a\n    layer_range: [0, 4]\n"), "models[0].layer_range",
     "unknown key"),
    (TA.replace("base_model: base\n", ""), "base_model", "missing"),
    (TA.replace("merge_method: ties", "merge_method: ramplus_tl"), "merge_method",
     "mergekit's method 'ramplus_tl' is not supported"),
    ("merge_method: karcher\nmodels: [{model: ft/a}]\n", "models", "at least two models, got 1"),
    ("merge_method: karcher\nbase_model: base\nmodels: [{model: ft/a}]\nparameters: {max_iter: 2.5}\n",
     "parameters.max_iter", "whole number"),
    (TA.replace("merge_method: ties", "merge_method: arcee_fusion"), "models[0].parameters.weight",
     "not a parameter of mergekit's 'arcee_fusion'"),
    ("merge_method: arcee_fusion\nbase_model: base\nmodels: [{model: ft/a}, {model: ft/b}]\n", "models",
     "ONE other model, got 2"),
    (TA.replace("merge_method: ties", "merge_method: passthrough"), "merge_method", "stacks layers"),
    (TA.replace("merge_method: ties", "merge_method: ram"), "merge_method", "not supported"),
    ("merge_method: nearswap\nbase_model: base\nmodels: [{model: ft/a}]\n", "parameters.t", "requires t"),
    ("merge_method: multislerp\nmodels: [{model: ft/a, parameters: {weight: 1}}]\n", "models",
     "at least two models, got 1"),
    (TA.replace("merge_method: ties", "merge_method: sce"), "models[0].parameters.weight",
     "not a parameter of mergekit's 'sce'"),
    ("merge_method: slerp\nbase_model: base\nmodels: [{model: ft/a}, {model: ft/b}]\nparameters: {t: 0.5}\n",
     "models", "ONE other model, got 2"),
    (TA.replace("merge_method: ties", "merge_method: slerp").replace("  - model: ft/b\n    parameters: "
                                                                    "{weight: 1, density: 0.5}\n", ""),
     "models[0].parameters.weight", "not a parameter of mergekit's 'slerp'"),
    ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft/a\n", "parameters.t", "requires t"),
    ("merge_method: nuslerp\nbase_model: base\nmodels:\n  - model: base\n  - model: ft/a\n",
     "models[0].model", "cannot be one of the two"),
    ("merge_method: nuslerp\nmodels:\n  - model: ft/b\n    parameters: {weight: 1}\n",
     "models", "exactly two models, got 1"),
    ("merge_method: model_stock\nbase_model: base\nmodels:\n  - model: ft/a\n", "models",
     "at least two models besides the base"),
    (TA.replace("merge_method: ties", "merge_method: della").replace("density: 0.5}", "density: 0.9}"),
     "parameters.epsilon", "density ± epsilon must lie inside (0, 1)"),
    (TA.replace("merge_method: ties", "merge_method: della") + "parameters: {rescale: 1}\n",
     "parameters.rescale", "must be true or false"),
    ("merge_method: ties\nbase_model: base\nslices:\n  - sources: [{model: ft/a, layer_range: [0, 2]}, "
     "{model: ft/b, layer_range: 2}]\n", "slices[0].sources[1].layer_range", "must be [START, END]"),
    ("merge_method: ties\nbase_model: base\nslices:\n  - sources: [{model: ft/a, layer_range: [0, 2]}]\n"
     "  - sources: [{model: ft/b, layer_range: [0, 2]}]\n", "slices[1]", "several output slices"),
    ("merge_method: ties\nbase_model: base\nslices:\n  - sources: [{model: ft/a, layer_range: [0, 2]}]\n"
     "    parameters: {weight: 1}\n", "slices[0].parameters", "per-slice settings are not supported"),
    ("merge_method: ties\nbase_model: base\nslices:\n  - sources: [{model: ft/a, layer_range: [0, 2]}, "
     "{model: ft/b, layer_range: [0, 3]}]\n", "slices[0].sources[1].layer_range", "differs from"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: ft/a}]\nslices: [{sources: []}]\n", "slices",
     "not both"),
    (TA.replace("merge_method: ties", "merge_method: topk"), "merge_method", "method 'topk' is not supported"),
    (TA.replace("merge_method: ties\n", ""), "merge_method", "missing"),
    ("merge_method: ties\nbase_model: base\n", "models", "missing"),
    ("merge_method: ties\nbase_model: base\nmodels: []\n", "models", "non-empty list"),
    ("merge_method: ties\nbase_model: base\nmodels: [ft/a]\n", "models[0]", "must be a mapping"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: 3}]\n", "models[0].model", "must be a model path"),
    ("merge_method: ties\nbase_model: base\nmodels: [{parameters: {}}]\n", "models[0].model", "missing"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n", "models", "no model to merge besides"),
    ("merge_method: linear\nmodels:\n  - model: ft/a\n    parameters: {weight: 1, density: 0.5}\n",
     "models[0].parameters.density", "not a parameter of mergekit's 'linear'"),
    ("merge_method: linear\nmodels:\n  - model: ft/a\n    parameters: {weight: 1}\nparameters: {lambda: 2}\n",
     "parameters.lambda", "not a parameter of mergekit's 'linear'"),
    ("merge_method: linear\nbase_model: base\nmodels:\n  - model: ft/a\n    parameters: {weight: 1}\n",
     "base_model", "linear averages the base model too"),
    (("merge_method: linear\nmodels:\n  - model: ft/a\n    parameters: {weight: 1}\n"
      "  - model: ft/b\n    parameters: {weight: 1}\nparameters: {normalize: false}\n"),
     "parameters.normalize", "scales the base model itself by 2"),
    (("merge_method: linear\nmodels:\n  - model: ft/a\n    parameters: {weight: 1}\n"
      "  - model: ft/b\n    parameters: {weight: -1}\n"), "parameters.normalize", "divide by zero"),
])
def test_refused_by_key_path(cwd: Path, text: str, key: str, fragment: str) -> None:
    refused(cwd, text, key, fragment)


@pytest.mark.parametrize(("text", "fragment"), [
    ("- merge_method: ties\n", "must be a YAML mapping, got a list"),
    ("just a string\n", "must be a YAML mapping, got a str"),
    ("", "must be a YAML mapping, got empty"),
    ("merge_method: ties\nmodels: [a, b\n", "malformed YAML"),
    ("merge_method: ties\n  models: x\n", "malformed YAML"),
    ("merge_method: linear\n---\nmerge_method: ties\n", "several YAML documents"),
    ("merge_method: !!python/object/apply:os.system ['echo pwned']\n", "unsupported YAML tag"),
    ("merge_method: !!python/object:collections.OrderedDict {}\n", "unsupported YAML tag"),
])
def test_bad_yaml_names_the_file(cwd: Path, text: str, fragment: str) -> None:
    p = write(cwd, text)
    with pytest.raises(ConfigError) as e:
        load_mergekit_config(p)
    assert str(e.value).startswith(f"{p}: ") and fragment in str(e.value), str(e.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yml: cannot read mergekit config"):
        load_mergekit_config(tmp_path / "missing.yml")
