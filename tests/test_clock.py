"""Our clock: a worker whose clock is off signs with the shared one (Redis TIME), and
says so; with correction off, the provider's run of -16 holds the fleet instead of
dead-lettering everything.

Redis and the stub keep the real time; the stub refuses a Timestamp more than 300 s off
with -16. Workers run under ``faketime`` (Debian's package) ten minutes ahead, with the
monotonic clock left true (``FAKETIME_DONT_FAKE_MONOTONIC``), which is what a skewed host
clock looks like. libfaketime 0.9.10 has one bug on that path: ``clock_nanosleep`` fails
with EINVAL, so ``time.sleep`` raises; a ``sitecustomize`` of three lines sleeps with
``select`` instead. Every other clock read (``time.time``, ``datetime.now``, the C
library's ``clock_gettime``) is libfaketime's.
"""

from __future__ import annotations

import email.utils
import os
import re
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
SLEEP = """import select, time
def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], seconds)
time.sleep = _sleep
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
    assert clock.describe() == {
        "clock_offset_s": f"{offset:.3f}",
        "clock_corrected": "0",
        "provider_clock_offset_s": "",
    }


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
    said, logged = {}, {}
    for correct in ("1", "0"):
        done = subprocess.run(
            [*AHEAD, sys.executable, "-c", SIGN, private_redis.url, provider.url, correct,
             API_KEY, API_SECRET],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        said[correct] = done.stdout.strip().splitlines()[-1].split()
        logged[correct] = done.stdout
    assert said["1"] == ["-600", "0"]  # measured, corrected: accepted
    assert said["0"] == ["-600", "-16"]  # measured, not corrected: "timestamp expired"
    # the provider's Date header agrees with Redis, not with this host's clock
    assert "provider_clock_differs" not in logged["1"]
    assert "provider_clock_differs" in logged["0"]
    assert "so this host's clock is off" in logged["0"]


def under_faketime(where: Path) -> dict[str, str]:
    """The environment of a Python process run under ``AHEAD``: the monotonic clock true,
    and ``time.sleep`` through ``select`` (see the module's docstring)."""
    if shutil.which("faketime") is None:
        pytest.fail("faketime is not installed (apt-get install faketime; ops/test.sh does)")
    site = where / "sleep"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLEEP)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": path}


def start_ahead(
    settings_env: dict[str, str], redis_url: str, stub_url: str, log: Path, **env: str
) -> WorkerProcess:
    worker = WorkerProcess(
        {**settings_env, "BACKFILL_REDIS_URL": redis_url, "BACKFILL_BASE_URL": stub_url,
         "BACKFILL_MAX_ATTEMPTS": "3", "BACKFILL_BACKOFF_BASE_S": "0.2",
         **under_faketime(log.parent), **env},
        log, prefix=AHEAD,
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
    # faketime forks: the worker under it goes with it
    assert worker.process is not None
    wait_for(lambda: not _group_alive(worker.process.pid), timeout_s=10)


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
        # the hold's line follows its step (the key is set first)
        wait_for(lambda: logged(worker, "postback.outage"), timeout_s=30)
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


def test_the_providers_date_header_is_a_second_witness() -> None:
    clock = SharedClock()
    clock.measure(Fixed(int(time.time()), 0))  # this host and Redis agree
    now = time.time()
    assert clock.witness(email.utils.formatdate(now, usegmt=True), 0.01) is not None
    assert abs(clock.provider_offset_s or 99) < 1.6
    assert clock.witness(email.utils.formatdate(now + 600, usegmt=True), 0.01) is None  # < 10 s
    clock._witnessed_at -= 11
    offset = clock.witness(email.utils.formatdate(now + 600, usegmt=True), 0.01)
    assert offset is not None
    assert 598 < offset < 602
    assert clock.describe()["provider_clock_offset_s"].startswith(("599.", "600.", "601."))
    said, fatal = offset_problem(clock.describe(), 30) or ("", True)
    assert "provider's clock (its Date header) is 600 s ahead of" in said
    assert not fatal
    for garbage in ("", "yesterday", "Mon, 99 Foo 2026 99:99:99 GMT", "x" * 100, "\u00e9t\u00e9"):
        clock._witnessed_at -= 11
        assert clock.witness(garbage, 0.01) is None
    assert clock.provider_offset_s == offset  # kept


def test_a_provider_ten_minutes_ahead_is_named_and_holds_instead_of_dead_lettering(
    private_redis: LocalRedis, settings_env: dict[str, str], tmp_path: Path
) -> None:
    """The stub (the provider) runs under faketime ten minutes ahead; this host and Redis
    agree. Every call is refused -16: the fleet holds, nothing is dead-lettered, and the
    provider's Date header names the provider's clock as the likely culprit."""
    out = tmp_path / "stub.log"
    with out.open("wb") as sink:
        stub = subprocess.Popen(
            [*AHEAD, sys.executable, "-m", "worker", "stub", "--port", "0",
             "--api-key", API_KEY, "--api-secret", API_SECRET],
            env={**os.environ, **under_faketime(tmp_path)},
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    worker: WorkerProcess | None = None
    try:
        url = wait_for(lambda: _listening(out, stub), timeout_s=60)
        worker = WorkerProcess(
            {**settings_env, "BACKFILL_REDIS_URL": private_redis.url, "BACKFILL_BASE_URL": url,
             "BACKFILL_MAX_ATTEMPTS": "3", "BACKFILL_BACKOFF_BASE_S": "0.2"},
            tmp_path / "w.log",
        )  # fmt: skip
        worker.start()
        worker.wait_ready(timeout_s=60)
        store = open_store(private_redis.url)
        ids = [i for i, _ in store.enqueue_many(records(60, "late"), source="test")]
        wait_for(lambda: logged(worker, "worker.provider_clock_differs"), timeout_s=60)
        wait_for(lambda: store.redis.exists(keys.OUTAGE), timeout_s=60)
        lines = read_log(Path(worker.log_path))
        (differs,) = [
            line for line in lines if line.get("event") == "worker.provider_clock_differs"
        ]
        assert 590 < differs["provider_offset_s"] < 610
        assert "the provider's clock is likely off" in differs["detail"]
        assert not [line for line in lines if line.get("event") == "worker.clock_offset"]
        assert store.redis.zcard(keys.DEAD) == 0
        assert "dead" not in store.states(ids)
        # the next heartbeat carries it to `health` (not fatal: the hold is the reaction)
        wait_for(lambda: "provider's clock (its Date header) is 6" in health(worker).stdout,
                 timeout_s=30)  # fmt: skip
        assert health(worker).returncode == 0
    finally:
        if worker is not None:
            worker.kill()
        os.killpg(stub.pid, 9)
        stub.wait(10)


def _listening(out: Path, process: subprocess.Popen[bytes]) -> str | None:
    """The stub's URL once it says it listens (its first line); its output if it died."""
    said = out.read_text(errors="replace")
    found = re.search(r"stub listening on (http://\S+)", said)
    if found:
        return found.group(1)
    if process.poll() is not None:
        pytest.fail(f"the stub exited with {process.returncode}: {said[-2000:]}")
    return None


def logged(worker: WorkerProcess, event: str) -> bool:
    """Whether the worker's log has a line of ``event``."""
    return any(line.get("event") == event for line in read_log(Path(worker.log_path)))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
