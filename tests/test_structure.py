"""The package's shape: a pure core, small modules and functions, imports that flow one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "worker"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
PURE = ("worker.policy", "worker.record", "worker.provider")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def test_the_pure_core_imports_without_celery_redis_or_kombu() -> None:
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('celery','redis','kombu')]"
    code = f"{blocked}; import {', '.join(PURE)}; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_package_import_is_cheap_and_still_finds_the_celery_app() -> None:
    code = (
        "import sys, worker; assert 'celery' not in sys.modules, 'worker imports Celery'; "
        "from celery.app.utils import find_app; print(find_app('worker').main)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "backfill"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_long_and_no_function_is_either(name: str) -> None:
    path = modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name}: split it by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {length} lines"


def test_no_benchmark_lives_in_the_package() -> None:
    assert not [p for p in PACKAGE.rglob("*.py") if "bench" in p.name]


def _imports(path: Path, name: str) -> set[str]:
    """The worker modules ``path`` imports at module level (not inside functions)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports are for the type checker
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("worker"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker"))
    return found - {name}


def test_module_imports_have_no_cycle() -> None:
    names = modules()
    graph = {n: {i for i in _imports(p, n) if i in names} for n, p in names.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            if nxt != "worker":  # the package's lazy __init__ imports nothing eagerly
                visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_the_runtime_never_imports_the_local_tooling() -> None:
    for name, path in modules().items():
        if name.startswith(("worker.local", "worker.cli")):
            continue  # `backfill stub` and `backfill demo` run the tooling
        assert not any(i.startswith("worker.local") for i in _imports(path, name)), name
        assert "worker.local" not in path.read_text(), name


def test_no_test_module_imports_from_another_test_module() -> None:
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("tests.test_"), f"{path.name}: {node.module}"
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
                assert not any(n.startswith("tests.test_") for n in names), path.name
