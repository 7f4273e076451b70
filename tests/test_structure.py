"""The package's shape: a pure core, small modules and functions (Python and Lua alike),
imports that flow one way (any import, wherever it stands)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "worker"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
PURE = ("worker.deliver.policy", "worker.enqueue.record", "worker.deliver.provider")
_LUA_TOKEN = re.compile(
    r"--\[(?P<ceq>=*)\[.*?\](?P=ceq)\]|--[^\n]*|\[(?P<seq>=*)\[.*?\](?P=seq)\]"
    r"|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\""
    r"|(?P<word>[A-Za-z_]\w*)(?:(?<=function)\s+(?P<name>[A-Za-z_][\w.:]*))?",
    re.DOTALL,
)


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


def lua_functions(text: str) -> list[tuple[str, int, int]]:
    """Each Lua function in ``text`` as (name, first line, last line): its ``function``
    to its matching ``end``, blocks counted outside comments and strings."""
    found: list[tuple[str, int, int]] = []
    open_: list[tuple[str, int] | None] = []  # a function (name, line), or another block
    words = [
        (m["word"], m["name"] or "(anonymous)", text.count("\n", 0, m.start()) + 1)
        for m in _LUA_TOKEN.finditer(text)
        if m["word"]
    ]
    for word, name, line in words:
        if word == "function":
            open_.append((name, line))
        elif word in ("if", "do", "repeat"):
            open_.append(None)
        elif word in ("end", "until") and open_:
            block = open_.pop()
            if block is not None:
                found.append((block[0], block[1], line))
    assert not open_, "unbalanced blocks"
    return found


def long_lua_functions() -> list[str]:
    """The Lua functions in worker/state/lua over the function length limit."""
    return [
        f"{path.name}:{name}: {last - first + 1} lines"
        for path in sorted((PACKAGE / "state" / "lua").glob("*.lua"))
        for name, first, last in lua_functions(path.read_text())
        if last - first + 1 > MAX_FUNCTION_LINES
    ]


def test_the_lua_reader_finds_functions_and_their_ends() -> None:
    text = (
        "-- function in a comment end\nlocal function a(x)\n  if x then return 'end' end\n"
        "  for i = 1, 2 do x = [[function]] end\nend\nlocal b = function() repeat until true end\n"
    )
    assert lua_functions(text) == [("a", 2, 5), ("(anonymous)", 6, 6)]


def test_no_lua_function_is_long() -> None:
    """The 60-line rule covers the Lua scripts too."""
    assert not long_lua_functions()


def test_no_benchmark_lives_in_the_package() -> None:
    assert not [p for p in PACKAGE.rglob("*.py") if "bench" in p.name]


def _imports(path: Path, name: str) -> set[str]:
    """Every worker module ``path`` imports: at module level, inside functions, under
    ``if TYPE_CHECKING:``, absolute or relative (a circle is one whenever it runs)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module.startswith("worker"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker"))
    return found - {name}


def import_cycle() -> list[str] | None:
    """A circle of imports among the worker modules (any import, see ``_imports``)."""
    names = modules()
    graph = {n: {i for i in _imports(p, n) if i in names} for n, p in names.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if nxt != "worker":  # the package's lazy __init__ imports nothing eagerly
                cycle = visit(nxt, [*path, node])
                if cycle:
                    return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_module_imports_have_no_cycle() -> None:
    cycle = import_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(
    tmp_path: Path,
) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from worker.state.store import Store\n"
        "def f() -> None:\n    from worker.state.dead_letters import batches\n"
        "    import worker.state.keys\n    from . import routes\n    from .auth import Guard\n"
    )
    assert _imports(source, "worker.console.mod") >= {
        "worker.state.store", "worker.state.dead_letters", "worker.state.keys",
        "worker.console.routes", "worker.console.auth",
    }  # fmt: skip


MAX_TOP_LEVEL_MODULES = 12
STAGES = ("enqueue", "state", "deliver", "operate")  # in the order a record goes through
# What each stage uses of the other stages' modules. The folders follow the data flow, not
# a layering: their imports go both ways (docs/how-it-works.md, "The modules, folder by
# folder", says how), so this states the real map instead of an order. A stage may also use
# the wiring at the top (WIRING), never cli/, console/ or local/.
STAGE_USES = {
    "enqueue": {
        "state.store", "state.lookup", "state.capacity", "state.connection",
        "operate.audit", "operate.errors", "operate.redact",
    },
    "state": {
        "enqueue.record", "deliver.steps", "deliver.policy",
        "operate.errors", "operate.clock", "operate.redact",
    },
    "deliver": {
        "enqueue.record", "state.store", "state.capacity",
        "operate.audit", "operate.metrics", "operate.heartbeat",
        "operate.errors", "operate.clock", "operate.redact",
    },
    "operate": {
        "enqueue.record", "deliver.provider", "deliver.policy", "deliver.inflight",
        "state.store", "state.capacity",
    },
}  # fmt: skip
WIRING = {"settings", "runtime", "app"}


def stage_of(name: str) -> str | None:
    """The stage of a module (``worker.<stage>.<module>``), None outside the stages."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def stage_uses() -> dict[str, set[str]]:
    """What each stage's modules import of the other worker modules, named without
    ``worker.`` (its own modules and the stage packages themselves left out)."""
    names = modules()
    packages = {f"worker.{stage}" for stage in STAGES}
    found: dict[str, set[str]] = {stage: set() for stage in STAGES}
    for name, path in names.items():
        stage = stage_of(name)
        if stage is None:
            continue
        for imported in _imports(path, name) & names.keys():
            if stage_of(imported) != stage and imported not in packages:
                found[stage].add(imported.removeprefix("worker."))
    return found


def test_the_top_level_holds_the_wiring_and_the_stages() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top: {top}"
    assert all((PACKAGE / stage / "__init__.py").is_file() for stage in STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_package_says_what_it_is_and_imports_nothing(stage: str) -> None:
    tree = ast.parse((PACKAGE / stage / "__init__.py").read_text())
    assert ast.get_docstring(tree), stage
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_uses_only_what_the_stage_map_says(stage: str) -> None:
    """A new import between stages goes in STAGE_USES and in docs/how-it-works.md; one
    that is gone comes out of both."""
    used = stage_uses()[stage]
    between = {u for u in used if u.split(".")[0] in STAGES}
    unlisted, gone = sorted(between - STAGE_USES[stage]), sorted(STAGE_USES[stage] - between)
    assert not unlisted, f"{stage} uses, not in STAGE_USES: {unlisted}"
    assert not gone, f"{stage} no longer uses, in STAGE_USES: {gone}"
    assert used - between <= WIRING, f"{stage} uses {sorted(used - between - WIRING)}"


def test_the_stage_map_sees_each_form_of_import() -> None:
    uses = stage_uses()
    assert "state.store" in uses["enqueue"]  # from worker.state.store import Store
    assert "state.capacity" in uses["deliver"]  # from worker.state import capacity
    assert "settings" in uses["deliver"]  # from worker.settings import Settings
    assert not [u for u in uses["enqueue"] if u.startswith("enqueue.")]


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
