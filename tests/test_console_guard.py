"""The console holds against hostile clients: wrong passwords are limited per address and
per user name (429 with Retry-After, a few log lines a burst), and slow clients from one
address cannot take the connections an operator needs.

A real ``backfill console`` process on a Redis of the test's own; clients come from
different loopback addresses (127.0.0.x: Linux routes all of 127/8 to the loopback).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.helpers import serving
from worker.local.processes import LocalRedis, free_port

USER, PASSWORD = "operator", "a-long-console-password"
LIMIT_EVENTS = {"console.auth_failed", "console.login_limited", "console.login_burst"}


@pytest.fixture
def console(private_redis: LocalRedis, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real ``backfill console``: its port and its log file."""
    port = free_port()
    log_path = tmp_path / "console.log"
    env = {**os.environ, "BACKFILL_REDIS_URL": private_redis.url,
           "BACKFILL_CONSOLE_USERS": f"{USER}:{PASSWORD}"}  # fmt: skip
    with serving(["console", "--port", str(port)], env, log_path, lambda: _listening(port)):
        yield port, log_path


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while Client.opened:
        Client.opened.pop().close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class Client:
    """Requests over one kept-alive connection from a chosen loopback address."""

    opened: ClassVar[list[http.client.HTTPConnection]] = []  # closed after each test

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                               source_address=(source, 0))  # fmt: skip
        self.opened.append(self.http)

    def get(self, path: str, user: str, password: str) -> http.client.HTTPResponse:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.http.request("GET", path, headers={"Authorization": f"Basic {token}"})
        answer = self.http.getresponse()
        answer.read()
        return answer


def events(log_path: Path) -> list[dict[str, object]]:
    lines = log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_two_thousand_wrong_passwords_get_429_with_retry_after_and_a_few_log_lines(
    console: tuple[int, Path],
) -> None:
    port, log_path = console
    operator = Client(port)
    assert operator.get("/", USER, PASSWORD).status == 200
    attacker = Client(port, "127.0.0.2")
    statuses = [attacker.get("/", USER, f"guess-{n:06d}").status for n in range(2000)]
    assert statuses[:10] == [401] * 10
    assert set(statuses[10:]) == {429}
    limited = attacker.get("/", USER, PASSWORD)  # even the right password: still limited
    assert limited.status == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-Frame-Options"] == "DENY"  # the same security headers
    assert limited.headers["Cache-Control"] == "no-store"
    assert operator.get("/", USER, PASSWORD).status == 200  # the operator's address is not

    lines = [e for e in events(log_path) if e.get("event") in LIMIT_EVENTS]
    assert [e["event"] for e in lines] == ["console.auth_failed"] + ["console.login_limited"] * 2
    assert {(e.get("address"), e.get("user")) for e in lines[1:]} == {
        ("127.0.0.2", None),
        (None, USER),
    }
    assert PASSWORD not in log_path.read_text()
    assert "guess-" not in log_path.read_text()


def test_a_user_name_guessed_from_many_addresses_is_limited_but_its_operator_keeps_working(
    console: tuple[int, Path],
) -> None:
    port, log_path = console
    operator = Client(port, "127.0.0.1")
    assert operator.get("/", USER, PASSWORD).status == 200  # logged in before the attack
    guesses = [Client(port, f"127.0.0.{10 + n}") for n in range(4)]
    statuses = [guesses[n % 4].get("/", USER, f"guess-{n}").status for n in range(40)]
    assert statuses[:10] == [401] * 10  # 10 failures for the name, from 4 addresses
    assert set(statuses[10:]) == {429}
    assert operator.get("/dead", USER, PASSWORD).status == 200
    newcomer = Client(port, "127.0.0.50").get("/", USER, PASSWORD)
    assert newcomer.status == 429  # a new address waits out the name's window
    assert int(newcomer.headers["Retry-After"]) > 0
    assert Client(port, "127.0.0.51").get("/", "someone-else", "x" * 12).status == 401

    limited = [e for e in events(log_path) if e.get("event") == "console.login_limited"]
    assert limited == [e for e in limited if e.get("user") == USER]
    assert len(limited) == 1


def test_slow_sockets_from_one_address_leave_room_for_a_logged_in_operator(
    console: tuple[int, Path],
) -> None:
    port, _ = console
    slow = []
    for _ in range(80):  # the console serves 64 connections; one address may hold 16
        sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=("127.0.0.2", 0))  # fmt: skip
        sock.sendall(b"GET / HTTP/1.1\r\nHost: console\r\nX-Slow: ")  # never finished
        slow.append(sock)
    try:
        answer = Client(port).get("/", USER, PASSWORD)
        assert answer.status == 200
        refused = [sock for sock in slow if _refused(sock)]
        assert len(refused) == 64  # all 80 connected well within the 10 s header deadline
    finally:
        for sock in slow:
            sock.close()


def _refused(sock: socket.socket) -> bool:
    """Whether the console answered this connection with its 503 (Retry-After) at once."""
    sock.settimeout(0.2)  # a refused one was answered as it connected
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False  # held open, waiting for the rest of its headers
    return data.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in data
