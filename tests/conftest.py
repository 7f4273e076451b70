"""Fixtures that start real services: a private Redis, the provider stub, a worker process.

Each fixture is a factory that stops what it started. The session worker runs with
short backoff and pause settings so the suite is quick; the production defaults are
covered by the unit tests of ``worker.settings`` and ``worker.deliver.policy``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import (
    open_store,
    read_log,
    wait_for,  # noqa: F401 - the test modules import it from here
)
from worker.local.processes import LocalRedis, WorkerProcess, local_env
from worker.local.stub import ProviderStub
from worker.state import keys
from worker.state.store import Store

API_KEY = "test-key-0001"
API_SECRET = "s3cret-value-that-must-never-be-logged"


def unique(prefix: str = "m") -> str:
    """A msgid no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def worker_settings(redis_url: str, stub_url: str) -> dict[str, str]:
    """The environment of the test worker and of the test process's producer."""
    return local_env(
        redis_url,
        stub_url,
        API_KEY,
        API_SECRET,
        max_attempts=4,
        backoff_base_s=0.05,
        backoff_cap_s=2,
        connect_timeout_s=1,
        read_timeout_s=1,
        pause_s=1.5,
        keep_delivered_s=3600,
        scheduler_tick_s=0.05,
        log_level="INFO",
    )


def reset_caches() -> None:
    """Forget settings and clients built from an earlier environment."""
    from worker.runtime import reset

    reset()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A private Redis for the whole session (the shared one on 6379 is left alone)."""
    yield from _serving(tmp_path_factory.mktemp("redis"))


def _serving(workdir: Path) -> Iterator[LocalRedis]:
    """A private Redis in ``workdir``, stopped when the generator ends."""
    server = LocalRedis(workdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stub() -> Iterator[ProviderStub]:
    """The provider stand-in, answering over real HTTP on loopback."""
    with ProviderStub(API_KEY, API_SECRET) as server:
        yield server


@pytest.fixture(scope="session")
def settings_env(redis_server: LocalRedis, stub: ProviderStub) -> Iterator[dict[str, str]]:
    """Point this process (the producer side) at the private Redis and the stub."""
    env = worker_settings(redis_server.url, stub.url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_caches()
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    reset_caches()


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session worker writes its JSON lines."""
    return tmp_path_factory.mktemp("worker") / "worker.log"


