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
    {"methods"},
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


def imports_of(mod: str, tree: ast.Module | None = None) -> set[str]:
    """Every tvbasis module ``mod`` imports, anywhere in its body (or in ``tree``, a part of it)."""
    if tree is None:
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


def import_time_imports(mod: str) -> set[str]:
    """The tvbasis modules ``mod`` imports when it is imported: its module-level imports, without those inside
    function bodies (run when called) or under ``if TYPE_CHECKING:`` (never run)."""
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    kept: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kept.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(getattr(node, field, []))
    return {t for t in imports_of(mod, ast.Module(body=kept, type_ignores=[])) if t != mod}


EXTRA = ("eval", "bench")  #: the components that need the eval extra


@pytest.mark.parametrize("core", ["tvbasis", "tvbasis.store", "tvbasis.passes", "tvbasis.vectors", "tvbasis.cli"])
def test_core_does_not_need_the_eval_extra(core):
    """What the core reaches, transitively, imports no module of tvbasis.eval or tvbasis.bench (whose dependencies
    are optional), except the CLI's guarded lazy imports: inside the functions of the subcommands that need the
    eval extra (cli/bench.py, cli/evaluate.py, inspect --plot, localize --data), never when a CLI module is
    imported."""
    seen, todo = set(), [core]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        lazy_ok = component(m) == "cli"
        todo.extend(t for t in GRAPH[m] if not (lazy_ok and component(t) in EXTRA))
        if lazy_ok:
            todo.extend(import_time_imports(m))
    assert not [m for m in seen if component(m) in EXTRA]


def floors(package: str) -> int:
    """How many floors the modules of ``package`` stand on: a module importing no sibling is on floor 1, any other
    one floor above the highest sibling it imports (the longest import chain inside the package; its
    ``__init__``, the package's face, not counted)."""
    mods = {m for m in MODULES if component(m) == package and not is_package(m)}
    floor: dict[str, int] = {}

    def of(m: str) -> int:
        if m not in floor:
            floor[m] = 1 + max((of(t) for t in GRAPH[m] if t in mods), default=0)
        return floor[m]

    return max((of(m) for m in mods), default=0)


def lines_by_component() -> dict[str, int]:
    out: dict[str, int] = {}
    for m, path in MODULES.items():
        out[component(m)] = out.get(component(m), 0) + len(path.read_text().splitlines())
    return out


def test_eval_stands_on_at_most_six_floors():
    assert floors("eval") <= 6, f"tvbasis.eval stands on {floors('eval')} floors"


#: packages known to hold more than a fifth of the lines, and why; remove one here once it is below
OVER_A_FIFTH: dict[str, str] = {}


def test_no_package_holds_more_than_a_fifth_of_the_lines():
    lines = lines_by_component()
    total = sum(lines.values())
    big = {c: f"{100 * n / total:.1f} %" for c, n in lines.items() if n > 0.2 * total}
    assert set(big) <= set(OVER_A_FIFTH), f"packages above 20 % of the {total} lines of src/tvbasis: {big}"


def test_the_checker_sees_function_level_imports():
    """The import reader itself: engine/options.py imports the Ray engine inside a function body (an optional
    dependency), and that import must be in the graph."""
    assert "tvbasis.engine.ray" in imports_of("tvbasis.engine.options")
    assert "tvbasis.engine.ray" not in import_time_imports("tvbasis.engine.options")
    assert "tvbasis.eval.localize" in imports_of("tvbasis.cli.stitch")
    assert "tvbasis.eval.localize" not in import_time_imports("tvbasis.cli.stitch")
    assert resolve("tvbasis.io.reader.Checkpoint") == "tvbasis.io.reader"
