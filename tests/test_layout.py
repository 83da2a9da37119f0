"""The layout rule (STYLE.md 1): stages import the core (pipeline/) and never each other; the core
imports no stage. What two stages share belongs in pipeline/. Checked by parsing every file's imports."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = "pipeline"
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
STAGES = [p for p in PACKAGES if p != CORE]


def imported(source: str) -> list[str]:
    """Absolute module names a file imports, at any depth (lazy imports inside functions count too)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def violations(source: str, allowed: set[str]) -> list[str]:
    """Imports of project packages other than ``allowed``."""
    return [m for m in imported(source) if m.split(".")[0] in PACKAGES and m.split(".")[0] not in allowed]


def test_the_check_sees_cross_stage_imports():
    source = "import os\nfrom train.data import x\n\ndef f():\n    import infer.load\n    from pipeline import shards\n"
    assert violations(source, {"preprocess", CORE}) == ["train.data", "infer.load"]
    assert STAGES == ["infer", "preprocess", "train"]


def test_stages_import_only_the_core_and_themselves():
    found = []
    for package in PACKAGES:
        allowed = {package} if package == CORE else {package, CORE}
        for path in sorted((REPO / package).rglob("*.py")):
            found += [f"{path.relative_to(REPO)}: {m}" for m in violations(path.read_text(), allowed)]
    assert found == []
