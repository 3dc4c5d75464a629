"""The import graph of the package: no cycles, and every import goes down the layers (imports inside function
bodies and under TYPE_CHECKING included). Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tvbasis"

#: top layer first; components in one layer are independent of each other (neither imports the other)
LAYERS: list[set[str]] = [
    {"cli"},
    {"bench"},
    {"eval", "interop"},
    {"store", "stitch"},
    {"passes", "compress", "lora"},
    {"bases", "taskset"},
    {"vectors"},
    {"io", "engine", "merge", "codecs"},
    {"untrusted"},
    {"errors", "_version"},
]
LAYER_OF = {c: i for i, layer in enumerate(LAYERS) for c in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def imports_of(mod: str) -> set[str]:
    """Every tvbasis module ``mod`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    package = mod if is_package(mod) else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "tvbasis")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tvbasis":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in MODULES else target)
    return {resolve(t) for t in out}


def resolve(name: str) -> str:
    """The module an import names (``tvbasis.io.reader.Checkpoint`` -> ``tvbasis.io.reader``)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def component(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""  # "" is the package root (the public face)


GRAPH = {m: imports_of(m) - {m} for m in MODULES}


def test_every_module_has_a_layer():
    missing = sorted({component(m) for m in MODULES} - set(LAYER_OF) - {""})
    assert not missing, f"add these to LAYERS in tests/test_architecture.py: {missing}"


def test_imports_go_down_the_layers():
    bad = []
    for mod, targets in GRAPH.items():
        a = component(mod)
        for t in targets:
            b = component(t)
            if b == "":
                bad.append(f"{mod} imports the package root tvbasis (import the submodule instead)")
            elif a == "" or a == b:
                continue
            elif LAYER_OF[a] >= LAYER_OF[b]:
                why = "a sibling of the same layer" if LAYER_OF[a] == LAYER_OF[b] else "a higher layer"
                bad.append(f"{mod} imports {t}: {why}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("core", ["tvbasis", "tvbasis.store", "tvbasis.passes", "tvbasis.vectors", "tvbasis.cli"])
def test_core_does_not_need_the_eval_extra(core):
    """What the core reaches, transitively, imports no module of tvbasis.eval (whose dependencies are optional)
    except the CLI's guarded registration of the eval subcommands."""
    seen, todo = set(), [core]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(t for t in GRAPH[m] if not (m in ("tvbasis.cli", "tvbasis.cli.bench") and component(t) in ("eval", "bench")))
    assert not [m for m in seen if component(m) in ("eval", "bench")]


def test_the_checker_sees_function_level_imports():
    """The import reader itself: engine/options.py imports the Ray engine inside a function body (an optional
    dependency), and that import must be in the graph."""
    assert "tvbasis.engine.ray" in imports_of("tvbasis.engine.options")
    assert resolve("tvbasis.io.reader.Checkpoint") == "tvbasis.io.reader"
