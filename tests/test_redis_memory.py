"""Our Redis: an evicting one is refused by every entry point, a full one is named as full
everywhere, refuses a write whole, and a worker started against it drains it.

Private Redis servers with ``maxmemory`` and the policy each case needs; the stub and a
real worker where delivering is the point.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import requests

from tests.conftest import API_KEY, API_SECRET, read_log, reset_caches, wait_for
from tests.helpers import backfill, events
from tests.intake_helpers import healthy, running_intake
from tests.intake_helpers import rec as http_rec
from worker.enqueue.intake import PROCESS_OVER, accept
from worker.enqueue.intake_health import RedisCheck
from worker.enqueue.intake_server import RETRY_AFTER_S
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port, local_env
from worker.local.stub import ProviderStub
from worker.operate.errors import ConfigError, RedisFull
from worker.state import capacity, keys
from worker.state.connection import connect
from worker.state.delivery import delivery_id
from worker.state.store import Store

Servers = Callable[..., LocalRedis]


@pytest.fixture
def evicting(private_redis_factory: Servers) -> LocalRedis:
    return private_redis_factory(
        extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    )


@pytest.fixture
def small(private_redis_factory: Servers) -> LocalRedis:
    return private_redis_factory(
        extra_args=("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    )


@pytest.fixture
def roomy(private_redis_factory: Servers) -> LocalRedis:
    # full, but with room enough that what a delivered record keeps (its marker, the
    # console's list of the newest 10,000) is less than what delivering it frees
    return private_redis_factory(
        extra_args=("--maxmemory", "12mb", "--maxmemory-policy", "noeviction")
    )


@pytest.fixture
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's settings and clients are built again from the environment as it was:
    a test that points them at its own Redis leaves none of that behind."""
    yield
    monkeypatch.undo()
    reset_caches()


def env_for(server: LocalRedis, stub_url: str = "http://127.0.0.1:9/sms", **more: str) -> dict:
    return {**local_env(server.url, stub_url, API_KEY, API_SECRET), **more}


def record(i: int, tag: str = "mem") -> BackfillRecord:
    return BackfillRecord(
        f"app-{tag}", f"8613{i:09d}", str(1_700_000_000_000 + i), msgid=f"{tag}{i}"
    )


def fill(store: Store, tag: str, due_in_s: float = 0.0) -> int:
    """Enqueue until Redis refuses: how many records got in (due in ``due_in_s``)."""
    count, size = 0, 200
    while True:
        batch = [record(count + i, tag) for i in range(size)]
        try:
            store.enqueue_many(batch, source="test", due_in_s=due_in_s)
        except RedisFull:
            if size == 1:
                return count
            size = 1  # then one at a time: up to the last byte
            continue
        count += len(batch)


