"""`backfill health` means progress, and nothing untrusted makes a log line huge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.conftest import read_log, unique, wait_for
from worker.deliver.messages import wake_message
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess
from worker.local.stub import ProviderStub
from worker.operate.heartbeat import stalled
from worker.state.connection import connect
from worker.state.store import Store


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "health", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_stall_rule() -> None:
    now = 1_000.0
    fresh = {"due_since": "", "last_finish": "0"}
    assert stalled(fresh, now, 60) is None  # nothing waiting: an idle worker is fine
    busy = {"due_since": "100", "last_finish": "990"}
    assert stalled(busy, now, 60) is None  # work waits, but attempts keep finishing
    stuck = {"due_since": "100", "last_finish": "500"}
    assert stalled(stuck, now, 60) == (
        "work waiting for 900 s and no attempt finished for 500 s (threshold 60 s)"
    )
    assert stalled({"last_finish": "x"}, now, 60) == "heartbeat unreadable"


def test_health_reports_a_worker_that_has_work_and_finishes_nothing(
    settings_env: dict[str, str],
    stub: ProviderStub,
    tmp_path: Path,
    private_redis_factory: Callable[..., LocalRedis],
) -> None:
    node = f"stall-{unique()}@{socket.gethostname()}"
    local = private_redis_factory()
    env = {
        **settings_env,
        "BACKFILL_REDIS_URL": local.url,
        "BACKFILL_READ_TIMEOUT_S": "20",
        "BACKFILL_STALL_AFTER_S": "5",
    }
    worker = WorkerProcess(
        env, tmp_path / "worker.log", concurrency=1, extra_args=(f"--hostname={node}",)
    ).start()
    try:
        worker.wait_ready()
        assert health(env, "--node", node).returncode == 0
        store = Store(connect(local.url), dedupe_ttl_s=3600)
        slow, waiting = unique(), unique()
        stub.set_plan({slow: ["slow:14"]})  # the only thread is held for 14 s

        def enqueue(msgid: str) -> None:
            record = BackfillRecord("app-l", "8613512345678", "1681184764000", msgid=msgid)
            assert store.enqueue(record)[1]

        enqueue(slow)
        # the slow attempt is in flight before the other record waits behind it
        wait_for(lambda: [s for s in stub.seen() if s["msgid"] == slow], 10)
        enqueue(waiting)

        def reported() -> subprocess.CompletedProcess[str] | None:
            result = health(env, "--node", node)
            return result if result.returncode == 1 else None

        result = wait_for(reported, 20, 0.5)
        assert f"{node} stalled: work waiting for" in result.stdout
        assert health(env).returncode == 1  # the fleet check names it too
        # once the slow attempt ends and the queue drains, it is healthy again
        wait_for(lambda: health(env, "--node", node).returncode == 0, 40, 0.5)
    finally:
        worker.stop()
    missing = health(env, "--node", f"gone@{socket.gethostname()}", "--timeout", "0.5")
    assert missing.returncode == 1


def test_a_huge_message_argument_is_capped_in_the_log(
    r: redis.Redis, worker: WorkerProcess, worker_log: Path, settings_env: dict[str, str]
) -> None:
    huge = "x" * 1_000_000
    r.lpush(settings_env.get("BACKFILL_QUEUE", "backfill"), wake_message("backfill", "t", [huge]))
    (bad,) = wait_for(
        lambda: [e for e in read_log(worker_log) if e.get("event") == "postback.bad_message"], 10
    )
    assert bad["arguments"].startswith("(('xxxx")  # which message it was, capped
    assert len(bad["arguments"]) < 200
    longest = max(len(line) for line in worker_log.read_text().splitlines())
    assert longest < 8_000


@pytest.mark.usefixtures("worker")
def test_no_log_line_of_a_busy_worker_is_over_the_cap(worker_log: Path) -> None:
    assert all(len(line) < 20_000 for line in worker_log.read_text().splitlines())
