"""High availability: a real primary, replica and sentinel; fail the primary over mid-run."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import unique, wait_for
from worker.enqueue.record import BackfillRecord
from worker.local.processes import LocalRedis, WorkerProcess, free_port
from worker.local.stub import ProviderStub
from worker.state.connection import connect
from worker.state.store import Store

Spawn = Callable[..., WorkerProcess]
MASTER = "backfill-primary"


class Sentinel:
    def __init__(self, workdir: Path, primary_port: int) -> None:
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        self.process = subprocess.Popen(
            ["redis-server", str(config), "--sentinel", "--logfile", str(workdir / "s.log")],
            stdin=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port, decode_responses=True)

    def replicas_ok(self) -> bool:
        try:
            found = self.client.sentinel_slaves(MASTER)
        except redis.ConnectionError:
            return False
        return any("s_down" not in r["flags"] for r in found)

    def primary_port(self) -> int:
        return int(self.client.sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def cluster(
    tmp_path: Path, private_redis_factory: Callable[..., LocalRedis]
) -> Iterator[tuple[LocalRedis, LocalRedis, Sentinel]]:
    primary = private_redis_factory(appendonly=True)
    replica = private_redis_factory(
        appendonly=True, extra_args=("--replicaof", "127.0.0.1", str(primary.port))
    )
    sentinel = Sentinel(tmp_path / "sentinel", primary.port)
    try:
        wait_for(sentinel.replicas_ok, 30, 0.2)
        yield primary, replica, sentinel
    finally:
        sentinel.stop()


def test_deliveries_continue_through_a_failover_with_none_lost(
    stub: ProviderStub, cluster: tuple[LocalRedis, LocalRedis, Sentinel], spawn_worker: Spawn
) -> None:
    primary, replica, sentinel = cluster
    url = f"sentinel://127.0.0.1:{sentinel.port}/0"
    env = {"BACKFILL_REDIS_MASTER_NAME": MASTER, "BACKFILL_RATE_LIMIT": "60"}
    spawn_worker(url, **env)
    store = Store(connect(url, MASTER), dedupe_ttl_s=3600, keep_delivered_s=3600)
    tag = unique("ha")
    records = [
        BackfillRecord("ha", "8613512345678", str(1681184764000 + i), msgid=f"{tag}-{i}")
        for i in range(300)
    ]
    ids = [d for d, _ in store.enqueue_many(records)]
    fence = redis.Redis(port=primary.port)
    fence.incr("test:fence")  # a later write: once the replica has it, it has them all
    assert fence.wait(1, 5000) == 1
    fence.close()

    def accepted() -> list[float]:
        return sorted(
            float(str(r["received_at"])) for r in stub.requests() if str(r["msgid"]).startswith(tag)
        )

    wait_for(lambda: len(accepted()) >= 100, 30, 0.1)
    primary.kill()
    killed_at = time.time()
    wait_for(lambda: sentinel.primary_port() == replica.port, 30, 0.2)
    promoted_at = time.time()
    wait_for(lambda: len(accepted()) == len(ids), 90, 0.2)
    # the first delivery the fleet made on the promoted replica (a drain's batch already
    # claimed may all go out meanwhile: then nothing was left to resume)
    resumed_at = next((t for t in accepted() if t > promoted_at), promoted_at)
    print(
        f"\nfailover: promoted after {promoted_at - killed_at:.1f} s, "
        f"deliveries resumed after {resumed_at - killed_at:.1f} s, lost 0 of {len(ids)}"
    )
    assert resumed_at - killed_at < 30
    # a delivery whose outcome was recorded on the old primary only is claimed there and
    # recorded nowhere: it goes again when its lease (12 s here) ends, answered -20; a
    # busy machine stretches that, so the bound is wide (stuck would be for good)
    try:
        wait_for(lambda: store.states(ids) == ["delivered"] * len(ids), 90, 0.2)
    except BaseException:
        print("states:", Counter(store.states(ids)))
        raise
