"""The benchmark runs end to end and reports every figure; no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every row of the bench's table (ops/bench.py ROWS): issues 6 and 11 name most of them
FIGURES = (
    "stub_ceiling_rps",
    "stub_ceiling_cpu_pct",
    "raw_rps",
    "raw_cpu_us_per_request",
    "e2e_rps",
    "ratio",
    "cpu_ratio",
    "redis_cpu_us_per_delivery",
    "redis_bytes_per_pending",
    "redis_bytes_per_delivered",
    "redis_bytes_per_retry_3",
    "live_latency_p50_ms",
    "live_latency_max_ms",
    "e2e_rps_cores",
    "ratio_cores",
    "cpu_ratio_cores",
    "redis_cpu_us_cores",
    "enqueue_p50_ms",
    "enqueue_p99_ms",
    "bulk_enqueue_rps",
    "latency_p50_ms",
    "latency_p99_ms",
    "worker_rss_mb",
    "worker_cpu_s_per_1k",
    "stub_cpu_s_per_1k",
    "idle_rss_mb",
    "waiting_retry_rss_mb",
)


def test_quick_bench_prints_and_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    # the table's rows, by the figure's name that begins each
    printed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    for name in FIGURES:
        value = figures[name]
        assert isinstance(value, int | float), name
        assert math.isfinite(value), name
        assert name in printed, name
