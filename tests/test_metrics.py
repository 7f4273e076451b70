"""``worker.operate.metrics``: the fleet gauges a scrape reads from Redis, and serving them.

The collector runs over a real ``Store`` on a Redis of this module's own; what a real
worker serves end to end is ``test_fleet.py``'s and ``test_ops_monitoring.py``'s.
``serve`` starts a server thread and registers the collector once per process, so the
test that lets it succeed runs in a child process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from tests.helpers import DeadRedis
from worker.deliver.policy import AnswerClass, Outcome, Verdict
from worker.deliver.provider import Answer
from worker.deliver.steps import LIVE, Finish
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, free_port
from worker.operate import metrics
from worker.operate.errors import ConfigError
from worker.state import keys
from worker.state.connection import connect
from worker.state.store import Store

QUEUE = "backfill-metrics"
ROOT = Path(__file__).resolve().parent.parent
GAUGES = ("queue_depth", "pending", "waiting_retries", "dead_letters", "paused", "outage")
Sample = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture
def store_options() -> dict[str, Any]:
    """``store`` keeps no delivered record."""
    return {"keep_delivered_s": 0}


def rec(msgid: str) -> BackfillRecord:
    return BackfillRecord("app-m", "8613512345678", "1681184764000", msgid=msgid)


def scrape(collector: metrics.FleetCollector) -> dict[Sample, float]:
    """Every sample one collection yields, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_an_empty_fleet_reads_zero_in_every_family(store: Store) -> None:
    zero: dict[Sample, float] = {(f"backfill_{name}", ()): 0 for name in GAUGES}
    zero |= {("backfill_overdue_seconds", (("lane", lane),)): 0.0 for lane in ("live", "bulk")}
    zero |= {("backfill_redis_full", ()): 0.0, ("backfill_redis_memory_used_ratio", ()): 0.0}
    assert scrape(metrics.FleetCollector(store, QUEUE)) == zero


def test_each_gauge_reads_the_fleet_s_figure(store: Store) -> None:
    # one delivery dead, two live ones due (one of them for half a minute already), one
    # bulk one due in an hour, three wake-ups waiting, and the fleet paused in an outage
    ((dead_id, _),) = store.enqueue_many([rec("m-dead")], lane=LIVE)
    (claim,) = store.step(None, claim=1, prefer_bulk=False, lease_s=60, max_attempts=4).claims
    answer = Answer(AnswerClass.BAD_RECORD, http_status=200, api_status="-9")
    store.step(
        Finish(claim, answer, Verdict(Outcome.DEAD)),
        claim=0, prefer_bulk=False, lease_s=60, max_attempts=4,
    )  # fmt: skip
    overdue_id, _ = store.enqueue(rec("m-overdue"))
    seconds, micros = store.redis.time()
    due_ms = int(seconds) * 1000 + int(micros) // 1000 - 30_000
    store.redis.zadd(keys.LIVE, {overdue_id: due_ms}, xx=True)
    store.redis.hset(keys.delivery(overdue_id), "u", due_ms)
    store.enqueue(rec("m-live"))
    store.enqueue_many([rec("m-bulk")], due_in_s=3600)
    store.redis.lpush(QUEUE, "w1", "w2", "w3")
    store.redis.set(keys.PAUSED, "outage: connection error", px=60_000)
    store.redis.set(keys.OUTAGE, f"{due_ms}|1000")

    figures = scrape(metrics.FleetCollector(store, QUEUE))
    overdue = {lane: figures.pop(("backfill_overdue_seconds", (("lane", lane),))) for lane in
               ("live", "bulk")}  # fmt: skip
    assert figures == {
        ("backfill_queue_depth", ()): 3, ("backfill_pending", ()): 3,
        ("backfill_waiting_retries", ()): 1, ("backfill_dead_letters", ()): 1,
        ("backfill_paused", ()): 1, ("backfill_outage", ()): 1,
        # a Redis without maxmemory is never full
        ("backfill_redis_full", ()): 0, ("backfill_redis_memory_used_ratio", ()): 0,
    }  # fmt: skip
    assert 30 <= overdue["live"] < 35
    assert overdue["bulk"] == 0
    assert store.states([dead_id]) == ["dead"]


