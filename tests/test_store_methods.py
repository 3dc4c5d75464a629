"""The store-method registry (``tvbasis.methods``): nothing outside it branches on a method's name, a toy
per-task compressor registered here builds a store that reconstructs what a reference written here says, and the
old keyword form of ``build_store`` still works with a DeprecationWarning."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from tests.tinymodels import finetune_states, pretrained_state, save_hf
from tvbasis.cli import main
from tvbasis.errors import ConfigError
from tvbasis.methods import METHOD_FLAGS, get_store_method, register, store_method_names, unregister
from tvbasis.methods.per_task import PerTaskMethod
from tvbasis.store import BasisStore, StoreSpec, WriteOptions, build_store

PKG = Path(__file__).resolve().parents[1] / "src" / "tvbasis"
METHODS_PKG = PKG / "methods"


# ------------------------------------------------------------------------------------------------ no branches
#: comparisons with a store method's name that are not about a store method, each with why
NOT_A_METHOD = {
    ("bases/cluster.py", "self.params['assignment'] == 'random'"): "cluster's assignment option",
    ("compress/plan.py", "text.strip().lower() == 'tsvc'"): "the coder rule named tsvc",
    ("compress/plan.py", "text.strip().lower() == 'bitdelta'"): "the coder rule named bitdelta",
    ("bench/claims.py", "m == 'pca'"): "the bench's row label pca (bench.BASIS_METHODS)",
}


def _literals(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [x for e in node.elts for x in _literals(e)]
    return []


def branches_on_store_methods(root: Path, skip: Path, allowed: Mapping[tuple[str, str], str]) -> list[str]:
    """Every comparison (==, !=, in, not in) with a store method's name in the source under ``root`` outside
    ``skip``, but the ``allowed`` (file, expression) pairs; also any use of the old hand-kept lists' names."""
    names = set(store_method_names())
    out = []
    for path in sorted(root.rglob("*.py")):
        if skip in path.parents:
            continue
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        for old in ("PEER_METHODS", "LORA_METHODS", "_NOT_LORA", "_LORA_ONLY"):
            for m in re.finditer(rf"\b{old}\b", text):
                out.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {old}")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Compare):
                continue
            hit = sorted({x for s in [node.left, *node.comparators] for x in _literals(s)} & names)
            if hit and (rel, ast.unparse(node)) not in allowed:
                out.append(f"{rel}:{node.lineno}: {ast.unparse(node)[:80]}")
    return out


def test_no_branch_on_a_store_method_name_outside_the_registry():
    found = branches_on_store_methods(PKG, METHODS_PKG, NOT_A_METHOD)
    assert found == [], "ask the StoreMethod instead:\n" + "\n".join(found)


def test_the_grep_sees_a_branch(tmp_path):
    (tmp_path / "a.py").write_text('def f(store):\n    return store.method == "tall"\n')
    (tmp_path / "b.py").write_text('def g(args):\n    return args.method in ("pca", "nosuch")\n')
    (tmp_path / "c.py").write_text('LORA_METHODS = ()\nif x.mode == "mask":\n    pass\n')  # an old list
    assert len(branches_on_store_methods(tmp_path, tmp_path / "skip", {})) == 3
    assert branches_on_store_methods(tmp_path, tmp_path / "skip", {("a.py", "store.method == 'tall'"): "x"})[
        0
    ].startswith("b.py")


def test_the_store_package_docstring_names_every_module():
    import tvbasis.store

    doc = tvbasis.store.__doc__ or ""
    modules = [p.stem for p in (PKG / "store").glob("*.py") if p.stem != "__init__"]
    assert [m for m in modules if f"``{m}``" not in doc] == []
    import tvbasis.methods

    mdoc = tvbasis.methods.__doc__ or ""
    assert [m for m in (p.stem for p in METHODS_PKG.glob("*.py") if p.stem != "__init__")
            if f"``{m}``" not in mdoc] == []


def test_the_architecture_recipes_name_what_exists():
    """docs/architecture.md's recipes (merge method, basis method, codec, store method): every file they name
    exists and every registry they say to add to is there."""
    doc = (PKG.parents[1] / "docs" / "architecture.md").read_text()
    recipes = doc[doc.index("## Add a merge method") : doc.index("## Conventions")]
    paths = set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", recipes))
    assert len(paths) >= 8
    for path in paths:
        assert (PKG.parents[1] / path if path.startswith("tests/") else PKG / path).is_file(), path
    wants = {
        "merge/registry.py": "MERGE_METHODS",
        "bases/__init__.py": "BASIS_METHODS",
        "codecs/registry.py": "CODECS",
        "methods/per_task.py": "def _add(",
        "methods/registry.py": "class StoreMethod",
    }
    for path, text in wants.items():
        assert path in recipes and text in (PKG / path).read_text(), path
    for name in ("PerTaskMethod", "StoreSpec", "zero_fit", "MASK", "STATISTICS_FIRST", "Param", "BaseMerger"):
        assert name in recipes, name


