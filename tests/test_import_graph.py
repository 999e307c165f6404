"""The package's import graph has no cycle, and `sd2_hf.utils` imports nothing above it: every
`import` of an `sd2_hf` module, also those inside functions (a lazy import still ties two
modules together), read from the source; only imports for type annotations
(`if TYPE_CHECKING:`) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sd2_hf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """Module -> the sd2_hf modules it imports (`from pkg import mod` counts as `pkg.mod`)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_sd2_hf_has_no_import_cycle():
    graph = import_graph()
    assert "sd2_hf.pipeline" in graph or "sd2_hf.pipeline.run" in graph
    assert cycles(graph) == []


def upward_imports(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """Module of `package` -> the sd2_hf modules outside `package` it imports (none: absent)."""

    def inside(module: str) -> bool:
        return module == package or module.startswith(f"{package}.")

    found = {m: {t for t in targets if not inside(t)} for m, targets in graph.items() if inside(m)}
    return {m: targets for m, targets in found.items() if targets}


def test_the_checker_finds_an_upward_import():
    graph = {
        "sd2_hf": {"sd2_hf.assets"},
        "sd2_hf.assets": {"sd2_hf.utils.models"},
        "sd2_hf.utils": set(),
        "sd2_hf.utils.models": {"sd2_hf.utils.io", "sd2_hf.assets", "sd2_hf"},
        "sd2_hf.utils.io": set(),
        "sd2_hf.utilsx": {"sd2_hf.assets"},
    }
    assert upward_imports(graph, "sd2_hf.utils") == {
        "sd2_hf.utils.models": {"sd2_hf.assets", "sd2_hf"}
    }


def test_utils_import_nothing_above_them():
    graph = import_graph()
    assert "sd2_hf.utils.models" in graph and "sd2_hf.utils" in graph
    assert upward_imports(graph, "sd2_hf.utils") == {}
