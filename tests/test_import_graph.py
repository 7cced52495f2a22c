"""The package's import graph has no cycle.

Every module of `regionspot` is parsed with `ast` (nothing is imported), and each import of a
package module becomes an edge, whether it is at module level or inside a function: a
function-level import that closes a cycle is a cycle all the same, only deferred. A module
depends on the module it names (`from .a import b` depends on `a`, and on `a.b` when that is a
module); importing a package means importing its `__init__`.
"""
import ast
import os
from typing import Dict, List, Optional, Set

import regionspot

PACKAGE_DIR = os.path.dirname(os.path.abspath(regionspot.__file__))
PACKAGE = "regionspot"


def _modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for folder, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "configs")]
        rel = os.path.relpath(folder, PACKAGE_DIR)
        parts = [PACKAGE] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if f.endswith(".py"):
                name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                out[name] = os.path.join(folder, f)
    return out


def _imports(module: str, path: str, modules: Dict[str, str]) -> Set[str]:
    """The package modules `module` (file `path`) imports, anywhere in its body."""
    is_package = os.path.basename(path) == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = set()

    def add(name: Optional[str]) -> None:
        # the longest prefix of `name` that is a module of the package
        while name:
            if name in modules:
                found.add(name)
                return
            name = name.rpartition(".")[0]

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == PACKAGE:
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import x` imports the module x when there is one
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                else:
                    add(target)
    found.discard(module)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when it has none (depth-first search)."""
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    # edges that exist, of each kind: module level relative, function level, a package's __init__
    assert "regionspot.config" in graph["regionspot.modeling.encoders.build"]
    assert "regionspot.modeling.encoders" in graph["regionspot.modeling.region_pipeline"]
    assert "regionspot.modeling.encoders.region_encoder" in graph["regionspot.modeling.encoders.sam_encoder"]
    assert len(graph) > 40


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle in the package: " + " -> ".join(cycle)
