"""The one-way data flow: sparse_kernels <- data <- controller <- train.py/eval.py; inside controller, the
runtime reaches nothing of learning or experiments."""
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
    graph = project_graph()
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


ROLES = ("runtime", "guarantee", "learning", "experiments")
# role -> roles it may never import, directly or (for the runtime) through any module it imports
ROLE_FORBIDDEN = {"runtime": {"learning", "experiments"}, "guarantee": {"experiments"}, "learning": {"experiments"}}


def project_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere (function-level too)."""
    files = [f for p in FORBIDDEN for f in (ROOT / p).rglob("*.py")]
    names = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}
    return {n: {m for m in module_imports(f) if m in names and m != n and not n.startswith(m + ".")}
            for n, f in names.items()}


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def role_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "controller" and parts[1] in ROLES else None


def role_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every module whose role may not reach b's role: the runtime through its whole
    import closure, the guarantee and learning by their direct imports."""
    bad = []
    for module, direct in sorted(graph.items()):
        role = role_of(module)
        reached = closure(graph, module) if role == "runtime" else direct
        bad += [f"{module} -> {m}" for m in sorted(reached) if role_of(m) in ROLE_FORBIDDEN.get(role, ())]
    return bad


def test_controller_folders_are_its_roles_and_every_module_has_one():
    loose = [f.name for f in (ROOT / "controller").glob("*.py")]
    assert sorted(loose) == ["__init__.py", "benchmark.py", "holdout.py"], loose   # the two commands' names
    assert all((ROOT / "controller" / r / "__init__.py").is_file() for r in ROLES)


def test_the_runtime_reaches_no_learning_or_experiment_module_and_no_role_reaches_experiments():
    assert role_violations(project_graph()) == []


def test_the_role_check_sees_a_violation_through_a_chain():
    graph = {"controller.runtime.hook": {"controller.guarantee.calibrate"},
             "controller.guarantee.calibrate": {"controller.learning.dataset"}, "controller.learning.dataset": set()}
    assert role_violations(graph) == ["controller.runtime.hook -> controller.learning.dataset"]


def test_the_shipping_path_imports_no_training_code():
    """The hook, the decision, checkpoint loading and shadow labels: a fresh interpreter that imports them has no
    Lightning, no scikit-learn, no learning or experiment module and no labeling runner in sys.modules."""
    import subprocess
    import sys
    code = ("import sys, controller.runtime.hook, controller.runtime.checkpoint, controller.runtime.shadow; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'sklearn') "
            "or m.startswith(('controller.learning', 'controller.experiments')) or m == 'data.runner'))")
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


def test_the_runtime_names_its_public_api_and_refuses_others():
    import controller.runtime as runtime
    from controller.runtime.checkpoint import load_checkpoint
    from controller.runtime.hook import attach
    from controller.runtime.shadow import certify_live
    assert (runtime.attach, runtime.load_checkpoint, runtime.certify_live) == (attach, load_checkpoint, certify_live)
    assert all(getattr(runtime, n) is not None for n in runtime.__all__)
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        runtime.train
