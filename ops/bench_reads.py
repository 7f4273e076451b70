#!/usr/bin/env python3
"""How long the operators' reads take with millions of other keys in Redis.

Starts a private Redis, fills it with ``--keys`` filler keys (``DEBUG POPULATE``: about
1 GB for 10 million), the provider stub, one real worker (with /metrics) and a real
``backfill console``, and sends real deliveries through them: some delivered, some dead
(the stub answers -9), some waiting an hour; then pauses the fleet and enqueues
``--pending`` more, due now, which stay pending. Then times each read the way an
operator makes it, best of ``--repeat``, and counts the SCAN and KEYS calls each one
made (``INFO commandstats``): none should.

The CLI commands run in this process (click's runner), after one warm-up run, so the
figure is the command's work, not the interpreter's start-up (about 0.5 to 1 s more
for a fresh ``backfill`` process). The console's pages are asked over HTTP, as a
browser asks them (its confirmation pages by POST, with the form's token), and timed
to the last byte of the answer. Prints a table and, with --json PATH, the figures.

    python ops/bench_reads.py [--keys 10000000] [--delivered 3000] [--dead 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests

from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port, local_env
from worker.local.stub import ProviderStub

KEY, SECRET = "bench-key-0001", "bench-secret-never-logged"
APP = "bench-app"
USER, PASSWORD = "bench", "a-long-bench-password"
Read = Callable[[], str]


def scans(client: redis.Redis) -> int:
    """SCAN and KEYS calls Redis has served so far."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("scan", "keys"))


def cli(*args: str) -> Read:
    """A ``backfill`` command run in this process; returns its exit code and first line."""
    from click.testing import CliRunner

    from worker.cli import main

    def run() -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        lines = (result.stdout or result.stderr or "").strip().splitlines()
        return f"exit {result.exit_code}: {(lines[0] if lines else '')[:70]}"

    return run


