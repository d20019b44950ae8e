"""The one-way data flow: sparse_kernels <- data <- controller <- train.py/eval.py."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "sparse_kernels": {"data", "controller", "train", "eval", "calibrate"},
    "data": {"controller", "train", "eval", "calibrate"},
    "controller": {"train", "eval", "calibrate"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"no modules found in {package}"
    for f in files:
        bad = imported_roots(f) & FORBIDDEN[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_every_module_has_a_docstring():
    for package in FORBIDDEN:
        for f in (ROOT / package).rglob("*.py"):
            assert ast.get_docstring(ast.parse(f.read_text())), f"{f.relative_to(ROOT)} lacks a docstring"


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from controller.net import X\nimport data.store\n")
    assert imported_roots(bad) == {"controller", "data"}
