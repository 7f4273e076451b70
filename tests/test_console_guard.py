"""The console holds against hostile clients: wrong passwords are limited per address and
per user name (429 with Retry-After, a few log lines a burst), and slow clients from one
address cannot take the connections an operator needs.

A real ``backfill console`` process on a Redis of the test's own (one test serves the
same application in this process, with a login window of a few seconds, to see bursts
end); clients come from different loopback addresses (127.0.0.x: Linux routes all of
127/8 to the loopback).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import uvicorn

from tests.conftest import wait_for
from tests.helpers import open_store, serving
from worker.console.app import create_app
from worker.console.auth import Guard
from worker.console.limits import LoginLimiter
from worker.enqueue.intake_server import Limits
from worker.local.processes import LocalRedis, free_port
from worker.operate.audit import configure_logging

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


WINDOW_S = 4.0  # the login window of the in-process console: bursts end within the test


@pytest.fixture
def short_window_console(private_redis: LocalRedis) -> Iterator[tuple[int, io.StringIO]]:
    """The console application (its login window WINDOW_S) on uvicorn in a thread of
    this process, logging JSON lines to a buffer: its port and that buffer."""
    lines = io.StringIO()
    configure_logging("json", "INFO", stream=lines)
    store = open_store(private_redis.url)
    app = create_app(store, Guard({USER: PASSWORD}), limiter=LoginLimiter(10, WINDOW_S))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="on"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, 0.01)
    yield port, lines
    server.should_exit = True
    thread.join(10)
    configure_logging("json", "INFO", stream=io.StringIO())


def test_a_burst_of_wrong_passwords_is_summed_up_once_it_ends_without_more_traffic(
    short_window_console: tuple[int, io.StringIO],
) -> None:
    port, buffer = short_window_console
    attacker = Client(port, "127.0.0.2")
    started = time.monotonic()
    statuses = [attacker.get("/", USER, f"guess-{n:06d}").status for n in range(2000)]
    elapsed = time.monotonic() - started
    assert set(statuses) == {401, 429}

    def limit_lines() -> list[dict[str, object]]:
        found = [json.loads(line) for line in buffer.getvalue().splitlines()]
        return [e for e in found if e.get("event") in LIMIT_EVENTS]

    def by(event: str, key: str) -> list[dict[str, object]]:
        return [e for e in limit_lines() if e["event"] == event and key in e]

    # no request after the last guess: the summaries come as the last windows end
    wait_for(lambda: len(by("console.login_burst", "address"))
             == len(by("console.login_limited", "address")) > 0, WINDOW_S + 10, 0.1)  # fmt: skip
    wait_for(lambda: len(by("console.login_burst", "user"))
             == len(by("console.login_limited", "user")) > 0, 5, 0.1)  # fmt: skip
    for key in ("address", "user"):  # every try is in a summary, and once
        bursts = by("console.login_burst", key)
        assert sum(int(str(e["failures"])) + int(str(e["refused"])) for e in bursts) == 2000
        assert all(e["failures"] == 10 for e in bursts)
        assert len(bursts) <= elapsed / WINDOW_S + 1  # one a window, at most
    lines = limit_lines()
    windows = len(by("console.login_burst", "address"))
    assert len(by("console.auth_failed", "client")) == windows
    assert len(lines) == 5 * windows  # a window: auth_failed, and per key limited + burst
    assert len(lines) <= 5 * (elapsed / WINDOW_S + 1) < 100  # not one a try
    assert {e.get("address") for e in by("console.login_burst", "address")} == {"127.0.0.2"}
    assert {e.get("user") for e in by("console.login_burst", "user")} == {USER}
    assert "guess-" not in buffer.getvalue()
    time.sleep(0.5)
    assert limit_lines() == lines  # nothing more once the bursts are summed up


def test_a_client_that_never_finishes_its_headers_is_cut_off_at_the_deadline(
    console: tuple[int, Path],
) -> None:
    port, _ = console
    deadline_s = Limits().header_timeout_s  # the console's (backfill console uses Limits)
    partial = []
    for n in range(30):  # from 3 addresses: within the cap of 16 connections per address
        sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=(f"127.0.0.{2 + n % 3}", 0))  # fmt: skip
        sock.sendall(b"GET /dead HTTP/1.1\r\nHost: console\r\nAuthorization: Basic")
        partial.append(sock)
    opened = time.monotonic()
    try:
        operator = Client(port)
        assert operator.get("/", USER, PASSWORD).status == 200  # while they hang
        time.sleep(max(deadline_s / 2 - (time.monotonic() - opened), 0))
        assert not [sock for sock in partial if _closed(sock, 0.01)]  # not before it
        assert all(_closed(sock, deadline_s + 20) for sock in partial)  # cut off after it
        assert time.monotonic() - opened >= deadline_s
        # (an idle kept-alive connection is closed after 5 s: the operator reconnects)
        assert Client(port).get("/dead", USER, PASSWORD).status == 200
        assert Client(port, "127.0.0.2").get("/", USER, PASSWORD).status == 200
    finally:
        for sock in partial:
            sock.close()


def _closed(sock: socket.socket, wait_s: float) -> bool:
    """Whether the console closed this connection (without an answer) within ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False  # still open, waiting for the rest of its headers
    assert data == b"", data  # closed without a word: no answer to half a request
    return True


def test_a_burst_still_going_on_when_the_console_stops_is_summed_up() -> None:
    lines = io.StringIO()
    configure_logging("json", "INFO", stream=lines)
    try:
        limiter = LoginLimiter(10, 3600)
        for _ in range(12):
            limiter.failed("127.0.0.9", "nobody", known=False)
        assert limiter.retry_after("127.0.0.9", "nobody") > 0
        limiter.flush()  # what the console's shutdown does
        limiter.flush()  # once only
        sweepers = lambda: [t for t in threading.enumerate() if t.name == "console-login-bursts"]  # noqa: E731
        wait_for(lambda: not sweepers(), 5, 0.01)  # with nothing left to sum up, it ends
    finally:
        configure_logging("json", "INFO", stream=io.StringIO())
    bursts = [e for e in map(json.loads, lines.getvalue().splitlines())
              if e["event"] == "console.login_burst"]  # fmt: skip
    assert [(e.get("address"), e.get("user"), e["failures"], e["refused"]) for e in bursts] == [
        ("127.0.0.9", None, 12, 1),
        (None, "(not a console user)", 12, 1),
    ]