def test_the_collector_renders_in_prometheus_text_format(store: Store) -> None:
    store.enqueue(rec("m-1"))
    registry = CollectorRegistry()
    registry.register(metrics.FleetCollector(store, QUEUE))
    text = generate_latest(registry).decode()
    assert "# TYPE backfill_pending gauge\nbackfill_pending 1.0\n" in text
    assert 'backfill_overdue_seconds{lane="live"}' in text
    assert 'backfill_overdue_seconds{lane="bulk"} 0.0' in text


@pytest.mark.parametrize("down", ["refused", "closed"])
def test_a_redis_that_is_down_yields_nothing_and_logs_without_its_password(down: str) -> None:
    port = free_port()  # nothing listens, or a port that closes every connection at once
    dead = DeadRedis(port) if down == "closed" else None
    url = f"redis://:hunter2-redis-password@127.0.0.1:{port}/0"
    client = connect(url, connect_timeout_s=0.5, retries=0)
    collector = metrics.FleetCollector(Store(client, dedupe_ttl_s=3600), QUEUE)
    try:
        with capture_logs() as logs:
            assert scrape(collector) == {}
    finally:
        client.close()
        if dead is not None:
            dead.close()
    assert logs == [
        {"event": "metrics.redis_unavailable", "error": "ConnectionError", "log_level": "warning"}
    ]
    assert "hunter2" not in repr(logs)
    if dead is not None:  # a scrape tries once and gives up: it never waits Redis out
        assert dead.accepted == 1


def test_a_key_of_the_wrong_type_yields_nothing_and_logs(store: Store) -> None:
    store.redis.set(keys.LIVE, "not a sorted set")
    with capture_logs() as logs:
        assert scrape(metrics.FleetCollector(store, QUEUE)) == {}
    assert [(e["event"], e["error"]) for e in logs] == [
        ("metrics.redis_unavailable", "ResponseError")
    ]


def listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_serving_on_a_port_in_use_is_a_config_error_naming_the_setting(store: Store) -> None:
    assert metrics._serving == []  # nothing in this process serves (the test would be moot)
    registered = set(REGISTRY._collector_to_names)
    port = free_port()
    with listening(port), pytest.raises(ConfigError) as raised:
        metrics.serve(port, store, QUEUE, host="127.0.0.1")
    assert str(raised.value).startswith(
        f"BACKFILL_METRICS_PORT: port {port} on 127.0.0.1 is in use"
    )
    assert metrics._serving == []
    assert set(REGISTRY._collector_to_names) == registered  # no collector left registered


def test_serving_on_an_address_not_of_this_host_names_host_and_port(store: Store) -> None:
    port = free_port()
    with pytest.raises(ConfigError) as raised:
        metrics.serve(port, store, QUEUE, host="192.0.2.1")  # TEST-NET-1: not ours
    message = str(raised.value)
    assert message.startswith("BACKFILL_METRICS_HOST, BACKFILL_METRICS_PORT: cannot listen on")
    assert f"192.0.2.1:{port}" in message
    assert metrics._serving == []


CHILD = textwrap.dedent(
    """
    import sys, urllib.request
    from worker.operate import metrics
    from worker.state.connection import connect
    from worker.state.store import Store

    url, port = sys.argv[1], int(sys.argv[2])
    store = Store(connect(url), dedupe_ttl_s=3600)
    metrics.serve(port, store, "QUEUE", host="127.0.0.1")
    metrics.serve(port, store, "QUEUE", host="127.0.0.1")  # a second call: a no-op
    metrics.serve(port + 1, store, "QUEUE", host="127.0.0.1")  # even on another port
    print("serving:", metrics._serving)
    answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    print("scraped:", answer.read().decode())
    """
).replace("QUEUE", QUEUE)


def test_serve_serves_the_fleet_gauges_once_per_process(
    store: Store, module_redis: LocalRedis
) -> None:
    store.enqueue_many([rec("m-1"), rec("m-2")])
    store.redis.lpush(QUEUE, "w1")
    port = free_port()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, module_redis.url, str(port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    logged, _, rest = child.stdout.partition("serving: ")
    assert logged.count("metrics.serving") == 1  # structlog's default output: stdout
    serving, _, text = rest.partition("\nscraped: ")
    assert serving == f"[('127.0.0.1', {port})]"
    assert text.count("# TYPE backfill_pending gauge") == 1  # the collector registered once
    assert "\nbackfill_pending 2.0\n" in text
    assert "\nbackfill_queue_depth 1.0\n" in text
    assert "# TYPE backfill_attempts_total counter" in text  # and the worker's own counters
