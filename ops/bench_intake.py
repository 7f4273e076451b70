#!/usr/bin/env python3
"""Intake throughput: accepted records/s for single-record and 1,000-record requests.

Starts a private Redis and a real ``backfill intake`` (uvicorn) process, then posts from
a few client threads over keep-alive connections. No worker runs: this measures intake
and enqueue only. Prints a table and, with --json PATH, writes the figures.

    python ops/bench_intake.py [--singles 3000] [--batches 30] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from worker.local import LocalRedis, free_port

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway token for this run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="backfill-intake-bench-"))
    server = LocalRedis(root / "redis").start()
    port = free_port()
    env = {
        **os.environ,
        "BACKFILL_REDIS_URL": server.url,
        "BACKFILL_INTAKE_TOKENS": f"bench:{TOKEN}",
        "BACKFILL_LOG_LEVEL": "INFO",  # audit lines included, as in production
    }
    with (root / "intake.log").open("wb") as log:
        intake = subprocess.Popen(
            [sys.executable, "-m", "worker", "intake", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1/backfills"
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/healthz")
        single = _run(url, args.singles, 1, args.threads)
        batch = _run(url, args.batches, 1000, args.threads)
    finally:
        intake.terminate()
        intake.wait(10)
        server.stop()
    figures = {"intake_single_rps": round(single), "intake_batch_rps": round(batch)}
    print(f"intake, single-record requests   {single:10,.0f} records/s")
    print(f"intake, 1,000-record requests    {batch:10,.0f} records/s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("intake did not start")


def _run(url: str, requests_count: int, per_request: int, threads: int) -> float:
    """Accepted records per second over ``requests_count`` POSTs."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    local = threading.local()
    sessions: list[requests.Session] = []
    base = time.time_ns()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        return local.session  # type: ignore[no-any-return]

    def post(n: int) -> int:
        records = [
            {"app_id": "bench", "msgid": f"{base}-{n}-{i}", "number": "8613512345678",
             "time": "1681184764000"}
            for i in range(per_request)
        ]  # fmt: skip
        body = records[0] if per_request == 1 else {"records": records}
        answer = session().post(url, data=json.dumps(body), headers=headers, timeout=30)
        answer.raise_for_status()
        return per_request

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        accepted = sum(pool.map(post, range(requests_count)))
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.close()
    return accepted / elapsed


if __name__ == "__main__":
    sys.exit(main())
