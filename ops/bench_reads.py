#!/usr/bin/env python3
"""How long the operators' reads take with millions of other keys in Redis.

Starts a private Redis, fills it with ``--keys`` filler keys (``DEBUG POPULATE``: about
1 GB for 10 million), the provider stub and one real worker (with /metrics), and sends
real deliveries through them: some delivered, some dead (the stub answers -9), some
waiting. Then times each read the way an operator makes it, best of ``--repeat``, and
counts the SCAN and KEYS calls each one made (``INFO commandstats``): none should.

The CLI commands run in this process (click's runner), after one warm-up run, so the
figure is the command's work, not the interpreter's start-up (about 0.5 to 1 s more
for a fresh ``backfill`` process). Prints a table and, with --json PATH, the figures.

    python ops/bench_reads.py [--keys 10000000] [--delivered 3000] [--dead 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests

from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port, local_env
from worker.local.stub import ProviderStub

KEY, SECRET = "bench-key-0001", "bench-secret-never-logged"
APP = "bench-app"


def scans(client: redis.Redis) -> int:
    """SCAN and KEYS calls Redis has served so far."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("scan", "keys"))


def cli(*args: str) -> Callable[[], str]:
    """A ``backfill`` command run in this process; returns its exit code and first line."""
    from click.testing import CliRunner

    from worker.cli import main

    def run() -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        lines = (result.stdout or result.stderr or "").strip().splitlines()
        return f"exit {result.exit_code}: {(lines[0] if lines else '')[:70]}"

    return run


def console_reads(queue: str) -> dict[str, Callable[[], str]]:
    """What the console's pages read (worker.console.queries and the Store)."""
    from worker.console import actions, queries
    from worker.runtime import get_store

    store = get_store()

    def overview() -> str:
        now = time.time()
        store.gauges(queue, now)
        store.pause_state()
        queries.outage_since(store)
        workers = len(store.beats())
        recent = queries.recent(store.redis, int(now * 1000), window_s=store.dedupe_ttl_s)
        oldest = queries.oldest_pending(store.redis, int(now * 1000))
        return f"{workers} worker(s), window ≈ {recent.window}, oldest read {oldest.read}"

    def dead_page() -> str:
        groups = queries.dead_groups(store)
        return f"{len(groups)} group(s) of {sum(g.count for g in groups)}"

    def search() -> str:
        ids, more = queries.find_ids(store, "app_id", APP, None, 50)
        return f"{len(queries.summaries(store.redis, ids))} rows, more: {bool(more)}"

    return {
        "console overview": overview,
        "console dead letters": dead_page,
        "console search by app_id": search,
        "console purge-all count": lambda: str(actions.count_group(store, actions.ALL)),
    }


def fill(client: redis.Redis, count: int) -> float:
    """Add ``count`` filler keys (none of the project's); the seconds it took."""
    started = time.perf_counter()
    done = 0
    while done < count:  # in steps, so one DEBUG call never blocks Redis for long
        step = min(1_000_000, count - done)
        client.execute_command("DEBUG", "POPULATE", step, f"filler{done}", 32)
        done += step
    return time.perf_counter() - started


def deliveries(stub: ProviderStub, delivered: int, dead: int, waiting: int) -> dict[str, str]:
    """Enqueue real records: ``dead`` the stub kills (-9), ``waiting`` due in an hour."""
    from worker.runtime import get_store, wake_message

    store = get_store()
    made = [
        BackfillRecord(APP, "8613512345678", "1681184764000", msgid=f"b-{i}")
        for i in range(delivered + dead + waiting)
    ]
    stub.set_plan({f"b-{i}": ["status:-9"] for i in range(delivered, delivered + dead)})
    queue, message = wake_message()
    for start in range(0, delivered + dead, 1000):
        batch = made[start : min(start + 1000, delivered + dead)]
        store.enqueue_many(batch, wake_queue=queue, wake=message)
    ids = store.enqueue_many(made[delivered + dead :], due_in_s=3600)
    return {"one": ids[0][0] if ids else "", "msgid": "b-0"}