@contextmanager
def console_process(env: dict[str, str], log: Path) -> Iterator[str]:
    """A real ``backfill console`` on a free port; its URL while it runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "console", "--port", str(port)],
            env={**os.environ, **env, "BACKFILL_CONSOLE_USERS": f"{USER}:{PASSWORD}"},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"the console did not start: see {log}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(15)


def console_reads(url: str, dead_id: str) -> dict[str, Read]:
    """Each console page over HTTP, as a browser asks it: what it answered, in short."""
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    page = session.get(f"{url}/dead", timeout=30).text
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    group = re.search(r'id="group-([0-9a-f]{16})"', page)
    if token is None or group is None:
        raise SystemExit("the console's dead-letter page has no form token or no group")

    def get(path: str, shape: Callable[[str], str]) -> Read:
        def read() -> str:
            answer = session.get(url + path, timeout=30)
            return f"{answer.status_code}: {shape(answer.text)}"

        return read

    def confirm(action: str, which: str) -> Read:
        form = {"csrf": token.group(1), "group": which}

        def read() -> str:
            answer = session.post(f"{url}/dead/{action}", data=form, timeout=30,
                                  headers={"Origin": url})  # fmt: skip
            return f"{answer.status_code}: {_confirmation(answer.text)}"

        return read

    reads = {"console overview": get("/", _overview)}
    for state, lane in (("pending", "bulk"), ("waiting", "bulk"), ("dead", ""),
                        ("delivered", "")):  # fmt: skip
        path = f"/list?state={state}" + (f"&lane={lane}" if lane else "")
        reads[f"console list: {state}"] = get(path, _rows)
    return reads | {
        "console delivery page": get(f"/deliveries/{dead_id}", _delivery),
        "console search: app_id": get(f"/deliveries?q={APP}", _found),
        "console search: msgid": get("/deliveries?q=b-0", _found),
        "console dead letters": get("/dead", _dead),
        "console replay all: confirm": confirm("replay", "all"),
        "console replay group: confirm": confirm("replay", group.group(1)),
        "console purge all: confirm": confirm("purge", "all"),
        "console purge group: confirm": confirm("purge", group.group(1)),
    }


def _overview(html: str) -> str:
    workers = re.search(r"live heartbeat</th><td class=\"num\">(\d+)<", html)
    bars, lanes = html.count('<g class="bar">'), html.count('<tr id="lane-')
    return f"{workers.group(1) if workers else '?'} worker(s), {bars} bars, {lanes} lanes"


def _rows(html: str) -> str:
    total = re.search(r'<p id="total">(\d+) ', html)
    rows = html.count('<td><a href="/deliveries/')
    return f"{rows} rows of {total.group(1) if total else '?'}"


def _delivery(html: str) -> str:
    state = re.search(r'<td id="state">([^<]*)<', html)
    attempts = html.count('<tr class="attempt">')
    return f"{state.group(1) if state else '?'}, {attempts} attempt(s)"


def _found(html: str) -> str:
    sections = re.findall(r"<h2>By (\w+): (\d+\+?)</h2>", html)
    return ", ".join(f"{kind} {count}" for kind, count in sections) or "none"


def _dead(html: str) -> str:
    total = re.search(r"(\d+) dead in all", html)
    groups = html.count('<section class="group"')
    return f"{groups} group(s), {total.group(1) if total else '?'} dead"


def _confirmation(html: str) -> str:
    count = re.search(r'id="confirm">\w+ (\d+)</button>', html)
    return f"count {count.group(1) if count else '?'}"


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


def held_pending(count: int) -> None:
    """Pause the fleet for an hour and enqueue ``count`` records due now: they stay pending."""
    from worker.runtime import get_store
    from worker.state import keys

    store = get_store()
    store.redis.set(keys.PAUSED, "bench: held so pending deliveries stay listed", px=3_600_000)
    made = [BackfillRecord(APP, "8613512345678", "1681184764000", msgid=f"p-{i}")
            for i in range(count)]  # fmt: skip
    for start in range(0, count, 1000):
        store.enqueue_many(made[start : start + 1000])


def settle(client: redis.Redis, dead: int, timeout_s: float = 900) -> str:
    """Wait until the worker has delivered or buried every due delivery; a dead letter's id."""
    from worker.state import keys

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        due = client.zcount(keys.LIVE, "-inf", "+inf") + client.zcount(
            keys.BULK, "-inf", int(time.time() * 1000)
        )
        if due == 0 and client.zcard(keys.DEAD) >= dead:
            return str(client.zrange(keys.DEAD, 0, 0)[0]) if dead else ""
        time.sleep(0.5)
    raise SystemExit("the worker did not settle the deliveries in time")


def measure(client: redis.Redis, reads: dict[str, Read], repeat: int) -> list[dict[str, Any]]:
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


def cli_reads(ids: dict[str, str], node: str, metrics_port: int) -> dict[str, Read]:
    """The CLI's reads and a worker's /metrics."""

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
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000_000, help="filler keys")
    parser.add_argument("--delivered", type=int, default=3000)
    parser.add_argument("--dead", type=int, default=1000)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--pending", type=int, default=1000, help="held by a pause")
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
        dead_id = settle(client, args.dead)
        held_pending(args.pending)
        with console_process(env, root / "console.log") as url:
            reads = cli_reads(ids, "bench@reads", metrics_port) | console_reads(url, dead_id)
            for read in reads.values():  # warm up: imports, connections, scripts
                read()
            rows = measure(client, reads, args.repeat)
        report(rows, int(client.dbsize()), filled, args.json)
    finally:
        worker.stop()
        stub.stop()
        server.stop()
    return 0


def report(rows: list[dict[str, Any]], dbsize: int, filled_s: float, path: str | None) -> None:
    print(f"{dbsize:,} keys in Redis")
    print(f"{'read':31} {'best s':>7} {'first s':>7} {'SCAN/KEYS':>9}  answer")
    for row in rows:
        print(f"{row['read']:31} {row['best_s']:7.3f} {row['first_s']:7.3f} "
              f"{row['scan_calls']:9d}  {row['answer']}")  # fmt: skip
    if path:
        figures = {"keys": dbsize, "filled_s": round(filled_s, 1), "reads": rows}
        Path(path).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(main())
