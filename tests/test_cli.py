"""The ``backfill`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import API_KEY, API_SECRET, unique, wait_for
from tests.helpers import backfill, leftovers, listening, snapshot
from worker import enqueue_backfill
from worker.deliver.provider import build_headers
from worker.local.processes import free_port


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
    before = snapshot(r)
    result = backfill("enqueue", *args)
    assert result.returncode == 2
    assert f"{field}:" in result.stderr
    assert snapshot(r) == before


def test_enqueue_then_status(settings_env: dict[str, str], r: redis.Redis, worker: object) -> None:
    result = backfill(
        "enqueue", "--app-id", "cli", "--msgid", unique(), "--number", "8613512345678",
        "--time", "1681184764000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    delivery_id = result.stdout.strip()
    assert '"event":"postback.enqueued"' in result.stderr

    def delivered() -> dict[str, object] | None:
        out = backfill("status", delivery_id)
        status: dict[str, object] = json.loads(out.stdout)
        return status if status["state"] == "delivered" else None

    status = wait_for(delivered, 30, 0.2)
    assert status["number"] == "*********5678"
    assert len(status["attempts_made"]) == 1  # type: ignore[arg-type]
    assert backfill("status", "no-such-id").returncode == 3


def test_status_tells_no_such_delivery_from_redis_unavailable(
    settings_env: dict[str, str], r: redis.Redis
) -> None:
    msgid = unique()
    delivery_id = enqueue_backfill(
        app_id="cli", msgid=msgid, number="8613512345678", time="1681184764000"
    )
    found = backfill("status", delivery_id)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["msgid"] == msgid
    missing = backfill("status", "0b5e3c1e-0000-4000-8000-000000000000")
    assert missing.returncode == 3
    assert "error: no delivery 0b5e3c1e-0000-4000-8000-000000000000" in missing.stderr
    nobody = {"BACKFILL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    down = backfill("status", delivery_id, env=nobody)
    assert down.returncode == 1
    assert "error: Redis unavailable" in down.stderr
    assert "Traceback" not in down.stderr


@pytest.mark.parametrize(
    "delivery_id", ["x" * 129, "bell\x07id", "tab\tid", "has space", "", "caf\u00e9"]
)
def test_status_refuses_a_malformed_id_before_asking_redis(delivery_id: str) -> None:
    nobody = {"BACKFILL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # would exit 1
    result = backfill("status", delivery_id, env=nobody)
    assert result.returncode == 2
    assert "error: DELIVERY_ID: expected 1 to 128 printable ASCII" in result.stderr
    assert "Redis" not in result.stderr


def test_status_help_documents_the_exit_codes() -> None:
    words = " ".join(backfill("status", "--help").stdout.split())
    assert "3 no such delivery" in words
    assert "1 Redis unavailable" in words


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
        wait_for(lambda: listening(port), 15)
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
    # at least one sample record is bad on purpose: the summary says why it died
    assert "provider status -9 (injected): a bad record" in result.stdout
    assert "backfill demo --keep" in result.stdout
    log_text = (tmp_path / "worker.log").read_text()
    assert '"event":"postback.attempt"' in log_text
    assert leftovers(tmp_path) == {"worker": (1, []), "workdir": (1, [])}


def test_leftover_check_finds_a_worker_and_a_redis_left_running(tmp_path: Path) -> None:
    sleep = "import time; time.sleep(60)"
    worker = subprocess.Popen(  # the demo worker's command line, as far as it goes
        [sys.executable, "-c", sleep, "-m", "worker", "worker", "--concurrency=16"],
        start_new_session=True,
    )
    server = subprocess.Popen(
        [sys.executable, "-c", sleep, "--dir", str(tmp_path / "redis")], start_new_session=True
    )
    (tmp_path / "worker.pid").write_text(f"{worker.pid}\n")
    try:
        assert leftovers(tmp_path) == {"worker": (0, [worker.pid]), "workdir": (0, [server.pid])}
    finally:
        for process in (worker, server):
            process.kill()
            process.wait(10)
    assert leftovers(tmp_path) == {"worker": (1, []), "workdir": (1, [])}
