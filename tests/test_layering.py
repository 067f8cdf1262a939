"""Layering: no import cycles in factory/, and the lower layers import nothing of the stages and the run above them.

Every import counts, those inside functions too: a lazy import is still a dependency, only a later one.
"""

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "factory"
LOWER = ["factory.backbones", "factory.embedded", "factory.guidance", "factory.sampler", "factory.metrics",
         "factory.shards", "factory.data", "factory.bank", "factory.plan", "factory.config", "factory.random_models"]
UPPER = ["factory.stages", "factory.run", "factory.cli", "factory.report", "factory.dataplane", "factory.generate"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    """module -> the factory modules it imports (``from factory.x import y`` counts as factory.x.y when that
    is a module, else factory.x)."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                deps |= {f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module for a in node.names}
        graph[name] = {d for d in deps if d in paths and d != name and d != "factory"}
    return graph


def _within(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "factory.guidance.ot" in graph["factory.guidance"]  # from .ot import ...
    assert "factory.bank" in graph["factory.stages.references"]
    assert {"factory.stages.sample", "factory.stages.references"} <= graph["factory.run"]  # inside run()


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_import_nothing_above_them(lower):
    graph = import_graph()
    modules = [m for m in graph if _within(m, [lower])]
    assert modules, f"{lower} is not a module of factory/"
    upward = {m: sorted(d for d in graph[m] if _within(d, UPPER)) for m in modules}
    assert not any(upward.values()), {m: d for m, d in upward.items() if d}
