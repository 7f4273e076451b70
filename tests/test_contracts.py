"""The contract between Python and the Lua scripts: each script's keys and arguments by name
(``worker/state/scripts.py``) and the delivery hash's field letters (``keys.FIELD``) are what the
Lua reads; no Lua function is long either (the same 60-line rule as Python's)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import redis

from worker.local.processes import LocalRedis
from worker.state import keys, scripts
from worker.state.connection import connect

LUA = Path(__file__).resolve().parent.parent / "worker" / "state" / "lua"
MAX_FUNCTION_LINES = 60  # as tests/test_structure.py's for Python


def _text(*names: str) -> str:
    return "\n".join((LUA / f"{name}.lua").read_text() for name in names)


def _own(script: scripts.Script) -> str:
    """The script's own Lua: itself and its parts (not lib.lua, which every script gets)."""
    return _text(*scripts.PARTS.get(script.name, ()), script.name)


def _used(pattern: str, text: str) -> set[str]:
    return set(re.findall(pattern, text))


@pytest.mark.parametrize("name", sorted(scripts.ALL))
def test_a_script_reads_the_arguments_its_contract_declares_and_no_other(name: str) -> None:
    script = scripts.ALL[name]
    text = _own(script)
    args = _used(r"\bARG\.(\w+)", text) | _used(r"\barg\('(\w+)'", text)
    assert args == set(script.args), name
    assert _used(r"\bEACH\.(\w+)", text) == set(script.each), name
    assert not re.search(r"ARGV\[\d", text), f"{name} reads an argument by position"


@pytest.mark.parametrize("name", sorted(scripts.ALL))
def test_a_script_uses_the_keys_it_declares(name: str) -> None:
    script = scripts.ALL[name]
    own = _used(r"\bKEY\.(\w+)", _own(script))
    assert own <= set(script.keys), f"{name} uses undeclared keys {own - set(script.keys)}"
    everywhere = own | _used(r"\bKEY\.(\w+)", _text("lib"))
    assert set(script.keys) <= everywhere, f"{name} declares keys it never uses"
    assert set(script.keys.values()) <= {v for v in vars(keys).values() if isinstance(v, str)}


def test_the_field_letters_are_one_table_that_the_lua_reads_by_name() -> None:
    letters = list(keys.FIELD.values())
    assert len(set(letters)) == len(letters)
    assert all(len(x) == 1 for x in letters)
    every = _text(*(p.stem for p in sorted(LUA.glob("*.lua"))))
    assert _used(r"\bF\.(\w+)", every) <= set(keys.FIELD)
    # a delivery hash is never read or written with a raw letter for a field
    raw = re.findall(r"'H[A-Z]+', (?:key|delivery_key\([^)]*\)), '[a-z]'", every)
    assert not raw, raw
    prologue = scripts.STEP.prologue()
    for name, short in keys.FIELD.items():
        assert f"{name} = '{short}'" in prologue


def test_a_call_missing_or_adding_an_argument_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="replay: arguments not in its contract: id, idd"):
        scripts.REPLAY.argv({}, [{"idd": "x"}])
    good = dict.fromkeys(scripts.BEAT.args, "1")
    with pytest.raises(ValueError, match="beat: arguments not in its contract: ttl_s"):
        scripts.BEAT.argv({"node": "n"}, [])
    assert scripts.BEAT.argv(good, [{"field": "f", "value": "v"}]) == ["1", "1", "f", "v", "bf:"]


def test_a_script_reading_a_name_not_in_its_contract_fails_at_once(
    private_redis: LocalRedis,
) -> None:
    client = connect(private_redis.url)
    for read, what in (("KEY.paused", "key paused"), ("ARGV[ARG.n]", "argument n")):
        source = "\n".join([scripts.DECLARED, scripts.PURGE.prologue(), f"return {read}"])
        with pytest.raises(redis.ResponseError, match=f"not in the contract: {what}"):
            client.eval(source, len(scripts.PURGE.keys), *scripts.PURGE.key_list(), "bf:")
    client.close()


def lua_functions(text: str) -> list[tuple[str, int]]:
    """Each Lua function (name, lines): from ``function`` to the ``end`` at its indent."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)(?:local )?function ([\w.:]+)", line)
        if not match or re.search(r"\bend\s*$", line):
            continue
        indent = match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == f"{indent}end")
        found.append((match.group(2), end - i + 1))
    return found


@pytest.mark.parametrize("path", sorted(LUA.glob("*.lua")), ids=lambda p: p.name)
def test_no_lua_function_is_long(path: Path) -> None:
    functions = lua_functions(path.read_text())
    assert functions or path.stem in ("beat", "purge", "replay", "step_args"), path.name
    for name, length in functions:
        assert length <= MAX_FUNCTION_LINES, f"{path.name}: {name}: {length} lines"


# The modules that own Redis access: the store and the read model beside it, the connection
# and its checks, the places that turn Redis's errors into the project's (Redis full, down),
# and the local tooling that starts a private Redis. Everything else asks them.
OWN_REDIS = {
    "worker.state.store", "worker.state.reads", "worker.state.connection",
    "worker.state.capacity", "worker.state.dead_letters", "worker.runtime",
    "worker.enqueue.bulk", "worker.enqueue.intake", "worker.enqueue.intake_server",
    "worker.enqueue.intake_health", "worker.deliver.waker", "worker.console.app",
    "worker.cli.common", "worker.cli.find", "worker.cli.health", "worker.local.processes",
}  # fmt: skip


def _imports_redis(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(name.split(".")[0] == "redis" for name in names):
            return True
    return False


def test_redis_is_imported_only_by_the_modules_that_own_redis_access() -> None:
    root = LUA.parents[2]  # the repository
    found = {
        ".".join(path.relative_to(root).with_suffix("").parts)
        for path in sorted((root / "worker").rglob("*.py"))
        if _imports_redis(path)
    }
    assert found <= OWN_REDIS, sorted(found - OWN_REDIS)


def test_every_script_is_called_through_its_contract() -> None:
    root = LUA.parents[2]  # the repository
    for path in sorted((root / "worker").rglob("*.py")):
        text = path.read_text()
        calls = re.findall(r"register_script|\"EVALSHA\"|\.eval\(|\.evalsha\(", text)
        if path.name != "store.py":
            assert not calls, f"{path.name} runs a script around its contract"
    store = (root / "worker" / "state" / "store.py").read_text()
    assert "scripts.ALL" in store