@pytest.fixture(scope="session")
def worker(settings_env: dict[str, str], worker_log: Path) -> Iterator[WorkerProcess]:
    """One real ``backfill worker`` process (threads pool) for the session."""
    process = WorkerProcess(settings_env, worker_log, concurrency=8).start()
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture
def r(settings_env: dict[str, str]) -> Iterator[redis.Redis]:
    """A client on the test Redis; the project's keys are removed after each test."""
    client = redis.Redis.from_url(settings_env["BACKFILL_REDIS_URL"], decode_responses=True)
    yield client
    for key in client.scan_iter(f"{keys.PREFIX}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def audit(worker_log: Path) -> Callable[[str], list[dict[str, Any]]]:
    """``audit(delivery_id)``: the postback.attempt events of one delivery, in order."""

    def attempts_of(delivery_id: str) -> list[dict[str, Any]]:
        return [
            e
            for e in read_log(worker_log)
            if e.get("event") == "postback.attempt" and e.get("delivery_id") == delivery_id
        ]

    return attempts_of


def _redis_servers(workdir: Callable[[], Path]) -> Iterator[Callable[..., LocalRedis]]:
    """A factory of private Redis servers in ``workdir()``; it kills them all when done."""
    started: list[LocalRedis] = []

    def start(**options: Any) -> LocalRedis:
        server = LocalRedis(workdir() / f"redis-{len(started)}", **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def private_redis_factory(tmp_path: Path) -> Iterator[Callable[..., LocalRedis]]:
    """``private_redis_factory(appendonly=..., extra_args=(...))``: a Redis of this test's
    own per call, with ``LocalRedis``'s options (maxmemory and the like in ``extra_args``);
    all killed at the end of the test."""
    yield from _redis_servers(lambda: tmp_path)


@pytest.fixture
def private_redis(private_redis_factory: Callable[..., LocalRedis]) -> LocalRedis:
    """A Redis of this test's own, AOF on (for tests that kill workers or Redis)."""
    return private_redis_factory(appendonly=True)


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A Redis of this test module's own, with no worker unless the module starts one:
    nothing else writes there, so a module may count every key in it."""
    yield from _serving(tmp_path_factory.mktemp("module-redis"))


@pytest.fixture
def store_options() -> dict[str, Any]:
    """The ``Store`` options of ``store`` (see ``helpers.open_store``); a module overrides
    this fixture to change them."""
    return {}


@pytest.fixture
def store_redis(module_redis: LocalRedis) -> LocalRedis:
    """The Redis ``store`` works on: the module's own; a module overrides this fixture
    to use another (``private_redis``)."""
    return module_redis


@pytest.fixture
def store(store_redis: LocalRedis, store_options: dict[str, Any]) -> Iterator[Store]:
    """A Store on ``store_redis`` with ``store_options``, its Redis empty at the start
    and at the end of each test."""
    own = open_store(store_redis.url, **store_options)
    own.redis.flushdb()
    yield own
    own.redis.flushdb()
    own.redis.close()


@pytest.fixture
def spawn_worker(
    settings_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn_worker(redis_url, **env)``: start a ready worker; all are stopped at the end."""
    started: list[WorkerProcess] = []

    def spawn(redis_url: str, concurrency: int = 8, **env: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        process = WorkerProcess(
            {**settings_env, "BACKFILL_REDIS_URL": redis_url, **env},
            log_path,
            concurrency=concurrency,
        ).start()
        started.append(process)
        process.wait_ready()
        return process

    yield spawn
    for process in started:
        process.kill()


@pytest.fixture
def provider() -> Iterator[ProviderStub]:
    """A provider stub of this test's own (``stub`` is the session's, shared)."""
    with ProviderStub(API_KEY, API_SECRET) as own:
        yield own


@pytest.fixture
def fleet(
    private_redis: LocalRedis,
    provider: ProviderStub,
    spawn_worker: Callable[..., WorkerProcess],
    request: pytest.FixtureRequest,
) -> Callable[..., tuple[Store, WorkerProcess]]:
    """``fleet(**env)``: a worker on this test's own Redis and ``provider``, with the
    module's ``FLEET_ENV`` then ``env``; and a Store on that Redis."""
    fleet_env: dict[str, str] = getattr(request.module, "FLEET_ENV", {})

    def start(**env: str) -> tuple[Store, WorkerProcess]:
        settings = {"BACKFILL_BASE_URL": provider.url, **fleet_env, **env}
        worker = spawn_worker(private_redis.url, **settings)
        return open_store(private_redis.url), worker

    return start


# The quick subset (`pytest -m "not slow"`; how long it takes is in docs/testing.md)
# leaves out every test that starts worker processes of its own, and these modules, whose
# tests start servers, a browser, a CLI process each, or a run of minutes: run the whole
# suite before a merge.
SLOW_MODULES = frozenset(
    {
        "test_bench",
        "test_bulk",
        "test_cli",
        "test_clock",
        "test_console_browser",
        "test_console_guard",
        "test_demo",
        "test_hostile_provider",
        "test_intake",
        "test_intake_limits",
        "test_liveness",
        "test_mass_actions",
        "test_ops_monitoring",
        "test_redis_memory",
        "test_reliability",
        "test_scale_reads",
    }
)
SLOW_FIXTURES = frozenset({"spawn_worker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow tests (see SLOW_MODULES): ``-m "not slow"`` is the quick subset."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
