#!/usr/bin/env python3
"""Far-away providers: one worker process against a stub that answers after a latency.

    python ops/bench_latency.py --baseline /tmp/main-checkout --json latency.json
    python ops/bench_latency.py --quick
    python ops/bench_latency.py --baseline /tmp/main-checkout --latencies 5 --rotate 4

For each provider latency (``--latencies``, ms: 5 and 150) the stub answers every call
after that long, and each system below delivers the same records through the same
private Redis, one after the other, ``--runs`` times (the machine is shared: compare the
systems of one run, side by side):

- ``raw``: the same signed POSTs through ``ProviderClient.send`` from N threads, no queue
  (N: the largest fixed concurrency);
- ``ours``: one default worker process (no ``-c``: requests in flight sized from the
  provider's latency), and ``ours -c N`` for each fixed N (``--fixed``);
- ``base``: the same from another checkout (``--baseline``, e.g. main before a change),
  default and ``-c`` of ``--baseline-fixed``;
- ``dramatiq``: the peer, a minimal actor doing the same POST (``ops/peer_dramatiq.py``,
  the ``bench`` extra), one process with as many threads as the best fixed ``-c`` of ours.

With ``--rotate K`` it runs, instead, ours default, the baseline's default and dramatiq K
times each in a rotating order, and adds each one's median: for figures too close to call
from one run on a shared machine.

Figures per system: deliveries/s (first to last delivery the stub saw), worker CPU ms per
delivery (the whole process tree), Redis CPU us per delivery (INFO cpu, enqueue
included), peak RSS, and for ours Redis bytes per delivered record (lookup index on,
compacted at once). Linux only: it reads /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import (
    APP_ID,
    BATCH,
    KEY,
    NUMBER,
    SECRET,
    TIME_MS,
    _used_memory,
    hammer,
    provider_sender,
    stub_call,
)

from worker.deliver.provider import ProviderClient
from worker.local.processes import LocalRedis, free_port, local_env
from worker.operate.errors import BackfillError
from worker.state.connection import connect

OPS = Path(__file__).resolve().parent
Row = dict[str, object]


@dataclass
class Rig:
    """A private Redis and the stub; what each system runs against."""

    root: Path
    redis: LocalRedis
    stub_port: int = field(default_factory=free_port)
    stub: subprocess.Popen[bytes] | None = None

    @property
    def stub_url(self) -> str:
        return f"http://127.0.0.1:{self.stub_port}/sms"

    def start_stub(self, latency_ms: float) -> None:
        self.stop_stub()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env |= {"BACKFILL_API_KEY": KEY, "BACKFILL_API_SECRET": SECRET}
        with (self.root / "stub.log").open("ab") as log:
            self.stub = subprocess.Popen(
                [sys.executable, "-m", "worker", "stub", f"--port={self.stub_port}",
                 f"--latency-ms={latency_ms:g}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                stub_call(self.stub_port, "GET", "/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise BackfillError("the stub did not start")

    def stop_stub(self) -> None:
        if self.stub is not None and self.stub.poll() is None:
            self.stub.terminate()
            self.stub.wait(10)

    def redis_cpu(self) -> float:
        info = connect(self.redis.url).info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def tree(pid: int) -> list[int]:
    """A process and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree_rss_mb(pid: int) -> float:
    peak = 0.0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def enqueue_child(kind: str, count: int, tag: str) -> None:
    """(In a child process) enqueue ``count`` records the way ``kind`` takes them."""
    from worker.enqueue.record import BackfillRecord

    rows = [BackfillRecord(APP_ID, NUMBER, TIME_MS, msgid=f"{tag}-{i}") for i in range(count)]
    if kind == "dramatiq":
        sys.path.insert(0, str(OPS))
        from peer_dramatiq import deliver

        for r in rows:
            deliver.send(r.app_id, r.msgid or "", r.number, r.time)
        return
    from worker.runtime import get_store

    store = get_store()
    for start in range(0, len(rows), BATCH):
        store.enqueue_many(rows[start : start + BATCH], source="bench")


def delivered_span(rig: Rig, count: int, timeout_s: float) -> float:
    """Wait until the stub accepted ``count`` records; seconds from the first to the last."""
    deadline = time.monotonic() + timeout_s
    while json.loads(stub_call(rig.stub_port, "GET", "/_stub/stats"))["accepted"] < count:
        if time.monotonic() > deadline:
            raise BackfillError(f"fewer than {count} records delivered after {timeout_s:g} s")
        time.sleep(0.1)
    times = sorted(
        r["received_at"] for r in json.loads(stub_call(rig.stub_port, "GET", "/_stub/requests"))
    )
    return max(times[-1] - times[0], 1e-3)


