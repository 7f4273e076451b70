#!/usr/bin/env python3
"""Attribution: a provider that fails *some* requests, side by side with one that fails none.

    python ops/bench_attribution.py                  # every scenario, 1000 records
    python ops/bench_attribution.py --only flaky --json attribution.json

Each scenario gets a fresh private Redis, a fresh real worker process and the stub,
scripted per case; all are killed after it. Seconds run from the enqueue (one
``enqueue_many``) to the last record delivered. Scenarios:

- ``fault_free``: N records, the stub answers every request;
- ``first_dropped``: the stub drops each record's first request (a stale keep-alive
  connection), the second succeeds: seconds and their ratio to fault-free (target <= 2);
- ``flaky``: 100 records each answered ``-18``, HTTP 503, then ``0``, after a 3 s account
  block (``-1`` to everything): seconds to all delivered (target <= 30);
- ``random30``: 30 % of requests answered 503 at random (seed 7), 12 attempts: deliveries/s
  and their ratio to fault-free (target >= 0.6);
- ``poison``: 300 good records over 3 apps plus 3 records the stub always fails (503,
  a redirect, or a 3 s answer): seconds until the good 300 are delivered against 300
  fault-free, and the attempts each poison record spent before its dead letter.

``p90_s`` is the seconds until 90 % were delivered and ``p90_ratio`` compares it with
fault-free (time for ``first_dropped``, deliveries/s for ``random30``): with few records
the last retries' backoff, not the fleet's rate, sets the total.
Holds and pauses are the worker's ``postback.outage`` and ``postback.paused`` log lines.
The machine may be shared: compare the figures of one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.local.stub import ProviderStub
from worker.state import keys
from worker.state.connection import connect
from worker.state.store import Store

KEY, SECRET = "attribution-key", "attribution-secret"
SETTINGS: dict[str, object] = {
    "max_attempts": 6,
    "backoff_base_s": 0.2,
    "backoff_cap_s": 1,
    "pause_s": 5,
    "outage_probe_cap_s": 5,
    "connect_timeout_s": 0.5,
    "read_timeout_s": 0.5,
    "keep_delivered_s": 3600,
    "log_level": "INFO",
}
Report = dict[str, Any]
POISONS = ("503", "redirect", "slow:3")


@dataclass
class Fleet:
    """One scenario's private Redis, stub and worker."""

    store: Store
    stub: ProviderStub
    worker: WorkerProcess
    p90: float | None = None

    def lines(self, event: str) -> int:
        """How many log lines of the worker name ``event``."""
        count = 0
        for line in Path(self.worker.log_path).read_text(errors="replace").splitlines():
            try:
                count += json.loads(line).get("event") == event
            except (ValueError, AttributeError):
                continue
        return count

    def dead(self) -> int:
        return int(self.store.redis.zcard(keys.DEAD))

    def wait(self, ids: list[str], state: str, timeout_s: float) -> float | None:
        """Seconds until every delivery of ``ids`` is in ``state``; None on timeout.

        Also notes in ``p90`` the seconds until 90 % of them were (the retries' tail apart).
        """
        started, self.p90 = time.monotonic(), None
        while (took := round(time.monotonic() - started, 2)) < timeout_s:
            done = sum(1 for s in self.store.states(ids) if s == state)
            if self.p90 is None and done >= 0.9 * len(ids):
                self.p90 = took
            if done == len(ids):
                return took
            time.sleep(0.05)
        return None

    def count(self, ids: list[str], state: str) -> int:
        return sum(1 for s in self.store.states(ids) if s == state)

    def cpu_s(self) -> float:
        """The worker process's CPU seconds so far (user + system, from /proc)."""
        assert self.worker.process is not None
        fields = Path(f"/proc/{self.worker.process.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fleet(
    args: argparse.Namespace, name: str, stub_kw: dict[str, Any], **env: object
) -> Iterator[Fleet]:
    """A fresh Redis, stub and ready worker for one scenario; all are killed after."""
    root = Path(tempfile.mkdtemp(prefix=f"backfill-attr-{name}-"))
    with ExitStack() as stack:
        server = LocalRedis(root / "redis").start()
        stack.callback(server.kill)
        stub_kw = {"latency_s": args.latency_ms / 1000.0, **stub_kw}
        stub = ProviderStub(KEY, SECRET, **stub_kw).start()
        stack.callback(stub.stop)
        settings = {**SETTINGS, "scheduler_tick_s": args.tick, **env}
        worker = WorkerProcess(
            local_env(server.url, stub.url, KEY, SECRET, **settings),
            root / "worker.log",
            concurrency=args.concurrency,
        )
        stack.callback(worker.kill)
        worker.start().wait_ready(60)
        store = Store(connect(server.url), dedupe_ttl_s=3600, keep_delivered_s=3600)
        yield Fleet(store, stub, worker)


