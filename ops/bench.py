#!/usr/bin/env python3
"""The benchmark: what the queue costs next to the HTTP call, and what Redis holds.

    python ops/bench.py --json bench.json     # about 3 minutes
    python ops/bench.py --quick               # under a minute

One run on this machine, on a private Redis, with the project's stub as the provider
(a subprocess, so its CPU is counted apart from the worker's):

1. the stub's own ceiling, and the raw baseline: the same signed POSTs through
   ``ProviderClient.send`` from N threads, no queue, with the CPU it costs per request;
2. ``enqueue_backfill`` latency (single calls) and bulk enqueue rows/s;
3. Redis memory per pending delivery, and per waiting retry with 3 attempts of history;
4. end to end: records bulk-enqueued and drained by real workers with the production
   defaults; worker and Redis CPU per delivery; Redis memory per delivered record;
5. enqueue-to-delivered latency at a light load, and of live records sent while a bulk
   backlog drains (enqueue to the provider's receipt);
6. the end-to-end drain again with one worker process per core;
7. deliveries waiting for retry: worker RSS.

It prints a table and writes the figures as JSON (``--json``). Linux only: it reads /proc.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TextIO

from worker.deliver.provider import PATH, ProviderClient, build_body, build_headers
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port, local_env
from worker.operate.audit import configure_logging
from worker.operate.errors import BackfillError
from worker.settings import ENV_PREFIX
from worker.state.store import Store

KEY, SECRET = "bench-key", "bench-secret-not-for-production"
APP_ID, NUMBER, TIME_MS = "bench-app", "8613512345678", "1700000000000"
BATCH = 1000  # rows per Store.enqueue_many call, as `backfill enqueue --file` sends them
LIGHT_GAP_S = 0.02  # between single enqueues in the light-load phase
Figures = dict[str, float]
SenderFactory = Callable[[str], Callable[[int], bool]]


@dataclass(frozen=True)
class Sizes:
    """How much each phase does; ``--quick`` scales everything down."""

    records: int
    single_enqueues: int
    bulk_rows: int
    light_records: int
    waiting: int
    backlog: int  # bulk records draining while the live records are sent
    live: int
    loop_s: float  # how long the stub-ceiling and raw-baseline loops run
    settle_s: float  # how long workers run with the waiting retries before RSS is read


FULL = Sizes(20_000, 2_000, 50_000, 200, 20_000, 30_000, 20, loop_s=5.0, settle_s=5.0)
QUICK = Sizes(2_000, 300, 5_000, 30, 2_000, 3_000, 5, loop_s=2.0, settle_s=2.0)
LIVE_GAP_S = 0.25  # between the live records sent during the backlog
# (key, unit, what it is); the key names the figure in the JSON and the table alike
ROWS = (
    ("stub_ceiling_rps", "req/s", "stub alone: keep-alive http.client, N threads"),
    ("stub_ceiling_cpu_pct", "%", "stub CPU (of one core) during that ceiling run"),
    ("raw_rps", "req/s", "ProviderClient.send from N threads, no queue"),
    ("raw_cpu_us_per_request", "CPU us", "CPU of that raw loop per request"),
    ("e2e_rps", "deliv/s", "first bulk enqueue to last delivery, real workers"),
    ("ratio", "", "e2e_rps / raw_rps"),
    ("cpu_ratio", "", "worker CPU per delivery / raw loop CPU per request"),
    ("redis_cpu_us_per_delivery", "CPU us", "Redis CPU (INFO cpu) over the drain, per delivery"),
    ("redis_bytes_per_pending", "B", "Redis used_memory per pending delivery"),
    ("redis_bytes_index", "B", "of which the lookup index (by msgid and app_id)"),
    ("redis_bytes_per_delivered", "B", "per delivered record, as kept for the dedupe window"),
    ("redis_bytes_delivered_no_index", "B", "the same without its lookup index entry"),
    ("redis_bytes_per_retry_3", "B", "per waiting retry with 3 attempts of history"),
    ("redis_bytes_retry_3_no_index", "B", "the same without its lookup index entry"),
    ("live_latency_p50_ms", "ms", "live enqueue to provider, behind a bulk backlog"),
    ("live_latency_max_ms", "ms", "live enqueue to provider, behind a bulk backlog"),
    ("e2e_rps_cores", "deliv/s", "the drain again, one worker process per core"),
    ("ratio_cores", "", "e2e_rps_cores / raw_rps"),
    ("cpu_ratio_cores", "", "cpu_ratio, one worker process per core"),
    ("redis_cpu_us_cores", "CPU us", "Redis CPU per delivery, one worker per core"),
    ("enqueue_p50_ms", "ms", "enqueue_backfill, one call"),
    ("enqueue_p99_ms", "ms", "enqueue_backfill, one call"),
    ("bulk_enqueue_rps", "rows/s", "Store.enqueue_many, batches of 1,000"),
    ("latency_p50_ms", "ms", "enqueue call to provider, light load"),
    ("latency_p99_ms", "ms", "enqueue call to provider, light load"),
    ("worker_rss_mb", "MiB", "worker peak RSS (VmHWM) after the drain"),
    ("worker_cpu_s_per_1k", "CPU s", "worker CPU per 1,000 deliveries"),
    ("stub_cpu_s_per_1k", "CPU s", "stub CPU per 1,000 deliveries"),
    ("idle_rss_mb", "MiB", "worker RSS before the retries were parked"),
    ("waiting_retry_rss_mb", "MiB", "worker RSS with the retries waiting"),
)
TARGETS = {  # issues 6, 11 and 21
    "ratio": (">=", 0.7),
    "cpu_ratio": ("<=", 1.25),
    "redis_cpu_us_per_delivery": ("<=", 50.0),
    "redis_bytes_per_pending": ("<=", 600.0),
    # the lookup index (BACKFILL_LOOKUP_INDEX, on by default) is extra: README "Performance"
    "redis_bytes_delivered_no_index": ("<=", 200.0),
    "redis_bytes_per_delivered": ("<=", 200.0),  # issue 21: with the index on (the default)
    "redis_bytes_retry_3_no_index": ("<=", 1000.0),
    "live_latency_max_ms": ("<=", 1000.0),
    "enqueue_p99_ms": ("<=", 2.0),
    "bulk_enqueue_rps": (">=", 20_000.0),
    "worker_rss_mb": ("<=", 150.0),
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``--json``; 0 ok, 1 failed, 130 interrupted."""
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sizes = replace(sizes, records=args.records or sizes.records)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="backfill-bench-"))
    started = time.monotonic()
    try:
        with _sigterm_exits(), Fleet(root, args.workers, args.concurrency) as fleet:
            figures = run(fleet, sizes)
    except BackfillError as exc:
        print(f"bench failed: {exc} (logs in {root})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    figures["seconds"] = round(time.monotonic() - started, 1)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    count = _positive_int
    parser.add_argument("--quick", action="store_true", help="small sizes; under a minute")
    parser.add_argument("--records", type=count, help="end-to-end records (20000; quick 2000)")
    parser.add_argument("--workers", type=count, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=count, default=16, help="threads per worker")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--workdir", help="keep logs and Redis files here (kept afterwards)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit, so every ``finally`` stops what it started."""

    def _exit(_signum: int, _frame: FrameType | None) -> None:
        sys.exit(1)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(fleet: Fleet, sizes: Sizes) -> Figures:
    """Every measurement, in an order where none disturbs the next."""
    get_store = _store_factory()
    figures: Figures = {"records": sizes.records, "waiting_retries": sizes.waiting}
    figures |= {"workers": fleet.worker_count, "concurrency": fleet.concurrency}
    _say(f"stub ceiling and raw baseline, {fleet.concurrency} threads")
    figures |= measure_http(fleet, sizes)
    store = get_store()
    _say("enqueue latency and bulk enqueue (no worker running)")
    figures |= measure_enqueue(store, sizes)
    _say("Redis memory per pending delivery and per waiting retry")
    figures |= measure_memory(store, sizes)
    fleet.start_workers()
    _say(f"end to end: {sizes.records:,} records")
    figures |= measure_drain(fleet, store, sizes.records)
    _say(f"light load: {sizes.light_records} records, one every {LIGHT_GAP_S * 1000:g} ms")
    figures |= measure_latency(fleet, sizes)
    _say(f"{sizes.live} live records behind {sizes.backlog:,} bulk ones")
    figures |= measure_live(fleet, store, sizes)
    _say(f"{sizes.waiting:,} deliveries waiting for retry")
    figures |= measure_waiting(fleet, store, sizes)
    cores = os.cpu_count() or 1
    _say(f"end to end again: {cores} worker processes x {fleet.concurrency // cores} threads")
    fleet.restart_workers(cores, max(fleet.concurrency // cores, 1))
    store.redis.flushdb()
    again = measure_drain(fleet, store, sizes.records)
    figures["e2e_rps_cores"] = again["e2e_rps"]
    figures["redis_cpu_us_cores"] = again["redis_cpu_us_per_delivery"]
    worker_us = again["worker_cpu_s_per_1k"] * 1000
    figures["cpu_ratio_cores"] = worker_us / figures["raw_cpu_us_per_request"]
    figures["ratio"] = figures["e2e_rps"] / figures["raw_rps"]
    figures["ratio_cores"] = figures["e2e_rps_cores"] / figures["raw_rps"]
    figures["cpu_ratio"] = figures["worker_cpu_s_per_1k"] * 1000 / figures["raw_cpu_us_per_request"]
    return {key: round(value, 3) for key, value in figures.items()}


class Fleet:
    """What the bench runs: a private Redis, the stub subprocess, workers; ``close`` stops all."""

    def __init__(self, root: Path, workers: int, concurrency: int) -> None:
        self.root = root
        self.concurrency = concurrency
        self.stub_port = free_port()
        self.redis = LocalRedis(root / "redis")
        self.stub: subprocess.Popen[bytes] | None = None
        self.worker_count = workers
        self.workers: list[WorkerProcess] = []
        self.env: dict[str, str] = {}
        self._saved_env: dict[str, str] = {}
        self._producer_log: TextIO | None = None

    def __enter__(self) -> Fleet:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            stub_url = f"http://127.0.0.1:{self.stub_port}/sms"
            # the workers get the production defaults, but for one: a delivered record is
            # compacted at once, so the memory measured is what the dedupe window keeps
            self.env = local_env(self.redis.url, stub_url, KEY, SECRET, keep_delivered_s=0)
            self._use_env()
            self.redis.start()
            self._start_stub()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _use_env(self) -> None:
        """Only our BACKFILL_* here: the shell's must not reach this run (nor Redis on 6379)."""
        from worker.app import app

        self._saved_env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        for name in self._saved_env:
            del os.environ[name]
        os.environ.update(self.env)
        _forget_settings()
        if app.conf.broker_url != self.env["BACKFILL_REDIS_URL"]:
            raise BackfillError("Celery was configured before the bench set its Redis URL")
        # the producer's postback.enqueued lines: written, as a web app would, but not here
        self._producer_log = (self.root / "producer.log").open("a", encoding="utf-8")
        configure_logging("json", "INFO", stream=self._producer_log)

    def _start_stub(self) -> None:
        with (self.root / "stub.log").open("ab") as log:
            self.stub = subprocess.Popen(
                [sys.executable, "-m", "worker", "stub", f"--port={self.stub_port}"],
                # the installed package's stub, also when PYTHONPATH points the rest of the
                # run at another checkout (to measure an older design side by side)
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the stub
            )
        deadline = time.monotonic() + 30
        while self.stub.poll() is None and time.monotonic() < deadline:
            try:
                stub_call(self.stub_port, "GET", "/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise BackfillError(f"the stub did not start; see {self.root / 'stub.log'}")

    def start_workers(self) -> None:
        """Start the workers and wait until each one's dispatcher runs."""
        for i in range(self.worker_count):
            log_path = self.root / f"worker-{len(self.workers)}-{i}.log"
            self.workers.append(WorkerProcess(self.env, log_path, concurrency=self.concurrency))
            self.workers[-1].start()
        for worker in self.workers:
            worker.wait_ready(60)

    def restart_workers(self, count: int, concurrency: int) -> None:
        """Stop the workers and start ``count`` new ones of ``concurrency`` threads."""
        for worker in self.workers:
            worker.stop(timeout_s=30)
        self.workers = []
        self.worker_count, self.concurrency = count, concurrency
        self.start_workers()

    def redis_cpu(self) -> float:
        """CPU seconds Redis has used so far (INFO cpu: user plus system)."""
        info = _store_factory()().redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def worker_pids(self) -> list[int]:
        """The process id of each running worker."""
        return [w.process.pid for w in self.workers if w.process is not None and w.alive]

    def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by all workers together, and by the stub."""
        assert self.stub is not None
        return sum(cpu_s(pid) for pid in self.worker_pids()), cpu_s(self.stub.pid)

    def close(self) -> None:
        """Stop workers, the stub and Redis; give the process its environment back."""
        for worker in self.workers:
            worker.stop(timeout_s=30)
        if self.stub is not None and self.stub.poll() is None:
            self.stub.terminate()
            try:
                self.stub.wait(5)
            except subprocess.TimeoutExpired:
                self.stub.kill()
                self.stub.wait(5)
        self.redis.stop()
        for name in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[name]
        os.environ.update(self._saved_env)
        _forget_settings()
        if self._producer_log is not None:
            configure_logging("json", "INFO", stream=sys.stderr)
            self._producer_log.close()


def measure_http(fleet: Fleet, sizes: Sizes) -> Figures:
    """The stub's ceiling (with its CPU share) and the raw ProviderClient baseline."""
    _, stub_cpu = fleet.cpu()
    ceiling = hammer(fleet.concurrency, sizes.loop_s, keepalive_sender(fleet.stub_port))
    stub_busy = (fleet.cpu()[1] - stub_cpu) / sizes.loop_s
    stub_call(fleet.stub_port, "POST", "/_stub/reset")  # its request log would only grow
    client = ProviderClient(f"http://127.0.0.1:{fleet.stub_port}/sms", KEY, SECRET)
    started, cpu = time.monotonic(), time.process_time()
    raw = hammer(fleet.concurrency, sizes.loop_s, provider_sender(client))
    cpu, took = time.process_time() - cpu, time.monotonic() - started
    stub_call(fleet.stub_port, "POST", "/_stub/reset")
    return {
        "stub_ceiling_rps": ceiling,
        "stub_ceiling_cpu_pct": stub_busy * 100,
        "raw_rps": raw,
        "raw_cpu_us_per_request": cpu / (raw * took) * 1e6,
    }


def measure_enqueue(store: Store, sizes: Sizes) -> Figures:
    """Single ``enqueue_backfill`` calls (ms) and bulk ``Store.enqueue_many`` (rows/s)."""
    from worker.enqueue.producer import enqueue_backfill

    for i in range(20):  # load the Lua scripts, open the connection
        enqueue_backfill(app_id=APP_ID, msgid=f"warm-{i}", number=NUMBER, time=TIME_MS)
    samples = []
    for i in range(sizes.single_enqueues):
        started = time.perf_counter()
        enqueue_backfill(app_id=APP_ID, msgid=f"single-{i}", number=NUMBER, time=TIME_MS)
        samples.append((time.perf_counter() - started) * 1000)
    rows = [_record(f"bulk-{i}") for i in range(sizes.bulk_rows)]
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        store.enqueue_many(rows[start : start + BATCH], source="bench")
    bulk_rps = len(rows) / (time.perf_counter() - started)
    store.redis.flushdb()  # the workers, started later, must find an empty queue
    return {
        "enqueue_p50_ms": percentile(samples, 50),
        "enqueue_p99_ms": percentile(samples, 99),
        "bulk_enqueue_rps": bulk_rps,
    }


def measure_memory(store: Store, sizes: Sizes) -> Figures:
    """Redis bytes per pending delivery, and per waiting retry with 3 attempts of history.

    The retries are made by the real step script (claim, then record a 503), three times
    each, as a worker would; no worker runs meanwhile.
    """
    count = sizes.waiting
    before = _used_memory(store)
    for start in range(0, count, BATCH):
        rows = [_record(f"mem-{i}") for i in range(start, min(start + BATCH, count))]
        store.enqueue_many(rows, source="bench")
    pending = (_used_memory(store) - before) / count
    figures = {"redis_bytes_per_pending": pending}
    from worker.state import keys

    index = 0.0
    if hasattr(keys, "index") or hasattr(keys, "index_directory"):  # the lookup index's share
        index = _index_size(store)[0] / count
        figures["redis_bytes_index"] = index
    if hasattr(store, "step"):  # the drain design's store
        for round_ in range(3):
            fail_all(store, count, retry_in_s=3600.0 if round_ == 2 else 0.0)
        figures["redis_bytes_per_retry_3"] = (_used_memory(store) - before) / count
        figures["redis_bytes_retry_3_no_index"] = figures["redis_bytes_per_retry_3"] - index
    store.redis.flushdb()
    return figures


def fail_all(store: Store, count: int, retry_in_s: float) -> None:
    """Claim ``count`` due deliveries in batches and record a failed attempt (the transient
    provider code -18) for each, through the real step script, as a worker would. (Not HTTP
    503: that many of them with no success between is an outage, and the fleet holds.)"""
    from worker.deliver.policy import AnswerClass, Evidence, Outcome, Verdict
    from worker.deliver.provider import Answer
    from worker.deliver.steps import Finish

    answer = Answer(
        AnswerClass.TRANSIENT, http_status=200, api_status="-18", api_reason="system busy",
        latency_ms=12.5,
    )  # fmt: skip
    done: list[Finish] = []
    left = count
    while True:
        want = min(8, left)
        step = store.step(done, claim=want, prefer_bulk=True, lease_s=30, max_attempts=16)
        if want == 0:
            return
        if len(step.claims) < want:
            raise BackfillError(f"nothing to claim for the memory figure ({step.status})")
        verdict = Verdict(Outcome.RETRY, retry_in_s, evidence=Evidence.UP)
        done = [Finish(c, answer, verdict) for c in step.claims]
        left -= len(done)


def measure_drain(fleet: Fleet, store: Store, records: int) -> Figures:
    """Bulk-enqueue ``records`` and time them to their last delivery; CPU and memory."""
    rows = [_record(f"e2e-{len(fleet.workers)}-{i}") for i in range(records)]
    memory = _used_memory(store)
    worker_cpu, stub_cpu = fleet.cpu()
    redis_cpu = fleet.redis_cpu()
    commands = _command_usec(store)
    started = time.monotonic()
    for start in range(0, len(rows), BATCH):
        store.enqueue_many(rows[start : start + BATCH], source="bench")
    wait_finished(store, timeout_s=max(120.0, records / 20))
    took = time.monotonic() - started
    worker_end, stub_end = fleet.cpu()
    redis_end = fleet.redis_cpu()
    spent = _command_usec(store)
    calls = spent.pop("evalsha calls") - commands.pop("evalsha calls")
    top = sorted(spent, key=lambda name: commands.get(name, 0) - spent[name])[:8]
    _say(f"  Lua script runs per delivery: {calls / records:.2f}")
    _say(
        "  Redis usec per delivery by command: "
        + ", ".join(f"{n} {(spent[n] - commands.get(n, 0)) / records:.1f}" for n in top)
    )
    thousands = records / 1000
    delivered = (_used_memory(store) - memory) / records
    return {
        "e2e_rps": records / took,
        "e2e_seconds": took,
        "worker_rss_mb": max(memory_mb(pid, "VmHWM") for pid in fleet.worker_pids()),
        "worker_cpu_s_per_1k": (worker_end - worker_cpu) / thousands,
        "stub_cpu_s_per_1k": (stub_end - stub_cpu) / thousands,
        "redis_cpu_us_per_delivery": (redis_end - redis_cpu) / records * 1e6,
        "redis_bytes_per_delivered": delivered,
        "redis_bytes_delivered_no_index": delivered - _index_entry_bytes(store),
    }


def _index_entry_bytes(store: Store) -> float:
    """What one lookup index entry of the bench's app costs (0 without the index)."""
    size, entries = _index_size(store)
    return size / entries if entries else 0.0


def _index_size(store: Store) -> tuple[int, int]:
    """The bench app's lookup index: (bytes, entries), exactly (MEMORY USAGE, SAMPLES 0), in
    either layout (buckets and their directory, or one sorted set before buckets)."""
    from worker.state import keys

    if hasattr(keys, "index_directory"):
        directory = keys.index_directory(APP_ID)
        names = [directory] + [
            keys.index_bucket(APP_ID, bound) for bound in store.redis.zrange(directory, 0, -1)
        ]
        entries = sum(store.redis.zcard(name) for name in names[1:])
    elif hasattr(keys, "index"):
        names = [keys.index(APP_ID)]
        entries = store.redis.zcard(names[0])
    else:
        return 0, 0
    return sum(store.redis.memory_usage(name, samples=0) or 0 for name in names), entries


def _command_usec(store: Store) -> dict[str, float]:
    """Redis's own time per command name so far (INFO commandstats, usec)."""
    stats = store.redis.info("commandstats")
    found = {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}
    found["evalsha calls"] = float(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return found


def send_live(tag: str, count: int, gap_s: float) -> dict[str, float]:
    """``count`` records through ``enqueue_backfill``, ``gap_s`` apart; when each was sent."""
    from worker.enqueue.producer import enqueue_backfill

    sent = {}
    for i in range(count):
        msgid = f"{tag}-{i}"
        sent[msgid] = time.time()
        enqueue_backfill(app_id=APP_ID, msgid=msgid, number=NUMBER, time=TIME_MS)
        time.sleep(gap_s)
    return sent


def measure_latency(fleet: Fleet, sizes: Sizes) -> Figures:
    """Enqueue call to the provider's receipt, one record at a time with gaps between."""
    sent = send_live("light", sizes.light_records, LIGHT_GAP_S)
    latencies = received_after(fleet, sent, timeout_s=60.0)
    return {
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p99_ms": percentile(latencies, 99),
    }


def measure_live(fleet: Fleet, store: Store, sizes: Sizes) -> Figures:
    """Live records (``enqueue_backfill``) sent while a bulk backlog drains: enqueue call
    to the provider's receipt, each."""
    rows = [_record(f"backlog-{i}") for i in range(sizes.backlog)]
    for start in range(0, len(rows), BATCH):
        store.enqueue_many(rows[start : start + BATCH], source="bench")
    time.sleep(1.0)  # the drain is in full swing
    sent = send_live("live", sizes.live, LIVE_GAP_S)
    latencies = received_after(fleet, sent, timeout_s=max(120.0, sizes.backlog / 20))
    wait_finished(store, timeout_s=max(120.0, sizes.backlog / 20))
    store.redis.flushdb()
    return {
        "live_latency_p50_ms": percentile(latencies, 50),
        "live_latency_max_ms": max(latencies),
    }


def received_after(fleet: Fleet, sent: dict[str, float], timeout_s: float) -> list[float]:
    """For each msgid sent at the time given, ms until the stub received it."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = json.loads(stub_call(fleet.stub_port, "GET", "/_stub/seen_at"))
        got = {m: at for m, at in log.items() if m in sent}
        if len(got) == len(sent):
            stub_call(fleet.stub_port, "POST", "/_stub/reset")
            return [(got[m] - at) * 1000 for m, at in sent.items()]
        if time.monotonic() > deadline:
            raise BackfillError(f"{len(sent) - len(got)} records never reached the provider")
        time.sleep(0.2)


def measure_waiting(fleet: Fleet, store: Store, sizes: Sizes) -> Figures:
    """Worker RSS before and with ``waiting`` retries parked for an hour."""
    idle_rss = max(memory_mb(pid, "VmRSS") for pid in fleet.worker_pids())
    rows = [_record(f"wait-{i}") for i in range(sizes.waiting)]
    for start in range(0, len(rows), BATCH):
        try:
            store.enqueue_many(rows[start : start + BATCH], source="bench", due_in_s=3600.0)
        except TypeError:  # the design before drains: the same, by another name
            store.enqueue_many(rows[start : start + BATCH], source="bench", dispatch_grace_s=3600)  # type: ignore[call-arg]
    time.sleep(sizes.settle_s)  # many waker ticks over lanes full of them
    figures = {
        "idle_rss_mb": idle_rss,
        "waiting_retry_rss_mb": max(memory_mb(pid, "VmRSS") for pid in fleet.worker_pids()),
    }
    store.redis.flushdb()
    return figures


def hammer(threads: int, seconds: float, make_sender: SenderFactory) -> float:
    """Successful calls per second from ``threads`` threads sending in a loop for ``seconds``."""
    counts, errors = [0] * threads, []
    deadline = time.monotonic() + seconds

    def loop(n: int) -> None:
        try:
            send, i = make_sender(f"{n}-{time.monotonic_ns()}"), 0
            while time.monotonic() < deadline:
                counts[n] += send(i)
                i += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    pool = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(threads)]
    started = time.monotonic()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise BackfillError(f"{len(errors)} sender threads failed, e.g. {errors[0]}")
    return sum(counts) / (time.monotonic() - started)


def keepalive_sender(port: int) -> SenderFactory:
    """Signed POSTs over one bare keep-alive ``http.client`` connection per thread."""

    def make(thread: str) -> Callable[[int], bool]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def send(i: int) -> bool:
            body = build_body(_record(f"ceiling-{thread}-{i}"))
            conn.request("POST", "/sms" + PATH, body=body, headers=build_headers(KEY, SECRET))
            response = conn.getresponse()
            return bool(json.loads(response.read()).get("status") == "0")

        return send

    return make


def provider_sender(client: ProviderClient) -> SenderFactory:
    """Signed POSTs through the worker's own client (fresh Sign, pooled Session per thread)."""

    def make(thread: str) -> Callable[[int], bool]:
        return lambda i: client.send(_record(f"raw-{thread}-{i}")).api_status == "0"

    return make


def wait_finished(store: Store, timeout_s: float) -> None:
    """Block until the schedule is empty: every delivery is delivered or dead.

    One ZCARD per poll: reading each delivery's state would take CPU from the workers.
    """
    deadline = time.monotonic() + timeout_s
    while (pending := store.counts()["pending"]) > 0:
        if time.monotonic() > deadline:
            raise BackfillError(f"{pending} deliveries unfinished after {timeout_s:g} s")
        time.sleep(0.05)


def stub_call(port: int, method: str, path: str) -> bytes:
    """One request to the stub's control or health endpoints."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        return conn.getresponse().read()
    finally:
        conn.close()


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status (``VmRSS`` now, ``VmHWM`` peak) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise BackfillError(f"no {field} for process {pid}")


def percentile(samples: Sequence[float], q: int) -> float:
    """The q-th percentile (1-99) of at least two samples, interpolated."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def table(figures: Figures) -> str:
    """The figures as a table for people, with the issue's targets where it sets one."""
    lines = [
        f"backfill bench: {figures['records']:,.0f} records, {figures['workers']:.0f} worker(s)"
        f" x {figures['concurrency']:.0f} threads, {figures['waiting_retries']:,.0f} waiting"
        f" retries, {os.cpu_count()} CPUs, {figures['seconds']:g} s",
        f"{'figure':<24} {'value':>10}  {'unit':<8} {'target':<14} what",
    ]
    for key, unit, what in ROWS:
        if key not in figures:  # e.g. the retry figure, run against the design before drains
            lines.append(f"{key:<24} {'n/a':>10}  {unit:<8} {'':<14} {what}")
            continue
        value = figures[key]
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 3
        mark = ""
        if key in TARGETS:
            op, bound = TARGETS[key]
            met = value >= bound if op == ">=" else value <= bound
            mark = f"{op} {bound:g} {'ok' if met else 'MISS'}"
        lines.append(f"{key:<24} {value:>10,.{digits}f}  {unit:<8} {mark:<14} {what}")
    return "\n".join(lines)


def _record(msgid: str) -> BackfillRecord:
    return BackfillRecord(APP_ID, NUMBER, TIME_MS, msgid=msgid)


def _used_memory(store: Store) -> int:
    """Redis's memory for data: used_memory less the clients' buffers and the Lua cache,
    which come and go with the connections and are not the data being measured."""
    stats = store.redis.memory_stats()
    return int(stats["total.allocated"]) - int(stats["clients.normal"]) - int(stats["lua.caches"])


def _forget_settings() -> None:
    """Drop settings and clients cached from an earlier environment."""
    from worker.deliver import tasks

    if hasattr(tasks, "get_runtime"):  # the design before drains (PYTHONPATH elsewhere)
        from worker.app import get_settings  # type: ignore[attr-defined]

        for cached in (get_settings, tasks.get_store, tasks.get_runtime):  # type: ignore[attr-defined]
            cached.cache_clear()
        return
    from worker.runtime import reset

    reset()


def _store_factory() -> Callable[[], Store]:
    """The process's store: from worker.runtime, or worker.deliver.tasks before drains."""
    from worker.deliver import tasks

    if hasattr(tasks, "get_store"):
        return tasks.get_store  # type: ignore[no-any-return]
    from worker.runtime import get_store

    return get_store


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
