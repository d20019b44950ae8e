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


def module_imports(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere (function-level too), relative imports resolved."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_there_is_no_import_circle_between_project_modules():
    files = [f for p in FORBIDDEN for f in (ROOT / p).rglob("*.py")]
    names = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}
    graph = {n: {m for m in module_imports(f) if m in names and m != n and not n.startswith(m + ".")}
             for n, f in names.items()}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_the_shipping_path_imports_no_training_code():
    """The hook, the decision, checkpoint loading and shadow labels: a fresh interpreter that imports them has no
    Lightning, no training pipeline and no labeling runner in sys.modules."""
    import subprocess
    import sys
    code = ("import sys, controller.hook, controller.export, controller.shadow; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m in ('controller.lit', 'controller.pipeline', 'controller.recalibrate', 'data.runner')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"the shipping path imports {done.stdout.strip()}"


def test_plain_torch_is_the_ground_floor_of_sparse_kernels():
    """Selection, reference attention, probes and the break-even table import no Triton module: the
    one place choosing the Triton selection or kernel is `backends` (and the adapter asks it)."""
    triton_modules = {"triton", "sparse_kernels.triton_select", "sparse_kernels.triton_attention",
                      "sparse_kernels.triton_select.fused_select", "sparse_kernels.triton_attention.triton"}
    for name in ("select", "reference", "probes", "dispatch"):
        imported = module_imports(ROOT / "sparse_kernels" / f"{name}.py")
        assert not imported & triton_modules, f"sparse_kernels/{name}.py imports {imported & triton_modules}"