def records(count: int, tag: str, apps: int = 1) -> list[BackfillRecord]:
    return [
        BackfillRecord(
            f"app-{tag}-{i % apps}", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"{tag}-{i}"
        )
        for i in range(count)
    ]


def ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 2) if num and den else None


def enqueue(f: Fleet, batch: list[BackfillRecord]) -> list[str]:
    return [delivery_id for delivery_id, _ in f.store.enqueue_many(batch, source="bench")]


def fault_free(args: argparse.Namespace, _: dict[str, Report]) -> Report:
    with fleet(args, "free", {}) as f:
        cpu = f.cpu_s()
        ids = enqueue(f, records(args.records, "free"))
        took = f.wait(ids, "delivered", args.timeout)
        return {
            "cpu_ms_per_record": round((f.cpu_s() - cpu) * 1000 / args.records, 2),
            "seconds": took,
            "p90_s": f.p90,
            "per_s": round(args.records / took, 1) if took else None,
            "requests": len(f.stub.seen()),
            "delivered": f.count(ids, "delivered"),
            "dead": f.dead(),
        }


def first_dropped(args: argparse.Namespace, done: dict[str, Report]) -> Report:
    with fleet(args, "drop", {}) as f:
        batch = records(args.records, "drop")
        f.stub.set_plan({str(r.msgid): ["drop"] for r in batch})
        cpu = f.cpu_s()
        ids = enqueue(f, batch)
        took = f.wait(ids, "delivered", args.timeout)
        base = done.get("fault_free", {})
        return {
            "cpu_ms_per_record": round((f.cpu_s() - cpu) * 1000 / args.records, 2),
            "seconds": took,
            "p90_s": f.p90,
            "ratio_to_fault_free": ratio(took, base.get("seconds")),
            "p90_ratio": ratio(f.p90, base.get("p90_s")),
            "target": "ratio <= 2",
            "requests": len(f.stub.seen()),
            "holds": f.lines("postback.outage"),
            "delivered": f.count(ids, "delivered"),
            "dead": f.dead(),
        }


def flaky(args: argparse.Namespace, _: dict[str, Report]) -> Report:
    with fleet(args, "flaky", {}) as f:
        batch = records(100, "flaky")
        f.stub.set_plan({str(r.msgid): ["status:-18", "503", "ok"] for r in batch})
        f.stub.set_down("status:-1")
        timer = threading.Timer(3.0, f.stub.set_down, args=(None,))
        timer.start()
        try:
            ids = enqueue(f, batch)
            took = f.wait(ids, "delivered", args.timeout)
        finally:
            timer.cancel()
        return {
            "seconds": took,
            "p90_s": f.p90,
            "target": "seconds <= 30",
            "requests": len(f.stub.seen()),
            "pauses": f.lines("postback.paused"),
            "holds": f.lines("postback.outage"),
            "delivered": f.count(ids, "delivered"),
            "dead": f.dead(),
        }


def random30(args: argparse.Namespace, done: dict[str, Report]) -> Report:
    stub_kw = {"fault_rate": 0.3, "faults": ("503",), "seed": 7}
    with fleet(args, "random", stub_kw, max_attempts=12) as f:
        cpu = f.cpu_s()
        ids = enqueue(f, records(args.records, "random"))
        took = f.wait(ids, "delivered", args.timeout)
        per_s = round(args.records / took, 1) if took else None
        base = done.get("fault_free", {})
        return {
            "cpu_ms_per_record": round((f.cpu_s() - cpu) * 1000 / args.records, 2),
            "seconds": took,
            "p90_s": f.p90,
            "per_s": per_s,
            "ratio_to_fault_free": ratio(per_s, base.get("per_s")),
            # deliveries/s up to the 90th percentile: the full-rate phase, retries' tail apart
            "p90_ratio": ratio(base.get("p90_s"), f.p90),
            "target": "ratio >= 0.6",
            "requests": len(f.stub.seen()),
            "holds": f.lines("postback.outage"),
            "delivered": f.count(ids, "delivered"),
            "dead": f.dead(),
        }


