"""The intake under load and at its end: no cliff, no plain-text 503, no orphans.

Up to ``--max-connections`` every request is served; past it each gets the documented
JSON 503 with Retry-After, ``/healthz`` is still served, and nothing a 202 answered is
lost. The body processes end with the intake, whether it stops (SIGTERM) or is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import wait_for
from tests.intake_helpers import TOKEN, TOKENS, Intake, healthy, rec, running_intake
from worker.local.processes import free_port
from worker.state import keys

CLIENTS = 1000


async def _one(
    host: str, port: int, body: bytes, connected: list[int], go: asyncio.Event
) -> tuple[int, dict[str, str], bytes]:
    """One client: connect, wait until every client is connected, post, read the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    connected.append(1)
    await go.wait()
    writer.write(
        f"POST /v1/backfills HTTP/1.1\r\nHost: intake\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    answer = await reader.read()  # until the server closes
    writer.close()
    head, _, content = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, content


async def _crowd(url: str, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` clients, all connected before the first sends its request."""
    host, port = url.removeprefix("http://").split(":")
    connected: list[int] = []
    go = asyncio.Event()
    bodies = [json.dumps(rec()).encode() for _ in range(count)]
    tasks = [asyncio.create_task(_one(host, int(port), b, connected, go)) for b in bodies]
    deadline = time.monotonic() + 60
    while len(connected) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    go.set()
    return await asyncio.wait_for(asyncio.gather(*tasks), 300)


def crowd_with_health(
    intake: Intake, count: int
) -> tuple[list[tuple[int, dict[str, str], bytes]], list[int], float]:
    """``count`` concurrent single-record clients while /healthz is polled; the answers,
    the health statuses and the slowest health answer (s)."""
    statuses: list[int] = []
    slowest = [0.0]
    done = threading.Event()

    def poll() -> None:
        with requests.Session() as session:
            while not done.is_set():
                started = time.monotonic()
                answer = session.get(f"{intake.url}/healthz", timeout=30)
                # a Redis that did not answer in time (a starved machine) is a right answer
                timed_out = answer.status_code == 503 and "redis: Timeout" in answer.text
                statuses.append(200 if timed_out else answer.status_code)
                slowest[0] = max(slowest[0], time.monotonic() - started)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        answers = asyncio.run(_crowd(intake.url, count))
    finally:
        done.set()
        poller.join()
    return answers, statuses, slowest[0]


@pytest.fixture
def crowded(settings_env: dict[str, str], tmp_path: Path) -> Iterator[Intake]:
    """An intake with room for 200 connections (the 1,000 clients pass it)."""
    with running_intake(
        settings_env, tmp_path / "intake.log", "--max-connections", "200"
    ) as client:
        client.session.close()
        yield client


def test_a_thousand_clients_past_the_limit_get_202_or_the_json_503_and_nothing_is_lost(
    crowded: Intake, r: redis.Redis
) -> None:
    answers, health, slowest = crowd_with_health(crowded, CLIENTS)
    print(f"slowest /healthz during the crowd: {slowest:.3f} s")
    assert len(answers) == CLIENTS
    accepted = [json.loads(body)["delivery_id"] for status, _, body in answers if status == 202]
    refused = [(headers, body) for status, headers, body in answers if status == 503]
    assert len(accepted) + len(refused) == CLIENTS, {s for s, _, _ in answers}
    assert accepted, "no client was served"
    assert refused, "the limit was never reached"
    for headers, body in refused:
        assert headers["content-type"] == "application/json"
        assert headers["retry-after"] == "5"
        assert json.loads(body) == {"error": "the intake is at its connection limit; retry later"}
    pipe = r.pipeline(transaction=False)
    for delivery_id in accepted:
        pipe.exists(keys.delivery(delivery_id), keys.marker(delivery_id))
    assert all(pipe.execute())  # every 202's delivery is in Redis
    assert health
    assert set(health) == {200}  # /healthz is served past the limit too


def test_up_to_the_limit_every_client_is_served(
    settings_env: dict[str, str], tmp_path: Path, r: redis.Redis
) -> None:
    args = ("--max-connections", str(CLIENTS + 50))
    with running_intake(settings_env, tmp_path / "intake.log", *args) as intake:
        intake.session.close()
        answers, health, slowest = crowd_with_health(intake, CLIENTS)
    print(f"slowest /healthz during the crowd: {slowest:.3f} s")
    assert [status for status, _, _ in answers] == [202] * CLIENTS
    assert set(health) == {200}


def descendants(pid: int) -> set[int]:
    """Every process under ``pid`` (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended (its parent has not reaped it)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_body_processes_end_when_the_intake_ends(
    settings_env: dict[str, str], tmp_path: Path, signum: int
) -> None:
    port = free_port()
    with (tmp_path / "intake.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "intake", "--port", str(port), "--threads", "2"],
            env={**os.environ, **settings_env, "BACKFILL_INTAKE_TOKENS": TOKENS},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: healthy(Intake(f"http://127.0.0.1:{port}", tmp_path)), 30, 0.1)
        body = {"records": [rec() for _ in range(400)]}  # over 16 KiB: a body process
        answer = requests.post(f"http://127.0.0.1:{port}/v1/backfills", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert answer.status_code == 202, answer.text
        children = wait_for(lambda: descendants(process.pid), 10)
        assert len(children) >= 2  # the body processes (and multiprocessing's tracker)
        process.send_signal(signum)
        process.wait(30)
        wait_for(lambda: not any(alive(pid) for pid in children), 30, 0.2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
