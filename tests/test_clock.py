"""Our clock: a worker whose clock is off signs with the shared one (Redis TIME), and
says so; with correction off, the provider's run of -16 holds the fleet instead of
dead-lettering everything.

Redis and the stub keep the real time; the stub refuses a Timestamp more than 300 s off
with -16. The signing path runs under ``faketime`` (Debian's package) ten minutes ahead.
A whole worker cannot: libfaketime 0.9.10 does not translate ``sem_clockwait``, so every
timed wait of a Python thread (``Event.wait``) sleeps the offset too (and with
``--exclude-monotonic`` ``time.sleep`` fails with EINVAL). The fleet tests move the
worker's wall clock in Python instead (``sitecustomize``: ``time.time`` ten minutes
ahead, the monotonic clock true), which is what a skewed host clock looks like.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, API_SECRET, read_log, wait_for
from tests.helpers import open_store
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess
from worker.local.stub import ProviderStub
from worker.operate.clock import SharedClock, offset_problem
from worker.state import keys

AHEAD = ("faketime", "-f", "+600")  # ten minutes ahead
SKEW = """import time
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + 600
time.time_ns = lambda: _time_ns() + 600_000_000_000
"""
SIGN = """import sys
from worker.operate.clock import clock
from worker.state.connection import connect
from worker.deliver.provider import ProviderClient
from worker.enqueue.record import BackfillRecord
clock.correct = sys.argv[3] == "1"
clock.measure(connect(sys.argv[1]))
answer = ProviderClient(sys.argv[2], sys.argv[4], sys.argv[5]).send(
    BackfillRecord("app-sign", "8613500000000", "1700000000000", msgid=sys.argv[3]))
print(round(clock.offset_s), answer.api_status)
"""


class Fixed:
    """A time source that answers a fixed shared time."""

    def __init__(self, seconds: int, micros: int) -> None:
        self.answer = [seconds, micros]

    def time(self) -> Any:
        return self.answer


def test_the_offset_is_the_shared_clock_minus_ours() -> None:
    clock = SharedClock()
    now = int(time.time())
    offset = clock.measure(Fixed(now - 600, 0))
    assert offset is not None
    assert -601 < offset < -599
    assert abs(clock.now() - (time.time() - 600)) < 1
    clock.correct = False
    assert abs(clock.now() - time.time()) < 1
    assert clock.measure(Fixed("x", "y")) is None  # type: ignore[arg-type]
    assert clock.describe() == {"clock_offset_s": f"{offset:.3f}", "clock_corrected": "0"}


def test_health_names_an_offset_and_fails_only_when_it_is_not_corrected() -> None:
    assert offset_problem({"clock_offset_s": "0.2", "clock_corrected": "1"}, 30) is None
    assert offset_problem({"clock_offset_s": ""}, 30) is None
    said, fatal = offset_problem({"clock_offset_s": "-600", "clock_corrected": "1"}, 30) or ("", 1)
    assert "600.0 s ahead of the shared clock" in said
    assert not fatal
    said, fatal = offset_problem({"clock_offset_s": "600", "clock_corrected": "0"}, 30) or ("", 0)
    assert "behind" in said
    assert "NOT corrected" in said
    assert fatal


def records(count: int, tag: str) -> list[BackfillRecord]:
    return [
        BackfillRecord(f"app-{tag}", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"{tag}-{i}")
        for i in range(count)
    ]


def test_under_faketime_the_signature_carries_the_shared_clocks_time(
    private_redis: LocalRedis, provider: ProviderStub
) -> None:
    if shutil.which("faketime") is None:
        pytest.fail("faketime is not installed (apt-get install faketime; ops/test.sh does)")
    said = {}
    for correct in ("1", "0"):
        done = subprocess.run(
            [*AHEAD, sys.executable, "-c", SIGN, private_redis.url, provider.url, correct,
             API_KEY, API_SECRET],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        said[correct] = done.stdout.split()
    assert said["1"] == ["-600", "0"]  # measured, corrected: accepted
    assert said["0"] == ["-600", "-16"]  # measured, not corrected: "timestamp expired"


def start_ahead(
    settings_env: dict[str, str], redis_url: str, stub_url: str, log: Path, **env: str
) -> WorkerProcess:
    site = log.parent / "skew"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SKEW)
    worker = WorkerProcess(
        {**settings_env, "BACKFILL_REDIS_URL": redis_url, "BACKFILL_BASE_URL": stub_url,
         "BACKFILL_MAX_ATTEMPTS": "3", "BACKFILL_BACKOFF_BASE_S": "0.2",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
         **env},
        log,
    )  # fmt: skip
    worker.start()
    worker.wait_ready(timeout_s=60)
    return worker


def health(worker: WorkerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "health", "--timeout", "5"],
        env={**os.environ, **worker.env}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_a_worker_ten_minutes_ahead_signs_with_the_shared_clock(
    private_redis: LocalRedis, provider: ProviderStub, settings_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    worker = start_ahead(settings_env, private_redis.url, provider.url, tmp_path / "w.log")
    try:
        store = open_store(private_redis.url)
        ids = [i for i, _ in store.enqueue_many(records(100, "ahead"), source="test")]
        wait_for(lambda: store.states(ids).count("delivered") == 100, timeout_s=90)
        assert "-16" not in provider.stats()["codes"]  # type: ignore[operator]
        lines = read_log(Path(worker.log_path))
        (offset,) = [line for line in lines if line.get("event") == "worker.clock_offset"]
        assert offset["level"] == "error"
        assert -610 < offset["offset_s"] < -590
        assert offset["corrected"] is True
        # the audit line's timestamp is the shared clock's, not ten minutes on
        attempt = next(line for line in lines if line.get("event") == "postback.attempt")
        stamp = datetime.fromisoformat(attempt["timestamp"].replace("Z", "+00:00"))
        assert abs(stamp.timestamp() - time.time()) < 120
        said = health(worker)
        assert said.returncode == 0, said.stdout + said.stderr
        assert "s ahead of the shared clock" in said.stdout
        assert "corrected when signing" in said.stdout
    finally:
        worker.kill()


def test_uncorrected_the_run_of_minus_16_holds_instead_of_dead_lettering(
    private_redis: LocalRedis, provider: ProviderStub, settings_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    worker = start_ahead(
        settings_env, private_redis.url, provider.url, tmp_path / "w.log",
        BACKFILL_CLOCK_CORRECTION="false",
    )  # fmt: skip
    try:
        store = open_store(private_redis.url)
        ids = [i for i, _ in store.enqueue_many(records(60, "skew"), source="test")]
        wait_for(lambda: store.redis.exists(keys.OUTAGE), timeout_s=60)
        lines = read_log(Path(worker.log_path))
        assert any(
            line.get("event") == "worker.clock_offset" and line["corrected"] is False
            for line in lines
        )
        (outage,) = [line for line in lines if line.get("event") == "postback.outage"]
        assert "-16" in outage["last_error"]
        assert store.redis.zcard(keys.DEAD) == 0
        assert "dead" not in store.states(ids)
        said = health(worker)
        assert said.returncode == 1, said.stdout
        assert "NOT corrected" in said.stdout
    finally:
        worker.kill()
