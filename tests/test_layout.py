"""The layout rule (STYLE.md 1): stages import the core (pipeline/) and never each other; the core
imports no stage. The stand-ins and sample corpora (standins/) import only the core, and no stage or
core module imports them: only cli.py, benchmarks and tests do. What two stages share belongs in
pipeline/. Checked by parsing every file's imports."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = "pipeline"
STANDINS = "standins"
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
STAGES = [p for p in PACKAGES if p not in (CORE, STANDINS)]


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


def allowed_imports(package: str) -> set[str]:
    """The core imports only itself; a stage or the stand-ins import the core and themselves."""
    return {package} if package == CORE else {package, CORE}


def test_the_check_sees_cross_stage_imports():
    source = "import os\nfrom train.data import x\n\ndef f():\n    import infer.load\n    from pipeline import shards\n"
    assert violations(source, {"preprocess", CORE}) == ["train.data", "infer.load"]
    assert violations("from standins.sample_data import x\n", allowed_imports("train")) == [
        "standins.sample_data"
    ]
    assert STAGES == ["infer", "preprocess", "train"]
    assert STANDINS in PACKAGES


def test_stages_import_only_the_core_and_themselves():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found += [
                f"{path.relative_to(REPO)}: {m}"
                for m in violations(path.read_text(), allowed_imports(package))
            ]
    assert found == []


def test_core_holds_no_stand_in_or_single_stage_module():
    """Modules that moved out of the core stay out: the stand-ins and corpora, and training-only code."""
    moved = ["tiny_llm", "tiny_encoder", "synthetic", "sample_data", "plan", "checkpoint"]
    assert [m for m in moved if (REPO / CORE / f"{m}.py").exists()] == []
    assert (REPO / "train" / "memory.py").exists() and (REPO / "train" / "checkpoint.py").exists()


PROMPT_MARKS = ("<Video", "</Video", "<Image>", "</Image>", "<ImageHere>")


def prompt_literals(source: str) -> list[str]:
    """String constants (docstrings aside) that spell a piece of the visual block or the placeholder."""
    tree = ast.parse(source)
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docs
        and any(mark in node.value for mark in PROMPT_MARKS)
    ]


def test_one_module_owns_the_visual_block_and_the_placeholder():
    """pipeline/prompts.py alone spells ``<Video>...</Video>`` and ``<ImageHere>``: training, inference and
    the stand-in LLM build them with its functions (visual_block, visual_turn, image_token_id)."""
    assert prompt_literals('"""<Video> doc"""\nx = "<Video>"\nf"<{tag}>"\n') == ["<Video>"]
    found = []
    for path in sorted(REPO.glob("*/**/*.py")) + sorted(REPO.glob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv") or rel == Path(CORE, "prompts.py"):
            continue
        found += [f"{rel}: {text!r}" for text in prompt_literals(path.read_text())]
    assert found == []
