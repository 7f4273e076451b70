#!/usr/bin/env python3
"""Rate-limit run: how close a fleet with BACKFILL_RATE_LIMIT comes to its limit.

Several real workers (``--workers``, 8 threads each) share one private Redis and the
stub; N records are bulk-enqueued and the stub's receive times give the send rate. The
test suite asserts only what is certain (never above the limit); this prints the rate
itself, which a busy machine lowers.

    python ops/bench_rate_limit.py --limit 40 --records 320 --workers 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.local.stub import ProviderStub
from worker.state.connection import connect
from worker.state.store import Store

KEY, SECRET = "rate-key", "rate-secret"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=40.0)
    parser.add_argument("--records", type=int, default=320)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="backfill-rate-"))
    with LocalRedis(root / "redis") as server, ProviderStub(KEY, SECRET) as stub:
        env = local_env(server.url, stub.url, KEY, SECRET, rate_limit=args.limit)
        workers = [
            WorkerProcess(env, root / f"worker-{n}.log", concurrency=8).start()
            for n in range(args.workers)
        ]
        try:
            for worker in workers:
                worker.wait_ready(60)
            store = Store(connect(server.url), dedupe_ttl_s=3600)
            batch = [
                BackfillRecord("rate", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"r-{i}")
                for i in range(args.records)
            ]
            ids = [d for d, _ in store.enqueue_many(batch, source="bench")]
            while store.states(ids).count("delivered") < len(ids):
                time.sleep(0.1)
        finally:
            for worker in workers:
                worker.stop(timeout_s=30)
        times = sorted(float(str(r["received_at"])) for r in stub.requests())
    measured = (len(times) - 1) / (times[-1] - times[0])
    report = {
        "limit_per_s": args.limit,
        "workers": args.workers,
        "records": len(times),
        "measured_per_s": round(measured, 1),
        "ratio": round(measured / args.limit, 3),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
