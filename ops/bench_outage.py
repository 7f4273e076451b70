#!/usr/bin/env python3
"""Outage run: a provider that answers 503 to everything for longer than the retry window.

One real worker (default concurrency) with a short retry window (3 attempts, backoff base
0.2 s, cap 1 s), a private Redis, the stub. N records are enqueued while the stub is down;
it comes back after ``--outage-s``. Prints what the issue asks to measure: requests the
provider received during the outage, seconds from its return to the last delivery, the
peak send rate (per second) in the first seconds after recovery, and dead letters (0).

    python ops/bench_outage.py --records 300 --outage-s 25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.local.stub import ProviderStub
from worker.state.connection import connect
from worker.state.store import Store

KEY, SECRET = "outage-key", "outage-secret"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--outage-s", type=float, default=25.0)
    parser.add_argument("--down", default="503", help="the stub's answer while down (503, drop)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="backfill-outage-"))
    with LocalRedis(root / "redis") as server, ProviderStub(KEY, SECRET) as stub:
        env = local_env(
            server.url, stub.url, KEY, SECRET,
            max_attempts=3, backoff_base_s=0.2, backoff_cap_s=1,
            connect_timeout_s=1, read_timeout_s=1,
        )  # fmt: skip
        worker = WorkerProcess(env, root / "worker.log").start()
        try:
            worker.wait_ready(60)
            report = _run(args, Store(connect(server.url), dedupe_ttl_s=3600), stub)
        finally:
            worker.stop(timeout_s=30)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["dead"] == 0 and report["delivered"] == args.records else 1


def _run(args: argparse.Namespace, store: Store, stub: ProviderStub) -> dict[str, Any]:
    batch = [
        BackfillRecord("app-outage", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"o-{i}")
        for i in range(args.records)
    ]
    stub.set_down(args.down)
    went_down = time.time()
    ids = [delivery_id for delivery_id, _ in store.enqueue_many(batch, source="bench")]
    time.sleep(args.outage_s)
    stub.set_down(None)
    came_back = time.time()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        states = store.states(ids)
        if all(s in ("delivered", "dead") for s in states):
            break
        time.sleep(0.05)
    finished = time.time()
    seen = [float(s["at"]) for s in stub.seen()]
    # the first request after the return is the hold's probe: the ramp starts there
    probe = min((at for at in seen if at >= came_back), default=came_back)
    after = [at - probe for at in seen if at >= probe]
    per_second = [sum(1 for t in after if n <= t < n + 1) for n in range(20)]
    return {
        "records": args.records,
        "outage_s": args.outage_s,
        "down_answer": args.down,
        "requests_during_outage": sum(1 for at in seen if went_down <= at < came_back),
        "seconds_from_return_to_first_probe": round(probe - came_back, 2),
        "seconds_from_return_to_last_delivery": round(finished - came_back, 2),
        "sends_per_second_from_the_probe": per_second,
        "peak_sends_per_second_first_5_s": max(per_second[:5]),
        "delivered": states.count("delivered"),
        "dead": states.count("dead"),
    }


if __name__ == "__main__":
    sys.exit(main())