def settle(client: redis.Redis, dead: int, timeout_s: float = 900) -> None:
    """Wait until the worker has delivered or buried every due delivery."""
    from worker.state import keys

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        due = client.zcount(keys.LIVE, "-inf", "+inf") + client.zcount(
            keys.BULK, "-inf", int(time.time() * 1000)
        )
        if due == 0 and client.zcard(keys.DEAD) >= dead:
            return
        time.sleep(0.5)
    raise SystemExit("the worker did not settle the deliveries in time")


def measure(
    client: redis.Redis, reads: dict[str, Callable[[], str]], repeat: int
) -> list[dict[str, Any]]:
    """Each read: best and first time (s), SCAN/KEYS calls, what it answered."""
    rows = []
    for name, read in reads.items():
        times, before = [], scans(client)
        for _ in range(repeat):
            started = time.perf_counter()
            answer = read()
            times.append(time.perf_counter() - started)
        rows.append({"read": name, "best_s": min(times), "first_s": times[0],
                     "scan_calls": scans(client) - before, "answer": answer})  # fmt: skip
    return rows


def reads_for(
    env: dict[str, str], ids: dict[str, str], node: str, metrics_port: int
) -> dict[str, Callable[[], str]]:
    def metrics() -> str:
        body = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        return next(
            (line for line in body.splitlines() if line.startswith("backfill_pending")), "?"
        )

    return {
        "backfill health": cli("health"),
        "backfill health --node": cli("health", "--node", node),
        "/metrics": metrics,
        "backfill status": cli("status", ids["one"]),
        "backfill find --app-id": cli("find", "--app-id", APP),
        "backfill find --msgid": cli("find", "--msgid", ids["msgid"]),
        "backfill dead list": cli("dead", "list"),
        **console_reads(env.get("BACKFILL_QUEUE", "backfill")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000_000, help="filler keys")
    parser.add_argument("--delivered", type=int, default=3000)
    parser.add_argument("--dead", type=int, default=1000)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="backfill-reads-bench-"))
    server = LocalRedis(root / "redis", extra_args=("--enable-debug-command", "local")).start()
    stub = ProviderStub(KEY, SECRET).start()
    metrics_port = free_port()
    env = local_env(server.url, stub.url, KEY, SECRET, metrics_port=metrics_port,
                    log_level="INFO", keep_delivered_s=3600)  # fmt: skip
    os.environ.update(env)
    worker = WorkerProcess(env, root / "worker.log", extra_args=("--hostname", "bench@reads"))
    try:
        client = redis.Redis(port=server.port, decode_responses=True)
        filled = fill(client, args.keys)
        print(f"filled {args.keys:,} keys in {filled:.1f} s", file=sys.stderr)
        worker.start().wait_ready(120)
        ids = deliveries(stub, args.delivered, args.dead, args.waiting)
        settle(client, args.dead)
        reads = reads_for(env, ids, "bench@reads", metrics_port)
        for read in reads.values():  # warm up: imports, connections, scripts
            read()
        rows = measure(client, reads, args.repeat)
        report(rows, int(client.dbsize()), args.json)
    finally:
        worker.stop()
        stub.stop()
        server.stop()
    return 0


def report(rows: list[dict[str, Any]], dbsize: int, path: str | None) -> None:
    print(f"{dbsize:,} keys in Redis")
    print(f"{'read':28} {'best s':>8} {'first s':>8} {'SCAN/KEYS':>9}  answer")
    for row in rows:
        print(f"{row['read']:28} {row['best_s']:8.3f} {row['first_s']:8.3f} "
              f"{row['scan_calls']:9d}  {row['answer']}")  # fmt: skip
    if path:
        Path(path).write_text(json.dumps({"keys": dbsize, "reads": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
