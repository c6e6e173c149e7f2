"""The import graph of mmtrain/, read from the source: no module reaches itself through imports.

Every ``import mmtrain...`` counts, at module level or inside a function: a lazy import hides
a cycle from Python, not from whoever reads the code (a tokenizer kind registered by an import
side effect was one)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "mmtrain"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported mmtrain module: line of the first such import}."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from mmtrain.a import b` names the submodule mmtrain.a.b when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import mmtrain.a.b.c` of an attribute path
                    target = target.rpartition(".")[0]
                if target.startswith("mmtrain") and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_mmtrain_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "mmtrain.tokenize.vae" in graph["mmtrain.tokenize.build"]
    found = cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{a} imports {b} (line {graph[a][b]})" for a in c for b in graph[a] if b in c)
              for c in found]
    assert not found, "\n".join(detail)


def test_the_walk_finds_a_cycle_through_a_lazy_import(tmp_path):
    """The check itself: two modules that import each other, one inside a function, are a cycle."""
    pkg = tmp_path / "mmtrain"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from mmtrain.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("thing = 1\n\ndef f():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import mmtrain.sub.a\n")
    graph = import_graph(pkg)
    assert graph["mmtrain.sub.a"] == {"mmtrain.sub.b": 1} and graph["mmtrain.sub.b"] == {"mmtrain.sub.a": 4}
    assert cycles(graph) == [["mmtrain.sub.a", "mmtrain.sub.b"]]

