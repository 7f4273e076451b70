#!/usr/bin/env python3
"""Chaos run: prove that nothing enqueued is lost while workers and Redis are killed.

A private Redis with AOF (appendfsync everysec), the stub injecting faults on a share of
attempts, two or more real workers. N distinct records are enqueued; a random worker is
SIGKILLed every few seconds and restarted (at most ``--max-kills`` times); once 30 % are
finished, Redis is SIGKILLed and restarted from its AOF; once 60 % are finished, the
provider goes down for longer than the whole retry window (``--outage-s``: every request
answered 503 for the first half, its connection cut for the second). Then it waits for
every record and reports delivered, dead, lost (must be 0), duplicates seen by the stub,
attempts, outage holds and time. Exit 0 only when every record finished, none is lost
and none is dead (every fault the run injects is transient, the outage included).

    python ops/chaos.py --records 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.deliver.policy import retry_window
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.local.stub import ProviderStub

KEY, SECRET = "chaos-key", "chaos-secret"
MAX_ATTEMPTS, BACKOFF_BASE_S, BACKOFF_CAP_S = 12, 0.1, 2.0
FAULTS = ("status", "500", "503", "429:1", "slow:2", "drop", "nonjson")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="backfill-chaos-"))
    rng = random.Random(args.seed)
    server = LocalRedis(root / "redis", appendonly=True)
    stub = ProviderStub(KEY, SECRET, fault_rate=args.fault_rate, faults=FAULTS, seed=args.seed)
    workers: list[WorkerProcess] = []
    report: dict[str, Any] = {}
    try:
        server.start()
        stub.start()
        env = _worker_env(server.url, stub.url)
        os.environ.update(env)
        workers = [
            WorkerProcess(env, root / f"worker-{i}.log", concurrency=args.concurrency).start()
            for i in range(args.workers)
        ]
        for worker in workers:
            worker.wait_ready(60)
        started = time.monotonic()
        ids = _enqueue(args.records, args.seed)
        print(f"enqueued {len(ids)} in {time.monotonic() - started:.1f} s; logs in {root}")
        report = _torment(args, rng, server, workers, ids, started, stub)
        report.update(_count(ids, stub, args.seed))
        report["outage_holds"] = sum(_holds(w.log_path) for w in workers)
        report["seconds"] = round(time.monotonic() - started, 1)
    finally:
        for worker in workers:
            worker.stop(timeout_s=30)
        stub.stop()
        server.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    good = report.get("lost") == 0 and report.get("dead") == 0 and report.get("finished")
    return 0 if good else 1


def _holds(log_path: Path) -> int:
    if not log_path.exists():
        return 0
    return sum('"event":"postback.outage"' in line for line in log_path.open(errors="replace"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--max-kills", type=int, default=0, help="worker kills at most (0: no cap)")
    parser.add_argument(
        "--outage-s", type=float, default=20.0,
        help="how long the provider is down (longer than the retry window); 0: no outage",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir")
    parser.add_argument("--json", help="also write the report here")
    return parser


def _worker_env(redis_url: str, stub_url: str) -> dict[str, str]:
    return local_env(
        redis_url,
        stub_url,
        KEY,
        SECRET,
        # 12 attempts: a 20 % fault share exhausts a delivery once in 4e8; the retry window
        # (15.1 s) is shorter than the outage phase, which must not dead-letter anything
        max_attempts=MAX_ATTEMPTS,
        backoff_base_s=BACKOFF_BASE_S,
        backoff_cap_s=BACKOFF_CAP_S,
        connect_timeout_s=1,
        read_timeout_s=1,
    )


def _enqueue(count: int, seed: int) -> list[str]:
    from worker.runtime import get_store

    store = get_store()
    base_ms = 1_700_000_000_000 + seed * 10**7
    ids: list[str] = []
    created = 0
    for start in range(0, count, 1000):
        # every record distinct (msgid, number, time): a delivery_id is derived from the
        # record, so two equal records would be one delivery and the count would lie
        batch = [
            BackfillRecord(f"chaos-{i % 7}", f"8613{i:09d}", str(base_ms + i), msgid=f"c{seed}-{i}")
            for i in range(start, min(start + 1000, count))
        ]
        for delivery_id, new in store.enqueue_many(batch, source="chaos"):
            ids.append(delivery_id)
            created += new
    if created != count or len(set(ids)) != count:
        raise SystemExit(f"chaos: {count} records made {created} new deliveries, not {count}")
    return ids


def _torment(
    args: argparse.Namespace,
    rng: random.Random,
    server: LocalRedis,
    workers: list[WorkerProcess],
    ids: list[str],
    started: float,
    stub: ProviderStub,
) -> dict[str, Any]:
    from worker.runtime import get_store

    store = get_store()
    outage = Outage(stub, args.outage_s)
    kills = redis_kills = 0
    next_kill = time.monotonic() + args.kill_every
    last_kill = started
    done = 0
    while time.monotonic() - started < args.timeout:
        done = _finished(store, ids)
        if done == len(ids):
            break
        now = time.monotonic()
        more = args.max_kills == 0 or kills < args.max_kills
        if more and now >= next_kill and done < len(ids) * 0.9:
            victim = rng.choice(workers)
            victim.kill()
            victim.start()
            kills += 1
            next_kill = now + args.kill_every
            last_kill = now
        if redis_kills == 0 and done >= len(ids) * 0.3:
            server.kill()
            time.sleep(1.0)
            server.start(timeout_s=60)
            redis_kills += 1
            print(f"  killed Redis at {done} done; restarted from its AOF")
        outage.tick(done >= len(ids) * 0.6)
        print(f"  {time.monotonic() - started:6.1f} s  finished {done}/{len(ids)}  kills {kills}")
        time.sleep(1.0)
    outage.tick(False, end=True)
    return {
        "retry_window_s": retry_window(MAX_ATTEMPTS, BACKOFF_BASE_S, BACKOFF_CAP_S),
        "outage_s": outage.lasted_s,
        "worker_kills": kills,
        "redis_kills": redis_kills,
        "finished": done == len(ids),
        # the tail: claims a killed worker held come back when their leases end
        "seconds_after_last_kill": round(time.monotonic() - last_kill, 1),
    }


class Outage:
    """The provider down once: 503 to everything for the first half, connections cut for
    the second, then up again."""

    def __init__(self, stub: ProviderStub, seconds: float) -> None:
        self._stub = stub
        self._seconds = seconds
        self._began = 0.0
        self.lasted_s = 0.0

    def tick(self, due: bool, *, end: bool = False) -> None:
        now = time.monotonic()
        if self._seconds <= 0 or self.lasted_s:
            return
        if not self._began and due and not end:
            self._stub.set_down("503")
            self._began = now
            print(f"  provider down for {self._seconds:g} s (503, then connections cut)")
        elif self._began and (end or now - self._began >= self._seconds):
            self._stub.set_down(None)
            self.lasted_s = round(now - self._began, 1)
            print(f"  provider up again after {self.lasted_s} s")
        elif self._began and now - self._began >= self._seconds / 2:
            self._stub.set_down("drop")


def _finished(store: Any, ids: list[str]) -> int:
    finished = 0
    for start in range(0, len(ids), 5000):
        states = store.states(ids[start : start + 5000])
        finished += sum(1 for s in states if s in ("delivered", "dead"))
    return finished


def _count(ids: list[str], stub: ProviderStub, seed: int) -> dict[str, Any]:
    from worker.runtime import get_store

    store = get_store()
    states: list[str | None] = []
    for start in range(0, len(ids), 5000):
        states.extend(store.states(ids[start : start + 5000]))
    received = {str(r["msgid"]) for r in stub.requests()}
    stats = stub.stats()
    delivered = states.count("delivered")
    dead = states.count("dead")
    # lost: enqueued, not dead-lettered, and the provider never got it
    lost = sum(1 for i, s in enumerate(states) if s != "dead" and f"c{seed}-{i}" not in received)
    return {
        "records": len(ids),
        "delivered": delivered,
        "dead": dead,
        "lost": lost,
        "provider_unique": len(received),
        "duplicates_seen_by_stub": stats["duplicates"],
        "attempts_seen_by_stub": stats["requests"],
        "faults_injected": stats["faults"],
    }


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
