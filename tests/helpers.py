"""Helpers shared by test modules (no fixtures: those are in conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.deliver.steps import Claim, Finish
from worker.local.processes import WorkerProcess
from worker.state import keys
from worker.state.connection import connect
from worker.state.store import Store


def backfill(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``backfill`` CLI (``python -m worker``) with ``env`` added; never raises."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        stdin=subprocess.DEVNULL,  # no terminal: a mass action without --yes refuses
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, every_s: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(every_s)


@contextmanager
def serving(
    args: list[str], env: dict[str, str], log_path: Path, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m worker *args`` with ``env`` (all of it), its output in ``log_path``;
    given once ``ready()``, terminated on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(ready, 20, 0.1)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def open_store(redis_url: str, **options: Any) -> Store:
    """A Store on ``redis_url``: dedupe window an hour, delivered records kept an hour,
    unless ``options`` (``Store``'s keywords) say otherwise."""
    return Store(connect(redis_url), **{"dedupe_ttl_s": 3600, "keep_delivered_s": 3600, **options})


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a worker log (a non-JSON line fails the test)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(worker: WorkerProcess, name: str) -> list[dict[str, Any]]:
    """The lines of ``worker``'s log whose event is ``name``, in order."""
    return [line for line in read_log(Path(worker.log_path)) if line.get("event") == name]


def state_counts(store: Store, ids: list[str]) -> dict[str | None, int]:
    """How many of ``ids`` are in each state (None: gone)."""
    found: dict[str | None, int] = {}
    for state in store.states(ids):
        found[state] = found.get(state, 0) + 1
    return found


def step_through(
    store: Store, answer: Callable[[Claim], Finish], *, claim: int, max_attempts: int
) -> list[str]:
    """Claim every due delivery, ``claim`` a step, and finish each with ``answer(claim)``
    through the real step script, as a drain does; the ids finished."""
    finished: list[str] = []
    done: list[Finish] = []
    while True:
        result = store.step(
            done, claim=claim, prefer_bulk=False, lease_s=60, max_attempts=max_attempts
        )
        finished += [item.claim.delivery_id for item in done]
        if not result.claims:
            return finished
        done = [answer(c) for c in result.claims]


def snapshot(r: redis.Redis) -> set[str]:
    """What an enqueue writes: the id of every delivery hash.

    Workers change deliveries' fields and attempt lists while they run, but only an enqueue
    creates a delivery, and the test workers keep a delivered record's hash for an hour
    (BACKFILL_KEEP_DELIVERED_S=3600), so this proves "nothing was enqueued" even while a
    worker is busy with earlier tests' deliveries. Delivered markers are left out: a worker
    finishing an attempt whose delivery an earlier test's clean-up removed still writes one.
    """
    prefix = keys.delivery("")
    return {k.removeprefix(prefix) for k in r.scan_iter(keys.delivery("*"), count=1000)}


def leftovers(workdir: Path) -> dict[str, tuple[int, list[int]]]:
    """pgrep's exit code and the PIDs it found, for what a demo in ``workdir`` started.

    ``worker``: the worker's process group (it is a session leader; the demo writes its
    PID to worker.pid), children included. ``workdir``: anything naming the workdir on its
    command line, such as redis-server's ``--dir``. Exit code 1 is "no match".
    """
    pid = (workdir / "worker.pid").read_text().strip()
    assert pid.isdigit()
    found = {}
    for name, args in (("worker", ["-g", pid]), ("workdir", ["-f", "--", str(workdir)])):
        done = subprocess.run(["pgrep", *args], capture_output=True, text=True, check=False)
        assert done.returncode in {0, 1}, done.stderr  # 2 and 3: pgrep did not search
        found[name] = (done.returncode, [int(p) for p in done.stdout.split()])
    return found


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class DeadRedis:
    """Redis's port once Redis is gone: it takes each connection and closes it at once
    (redis-py's "Connection closed by server"), counting them: how many times a client
    tried before it gave up, whatever the machine's speed."""

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()
