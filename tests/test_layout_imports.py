"""Stages import forward only (STYLE.md habit 7): shards -> pipeline -> model -> orchestration.

pipeline may import shard-format helpers from shards; pipeline and model never import each
other; nothing imports orchestration. Checked on the source with `ast`, so a lazy import
inside a function counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("shards", "pipeline", "model", "orchestration")
ALLOWED = {
    "shards": set(),
    "pipeline": {"shards"},
    "model": set(),
    "orchestration": {"pipeline", "model", "shards"},
}


def stage_imports(path: Path) -> set[str]:
    """Top-level project stages that one source file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in STAGES)
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_only_earlier_stages(stage: str) -> None:
    files = sorted((ROOT / stage).rglob("*.py"))
    assert files, f"{stage}/ holds no Python files"
    wrong = {
        str(f.relative_to(ROOT)): sorted(stage_imports(f) - ALLOWED[stage] - {stage})
        for f in files
    }
    wrong = {f: s for f, s in wrong.items() if s}
    assert not wrong, f"backward or sideways imports: {wrong}"


def test_checker_sees_a_backward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from orchestration.config import Config\n    import model\n")
    assert stage_imports(bad) == {"orchestration", "model"}