def run_worker(
    rig: Rig, name: str, count: int, argv_env: tuple[list[str], dict[str, str]], kind: str
) -> Row:
    """Start one system's worker, enqueue ``count`` records, measure, stop it."""
    command, env = argv_env
    client = connect(rig.redis.url)
    client.flushdb()
    stub_call(rig.stub_port, "POST", "/_stub/reset")
    with (rig.root / f"{name.replace(' ', '_')}.log").open("ab") as log:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=OPS,
        )  # fmt: skip
    try:
        time.sleep(4.0)  # started and idle (each polls Redis for work)
        if process.poll() is not None:
            raise BackfillError(f"{name} exited; see {rig.root}")
        memory = _used_memory_of(client)
        cpu, redis_cpu = tree_cpu(process.pid), rig.redis_cpu()
        commands = _command_usec(client)
        enqueue = [sys.executable, str(OPS / "bench_latency.py"), "--enqueue", kind, str(count)]
        subprocess.run([*enqueue, name.replace(" ", "_")], env=env, check=True, cwd=OPS)
        span = delivered_span(rig, count, timeout_s=max(120.0, count / 10))
        time.sleep(0.3)  # the last outcomes recorded
        spent = {k: v - commands.get(k, 0.0) for k, v in _command_usec(client).items()}
        top = sorted(spent, key=lambda k: -spent[k])[:6]
        _say(
            f"    {name}: Redis us per delivery: "
            + ", ".join(f"{k} {spent[k] / count:.1f}" for k in top)
        )
        row: Row = {
            "system": name,
            "deliveries_per_s": (count - 1) / span,
            "cpu_ms_per_delivery": (tree_cpu(process.pid) - cpu) / count * 1000,
            "redis_cpu_us_per_delivery": (rig.redis_cpu() - redis_cpu) / count * 1e6,
            "rss_mb": tree_rss_mb(process.pid),
        }
        if kind == "ours":
            row["bytes_per_delivered"] = (_used_memory_of(client) - memory) / count
        return row
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)


def _command_usec(client: Any) -> dict[str, float]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _used_memory_of(client: object) -> int:
    class _S:  # bench._used_memory takes a store
        redis = client

    return _used_memory(_S())  # type: ignore[arg-type]


def ours(
    rig: Rig, concurrency: int | None, pythonpath: str | None
) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, **local_env(rig.redis.url, rig.stub_url, KEY, SECRET, keep_delivered_s=0)}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, "-m", "worker", "worker"]
    return command + ([f"--concurrency={concurrency}"] if concurrency else []), env


def dramatiq_cmd(rig: Rig, threads: int) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PEER_REDIS_URL": rig.redis.url, "PEER_BASE_URL": rig.stub_url,
            "PEER_API_KEY": KEY, "PEER_API_SECRET": SECRET, "PYTHONPATH": str(OPS)}  # fmt: skip
    command = [sys.executable, "-m", "dramatiq", "peer_dramatiq", "--processes", "1",
               "--threads", str(threads), "--queues", "peer"]  # fmt: skip
    return command, env


def raw(rig: Rig, threads: int, seconds: float) -> Row:
    client = ProviderClient(rig.stub_url, KEY, SECRET)
    started, cpu = time.monotonic(), time.process_time()
    rate = hammer(threads, seconds, provider_sender(client))
    cpu, took = time.process_time() - cpu, time.monotonic() - started
    stub_call(rig.stub_port, "POST", "/_stub/reset")
    return {"system": f"raw loop, {threads} threads", "deliveries_per_s": rate,
            "cpu_ms_per_delivery": cpu / (rate * took) * 1000}  # fmt: skip


def one_run(rig: Rig, args: argparse.Namespace, latency: float, run: int) -> list[Row]:
    count = args.records if latency >= 50 else args.records * 2
    print(f"  run {run}, latency {latency:g} ms, {count} records", file=sys.stderr, flush=True)
    rig.start_stub(latency)
    rows = [raw(rig, max(args.fixed), 3.0 if args.quick else 6.0)]
    rows.append(run_worker(rig, "ours default", count, ours(rig, None, None), "ours"))
    for c in args.fixed:
        rows.append(run_worker(rig, f"ours -c {c}", count, ours(rig, c, None), "ours"))
    if args.baseline:
        rows.append(run_worker(rig, "base default", count, ours(rig, None, args.baseline), "ours"))
        for c in args.baseline_fixed:
            rows.append(run_worker(rig, f"base -c {c}", count, ours(rig, c, args.baseline), "ours"))
    if not args.no_peer:
        fixed = [r for r in rows if str(r["system"]).startswith("ours -c")]
        best = max(fixed, key=lambda r: float(r["deliveries_per_s"]))  # type: ignore[arg-type]
        threads = max(16, int(str(best["system"]).split()[-1]))
        rows.append(
            run_worker(
                rig, f"dramatiq {threads} threads", count, dramatiq_cmd(rig, threads), "dramatiq"
            )
        )
    for row in rows:
        row |= {"latency_ms": latency, "run": run, "records": count}
    return rows


