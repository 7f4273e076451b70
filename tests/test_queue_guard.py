"""The broker guard (worker/deliver/transport.py) against real workers on a private Redis.

Without it one malformed message stops a worker with exit 0, and 1,000 ETA messages stop
it consuming; with it each is logged once and the worker goes on delivering. A failure
that does stop a worker exits non-zero.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection as KombuConnection

from tests.conftest import read_log, unique, wait_for
from tests.helpers import open_store
from worker.app import app as celery_app
from worker.deliver.messages import wake_message
from worker.deliver.transport import (
    EXCERPT_CHARS,
    SENTINEL_TRANSPORT,
    TRANSPORT,
    Connection,
    envelope_problem,
    excerpt,
    task_problem,
)
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess
from worker.local.stub import ProviderStub
from worker.state.store import Store

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "backfill"
Spawn = Callable[..., WorkerProcess]


def envelope(**changes: Any) -> dict[str, Any]:
    """A wake-up message as the project sends it, with top-level fields changed."""
    message: dict[str, Any] = json.loads(wake_message(QUEUE, "test"))
    message.update(changes)
    return message


def with_body(body: bytes) -> str:
    return json.dumps(envelope(body=base64.b64encode(body).decode()))


def with_headers(**headers: Any) -> dict[str, Any]:
    message = envelope()
    message["headers"].update(headers)
    return message


MALFORMED = {
    "not JSON": "not json{ 8613512345678",
    "a JSON list": "[]",
    "a JSON number": "123",
    "an empty object": "{}",
    "no delivery_tag": json.dumps(envelope(properties={"body_encoding": "base64"})),
    "headers a list": json.dumps(envelope(headers=[])),
    "body not base64": json.dumps(envelope(body="!!!notbase64***")),
    "body not JSON": with_body(b"not json{"),
    "body a one-item list": with_body(b"[1]"),
    "body a number": with_body(b"123"),
    "no task id": json.dumps(with_headers(id=None)),
    "bad timelimit": json.dumps(with_headers(timelimit=[1])),
    "protocol 1": json.dumps(
        envelope(headers={}, body=base64.b64encode(b'{"task": "x"}').decode())
    ),
}


def record(msgid: str) -> BackfillRecord:
    return BackfillRecord("app-g", "8613512345678", "1681184764000", msgid=msgid)


def events(process: WorkerProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in read_log(process.log_path) if e.get("event") == name]


def delivered(store: Store, delivery_id: str) -> bool:
    return store.states([delivery_id])[0] == "delivered"


def test_the_checks_pass_the_project_s_own_messages() -> None:
    def decode(body: Any, encoding: Any) -> Any:
        return base64.b64decode(body) if encoding == "base64" else body

    message = envelope()
    assert envelope_problem(message, decode) is None
    assert task_problem(message, decode) is None
    cut = excerpt("x" * 1000 + "8613512345678")
    assert len(cut) == EXCERPT_CHARS
    assert excerpt("call 8613512345678 now") == "call *********5678 now"


def test_malformed_messages_are_logged_once_and_dropped(
    stub: ProviderStub, private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(private_redis.url)
    client = redis.Redis.from_url(private_redis.url)
    client.lpush(QUEUE, *MALFORMED.values())
    store = open_store(private_redis.url)
    msgid = unique("guard")
    # its wake-up queues behind the malformed ones: the worker must get past them
    delivery_id, _ = store.enqueue(record(msgid), wake_queue=QUEUE, wake=wake_message(QUEUE, "t"))
    wait_for(lambda: delivered(store, delivery_id), 30)
    assert worker.alive
    dropped = events(worker, "broker.malformed_message")
    assert len(dropped) == len(MALFORMED)
    assert all(e["level"] == "warning" and e["queue"] == QUEUE for e in dropped)
    assert all(len(e["excerpt"]) <= EXCERPT_CHARS for e in dropped)
    assert "8613512345678" not in worker.log_path.read_text()
    assert client.llen(QUEUE) == 0
    # dropped, not held for a later restore (the record's own message is acked just after)
    wait_for(lambda: client.hlen("unacked") == 0, 10)
    assert not [e for e in read_log(worker.log_path) if e.get("level") == "critical"]
    assert [s["msgid"] for s in stub.seen()].count(msgid) == 1


def test_eta_messages_run_at_once_instead_of_stalling_the_worker(
    private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(private_redis.url)
    client = redis.Redis.from_url(private_redis.url)
    # more than worker_eta_task_limit (1,000): Celery alone would hold them all and stop.
    # Each carries an argument no producer sends, so each run leaves one
    # postback.bad_message line: the test counts runs, not just acks.
    held = []
    for i in range(1100):
        message = json.loads(wake_message(QUEUE, "test", [i]))
        message["headers"]["eta"] = "2100-01-01T00:00:00+00:00"
        held.append(json.dumps(message))
    client.lpush(QUEUE, *held)
    # each ran as an immediate wake-up (a drain that found nothing due), none was held
    wait_for(lambda: len(events(worker, "postback.bad_message")) == 1100, 60, 0.2)
    ignored = events(worker, "broker.eta_ignored")
    assert len(ignored) == 1100
    assert {e["eta"] for e in ignored} == {"2100-01-01T00:00:00+00:00"}
    assert client.llen(QUEUE) == 0
    wait_for(lambda: client.hlen("unacked") == 0, 10)
    # and the worker still consumes: a record enqueued now goes out
    store = open_store(private_redis.url)
    delivery_id, _ = store.enqueue(
        record(unique("eta")), wake_queue=QUEUE, wake=wake_message(QUEUE, "t")
    )
    wait_for(lambda: delivered(store, delivery_id), 30, 0.1)
    assert worker.alive


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(
    private_redis: LocalRedis, spawn_worker: Spawn
) -> None:
    worker = spawn_worker(private_redis.url)
    # a queue key of the wrong type: BRPOP answers WRONGTYPE, which Celery cannot recover from
    redis.Redis.from_url(private_redis.url).set(QUEUE, "not a list")
    assert worker.process is not None
    assert worker.process.wait(30) == 1
    assert any("Unrecoverable error" in e["event"] for e in read_log(worker.log_path))


def test_celery_s_own_worker_command_is_guarded_too(
    settings_env: dict[str, str], private_redis: LocalRedis, tmp_path: Path
) -> None:
    log_path = tmp_path / "celery.log"
    env = {**os.environ, **settings_env, "BACKFILL_REDIS_URL": private_redis.url}
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-c", "2"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--without-mingle", "--without-gossip"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: b'"worker.ready"' in log_path.read_bytes(), 30)
        client = redis.Redis.from_url(private_redis.url)
        client.lpush(QUEUE, "not json{")
        wait_for(lambda: b'"broker.malformed_message"' in log_path.read_bytes(), 10)
        time.sleep(0.5)
        assert process.poll() is None
        client.delete(QUEUE)
        client.set(QUEUE, "not a list")
        assert process.wait(30) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize("problem", sorted(MALFORMED))
def test_each_malformed_kind_is_named(problem: str) -> None:
    def decode(body: Any, encoding: Any) -> Any:
        return base64.b64decode(body) if encoding == "base64" else body

    try:
        message = json.loads(MALFORMED[problem])
    except ValueError:
        return  # not JSON: the channel's own decode refuses it
    found = envelope_problem(message, decode) or task_problem(message, decode)
    assert found, problem


def test_the_guarded_transport_survives_a_failover_to_the_next_sentinel() -> None:
    urls = "sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2/0"
    connection = Connection(urls, transport=SENTINEL_TRANSPORT)
    for _ in range(3):  # what kombu does after each failed connect
        connection.maybe_switch_next()
        assert connection.transport_cls == SENTINEL_TRANSPORT
    # kombu's own Connection falls back to the URL's scheme, unguarded
    plain = KombuConnection(urls, transport=SENTINEL_TRANSPORT)
    plain.maybe_switch_next()
    assert plain.transport_cls == "sentinel"


def test_the_app_connects_through_the_guard(settings_env: dict[str, str]) -> None:
    with celery_app.connection_for_read() as connection:
        assert isinstance(connection, Connection)
        assert connection.transport_cls == TRANSPORT
