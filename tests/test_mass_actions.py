"""Mass actions on dead letters end, ask first, and say what they did.

``dead replay --all`` and ``dead purge --all`` (and the console's group and "all"
actions) fix their end when they begin: a letter that dies after that is left alone, so
a fleet that kills every replay again at once cannot keep the walk going.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest

from tests.conftest import unique, wait_for
from tests.helpers import backfill, step_through
from worker.console import actions
from worker.deliver.policy import AnswerClass, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import LIVE, Finish
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess
from worker.local.stub import ProviderStub
from worker.state import keys
from worker.state.dead_letters import batches, fixed_end, replay_until
from worker.state.store import Store

BAD = Answer(AnswerClass.BAD_RECORD, api_status="-9", api_reason="invalid number")
BLOCKED = Answer(AnswerClass.BAD_RECORD, api_status="-24", api_reason="number blocked")


@pytest.fixture
def store_redis(private_redis: LocalRedis) -> LocalRedis:
    """``store`` works on this test's own Redis, where the test's workers run."""
    return private_redis


def records(count: int, app_id: str = "app-m") -> list[BackfillRecord]:
    return [BackfillRecord(app_id, "8613512345678", "1681184764000", msgid=unique()) for _ in
            range(count)]  # fmt: skip


def bury_due(store: Store, answer: Answer = BAD) -> list[str]:
    """Claim every due delivery and dead-letter it through the real step script (by
    default a -9 answer), up to 32 a step, as a drain does; the ids buried."""
    dead = Verdict(Outcome.DEAD)
    return step_through(store, lambda c: Finish(c, answer, dead), claim=32, max_attempts=4)


def dead_letters(
    store: Store, count: int, app_id: str = "app-m", answer: Answer = BAD
) -> list[str]:
    made = records(count, app_id)
    for start in range(0, count, 1000):
        store.enqueue_many(made[start : start + 1000], lane=LIVE)
    return bury_due(store, answer)


def test_a_walk_never_passes_its_end_even_when_every_replay_dies_at_once(store: Store) -> None:
    letters = dead_letters(store, 250)
    tied = [i for i, _ in store.enqueue_many(records(3), lane=LIVE)]
    assert sorted(bury_due(store)) == sorted(tied)
    top = max(store.redis.zscore(keys.DEAD, i) or 0 for i in letters)
    for delivery_id in tied:  # three letters that died in the newest letter's millisecond
        store.redis.zadd(keys.DEAD, {delivery_id: top})
    end = fixed_end(store.redis)
    assert end.count == 253
    assert end.ms == int(top)
    assert set(tied) <= end.last
    replayed: list[str] = []
    for batch in islice(batches(store.redis, batch=40, end=end), 100):  # a loop fails
        replayed += store.replay(batch)
        assert sorted(bury_due(store)) == sorted(batch)  # the fleet kills each replay at once
    assert sorted(replayed) == sorted(letters + tied)  # each letter once, then the end
    assert store.counts()["dead"] == 253
    later = dead_letters(store, 5)
    result = replay_until(store, end=fixed_end(store.redis, "app-none"), app_id="app-none")
    assert (result.at_start, result.done) == (0, 0)
    result = replay_until(store, end=end)  # an old end: only what had died by it (none now)
    assert (result.done, result.later) == (0, 258)
    assert set(store.states(later)) == {"dead"}


def test_the_console_s_group_and_all_actions_stop_at_their_end(store: Store) -> None:
    letters = dead_letters(store, 30)
    end = fixed_end(store.redis)
    newer = dead_letters(store, 4)
    assert actions.count_group(store, actions.ALL, end) == 30
    result = actions.replay_group_until(store, "ops", actions.ALL, end)
    assert (result.done, result.seen, result.later) == (30, 30, 4)
    assert set(store.states(letters)) == {"pending"}
    assert set(store.states(newer)) == {"dead"}
    assert sorted(bury_due(store)) == sorted(letters)
    assert actions.purge_group(store, "ops", actions.ALL) == 34


def test_mass_actions_without_a_terminal_and_without_yes_refuse(
    settings_env: dict[str, str], store: Store, private_redis: LocalRedis
) -> None:
    letters = dead_letters(store, 3)
    env = {"BACKFILL_REDIS_URL": private_redis.url}
    for verb in ("replay", "purge"):
        for scope, whose in ((["--all"], ""), (["--app-id", "app-m"], " of app app-m")):
            refused = backfill("dead", verb, *scope, env=env)
            assert refused.returncode == 2, refused.stderr
            assert f"this would {verb} 3 dead letter(s){whose}, those" in refused.stderr
            assert "add --yes to confirm (no terminal to ask on)" in refused.stderr
    assert set(store.states(letters)) == {"dead"}
    one = backfill("dead", "replay", letters[0], env=env)  # one letter is not a mass action
    assert (one.returncode, one.stdout.strip()) == (0, "replayed 1 of 1")
    done = backfill("dead", "purge", "--all", "--app-id", "app-m", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert re.match(r"purged 2 of 2 \(dead letters of app app-m that died by \d{4}-", done.stdout)
    for wrong in ([letters[1], "--all"], [letters[1], "--group", "0" * 16], [],
                  ["--group", "not-a-key"], ["--group", "ABCDEF0123456789"]):  # fmt: skip
        assert backfill("dead", "replay", *wrong, env=env).returncode == 2, wrong


def test_replay_all_with_yes_replays_every_letter_and_says_so(
    settings_env: dict[str, str], store: Store, private_redis: LocalRedis
) -> None:
    letters = dead_letters(store, 5) + dead_letters(store, 2, "app-n", BLOCKED)
    env = {"BACKFILL_REDIS_URL": private_redis.url}
    done = backfill("dead", "replay", "--all", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"replayed 7 of 7 \(dead letters that died by [0-9: .Z-]+\)\n", done.stdout)
    assert set(store.states(letters)) == {"pending"}
    none = backfill("dead", "replay", "--all", "--yes", env=env)
    assert (none.returncode, none.stdout) == (0, "replayed 0 of 0: no dead letters\n")


def groups(env: dict[str, str]) -> dict[str, tuple[int, str]]:
    """``backfill dead groups``: each group's key, count and error."""
    listed = backfill("dead", "groups", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split(maxsplit=2) for line in listed.stdout.splitlines()[1:]]
    return {key: (int(count), error) for key, count, error in rows}