def test_every_method_is_typed_and_declares_its_flags():
    for name in store_method_names():
        m = get_store_method(name)
        assert m.name == name and m.summary
        assert set(m.flags) <= set(METHOD_FLAGS), name
        assert set(m.choices) <= set(m.defaults), name
    with pytest.raises(ConfigError, match="unknown store method"):
        get_store_method("nosuch")


# ------------------------------------------------------------------------------------------------ a toy method
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    pre = pretrained_state()
    fts = finetune_states(pre, 3)
    pre_p = save_hf(pre, root / "pre")
    ft_p = {f"t{i}": save_hf(sd, root / f"ft{i}") for i, sd in enumerate(fts)}
    return pre, fts, pre_p, ft_p


@pytest.fixture
def toy():
    """A per-task compressor in one line: every task vector cast to a float type (option ``dtype``)."""
    method = register(
        PerTaskMethod(
            "toy-cast",
            "every task vector in a smaller float type",
            residual=lambda o: o["dtype"],
            defaults={"dtype": "float16"},
            choices={"dtype": ("float16", "bfloat16")},
        )
    )
    yield method
    unregister("toy-cast")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_toy_per_task_compressor_builds_and_reconstructs(family, toy, tmp_path, dtype):
    pre, fts, pre_p, ft_p = family
    store = build_store(pre_p, ft_p, StoreSpec("toy-cast", options={"dtype": dtype}), tmp_path / "s")
    assert store.verify() == [] and store.M == 0 and store.method == "toy-cast"
    assert BasisStore.open(tmp_path / "s").manifest.options == {"dtype": dtype}
    cast = getattr(torch, dtype)
    for t, sd in enumerate(fts):
        got = dict(store.reconstruct(f"t{t}").items())
        for k, v in pre.items():
            if not v.is_floating_point():
                continue
            want = (sd[k].float() - v.float()).to(cast).float()  # the reference: the delta cast, here
            assert torch.equal(got[k].float(), want), (t, k)
    with pytest.raises(ConfigError, match="dtype"):
        build_store(pre_p, ft_p, StoreSpec("toy-cast", options={"dtype": "int8"}), tmp_path / "bad")
    with pytest.raises(ConfigError, match="-M must be 0"):
        build_store(pre_p, ft_p, StoreSpec("toy-cast", M=1), tmp_path / "bad")


def test_the_cli_builds_a_toy_method_and_refuses_flags_it_does_not_take(family, toy, tmp_path, capsys):
    _, _, pre_p, ft_p = family
    ft = [a for n, p in ft_p.items() for a in ("--finetuned", f"{n}={p}")]
    base = ["-q", "build", "--pretrained", str(pre_p), *ft, "--method", "toy-cast"]
    assert main([*base, "--option", "dtype=bfloat16", "--out", str(tmp_path / "s")]) == 0
    assert BasisStore.open(tmp_path / "s").manifest.options == {"dtype": "bfloat16"}
    capsys.readouterr()
    assert main([*base, "--residual", "int8", "--out", str(tmp_path / "bad")]) != 0
    assert "--residual applies to --method" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ the old form
def test_the_old_keyword_form_still_builds_with_a_deprecation_warning(family, tmp_path):
    _, _, pre_p, ft_p = family
    with pytest.warns(DeprecationWarning, match="StoreSpec"):
        old = build_store(pre_p, ft_p, "pca", 2, tmp_path / "old", None, False, "float16", max_shard_size="1GB")
    new = build_store(
        pre_p, ft_p, StoreSpec("pca", M=2, dtype="float16"), tmp_path / "new", write=WriteOptions(max_shard_size="1GB")
    )
    for t in old.task_names:
        a, b = dict(old.reconstruct(t).items()), dict(new.reconstruct(t).items())
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert old.manifest.store_dtypes == new.manifest.store_dtypes
    with pytest.warns(DeprecationWarning):
        kw = build_store(pretrained=pre_p, finetuned=ft_p, method="tall", M=None, out=tmp_path / "kw")
    assert kw.masks
    with pytest.raises(TypeError, match="unknown"):
        build_store(pre_p, ft_p, "pca", 2, tmp_path / "x", nosuch=1)


def test_build_store_takes_six_parameters():
    import inspect

    assert list(inspect.signature(build_store).parameters) == ["pretrained", "finetuned", "spec", "out", "run", "write"]
