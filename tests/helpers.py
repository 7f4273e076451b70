"""Helpers shared by test modules (no fixtures: those are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from worker import keys


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