def test_a_group_is_replayed_or_purged_alone_and_asks_first(
    settings_env: dict[str, str], store: Store, private_redis: LocalRedis
) -> None:
    invalid = dead_letters(store, 4) + dead_letters(store, 2, "app-n")
    blocked = dead_letters(store, 3, "app-n", BLOCKED)
    env = {"BACKFILL_REDIS_URL": private_redis.url}
    found = groups(env)
    assert sorted(found.values()) == [(3, "status -24: number blocked"),
                                      (6, "status -9: invalid number")]  # fmt: skip
    (key,) = [k for k, (_, error) in found.items() if "-9" in error]

    refused = backfill("dead", "replay", "--group", key, env=env)
    assert refused.returncode == 2, refused.stderr
    assert f"this would replay 6 dead letter(s) of group {key}, those that died by" in (
        refused.stderr
    )
    assert "add --yes" in refused.stderr
    code, out = on_terminal(["dead", "replay", "--group", key, "--app-id", "app-n"], env, "n")
    assert code == 1, out
    assert f"This will replay 2 dead letter(s) of group {key} of app app-n, those" in out
    assert set(store.states(invalid + blocked)) == {"dead"}  # asked, nothing done

    code, out = on_terminal(["dead", "replay", "--group", key], env, "y")
    assert code == 0, out
    assert f"replayed 6 of 6 (dead letters of group {key} that died by" in out
    assert set(store.states(invalid)) == {"pending"}
    assert set(store.states(blocked)) == {"dead"}  # another group: untouched

    (other,) = [k for k in found if k != key]
    purged = backfill("dead", "purge", "--group", other, "--yes", env=env)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith(f"purged 3 of 3 (dead letters of group {other} that died")
    assert store.states(blocked) == [None] * 3
    assert set(store.states(invalid)) == {"pending"}


def on_terminal(args: list[str], env: dict[str, str], answer: str) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, answer its question; exit code and all output."""
    main, side = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", *args], stdin=side, stdout=side, stderr=side,
        env={**os.environ, **env}, close_fds=True,
    )  # fmt: skip
    os.close(side)
    seen, answered = b"", False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the other side closed: the process ended
                break
            if not chunk:
                break
            seen += chunk
        if not answered and b"Go on?" in seen:
            os.write(main, answer.encode() + b"\n")
            answered = True
    os.close(main)
    return process.wait(timeout=30), seen.decode(errors="replace")


def test_mass_actions_on_a_terminal_ask_first(
    settings_env: dict[str, str], store: Store, private_redis: LocalRedis
) -> None:
    letters = dead_letters(store, 3)
    env = {"BACKFILL_REDIS_URL": private_redis.url}
    code, out = on_terminal(["dead", "replay", "--all"], env, "n")
    assert code == 1, out
    assert "This will replay 3 dead letter(s), those that died by" in out
    assert "Aborted" in out
    assert set(store.states(letters)) == {"dead"}
    code, out = on_terminal(["dead", "purge", "--all"], env, "y")
    assert code == 0, out
    assert "purged 3 of 3" in out
    assert store.counts()["dead"] == 0


def test_replaying_10000_letters_ends_while_a_worker_kills_every_replay_at_once(
    store: Store,
    private_redis: LocalRedis,
    stub: ProviderStub,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    made = records(10_000, "app-kill")
    for start in range(0, len(made), 1000):
        store.enqueue_many(made[start : start + 1000], lane=LIVE)
    letters = bury_due(store)
    assert len(letters) == 10_000
    stub.reset()
    stub.set_plan({r.msgid or "": ["status:-9"] * 3 for r in made})  # dead at once, each time
    spawn_worker(private_redis.url, concurrency=8)
    replay = backfill("dead", "replay", "--all", "--yes",
                      env={"BACKFILL_REDIS_URL": private_redis.url}, timeout=600)  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith("replayed 10000 of 10000 (dead letters that died by")
    wait_for(lambda: store.counts() == {"pending": 0, "dead": 10_000}, 600, every_s=1)
    sent: dict[str, int] = {}
    for request in stub.seen():
        sent[str(request["msgid"])] = sent.get(str(request["msgid"]), 0) + 1
    assert sent == {r.msgid: 1 for r in made}  # each letter replayed (and sent) once
    statuses = [store.status(i) for i in letters[:50]]
    assert all(s is not None and s["replay"] and s["state"] == "dead" for s in statuses)
