"""``backfill demo``: the whole path on this machine with nothing configured.

A private Redis, the stub with a share of faults, one real worker process; 200 sample
records (a few of them bad) enqueued, waited for until each is delivered or
dead-lettered, then a summary that says why each dead letter died. Everything it started
is stopped, Ctrl-C included; with ``keep`` it all keeps running (and a console joins
it) until Ctrl-C, so the dead letters can be looked at (``worker/local/demo_keep.py``).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from worker.deliver.policy import AnswerClass, classify_code
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.operate.audit import configure_logging

DEMO_KEY, DEMO_SECRET = "demo-key", "demo-secret-not-for-production"
BAD_SHARE = 0.02
# Short waits so the demo finishes in seconds; production defaults are in settings.py.
DEMO_SETTINGS: dict[str, object] = {
    "max_attempts": 8,
    "backoff_base_s": 0.2,
    "backoff_cap_s": 2,
    "connect_timeout_s": 1,
    "read_timeout_s": 1,
    "pause_s": 2,
}


def run_demo(*, records: int, fault_rate: float, workdir: str | None, keep: bool = False) -> int:
    """Run the demo; returns the exit code (0 when every record reached a final state).

    With ``keep``, Redis, the stub and the worker stay up after the summary, a console
    joins them, and the demo waits for Ctrl-C, having printed what to try meanwhile.
    """
    from worker.local.demo_keep import keep_running
    from worker.local.stub import ProviderStub

    root = Path(workdir or tempfile.mkdtemp(prefix="backfill-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    audit_log = root / "worker.log"
    server = LocalRedis(root / "redis")
    stub = ProviderStub(
        DEMO_KEY,
        DEMO_SECRET,
        fault_rate=fault_rate,
        faults=("status", "500", "503", "429:1", "slow:2", "drop", "nonjson"),
        seed=7,
    )
    worker: WorkerProcess | None = None
    producer_log = (root / "producer.log").open("a", encoding="utf-8")
    # the demo's own postback.enqueued lines go to a file, not over the progress lines
    configure_logging("json", "INFO", stream=producer_log)
    try:
        server.start()
        stub.start()
        env = local_env(server.url, stub.url, DEMO_KEY, DEMO_SECRET, **DEMO_SETTINGS)
        os.environ.update(env)
        click.echo(f"redis {server.url}  stub {stub.url}  logs {root}")
        worker = WorkerProcess(env, audit_log, concurrency=16).start()
        assert worker.process is not None
        (root / "worker.pid").write_text(f"{worker.process.pid}\n")  # for leftover checks
        worker.wait_ready()
        started = time.monotonic()
        ids = _enqueue_samples(records, stub)
        done = _wait(ids, timeout_s=300.0)
        elapsed = time.monotonic() - started
        _summary(ids, elapsed, stub.stats(), audit_log, keep=keep)
        if keep:
            keep_running(env, root)
        return 0 if done else 1
    finally:
        if worker is not None:
            worker.stop(timeout_s=20)
        stub.stop()
        server.stop()
        producer_log.close()


def _enqueue_samples(count: int, stub: object) -> list[str]:
    from worker.enqueue.producer import enqueue_backfill

    rng = random.Random(42)
    base_ms = int(time.time() * 1000)
    bad_msgids = {f"demo-{i:05d}" for i in rng.sample(range(count), max(1, int(count * BAD_SHARE)))}
    stub.set_plan({m: ["status:-9"] for m in bad_msgids})  # type: ignore[attr-defined]
    ids = []
    for i in range(count):
        ids.append(
            enqueue_backfill(
                app_id=f"demo-app-{i % 3}",
                msgid=f"demo-{i:05d}",
                number=f"86135{rng.randrange(10**8):08d}",
                time=str(base_ms - rng.randrange(600_000)),
            )
        )
    return ids


def _wait(ids: list[str], *, timeout_s: float) -> bool:
    from worker.runtime import get_store

    store = get_store()
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        states = store.states(ids)
        delivered, dead = states.count("delivered"), states.count("dead")
        line = f"  delivered {delivered:4}  dead {dead:3}  pending {len(ids) - delivered - dead:4}"
        if line != last:
            click.echo(line)
            last = line
        if delivered + dead == len(ids):
            return True
        time.sleep(0.5)
    click.echo("timed out waiting for the deliveries", err=True)
    return False


def _summary(
    ids: list[str], elapsed: float, stub_stats: dict[str, object], audit: Path, *, keep: bool
) -> None:
    from worker.runtime import get_store

    store = get_store()
    documents = [store.status(i) or {} for i in ids]
    attempts = [len(doc.get("attempts_made", [])) for doc in documents]
    states = store.states(ids)
    click.echo(
        "\nsummary\n"
        f"  records     {len(ids)}\n"
        f"  delivered   {states.count('delivered')}\n"
        f"  retried     {sum(1 for a in attempts if a > 1)} (needed more than one attempt)\n"
        f"  dead        {states.count('dead')}\n"
        f"  attempts    {sum(attempts)} (stub saw {stub_stats.get('requests')} requests)\n"
        f"  time        {elapsed:.1f} s\n"
        f"  audit log   {audit} (producer side: {audit.with_name('producer.log')})"
    )
    dead = [doc for doc in documents if doc.get("state") == "dead"]
    if dead:
        click.echo("\nwhy the dead letters died")
        for reason, count in Counter(why_dead(doc) for doc in dead).most_common():
            click.echo(f"  {count:4}  {reason}")
        look = "below" if keep else "run `backfill demo --keep` to keep them"
        click.echo(f"  to look at them: `backfill dead list`, `backfill dead show ID` ({look})")


def why_dead(document: dict[str, Any]) -> str:
    """Why a dead letter died, in words: the provider's code and reason, or attempts used up."""
    made = document.get("attempts_made") or [{}]
    last = made[-1]
    code, reason = last.get("api_status"), last.get("api_reason")
    if code is not None and classify_code(str(code)) is AnswerClass.BAD_RECORD:
        return f"provider status {code} ({reason}): a bad record, dead-lettered at once"
    return (
        f"{document.get('attempts', len(made))} attempts used up, the last one: "
        f"{document.get('last_error') or 'no recorded outcome'}"
    )
