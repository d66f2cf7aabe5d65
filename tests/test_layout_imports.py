"""Imports go forward only (STYLE.md habit 7) and never in a circle (DESIGN.md "The flow").

Stages: shards -> pipeline -> model -> orchestration. pipeline may import shard-format
helpers from shards; pipeline and model never import each other; nothing imports
orchestration. `bench/` (all measurement) and `tools/` (machine set-up) stand outside the
flow: they may import every product stage, bench may use tools, and no product stage
imports either.

No import cycle between any two modules either, inside a folder too (pipeline.loader <->
pipeline.tuning was one). Both checks read the source with `ast`, so an import inside a
function (a lazy one) counts like one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("shards", "pipeline", "model", "orchestration")
OUTSIDE = ("bench", "tools")
FOLDERS = PRODUCT + OUTSIDE
ALLOWED = {
    "shards": set(),
    "pipeline": {"shards"},
    "model": set(),
    "orchestration": {"pipeline", "model", "shards"},
    "bench": {*PRODUCT, "tools"},
    "tools": set(PRODUCT),
}


def imports(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """Every import in one source file, anywhere in it, as (source, names): `import a.b` is
    ("a.b", []), `from a.b import c, d` is ("a.b", ["c", "d"]); relative sources made absolute
    against `module`, the file's own dotted name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = package.split(".")
                source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.append((source, [alias.name for alias in node.names]))
    return found


def stage_imports(path: Path) -> set[str]:
    """Top-level project folders that one source file imports."""
    return {source.split(".")[0] for source, _ in imports(path, path.stem)} & set(FOLDERS)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(root: Path, folders: tuple[str, ...] = FOLDERS) -> dict[str, set[str]]:
    """module -> the modules of the same tree it imports. `from pkg import sub` points at
    `pkg.sub` where that is a module, at `pkg` (its __init__) where `sub` is a name defined
    there; names outside the tree are dropped. The implicit import of a module's parent
    packages is not counted: what a package's __init__ re-exports would otherwise put every
    module of the package that a sibling imports in a circle."""
    files = {module_name(f, root): f for d in folders if (root / d).is_dir() for f in sorted((root / d).rglob("*.py"))}

    def known(name: str) -> str | None:  # the module itself, or the closest package holding it
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = set()
        for source, names in imports(path, module):
            if not names:
                targets.add(known(source))
            for name in names:
                targets.add(f"{source}.{name}" if f"{source}.{name}" in files else known(source))
        graph[module] = targets - {None, module}  # a script importing itself as a module is no cycle
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: each strongly connected set of two or more modules, sorted
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(found)


@pytest.mark.parametrize("stage", [f for f in FOLDERS if (ROOT / f).is_dir()])
def test_stage_imports_only_earlier_stages(stage: str) -> None:
    files = sorted((ROOT / stage).rglob("*.py"))
    assert files, f"{stage}/ holds no Python files"
    wrong = {
        str(f.relative_to(ROOT)): sorted(stage_imports(f) - ALLOWED[stage] - {stage})
        for f in files
    }
    wrong = {f: s for f, s in wrong.items() if s}
    assert not wrong, f"backward or sideways imports: {wrong}"


def test_no_import_cycles() -> None:
    graph = module_graph(ROOT)
    assert {"pipeline.factory", "pipeline.tuning", "shards.index"} <= set(graph), "the checker missed modules"
    assert not cycles(graph), f"import cycles (each a set of modules that import each other): {cycles(graph)}"


def test_checker_sees_a_backward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from orchestration.config import Config\n    import model\n    import bench.e2e\n")
    assert stage_imports(bad) == {"orchestration", "model", "bench"}


def test_checker_sees_a_planted_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pipeline.a import run\n")  # a re-export: no cycle by itself
    (pkg / "a.py").write_text("from pipeline.b import helper\n\ndef run():\n    return helper()\n")
    (pkg / "b.py").write_text("def helper():\n    from . import a  # lazy, relative\n    return a\n")
    (pkg / "c.py").write_text("from pipeline import b\nimport json\n")
    graph = module_graph(tmp_path, ("pipeline",))
    assert graph["pipeline.c"] == {"pipeline.b"} and graph["pipeline"] == {"pipeline.a"}
    assert cycles(graph) == [["pipeline.a", "pipeline.b"]]
    (pkg / "b.py").write_text("def helper():\n    return 1\n")
    assert cycles(module_graph(tmp_path, ("pipeline",))) == []
    (pkg / "d.py").write_text("import pipeline.e\n")
    (pkg / "e.py").write_text("import pipeline.f\n")
    (pkg / "f.py").write_text("from pipeline import d\n")
    assert cycles(module_graph(tmp_path, ("pipeline",))) == [["pipeline.d", "pipeline.e", "pipeline.f"]]
