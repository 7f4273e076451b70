"""The operators' reads never scan the keyspace: they read structures of their own.

``ops/bench_reads.py`` fills a private Redis with filler keys (``DEBUG POPULATE``), sends
real deliveries through the stub and a real worker, then makes every read (health with
and without --node, /metrics, status, find, dead list, the console's queries) and counts
the SCAN and KEYS calls Redis served meanwhile (``INFO commandstats``). Timings are the
script's to print, not a test's to assert; with BACKFILL_TEST_KEYS=10000000 this runs
at the scale the figures in docs/operating-at-scale.md were taken at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from worker.console import queries
from worker.local.processes import LocalRedis
from worker.state import keys

ROOT = Path(__file__).resolve().parent.parent


def test_every_read_answers_without_a_scan_among_many_keys(tmp_path: Path) -> None:
    out = tmp_path / "reads.json"
    count = os.environ.get("BACKFILL_TEST_KEYS", "300000")
    result = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "bench_reads.py"), "--keys", count,
         "--delivered", "300", "--dead", "100", "--waiting", "100", "--repeat", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=1800, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["keys"] >= int(count)
    rows = {row["read"]: row for row in figures["reads"]}
    assert len(rows) == 11
    assert {name: row["scan_calls"] for name, row in rows.items()} == dict.fromkeys(rows, 0)
    assert rows["backfill health"]["answer"].startswith("exit 0: healthy")
    assert rows["backfill health --node"]["answer"].startswith("exit 0: healthy")
    assert rows["/metrics"]["answer"] == "backfill_pending 100.0"
    assert rows["console overview"]["answer"].startswith("1 worker(s), window ≈ 300,")
    assert rows["console dead letters"]["answer"] == "1 group(s) of 100"
    assert rows["console purge-all count"]["answer"] == "100"
    for name in ("status", "find --app-id", "find --msgid", "dead list"):
        assert rows[f"backfill {name}"]["answer"].startswith("exit 0")


@pytest.fixture
def client(private_redis: LocalRedis) -> redis.Redis:
    return redis.Redis(port=private_redis.port, decode_responses=True)


def test_the_dedupe_window_count_is_summed_by_the_hour_and_marked_an_estimate(
    client: redis.Redis,
) -> None:
    now = 1_700_000_000_000
    hour = now // keys.COUNTED_HOUR_MS
    client.set(keys.delivered_in_hour(hour), 5)
    client.set(keys.delivered_in_hour(hour - 2), 7)  # within a 3 h window
    client.set(keys.delivered_in_hour(hour - 4), 11)  # past it
    client.set(keys.delivered_in(now // keys.COUNTED_EVERY_MS), 2)
    found = queries.recent(client, now, window_s=3 * 3600)
    assert (found.minute, found.hour, found.window, found.exact) == (2, 2, 12, False)
