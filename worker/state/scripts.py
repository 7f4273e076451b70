"""The contract of each Lua script (``lua/``): the keys it declares and its arguments, by name.

A script is called with the fixed keys it touches as ``KEYS`` (names from ``keys.py``) and
its arguments as ``ARGV`` in the order declared here: first ``args``, then ``each`` once
per item (records, attempts, ids), then the key prefix. The Lua side gets the same
contract as tables prepended to the script (``prologue``): ``KEY.<name>`` is a declared
key, ``ARGV[ARG.<name>]`` an argument, ``ARGV[at + EACH.<name>]`` a field of the item at
``at`` (items from ``FIRST``, ``WIDTH`` values each), ``F.<name>`` a field letter of a
delivery hash (``keys.FIELD``). Reading a name the contract lacks is an error at once.

The limit: a script still builds per-delivery and per-time keys from the prefix (the
delivery hash, its attempts and marker, an app's dead letters and lookup index, the
10 s / hourly / minute counters, a worker's heartbeat), so on Redis Cluster the
declared keys say which slots a script needs only for the fleet-wide keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from worker.state import keys


@dataclass(frozen=True)
class Script:
    """One script: its file, the fixed keys it touches, its arguments by name."""

    name: str
    keys: Mapping[str, str]  # name in Lua (KEY.<name>) -> the Redis key
    args: tuple[str, ...]  # ARGV from 1, in order
    each: tuple[str, ...] = ()  # the values of each item, after ``args``
    when_full: bool = False  # runs on a full Redis (``noeviction`` at ``maxmemory``)

    @property
    def first(self) -> int:
        """Where the first item begins in ARGV (Lua counts from 1)."""
        return len(self.args) + 1

    def key_list(self) -> list[str]:
        return list(self.keys.values())

    def argv(self, args: Mapping[str, Any], items: Iterable[Mapping[str, Any]] = ()) -> list[Any]:
        """ARGV for a call: ``args`` and each item's values by name, then the prefix."""
        out = [_pick(self.name, args, self.args)]
        out += [_pick(self.name, item, self.each) for item in items]
        return [value for part in out for value in part] + [keys.PREFIX]

    def source(self) -> str:
        """The script as Redis runs it: flags, its contract, lib.lua, its parts, itself."""
        flags = "#!lua flags=allow-oom" if self.when_full else "#!lua"
        files = ("lib", *PARTS.get(self.name, ()), self.name)
        lua = resources.files("worker.state").joinpath("lua")
        texts = [lua.joinpath(f"{name}.lua").read_text() for name in files]
        return "\n".join([flags, DECLARED, self.prologue(), *texts])

    def prologue(self) -> str:
        """The contract as Lua tables, prepended to the script (before ``lib.lua``)."""
        key_pairs = ", ".join(f"{name} = KEYS[{i}]" for i, name in enumerate(self.keys, 1))
        arg_pairs = ", ".join(f"{name} = {i}" for i, name in enumerate(self.args, 1))
        each_pairs = ", ".join(f"{name} = {i}" for i, name in enumerate(self.each))
        field_pairs = ", ".join(f"{name} = '{short}'" for name, short in keys.FIELD.items())
        return "\n".join(
            [
                f"-- the contract of {self.name}.lua, from worker/state/scripts.py",
                f"local KEY = _declared('key', {{{key_pairs}}})",
                f"local ARG = _declared('argument', {{{arg_pairs}}})",
                f"local EACH = _declared('item field', {{{each_pairs}}})",
                f"local FIRST, WIDTH = {self.first}, {max(len(self.each), 1)}",
                f"local F = _declared('hash field', {{{field_pairs}}})",
            ]
        )


# a table that raises on a name it lacks: a script reads only what its contract declares
DECLARED = """local function _declared(what, names)
  return setmetatable(names, {__index = function(_, name)
    error('not in the contract: ' .. what .. ' ' .. tostring(name))
  end})
end"""


def _pick(script: str, given: Mapping[str, Any], names: tuple[str, ...]) -> list[Any]:
    if given.keys() != set(names):
        odd = sorted(set(names) ^ given.keys())
        raise ValueError(f"{script}: arguments not in its contract: {', '.join(odd)}")
    return [given[name] for name in names]


LANES = {"live": keys.LIVE, "bulk": keys.BULK}
OUTAGE_ARGS = (
    "o_failures", "o_distinct", "o_window_ms", "o_cap_ms", "ramp_start", "ramp_ms",
    "o_retried", "short_ms",
)  # fmt: skip

ENQUEUE = Script(
    "enqueue",
    {**LANES, "dead": keys.DEAD, "index_apps": keys.INDEX_APPS, "index_hand": keys.INDEX_HAND},
    ("lane", "caller", "due_in_ms", "wake_queue", "wake", "index"),
    ("id", "app_id", "msgid", "number", "time"),
)
_STEP_KEYS = {
    **LANES, "dead": keys.DEAD, "paused": keys.PAUSED, "probe": keys.PROBE,
    "probe_lock": keys.PROBE_LOCK, "rate": keys.RATE, "outage": keys.OUTAGE,
    "outage_seen": keys.OUTAGE_SEEN, "ramp": keys.RAMP, "outage_last": keys.OUTAGE_LAST,
    "held_by": keys.HELD_BY, "before": keys.BEFORE, "done": keys.DONE,
}  # fmt: skip
_STEP_ARGS = (
    "n", "k", "lease_ms", "rate", "burst", "max_wait_ms", "max_attempts", "prefer",
    "pause_ms", "gap_ms", "marker_ttl_s", "keep_s", "history", *OUTAGE_ARGS,
)  # fmt: skip
_ATTEMPT = (
    "id", "token", "outcome", "doc", "counted", "retry_ms", "last_error", "hold_ms", "lane",
    "callers", "evidence",
)  # fmt: skip
STEP = Script("step", _STEP_KEYS, _STEP_ARGS, _ATTEMPT, when_full=True)
REPLAY = Script("replay", {**LANES, "dead": keys.DEAD}, (), ("id",))
PURGE = Script(
    "purge",
    {"dead": keys.DEAD, "index_apps": keys.INDEX_APPS, "index_hand": keys.INDEX_HAND},
    (),
    ("id",),
    when_full=True,
)
BEAT = Script("beat", {"workers": keys.WORKERS}, ("node", "ttl_s"), ("field", "value"), True)

ALL = {script.name: script for script in (ENQUEUE, STEP, REPLAY, PURGE, BEAT)}
# the parts prepended to a script after lib.lua (lua/<part>.lua), so no function is long
PARTS = {
    "step": ("step_args", "step_outage", "step_finish", "step_claim"),
    "enqueue": ("index",),
    "purge": ("index",),
}
