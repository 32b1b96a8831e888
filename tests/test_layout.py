"""Architecture rules a refactor must keep: one module spells stored layouts, and the import
contracts in pyproject.toml hold."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "optirag"
# Backbone loading and model files read a Hugging Face model folder's own files and storage
# lists parquet files generically; none is one of our stored layouts.
ALLOWED = {"artifacts.py", "backbones/loading.py", "model_files.py", "storage.py"}
LAYOUT = re.compile(
    r"\.(parquet|safetensors|json|png|md)$|^_(SUCCESS|markers|manifest|plan)\b|^(shard|part)-"
    r"|(^|/)(neighbors|retriever|exits|features|evaluation|scores|interactions|candidates)/"
)


def layout_literals(source: str) -> list[str]:
    """String constants (docstrings aside) that spell a stored path or file name."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and LAYOUT.search(node.value)
    ]


def test_the_checker_finds_a_layout_literal():
    source = '"""Writes neighbors/gcn.parquet."""\nx = join(root, "_SUCCESS")\ny = "gcn.parquet"\n'
    assert sorted(layout_literals(source)) == ["_SUCCESS", "gcn.parquet"]


def test_no_stored_path_is_spelled_outside_the_artifacts_module():
    found = {
        str(path.relative_to(PACKAGE)): literals
        for path in PACKAGE.rglob("*.py")
        if str(path.relative_to(PACKAGE)) not in ALLOWED
        and (literals := layout_literals(path.read_text()))
    }
    assert found == {}


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_import_contracts_hold():
    result = subprocess.run(["lint-imports"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