def test_every_entry_point_refuses_an_evicting_redis(
    evicting: LocalRedis, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    env = env_for(evicting, BACKFILL_INTAKE_TOKENS="web:" + "t" * 32)
    args = ["--app-id", "a", "--number", "8613500000000", "--time", "1700000000000"]
    for command in (
        ["worker"],
        ["enqueue", *args],
        ["health", "--timeout", "1"],
        ["intake", "--port", "0"],
    ):
        done = backfill(*command, env=env)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        said = done.stdout + done.stderr
        assert "allkeys-lru" in said, said
        assert "maxmemory-policy noeviction" in said
        assert "BACKFILL_ACCEPT_EVICTION" in said
    # nothing was written by any of them
    assert connect(evicting.url).dbsize() == 0
    # the Python API says the same; the operator may accept the loss explicitly
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_caches()
    from worker import enqueue_backfill

    with pytest.raises(ConfigError, match="noeviction"):
        enqueue_backfill(app_id="a", number="8613500000000", time="1700000000000")
    monkeypatch.setenv("BACKFILL_ACCEPT_EVICTION", "true")
    reset_caches()
    assert enqueue_backfill(app_id="a", number="8613500000000", time="1700000000000")
    assert backfill("enqueue", *args, env={**env, "BACKFILL_ACCEPT_EVICTION": "1"}).returncode == 0
    reset_caches()


def test_a_full_redis_is_named_full_everywhere_and_nothing_is_half_written(
    small: LocalRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_caches: None,
) -> None:
    store = Store(connect(small.url), dedupe_ttl_s=3600)
    got_in = fill(store, "full")
    assert got_in > 0
    assert capacity.read(store.redis).full
    # a refused batch wrote nothing: every delivery in the lane has its hash, and no more
    assert store.redis.zcard(keys.BULK) == got_in
    # a file: the summary says how many rows got in before Redis refused, exit 1
    rows = tmp_path / "more.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"app_id": "app-file", "number": f"8613{i:09d}", "time": "1700000000000"})
            + "\n"
            for i in range(3000)
        )
    )
    env = env_for(small)
    done = backfill("enqueue", "--file", str(rows), env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Redis is full" in done.stderr
    assert "0 rows got in before it stopped" in done.stderr
    # one record from the CLI and from Python: named full, never "unavailable"
    single = backfill(
        "enqueue", "--app-id", "x", "--number", "8613500000001", "--time", "1700000000000",
        env=env,
    )  # fmt: skip
    assert single.returncode == 1, single.stderr
    assert "Redis is full" in single.stderr
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_caches()
    from worker import enqueue_backfill

    with pytest.raises(RedisFull, match="Redis is full"):
        enqueue_backfill(app_id="x", number="8613500000001", time="1700000000000")
    reset_caches()
    # the intake's answer and its /healthz
    answer = accept(b'{"app_id":"x","number":"8613500000002","time":"1700000000000"}', "web", store)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"]
    assert b"Redis is full" in bytes(answer.body)

    async def healthz_problem() -> str:
        client = aioredis.Redis.from_url(small.url)
        try:
            return await RedisCheck(client).problem()
        finally:
            await client.aclose()

    problem = asyncio.run(healthz_problem())
    assert problem.startswith("Redis is full")
    # `health`: with no worker nothing frees it: unhealthy, and it says so
    for args in ((), ("--node", "celery@%h")):
        health = backfill("health", "--timeout", "1", *args, env=env)
        assert health.returncode == 1, health.stdout + health.stderr
        assert health.stdout.startswith("unhealthy: Redis is full (used_memory "), health.stdout
        assert health.stdout.rstrip().endswith("nothing delivers to free it"), health.stdout
        assert "nor wrote a heartbeat" in health.stdout
    assert store.redis.zcard(keys.BULK) == got_in  # still nothing half-written


def test_enqueue_file_that_fills_redis_part_way_says_how_many_rows_got_in(
    private_redis_factory: Servers, tmp_path: Path
) -> None:
    server = private_redis_factory()  # noeviction, no maxmemory yet
    client = connect(server.url)
    # room for some thousands of pending records (a few hundred bytes each), not 20,000
    client.config_set("maxmemory", capacity.read(client).used + 2 * 2**20)
    rows = [
        {"app_id": "app-part", "msgid": f"part{i}", "number": f"8613{i:09d}",
         "time": str(1_700_000_000_000 + i)}
        for i in range(20_000)
    ]  # fmt: skip
    path = tmp_path / "part.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = backfill("enqueue", "--file", str(path), env=env_for(server), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Redis is full" in done.stderr
    said = re.search(r"; (\d+) rows got in before it stopped", done.stderr)
    assert said, done.stderr
    got_in = int(said[1])
    assert 0 < got_in < len(rows)
    assert f"accepted {got_in}  duplicates 0  rejected 0" in done.stdout
    # what got in is the file's first got_in rows, each whole: its hash with every field
    # of a new pending bulk delivery, its place in the bulk lane and in the lookup index
    expected = {delivery_id(BackfillRecord.parse(row)): row for row in rows[:got_in]}
    prefix = keys.delivery("")
    stored = {k.removeprefix(prefix) for k in client.scan_iter(keys.delivery("*"))}
    assert stored == set(expected)
    assert set(client.zrange(keys.BULK, 0, -1)) == stored
    assert client.zcard(keys.LIVE) == 0
    f = keys.FIELD
    whole = {f[name] for name in ("app_id", "msgid", "number", "time", "state", "due",
                                  "created", "lane")}  # fmt: skip
    for delivery, row in expected.items():
        fields = client.hgetall(keys.delivery(delivery))
        assert set(fields) == whole, fields
        assert fields[f["state"]] == "p"
        assert fields[f["lane"]] == "b"
        assert (fields[f["msgid"]], fields[f["number"]]) == (row["msgid"], row["number"])
    indexed = sum(client.zcard(k) for k in client.scan_iter(keys.index_bucket("app-part", "*")))
    assert indexed == got_in
    # and nothing else: no attempts, no markers, no wake-ups, no key of a refused batch
    others = {k for k in client.scan_iter() if not k.startswith((prefix, keys.index_bucket(
        "app-part", "")))}  # fmt: skip
    assert others == {keys.BULK, keys.index_directory("app-part"), keys.INDEX_APPS,
                      keys.INDEX_HAND}  # fmt: skip
    # once Redis has room, the same file again: the rows that got in are duplicates
    client.config_set("maxmemory", 0)
    again = backfill("enqueue", "--file", str(path), env=env_for(server), timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"accepted {len(rows) - got_in}  duplicates {got_in}  rejected 0" in again.stdout


def test_the_intake_names_a_full_redis_over_http(
    private_redis_factory: Servers, tmp_path: Path
) -> None:
    server = private_redis_factory()  # noeviction, no maxmemory yet
    client = connect(server.url)
    log_path = tmp_path / "intake.log"
    with running_intake(env_for(server), log_path) as intake:  # ready: /healthz said 200
        assert intake.post(http_rec()).status_code == 202
        client.config_set("maxmemory", capacity.read(client).used + 2**20)
        fill(Store(connect(server.url), dedupe_ttl_s=3600), "http")
        # the last bytes come and go with the clients' buffers: maxmemory 64 KiB under what
        # Redis holds now, so that no record fits while the test asks
        client.config_set("maxmemory", capacity.read(client).used - 2**16)
        before = client.dbsize()
        health = intake.get("/healthz", token=None)
        assert health.status_code == 503
        assert health.json()["error"].startswith("redis: Redis is full (used_memory ")
        # a single record (in a thread) and a batch over 16 KiB (in a body process)
        batch = {"records": [http_rec() for _ in range(300)]}
        assert len(json.dumps(batch)) > PROCESS_OVER
        for body in (http_rec(), batch):
            answer = intake.post(body)
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == str(RETRY_AFTER_S)
            assert answer.json() == {
                "error": "Redis is full: nothing of this request was stored; retry later"
            }
        assert client.dbsize() == before  # nothing of either was stored
        logged = [e for e in read_log(log_path) if e.get("event") == "intake.redis_full"]
        assert len(logged) == 2
        assert not [e for e in read_log(log_path) if e.get("event") == "intake.redis_unavailable"]
        # room again: /healthz and the enqueue recover by themselves
        client.config_set("maxmemory", 0)
        wait_for(lambda: healthy(intake), timeout_s=10)
        assert intake.post(batch).status_code == 202


def test_a_worker_started_against_a_full_redis_drains_it(
    roomy: LocalRedis, settings_env: dict[str, str], tmp_path: Path
) -> None:
    small = roomy
    store = Store(connect(small.url), dedupe_ttl_s=3600)
    got_in = fill(store, "drain")
    assert capacity.read(store.redis).full
    with ProviderStub(API_KEY, API_SECRET) as stub:
        # delivered records compacted at once, so that delivering frees memory at once (the
        # default, 900 s, keeps each one's hash and history 15 minutes: docs/reliability.md)
        env = {**settings_env, "BACKFILL_REDIS_URL": small.url, "BACKFILL_BASE_URL": stub.url,
               "BACKFILL_KEEP_DELIVERED_S": "0"}  # fmt: skip
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            worker.wait_ready(timeout_s=180)  # ready once Redis has room
            wait_for(lambda: stub.stats()["accepted"] == got_in, timeout_s=120)
            wait_for(lambda: store.redis.zcard(keys.BULK) == 0, timeout_s=30)
            assert not capacity.read(store.redis).full
            lines = read_log(Path(worker.log_path))
            assert any(line.get("event") == "redis.full" for line in lines)
            assert not [line for line in lines if line.get("level") == "critical"]
            # and it goes on as a Celery worker: a new record is delivered the usual way
            store.enqueue(record(10**6, "after"))
            wait_for(lambda: stub.stats()["accepted"] == got_in + 1, timeout_s=30)
        finally:
            worker.kill()


def scrape(port: int) -> dict[str, float]:
    """A worker's /metrics: each sample without labels by name."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = (line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    return {parts[0]: float(parts[1]) for parts in lines if len(parts) == 2}


def test_a_worker_waiting_on_a_full_redis_is_healthy_by_its_heartbeat_and_reports_it_full(
    small: LocalRedis, settings_env: dict[str, str], tmp_path: Path
) -> None:
    # full of records due in an hour: nothing a worker could deliver now frees it
    store = Store(connect(small.url), dedupe_ttl_s=3600)
    assert fill(store, "later", due_in_s=3600) > 0
    # the last bytes come and go with the clients' buffers: 64 KiB under what it holds
    store.redis.config_set("maxmemory", capacity.read(store.redis).used - 2**16)
    port = free_port()
    env = {**settings_env, "BACKFILL_REDIS_URL": small.url, "BACKFILL_METRICS_PORT": str(port),
           "BACKFILL_METRICS_HOST": "127.0.0.1"}  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        # it delivers without Celery (which a full Redis would stop) and says why
        wait_for(lambda: events(worker, "redis.full"), timeout_s=60)
        assert scrape(port)["backfill_redis_full"] == 1
        assert scrape(port)["backfill_redis_memory_used_ratio"] >= capacity.FULL_AT
        # it answers no ping, but its heartbeat says it is at work: healthy, Redis named
        for args in ((), ("--node", "celery@%h")):
            health = backfill("health", "--timeout", "1", *args, env=env)
            assert health.returncode == 0, health.stdout + health.stderr
            assert health.stdout.startswith("healthy: "), health.stdout
            assert "wrote a heartbeat" in health.stdout
            assert "; WARNING: Redis is full (used_memory " in health.stdout
        # room again (maxmemory raised): the gauge says so, and the worker starts Celery
        store.redis.config_set("maxmemory", 64 * 2**20)
        worker.wait_ready(timeout_s=60)
        assert events(worker, "redis.full_over")
        assert scrape(port)["backfill_redis_full"] == 0
        health = backfill("health", "--timeout", "5", "--node", "celery@%h", env=env)
        assert health.returncode == 0, health.stdout + health.stderr
        assert "worker celery@" in health.stdout
        assert " replied, making progress" in health.stdout
        assert "Redis is full" not in health.stdout
    finally:
        worker.kill()


def test_full_redis_figures() -> None:
    memory = capacity.Memory("noeviction", 100, 100)
    assert memory.full
    assert not memory.evicting
    assert capacity.Memory("allkeys-lru", 1, 0).evicting
    assert not capacity.Memory("noeviction", 98, 100).full
    assert not capacity.Memory(None, 10**9, 0).full  # no maxmemory: never full
    assert "Redis is full" in memory.full_message()


def test_a_redis_error_that_is_not_oom_is_not_full() -> None:
    assert capacity.is_full_error(redis.exceptions.OutOfMemoryError("OOM"))
    assert not capacity.is_full_error(redis.ConnectionError("down"))
