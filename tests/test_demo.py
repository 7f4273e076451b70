"""The demo and the stub as a person meets them: ``backfill demo --keep``, ``backfill stub``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.conftest import API_SECRET, wait_for
from tests.helpers import backfill, leftovers, listening
from worker.deliver.provider import build_headers
from worker.local.processes import free_port
from worker.local.stub import LOCAL_API_KEY, LOCAL_API_SECRET

BODY = {"appId": "a", "msgid": "m", "number": "8613512345678", "time": "1681184764000"}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}


def _read_until(stream: object, marker: str, lines: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.append(line)
        if marker in line:
            return
    raise AssertionError("".join(lines))


@contextmanager
def stub_saying(env: dict[str, str], port: int, marker: str) -> Iterator[str]:
    """``backfill stub`` on ``port`` with ``env``: what it said up to ``marker``; it gets
    SIGINT on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "stub", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        _read_until(process.stderr, marker, lines)
        yield "".join(lines)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()


def test_the_stub_runs_without_credentials_and_prints_what_it_expects() -> None:
    port = free_port()
    with stub_saying(_clean_env(), port, "point a worker at it") as said:
        assert f"BACKFILL_BASE_URL=http://127.0.0.1:{port}/sms" in said
        assert LOCAL_API_KEY in said
        assert LOCAL_API_SECRET in said
        url = f"http://127.0.0.1:{port}/sms/postback/backfill"
        signed = build_headers(LOCAL_API_KEY, LOCAL_API_SECRET)
        assert requests.post(url, json=BODY, headers=signed, timeout=5).json()["status"] == "0"
        wrong = build_headers(LOCAL_API_KEY, "another-secret")
        assert requests.post(url, json=BODY, headers=wrong, timeout=5).json()["status"] == "-1"


def test_the_stub_never_echoes_credentials_it_was_given() -> None:
    port = free_port()
    given = {"BACKFILL_API_KEY": "a-real-looking-key", "BACKFILL_API_SECRET": API_SECRET}
    with stub_saying({**_clean_env(), **given}, port, "point a worker") as said:
        assert "a-real-looking-key" not in said
        assert API_SECRET not in said
        assert "BACKFILL_API_KEY" in said


def test_the_stub_help_names_the_variables_it_reads() -> None:
    result = backfill("stub", "--help")
    assert result.returncode == 0
    assert "BACKFILL_API_KEY" in result.stdout
    assert "BACKFILL_API_SECRET" in result.stdout
    assert "BACKFILL_BASE_URL" in result.stdout


def test_demo_keep_leaves_everything_running_until_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "demo", "-n", "30", "--keep", "--workdir", str(tmp_path)],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        _read_until(process.stdout, "Press Ctrl-C", lines)
        said = "".join(lines)
        assert "why the dead letters died" in said
        assert "provider status -9 (injected): a bad record, dead-lettered at once" in said
        exports = dict(re.findall(r"export (BACKFILL_\w+)=(\S+)", said))
        assert set(exports) >= {"BACKFILL_REDIS_URL", "BACKFILL_BASE_URL", "BACKFILL_API_KEY"}
        # what the summary tells a person to try works, on what the demo just did
        dead = backfill("dead", "list", env={**_clean_env(), **exports})
        assert dead.returncode == 0, dead.stderr
        assert "status -9: injected" in dead.stdout
        console = re.search(r"console: (http://\S+)\s+\(user (\S+), password (\S+)\)", said)
        assert console is not None
        url, user, password = console.groups()
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, auth=(user, password), timeout=10).status_code == 200
        port = int(url.rstrip("/").rsplit(":", 1)[1])
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert "stopping" in out
    assert leftovers(tmp_path) == {"worker": (1, []), "workdir": (1, [])}
    assert wait_for(lambda: not listening(port), 10)
