"""The ``backfill`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import API_KEY, API_SECRET, unique, wait_for
from worker import keys
from worker.local import free_port
from worker.provider import build_headers


def backfill(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def snapshot(r: redis.Redis, queue: str = "backfill") -> dict[str, object]:
    """What an enqueue writes: every dedupe key with its value and every delivery key.

    Workers change deliveries' fields and attempt lists while they run, but only an
    enqueue creates a delivery or a dedupe key, so this proves "nothing was enqueued"
    even while a worker is busy with earlier tests' deliveries.
    """
    state: dict[str, object] = {k: r.get(k) for k in r.scan_iter(f"{keys.DEDUPE}*", count=1000)}
    state.update(dict.fromkeys(r.scan_iter(f"{keys.DELIVERY}*", count=1000), True))
    return state


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--app-id", "a", "--number", "abc", "--time", "1681184764000"], "number"),
        (["--app-id", "a", "--number", "8613512345678", "--time", "1681184764"], "time"),
        (
            ["--app-id", "has space", "--number", "8613512345678", "--time", "1681184764000"],
            "app_id",
        ),
        (["--number", "8613512345678", "--time", "1681184764000"], "app_id"),
    ],
)
def test_bad_input_exits_2_naming_the_field_and_writes_nothing(
    settings_env: dict[str, str], r: redis.Redis, args: list[str], field: str
) -> None:
    before = snapshot(r, "backfill")
    result = backfill("enqueue", *args)
    assert result.returncode == 2
    assert f"{field}:" in result.stderr
    assert snapshot(r, "backfill") == before


def test_enqueue_then_status(settings_env: dict[str, str], r: redis.Redis, worker: object) -> None:
    result = backfill(
        "enqueue", "--app-id", "cli", "--msgid", unique(), "--number", "8613512345678",
        "--time", "1681184764000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    delivery_id = result.stdout.strip()
    assert '"event": "postback.enqueued"' in result.stderr

    def delivered() -> dict[str, object] | None:
        out = backfill("status", delivery_id)
        status: dict[str, object] = json.loads(out.stdout)
        return status if status["state"] == "delivered" else None

    status = wait_for(delivered, 30, 0.2)
    assert status["number"] == "*********5678"
    assert len(status["attempts_made"]) == 1  # type: ignore[arg-type]
    assert backfill("status", "no-such-id").returncode == 1


def test_worker_without_credentials_exits_2(settings_env: dict[str, str]) -> None:
    result = backfill("worker", env={"BACKFILL_API_KEY": "", "BACKFILL_API_SECRET": ""})
    assert result.returncode == 2
    assert "BACKFILL_API_KEY" in result.stderr
    assert "BACKFILL_API_SECRET" in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BACKFILL_MAX_ATTEMPTS", "zero"),
        ("BACKFILL_BACKOFF_CAP_S", "-1"),
        ("BACKFILL_LOG_FORMAT", "xml"),
        ("BACKFILL_BASE_URL", "ftp://x"),
        ("BACKFILL_CODES", "-16:fatal"),
        ("BACKFILL_VISIBILITY_TIMEOUT_S", "10"),
    ],
)
def test_bad_settings_exit_2_naming_the_variable(
    settings_env: dict[str, str], name: str, value: str
) -> None:
    result = backfill("worker", env={name: value})
    assert result.returncode == 2
    assert name in result.stderr
    assert API_SECRET not in result.stderr + result.stdout


def test_stub_command_serves_signed_calls() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "stub", "--port", str(port)],
        env={**os.environ, "BACKFILL_API_KEY": API_KEY, "BACKFILL_API_SECRET": API_SECRET},
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _listening(port), 15)
        body = {"appId": "a", "msgid": "m", "number": "8613512345678", "time": "1681184764000"}
        answer = requests.post(
            f"http://127.0.0.1:{port}/sms/postback/backfill",
            json=body,
            headers=build_headers(API_KEY, API_SECRET),
            timeout=5,
        )
        assert answer.json() == {"status": "0", "reason": "success"}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--records", "40", "--workdir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "summary" in result.stdout
    assert "delivered" in result.stdout
    assert time.monotonic() - started < 200
    log_text = (tmp_path / "worker.log").read_text()
    assert '"event": "postback.attempt"' in log_text
    for pattern in (str(tmp_path), "-m worker worker --concurrency=16"):
        leftovers = subprocess.run(
            ["pgrep", "-f", pattern], capture_output=True, text=True, check=False
        )
        assert leftovers.stdout.strip() == "", pattern


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
