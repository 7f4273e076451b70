#!/usr/bin/env python3
"""Intake throughput, and /healthz latency while a burst of batches arrives.

Starts a private Redis and a real ``backfill intake`` (uvicorn) process, then posts from
a few client threads over keep-alive connections. No worker runs: this measures intake
and enqueue only. The burst sends ``--burst`` 1,000-record requests all at once (one
thread each) while another process times GET /healthz every 20 ms. Prints a table and,
with --json PATH, writes the figures.

    python ops/bench_intake.py [--singles 3000] [--batches 30] [--threads 8] [--burst 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from worker.local.processes import LocalRedis, free_port

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway token for this run
INTAKE = [sys.executable, "-m", "worker", "intake"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--burst", type=int, default=200, help="concurrent batches; 0: skip")
    parser.add_argument("--intake-threads", type=int, default=1, help="backfill intake --threads")
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
            [*INTAKE, "--port", str(port), "--threads", str(args.intake_threads)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1/backfills"
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/healthz")
        single = _run(url, args.singles, 1, args.threads)
        batch = _run(url, args.batches, 1000, args.threads)
        burst = _burst(url, f"http://127.0.0.1:{port}/healthz", args.burst) if args.burst else {}
    finally:
        intake.terminate()
        intake.wait(10)
        server.stop()
    figures = {"intake_single_rps": round(single), "intake_batch_rps": round(batch), **burst}
    print(f"intake, single-record requests   {single:10,.0f} records/s")
    print(f"intake, 1,000-record requests    {batch:10,.0f} records/s")
    if burst:
        print(f"burst of {args.burst} batches at once  {burst['burst_rps']:10,.0f} records/s")
        print(f"  /healthz during it, max        {burst['healthz_max_ms']:10,.1f} ms")
        print(f"  /healthz during it, median     {burst['healthz_p50_ms']:10,.1f} ms")
        print(f"  /healthz answers               {burst['healthz_count']:10,d}")
        print(f"  /healthz answers other than 200{burst['healthz_failures']:10,d}")
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


def _burst(url: str, health_url: str, count: int) -> dict[str, float]:
    """Post ``count`` 1,000-record batches at once while another process times /healthz."""
    base = time.time_ns()
    bodies = [
        json.dumps({"records": [
            {"app_id": "burst", "msgid": f"{base}-{n}-{i}", "number": "8613512345678",
             "time": "1681184764000"} for i in range(1000)]})
        for n in range(count)
    ]  # fmt: skip
    stop = multiprocessing.Event()
    results: multiprocessing.Queue[tuple[list[float], list[str]]] = multiprocessing.Queue()
    poller = multiprocessing.Process(target=_poll_health, args=(health_url, stop, results))
    poller.start()
    time.sleep(0.5)
    # The 200 senders run in a process of their own at the lowest priority: on a small
    # machine they would otherwise take the cores from the intake and the poller, which
    # in production sit on other machines than the clients.
    done: multiprocessing.Queue[tuple[int, float]] = multiprocessing.Queue()
    senders = multiprocessing.Process(target=_send_all, args=(url, bodies, done))
    senders.start()
    accepted, elapsed = done.get(timeout=600)
    senders.join(30)
    stop.set()
    latencies, failures = results.get(timeout=30)
    latencies.sort()
    poller.join(10)
    for failure in sorted(set(failures)):
        print(f"/healthz answered {failure} ({failures.count(failure)} times)")
    return {
        "burst_rps": round(accepted / elapsed),
        "healthz_max_ms": round(latencies[-1] * 1000, 1),
        "healthz_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "healthz_count": len(latencies),
        "healthz_failures": len(failures),
    }


def _send_all(url: str, bodies: list[str], done: Any) -> None:
    """Post every body at once, one thread each, niced (in its own process)."""
    os.nice(19)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    start = threading.Barrier(len(bodies))

    def post(body: str) -> int:
        start.wait()  # every request leaves together
        answer = requests.post(url, data=body, headers=headers, timeout=300)
        answer.raise_for_status()
        return 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        accepted = sum(pool.map(post, bodies))
    done.put((accepted, time.perf_counter() - started))


def _poll_health(url: str, stop: Any, results: Any) -> None:
    """GET /healthz every 20 ms until ``stop``; every answer must be 200 (in its own process)."""
    latencies, failures = [], []
    with requests.Session() as session:
        while not stop.is_set():
            began = time.perf_counter()
            answer = session.get(url, timeout=30)
            latencies.append(time.perf_counter() - began)
            if answer.status_code != 200:
                failures.append(f"{answer.status_code} {answer.text}")
            time.sleep(0.02)
    results.put((latencies, failures))


if __name__ == "__main__":
    sys.exit(main())