def poison_case(args: argparse.Namespace, poison: str | None) -> Report:
    tag = (poison or "none").replace(":", "")
    with fleet(args, f"poison-{tag}", {}) as f:
        good = records(300, f"good{tag}", apps=3)
        bad = records(3, f"bad{tag}") if poison else []
        f.stub.set_plan({str(r.msgid): [poison] * 50 for r in bad if poison})
        bad_ids = enqueue(f, bad) if bad else []
        good_ids = enqueue(f, good)
        took = f.wait(good_ids, "delivered", args.timeout)
        report: Report = {"good_seconds": took, "good_delivered": f.count(good_ids, "delivered")}
        if bad_ids:
            bad_took = f.wait(bad_ids, "dead", args.timeout)
            attempts = [int(f.store.redis.hget(keys.delivery(i), "c") or 0) for i in bad_ids]
            report |= {
                "poison_dead_after_s": bad_took,
                "poison_dead": f.count(bad_ids, "dead"),
                "poison_attempts": attempts,
                "pauses": f.lines("postback.paused"),
                "holds": f.lines("postback.outage"),
            }
        report["dead"] = f.dead()
        return report


def poison(args: argparse.Namespace, _: dict[str, Report]) -> Report:
    base = poison_case(args, None)
    report: Report = {"fault_free_300_seconds": base["good_seconds"]}
    for kind in POISONS:
        case = poison_case(args, kind)
        took, ref = case["good_seconds"], base["good_seconds"]
        case["ratio_to_fault_free"] = ratio(took, ref)
        report[kind] = case
    return report


SCENARIOS: dict[str, Callable[[argparse.Namespace, dict[str, Report]], Report]] = {
    "fault_free": fault_free,
    "first_dropped": first_dropped,
    "flaky": flaky,
    "random30": random30,
    "poison": poison,
}
NEEDS_BASELINE = {"first_dropped", "random30"}


COLUMNS = (("seconds", 9), ("p90_s", 7), ("ratio", 8), ("per_s", 8), ("requests", 10),
           ("pauses", 8), ("holds", 7), ("dead", 6))  # fmt: skip


def row(label: str, r: Report, note: str = "") -> str:
    """One table line: ``r``'s figures by column (``ratio`` is the ratio to fault-free)."""
    r = {**r, "ratio": r.get("ratio_to_fault_free")}
    cells = "".join(f"{'-' if r.get(k) is None else r[k]!s:>{w}}" for k, w in COLUMNS)
    return f"{label:<22}{cells}  {note}".rstrip()


def table(results: dict[str, Report]) -> list[str]:
    """One line per scenario (and per poison kind): the figures people judge."""
    rows = [f"{'scenario':<22}" + "".join(f"{k:>{w}}" for k, w in COLUMNS) + "  note"]
    for name, r in results.items():
        if name != "poison":
            p90 = f"p90 ratio {r['p90_ratio']}  " if "p90_ratio" in r else ""
            note = f"delivered {r.get('delivered')}  {p90}{r.get('target', '')}"
            rows.append(row(name, r, note))
            continue
        rows.append(row("poison: 300 clean", {"seconds": r["fault_free_300_seconds"]}))
        for kind in POISONS:
            c = r[kind]
            note = f"poison dead {c.get('poison_dead')}/3, attempts {c.get('poison_attempts')}"
            rows.append(row(f"poison: {kind}", {**c, "seconds": c["good_seconds"]}, note))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="N (default 1000)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--only", choices=sorted(SCENARIOS), help="run one scenario")
    parser.add_argument("--tick", type=float, default=0.05, help="scheduler tick, s")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0,
        help="the stub answers every request after this long (a far-away provider)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker -c: requests in flight at most (default: unset, sized from latency)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per wait, s")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.only is None else [args.only]
    if args.only in NEEDS_BASELINE:
        names.insert(0, "fault_free")
    results: dict[str, Report] = {}
    for name in names:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        results[name] = SCENARIOS[name](args, results)
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    report = {"records": args.records, "tick_s": args.tick, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