def rotation(rig: Rig, args: argparse.Namespace, latency: float) -> list[Row]:
    """``--rotate K``: ours default, the baseline's default and dramatiq, K times each, in
    a rotating order (each goes first, second and third in turn), so neither the order
    nor a slow minute of a shared machine favours one; the table then gives the medians."""
    count = args.records if latency >= 50 else args.records * 2
    rig.start_stub(latency)
    threads = max(args.fixed)
    systems = [("ours default", lambda: ours(rig, None, None), "ours")]
    if args.baseline:
        systems.append(("base default", lambda: ours(rig, None, args.baseline), "ours"))
    if not args.no_peer:
        systems.append(
            (f"dramatiq {threads} threads", lambda: dramatiq_cmd(rig, threads), "dramatiq")
        )
    rows: list[Row] = []
    for turn in range(args.rotate):
        print(f"  turn {turn + 1}, latency {latency:g} ms, {count} records", file=sys.stderr)
        shift = turn % len(systems)
        for name, command, kind in systems[shift:] + systems[:shift]:
            row = run_worker(rig, name, count, command(), kind)
            rows.append(row | {"latency_ms": latency, "run": turn + 1, "records": count})
    for name, _, _ in systems:
        mine = [r for r in rows if r["system"] == name]
        median: Row = {"system": name, "latency_ms": latency, "run": "med", "records": count}
        for key, _, _ in COLUMNS:
            values = [float(r[key]) for r in mine if isinstance(r.get(key), int | float)]  # type: ignore[arg-type]
            if values:
                median[key] = statistics.median(values)
        rows.append(median)
    return rows


COLUMNS = (  # (key, heading, digits)
    ("deliveries_per_s", "deliv/s", 0),
    ("cpu_ms_per_delivery", "CPU ms", 2),
    ("redis_cpu_us_per_delivery", "Redis us", 0),
    ("rss_mb", "RSS MB", 0),
    ("bytes_per_delivered", "B/deliv", 0),
)


def _cell(row: Row, key: str, digits: int) -> str:
    value = row.get(key)
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    """The rows for people: one line per system, run and latency."""
    head = f"{'latency':>7} {'run':>3}  {'system':<26}"
    lines = [head + "".join(f" {heading:>9}" for _, heading, _ in COLUMNS)]
    for r in rows:
        cells = "".join(f" {_cell(r, key, digits):>9}" for key, _, digits in COLUMNS)
        lines.append(f"{r['latency_ms']:>7g} {r['run']:>3}  {r['system']!s:<26}" + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_latency", description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument(
        "--latencies", type=lambda t: [float(x) for x in t.split(",")], default=[5.0, 150.0]
    )
    parser.add_argument(
        "--records", type=int, default=3000, help="per system (twice that under 50 ms)"
    )
    parser.add_argument("--fixed", type=ints, default=[16, 64, 128], help="fixed -c values of ours")
    parser.add_argument("--baseline", help="another checkout (PYTHONPATH) measured side by side")
    parser.add_argument("--baseline-fixed", type=ints, default=[64])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip dramatiq")
    parser.add_argument("--quick", action="store_true", help="300 records, one run, 5 and 150 ms")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--rotate", type=int, default=0,
        help="instead of runs: ours default, --baseline's default and dramatiq, K times each"
        " in a rotating order, with the medians",
    )  # fmt: skip
    parser.add_argument("--enqueue", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.enqueue:
        enqueue_child(args.enqueue[0], int(args.enqueue[1]), args.enqueue[2])
        return 0
    if args.quick:
        args.records, args.runs, args.fixed, args.baseline_fixed = 300, 1, [16], [16]
    root = Path(tempfile.mkdtemp(prefix="backfill-latency-"))
    rig = Rig(root, LocalRedis(root / "redis"))
    rows: list[Row] = []
    try:
        rig.redis.start()
        for run in range(1, 0 if args.rotate else args.runs + 1):
            for latency in args.latencies:
                rows += one_run(rig, args, latency, run)
        for latency in args.latencies if args.rotate else ():
            rows += rotation(rig, args, latency)
    except BackfillError as exc:
        print(f"bench failed: {exc} (logs in {root})", file=sys.stderr)
        return 1
    finally:
        rig.stop_stub()
        rig.redis.stop()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
