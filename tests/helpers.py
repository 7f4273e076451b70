"""Helpers shared by test modules (no fixtures: those are in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from worker import keys
from worker.connection import connect
from worker.store import Store


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


def open_store(redis_url: str, **options: Any) -> Store:
    """A Store on ``redis_url``: dedupe window an hour, delivered records kept an hour,
    unless ``options`` (``Store``'s keywords) say otherwise."""
    return Store(connect(redis_url), **{"dedupe_ttl_s": 3600, "keep_delivered_s": 3600, **options})


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
