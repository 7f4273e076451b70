"""Nothing lost: worker crashes, lost wake-ups, graceful shutdown, dead letters, chaos."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from tests.conftest import read_log, unique, wait_for
from tests.helpers import backfill, open_store
from worker import enqueue_backfill
from worker.deliver.messages import wake_message as legacy_message
from worker.deliver.policy import AnswerClass, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import Finish
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.local.stub import ProviderStub
from worker.runtime import get_settings, get_store, wake, wake_message
from worker.state import keys
from worker.state.store import Store

ROOT = Path(__file__).resolve().parent.parent
Spawn = Callable[..., WorkerProcess]


def record(msgid: str, app_id: str = "app-r") -> BackfillRecord:
    return BackfillRecord(app_id, "8613512345678", "1681184764000", msgid=msgid)


def enqueue(store: Store, rec: BackfillRecord) -> str:
    """Enqueue as the producer does: the delivery and its wake-up in one script."""
    queue, message = wake_message()
    return store.enqueue(rec, wake_queue=queue, wake=message)[0]


def state_of(store: Store, delivery_id: str) -> str | None:
    return store.states([delivery_id])[0]


def stub_saw(stub: ProviderStub, msgid: str) -> int:
    return sum(1 for s in stub.seen() if s["msgid"] == msgid)


def test_sigkill_mid_attempt_is_taken_over_by_another_worker(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    store = open_store(private_redis.url)
    first = spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="3")
    msgid = unique()
    stub.set_plan({msgid: ["slow:2"]})
    delivery_id = enqueue(store, record(msgid))
    wait_for(lambda: stub_saw(stub, msgid) == 1, 10)
    first.kill()  # the attempt was in flight: the provider has it, we never heard back
    killed_at = time.monotonic()
    second = spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="3")
    wait_for(lambda: state_of(store, delivery_id) == "delivered", 60)
    # taken over once the attempt's lease (1 + 3 + 10 s) ran out, not after the broker's
    # visibility timeout (300 s); the margin is for a second worker starting on a busy machine
    assert time.monotonic() - killed_at < 120
    events = [e for e in read_log(second.log_path) if e.get("delivery_id") == delivery_id]
    assert [e["outcome"] for e in events if e["event"] == "postback.attempt"] == ["duplicate"]
    status = store.status(delivery_id)
    assert status is not None
    assert status["attempts"] == 2  # the killed worker's attempt was counted at its claim


def test_a_delivery_whose_wake_up_never_reached_the_broker_is_still_sent(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(private_redis.url)
    store = open_store(private_redis.url)
    msgid = unique()
    # stored in the live lane as the producer does, but its wake-up was lost
    delivery_id, created = store.enqueue(record(msgid))
    assert created
    # the worker's waker saw it due and woke a thread (without the waker: never sent)
    wait_for(lambda: state_of(store, delivery_id) == "delivered", 30)
    assert stub_saw(stub, msgid) == 1
    attempts = [
        e
        for e in read_log(worker.log_path)
        if e.get("event") == "postback.attempt" and e.get("delivery_id") == delivery_id
    ]
    assert [e["outcome"] for e in attempts] == ["delivered"]


def test_sigterm_lets_in_flight_attempts_finish_and_gives_back_the_rest(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    store = open_store(private_redis.url)
    worker = spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="5")
    msgids = [unique() for _ in range(6)]
    stub.set_plan({m: ["slow:2"] for m in msgids})
    ids = [enqueue(store, record(m)) for m in msgids]
    # a drain may have claimed several (a batch, sent one after another): stop mid-way
    wait_for(lambda: any(stub_saw(stub, m) for m in msgids), 10)
    worker.signal(signal.SIGTERM)
    assert worker.process is not None
    assert worker.process.wait(20) == 0
    sent = [stub_saw(stub, m) == 1 for m in msgids]
    assert any(sent)
    assert all(stub_saw(stub, m) <= 1 for m in msgids)
    # every attempt that went out was finished and recorded, with its audit line
    for delivery_id, was_sent in zip(ids, sent, strict=True):
        status = store.status(delivery_id)
        assert status is not None
        if was_sent:
            assert (status["state"], status["attempts"]) == ("delivered", 1)
        else:  # claimed and never sent: given back, uncounted
            assert (status["state"], status["attempts"]) == ("pending", 0)
            assert status["attempts_made"] == []
    events = read_log(worker.log_path)
    assert sum(1 for e in events if e.get("event") == "postback.attempt") == sum(sent)
    # what was given back is due at once, not after its lease (16 s and more for a
    # batch's later ones): the next worker sends it straight away
    stub.set_plan({m: ["ok"] for m, was_sent in zip(msgids, sent, strict=True) if not was_sent})
    spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="5")
    wait_for(lambda: store.states(ids) == ["delivered"] * len(ids), 8)
    assert all(stub_saw(stub, m) == 1 for m in msgids)


def test_a_wake_up_after_the_delivery_succeeded_sends_nothing(
    stub: ProviderStub, r: redis.Redis, worker: WorkerProcess, worker_log: Path
) -> None:
    msgid = unique()
    delivery_id = enqueue_backfill(
        app_id="app-r", msgid=msgid, number="8613512345678", time="1681184764000"
    )
    wait_for(lambda: state_of(get_store(), delivery_id) == "delivered", 20)
    queue = get_settings().queue
    wake(3)
    # and one as an older producer, or the broker after a visibility timeout, would send it
    r.lpush(queue, legacy_message(queue, "test", [delivery_id]))
    # every wake-up was taken and acknowledged: its drain ran and found nothing due
    wait_for(lambda: r.llen(queue) == 0 and r.hlen("unacked") == 0, 20)
    assert stub_saw(stub, msgid) == 1
    lines = [e for e in read_log(worker_log) if e.get("delivery_id") == delivery_id]
    assert [e["outcome"] for e in lines if e["event"] == "postback.attempt"] == ["delivered"]
    status = get_store().status(delivery_id)
    assert status is not None
    assert status["state"] == "delivered"
    assert status["attempts"] == 1


def test_dead_letters_list_show_replay_and_purge(
    stub: ProviderStub, r: redis.Redis, worker: WorkerProcess, worker_log: Path
) -> None:
    msgids = [unique(), unique()]
    stub.set_plan({m: ["status:-24", "ok"] for m in msgids})
    ids = [
        enqueue_backfill(app_id="app-dead", msgid=m, number="8613512345678", time="1681184764000")
        for m in msgids
    ]
    wait_for(lambda: get_store().states(ids) == ["dead", "dead"], 20)

    listing = backfill("dead", "list")
    assert listing.returncode == 0
    for delivery_id in ids:
        assert delivery_id in listing.stdout
    assert "*********5678" in listing.stdout
    assert "8613512345678" not in listing.stdout
    assert "status -24" in listing.stdout

    shown = json.loads(backfill("dead", "show", ids[0]).stdout)
    assert shown["state"] == "dead"
    assert shown["attempts_made"][0]["api_status"] == "-24"

    replayed = backfill("dead", "replay", ids[0])
    assert replayed.returncode == 0, replayed.stderr
    wait_for(lambda: state_of(get_store(), ids[0]) == "delivered", 20)
    replay_lines = [
        e
        for e in read_log(worker_log)
        if e.get("delivery_id") == ids[0] and e.get("event") == "postback.attempt"
    ]
    assert [e.get("replay", False) for e in replay_lines] == [False, True]
    assert replay_lines[-1]["attempt"] == 1  # a fresh attempt budget

    assert backfill("dead", "purge", "--all").returncode == 2  # needs --yes
    purged = backfill("dead", "purge", ids[1])
    assert purged.returncode == 0
    assert get_store().status(ids[1]) is None
    assert backfill("dead", "purge", ids[0]).returncode == 1  # delivered, not dead


def bury_due(store: Store) -> list[str]:
    """Claim every due delivery and dead-letter it through the real step script, as a
    worker does after a -9 answer; the ids in the order they died."""
    buried: list[str] = []
    done: Finish | None = None
    answer = Answer(AnswerClass.BAD_RECORD, api_status="-9", api_reason="invalid number")
    while True:
        step = store.step(done, claim=True, prefer_bulk=False, lease_s=60, max_attempts=4)
        if done is not None:
            assert step.finished == "dead"
            buried.append(done.claim.delivery_id)
        if step.claim.verdict != "claimed":
            assert step.claim.verdict == "idle"
            return buried
        done = Finish(step.claim, answer, Verdict(Outcome.DEAD))


def dead_letters(store: Store, app_id: str, count: int) -> list[str]:
    """``count`` dead letters of ``app_id``, made in batches as a file import makes them."""
    records = [record(unique(), app_id) for _ in range(count)]
    for start in range(0, count, 1000):
        store.enqueue_many(records[start : start + 1000])
    return bury_due(store)


def dead_list(env: dict[str, str], *args: str) -> tuple[list[str], str | None]:
    """The ids one ``backfill dead list`` page shows, and the cursor it prints, if any."""
    result = backfill("dead", "list", *args, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    cursor = re.search(r"next page: --before (\S+)", result.stderr)
    return rows, cursor.group(1) if cursor else None


@dataclass
class Letters:
    """Dead letters on a Redis of their own: three died before ``since``, four after."""

    store: Store
    env: dict[str, str]  # for the CLI: BACKFILL_REDIS_URL
    early: list[str]  # app-a, app-a, app-b
    late: list[str]  # app-a, app-a, app-b, app-b
    since: float  # epoch s, by the scripts' clock


@pytest.fixture
def letters(settings_env: dict[str, str], private_redis: LocalRedis) -> Letters:
    store = open_store(private_redis.url)
    # no worker here: the letters die in a tight loop, several in the same millisecond
    early = dead_letters(store, "app-a", 2) + dead_letters(store, "app-b", 1)
    time.sleep(0.02)
    seconds, micros = store.redis.time()
    since = seconds + micros // 1000 / 1000
    time.sleep(0.02)
    late = dead_letters(store, "app-a", 2) + dead_letters(store, "app-b", 2)
    return Letters(store, {"BACKFILL_REDIS_URL": private_redis.url}, early, late, since)


def test_dead_list_pages_with_its_cursor_even_within_one_millisecond(letters: Letters) -> None:
    store = letters.store
    # a page may end inside a group of letters that died in the same millisecond (a busy
    # fleet, the loop above); make sure one does: the four late ones share one time
    tie = store.redis.zscore(keys.DEAD, letters.late[0])
    for delivery_id, app_id in zip(letters.late, ["app-a"] * 2 + ["app-b"] * 2, strict=True):
        for index in (keys.DEAD, keys.dead_app(app_id)):
            assert store.redis.zadd(index, {delivery_id: tie}, xx=True, ch=True) in (0, 1)
    newest_first = [i for i, _ in store.dead_page(limit=100)]
    assert sorted(newest_first[:4]) == sorted(letters.late)
    assert sorted(newest_first[4:]) == sorted(letters.early)

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        more = ["--before", cursor] if cursor else []
        rows, cursor = dead_list(letters.env, "--limit", "2", *more)
        pages.append(rows)
        if cursor is None:
            break
        assert len(pages) < 5, pages
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert [i for page in pages for i in page] == newest_first


def test_dead_list_filters_by_app_and_time(letters: Letters) -> None:
    early, late, since, env = letters.early, letters.late, letters.since, letters.env
    app_a, _ = dead_list(env, "--app-id", "app-a")
    assert sorted(app_a) == sorted(early[:2] + late[:2])
    iso = datetime.fromtimestamp(since, UTC).isoformat(timespec="milliseconds")
    recent, _ = dead_list(env, "--since", iso.replace("+00:00", "Z"))
    assert sorted(recent) == sorted(late)
    older, _ = dead_list(env, "--before", repr(since))  # epoch seconds alone: older than that
    assert sorted(older) == sorted(early)
    recent_b, _ = dead_list(env, "--app-id", "app-b", "--since", repr(since))
    assert sorted(recent_b) == sorted(late[2:])


@pytest.mark.parametrize(
    ("option", "value"),
    [("--since", "last tuesday"), ("--since", "nan"), ("--before", "inf"), ("--before", "1:a b")],
)
def test_dead_list_refuses_a_bad_since_or_cursor_before_asking_redis(
    option: str, value: str
) -> None:
    nobody = {"BACKFILL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # would exit 1
    result = backfill("dead", "list", option, value, env=nobody)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr
    assert "Redis" not in result.stderr
    assert "Traceback" not in result.stderr


def test_dead_replay_and_purge_work_through_thousands_in_batches(
    settings_env: dict[str, str], private_redis: LocalRedis
) -> None:
    store = open_store(private_redis.url)
    env = {"BACKFILL_REDIS_URL": private_redis.url}
    app_a = dead_letters(store, "app-a", 1500)
    app_b = dead_letters(store, "app-b", 1000)
    assert store.counts() == {"pending": 0, "dead": 2500}

    replayed = backfill("dead", "replay", "--all", "--app-id", "app-a", "--yes", env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1500 of 1500" in replayed.stdout
    assert set(store.states(app_a)) == {"pending"}
    assert set(store.states(app_b)) == {"dead"}
    assert store.redis.zcard(keys.BULK) == 1500  # behind live records
    assert store.redis.zcard(keys.dead_app("app-a")) == 0
    assert store.redis.zcard(keys.dead_app("app-b")) == 1000
    status = store.status(app_a[-1])
    assert status is not None
    assert (status["replay"], status["attempts"], status["lane"]) == (True, 0, "bulk")

    refused = backfill("dead", "purge", "--all", env=env)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert store.counts()["dead"] == 1000

    assert sorted(bury_due(store)) == sorted(app_a)  # the replays die again
    purged = backfill("dead", "purge", "--all", "--yes", env=env)
    assert purged.returncode == 0, purged.stderr
    assert "purged 2500 of 2500" in purged.stdout
    assert store.counts() == {"pending": 0, "dead": 0}
    assert set(store.states(app_a + app_b)) == {None}
    minute = keys.outcomes_in(0).removesuffix("0")  # the console's figures stay
    left = store.redis.scan_iter(keys.PREFIX + "*", count=1000)
    assert not [k for k in left if not k.startswith(minute)]


def test_chaos_run_loses_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ops" / "chaos.py"),
            "--records",
            "1500",
            "--kill-every",
            "1.5",
            # capped, so the run (a kill phase, then the killed workers' leases running
            # out) stays near two minutes
            "--max-kills",
            "6",
            "--timeout",
            "200",
            "--workdir",
            str(tmp_path / "run"),
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["lost"] == 0
    assert report["dead"] == 0
    assert report["outage_holds"] >= 1
    assert report["outage_s"] > report["retry_window_s"]
    assert report["delivered"] + report["dead"] == report["records"] == 1500
    assert report["provider_unique"] >= report["delivered"]
    assert report["redis_kills"] == 1
    assert report["worker_kills"] >= 3


@pytest.mark.parametrize(
    ("visibility", "read_timeout"),
    [
        ("100", "95"),  # the attempt lease alone (1 + 95 + 10 s) is longer
        ("20", "8"),  # the lease (19 s) fits, not with a drain's 5 s budget on top
    ],
)
def test_a_visibility_timeout_shorter_than_an_attempt_is_refused(
    settings_env: dict[str, str], visibility: str, read_timeout: str
) -> None:
    result = backfill(
        "worker",
        env={"BACKFILL_VISIBILITY_TIMEOUT_S": visibility, "BACKFILL_READ_TIMEOUT_S": read_timeout},
    )
    assert result.returncode == 2
    assert "BACKFILL_VISIBILITY_TIMEOUT_S must exceed" in result.stderr
