"""Nothing lost: worker crashes, lost messages, graceful shutdown, dead letters, chaos."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import read_log, unique, wait_for
from tests.test_cli import backfill
from worker import enqueue_backfill
from worker.connection import connect
from worker.local import LocalRedis, WorkerProcess
from worker.record import BackfillRecord
from worker.runtime import get_store
from worker.store import Store
from worker.stub import ProviderStub

ROOT = Path(__file__).resolve().parent.parent
Spawn = Callable[..., WorkerProcess]


def private_store(server: LocalRedis) -> Store:
    return Store(connect(server.url), dedupe_ttl_s=3600, requeue_after_s=5)


def record(msgid: str) -> BackfillRecord:
    return BackfillRecord("app-r", "8613512345678", "1681184764000", msgid=msgid)


def state_of(store: Store, delivery_id: str) -> str | None:
    return store.states([delivery_id])[0]


def stub_saw(stub: ProviderStub, msgid: str) -> int:
    return sum(1 for s in stub.seen() if s["msgid"] == msgid)


def test_sigkill_mid_attempt_is_taken_over_by_another_worker(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    store = private_store(private_redis)
    first = spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="3")
    msgid = unique()
    stub.set_plan({msgid: ["slow:2"]})
    delivery_id, _ = store.enqueue(record(msgid), dispatch_grace_s=0)
    wait_for(lambda: stub_saw(stub, msgid) == 1, 10)
    first.kill()  # the attempt was in flight: the provider has it, we never heard back
    killed_at = time.monotonic()
    second = spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="3")
    wait_for(lambda: state_of(store, delivery_id) == "delivered", 60)
    # taken over once the attempt's lease (1 + 3 + 10 s) ran out, not after an hour
    assert time.monotonic() - killed_at < 30
    events = [e for e in read_log(second.log_path) if e.get("delivery_id") == delivery_id]
    assert [e["outcome"] for e in events if e["event"] == "postback.attempt"] == ["duplicate"]


def test_a_lost_message_is_dispatched_again(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    spawn_worker(private_redis.url, BACKFILL_REQUEUE_AFTER_S="5")
    store = private_store(private_redis)
    msgid = unique()
    # stored and scheduled as if published, but its message never reached the broker
    delivery_id, _ = store.enqueue(record(msgid), dispatch_grace_s=5)
    started = time.monotonic()
    wait_for(lambda: state_of(store, delivery_id) == "delivered", 30)
    assert 4 < time.monotonic() - started < 15
    assert stub_saw(stub, msgid) == 1


def test_sigterm_lets_in_flight_attempts_finish(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    store = private_store(private_redis)
    worker = spawn_worker(private_redis.url, BACKFILL_READ_TIMEOUT_S="5")
    msgids = [unique() for _ in range(6)]
    stub.set_plan({m: ["slow:2"] for m in msgids})
    ids = [store.enqueue(record(m), dispatch_grace_s=0)[0] for m in msgids]
    wait_for(lambda: all(stub_saw(stub, m) == 1 for m in msgids), 10)
    worker.signal(signal.SIGTERM)
    assert worker.process is not None
    assert worker.process.wait(20) == 0
    assert store.states(ids) == ["delivered"] * len(ids)
    events = read_log(worker.log_path)
    assert sum(1 for e in events if e.get("event") == "postback.attempt") == len(ids)


def test_a_redelivered_task_after_success_is_not_sent_again(
    stub: ProviderStub, r: redis.Redis, worker: WorkerProcess, worker_log: Path
) -> None:
    msgid = unique()
    delivery_id = enqueue_backfill(
        app_id="app-r", msgid=msgid, number="8613512345678", time="1681184764000"
    )
    wait_for(lambda: state_of(get_store(), delivery_id) == "delivered", 20)
    publish([delivery_id])  # as the broker would after a visibility timeout

    def duplicate_line() -> list[dict[str, Any]]:
        return [
            e
            for e in read_log(worker_log)
            if e.get("delivery_id") == delivery_id and e.get("outcome") == "duplicate"
        ]

    (line,) = wait_for(duplicate_line, 20)
    assert line["error"] == "already delivered; not sent again"
    assert stub_saw(stub, msgid) == 1


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


def test_chaos_run_loses_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ops" / "chaos.py"),
            "--records",
            "1500",
            "--kill-every",
            "1",
            "--timeout",
            "240",
            "--workdir",
            str(tmp_path / "run"),
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["lost"] == 0
    assert report["delivered"] + report["dead"] == report["records"] == 1500
    assert report["redis_kills"] == 1
    assert report["worker_kills"] >= 3


@pytest.mark.parametrize("name", ["BACKFILL_REQUEUE_AFTER_S", "BACKFILL_READ_TIMEOUT_S"])
def test_a_visibility_timeout_shorter_than_an_attempt_is_refused(
    settings_env: dict[str, str], name: str
) -> None:
    result = backfill("worker", env={"BACKFILL_VISIBILITY_TIMEOUT_S": "100", name: "95"})
    assert result.returncode == 2
    assert "BACKFILL_VISIBILITY_TIMEOUT_S" in result.stderr
