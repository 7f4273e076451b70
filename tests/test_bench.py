"""The benchmark runs end to end and reports every figure; no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the figures issue 6 names, and the ones the script adds for CPU and the stub's ceiling
FIGURES = (
    "raw_rps",
    "e2e_rps",
    "ratio",
    "enqueue_p50_ms",
    "enqueue_p99_ms",
    "bulk_enqueue_rps",
    "latency_p50_ms",
    "latency_p99_ms",
    "worker_rss_mb",
    "waiting_retry_rss_mb",
    "redis_mb_per_1k_waiting",
    "worker_cpu_s_per_1k",
    "stub_cpu_s_per_1k",
    "stub_ceiling_rps",
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
    for name in FIGURES:
        value = figures[name]
        assert isinstance(value, int | float), name
        assert math.isfinite(value), name
        assert name in result.stdout, name
