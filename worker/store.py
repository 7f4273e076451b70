"""Everything the project keeps in Redis: deliveries, their schedule, dead letters, the pause.

The schedule (a sorted set of every pending delivery) is the source of truth; Celery
messages only wake a worker up. Each state change is one Lua script, so a delivery is
never half-written, and every script reads Redis's own clock, so worker clocks may drift.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from worker import keys
from worker.errors import InvalidRecord
from worker.record import BackfillRecord

T = TypeVar("T")
# How many attempt documents a delivery keeps (the audit log has every one).
HISTORY = 50
_TRANSIENT_REDIS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def connect(
    url: str,
    master_name: str = "mymaster",
    *,
    connect_timeout_s: float = 5.0,
    timeout_s: float = 10.0,
    retries: int = 6,
) -> redis.Redis:
    """A client for the project's state, retrying briefly through connection blips.

    ``sentinel://h1:26379;sentinel://h2:26379/0`` (kombu's form) asks the sentinels for
    the current primary of ``master_name`` and follows it through a failover. The
    defaults ride out a blip of ~3.5 s; the intake asks for less (it answers 503 instead).
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": timeout_s,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        "retry_on_error": list(_TRANSIENT_REDIS),
    }
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **options)
    nodes, password, db = sentinel_nodes(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        nodes, socket_timeout=2, sentinel_kwargs={"socket_timeout": 2}
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name, password=password, db=db, **options
    )
    return client


def sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """The (host, port) of each sentinel in a kombu-style URL, the password and the db."""
    nodes, password, db = [], None, 0
    for part in filter(None, url.split(";")):
        parsed = urlsplit(part.strip())
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"expected sentinel://host:port, got {part!r}")
        nodes.append((parsed.hostname, parsed.port or 26379))
        password = password or parsed.password
        if parsed.path.strip("/").isdigit():
            db = int(parsed.path.strip("/"))
    return nodes, password, db


def new_delivery_id() -> str:
    """A fresh delivery id (a UUID4 string)."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to "may I attempt this delivery now?"."""

    # claimed, delivered, dead, missing, orphan, corrupt, poison, busy, early, paused, throttled
    verdict: str
    token: str = ""
    attempts: int = 0
    record: BackfillRecord | None = None
    dedupe_key: str = ""
    replay: bool = False
    resume_at: float | None = None
    wait_s: float = 0.0  # a rate-limit slot was reserved this far ahead
    detail: str = ""  # why a claimed record cannot be sent, or which field is corrupt


def _stored_record(
    app_id: str, msgid: str | None, number: str, time_: str
) -> tuple[BackfillRecord | None, str]:
    """The stored record, validated again: a hand-edited one may no longer be sendable."""
    try:
        record = BackfillRecord.parse(
            {"app_id": app_id, "msgid": msgid or None, "number": number, "time": time_}
        )
    except InvalidRecord as exc:
        return None, "corrupt state: " + ", ".join(sorted(exc.errors))
    return record, ""


def _script(name: str) -> str:
    return resources.files("worker").joinpath(f"lua/{name}.lua").read_text()


class Store:
    """Typed access to the project's Redis state; one instance per process."""

    def __init__(self, client: redis.Redis, *, dedupe_ttl_s: int, requeue_after_s: float) -> None:
        self.redis = client
        self.dedupe_ttl_s = dedupe_ttl_s
        self.requeue_after_s = requeue_after_s
        self._enqueue = client.register_script(_script("enqueue"))
        self._claim = client.register_script(_script("gcra") + _script("claim"))
        self._finish = client.register_script(_script("finish"))
        self._promote = client.register_script(_script("promote"))
        self._replay = client.register_script(_script("replay"))

    def enqueue(
        self,
        record: BackfillRecord,
        *,
        source: str = "api",
        dispatch_grace_s: float | None = None,
        caller: str | None = None,
    ) -> tuple[str, bool]:
        """Store a new delivery (or find the same record's); returns (delivery_id, created)."""
        return self.enqueue_many(
            [record], source=source, dispatch_grace_s=dispatch_grace_s, caller=caller
        )[0]

    def enqueue_many(
        self,
        records: Sequence[BackfillRecord],
        *,
        source: str = "bulk",
        dispatch_grace_s: float | None = 0.0,
        caller: str | None = None,
    ) -> list[tuple[str, bool]]:
        """Store deliveries in one script run; (delivery_id, created) per record, in order.

        ``dispatch_grace_s`` is how long the dispatchers leave a new delivery alone:
        0 for bulk (they publish it), ``requeue_after_s`` (None) when the caller publishes.
        ``caller`` (an intake token's name) is added to the delivery's ``callers``, new or
        not: the intake lets a caller read only the deliveries listed for it.
        """
        if not records:
            return []
        grace = self.requeue_after_s if dispatch_grace_s is None else dispatch_grace_s
        key_list = [keys.SCHEDULE]
        args: list[Any] = [self.dedupe_ttl_s, grace, source, caller or "", keys.DELIVERY]
        for record in records:
            delivery_id = new_delivery_id()
            key_list += [keys.dedupe(record.fingerprint()), keys.delivery(delivery_id)]
            args += [delivery_id, record.app_id, record.msgid or "", record.number, record.time]
        flat = self._enqueue(key_list, args)
        return [(str(flat[i + 1]), bool(int(flat[i]))) for i in range(0, len(flat), 2)]

    def claim(
        self,
        delivery_id: str,
        lease_s: float,
        *,
        max_attempts: int,
        pause_s: float,
        rate_per_s: float = 0.0,
        burst: int = 1,
        max_wait_s: float = 5.0,
    ) -> Claim:
        """Lease a pending, due delivery for one attempt (counted now) and a rate-limit slot.

        A claimed delivery whose stored record no longer validates comes back with
        ``record=None`` and the reason in ``detail``: the caller dead-letters it.
        """
        reply = self._claim(
            [keys.delivery(delivery_id), keys.SCHEDULE, keys.PAUSED, keys.RATE, keys.DEAD],
            [
                delivery_id,
                lease_s,
                rate_per_s,
                burst,
                max_wait_s,
                max_attempts,
                max(int(pause_s * 1000), 1),
            ],
        )
        verdict = str(reply[0])
        if verdict == "claimed":
            _, token, attempts, app_id, msgid, number, time_, dedupe_key, replay, wait = reply
            record, problem = _stored_record(app_id, msgid, number, time_)
            return Claim(
                verdict,
                str(token),
                int(attempts),
                record,
                str(dedupe_key),
                replay == "1",
                wait_s=float(wait),
                detail=problem,
            )
        if verdict in ("delivered", "poison"):
            _, attempts, app_id, msgid, number, time_ = reply
            record = BackfillRecord.from_fields(
                {"app_id": app_id, "msgid": msgid or "", "number": number, "time": time_}
            )
            return Claim(verdict, attempts=int(attempts), record=record)
        if verdict in ("paused", "throttled"):
            return Claim(verdict, resume_at=float(reply[1]))
        if verdict == "corrupt":
            return Claim(verdict, detail=f"corrupt state: {reply[1]}")
        return Claim(verdict)

    def finish(
        self,
        delivery_id: str,
        claim: Claim,
        *,
        outcome: str,
        attempt: dict[str, Any],
        counted: bool,
        retry_in_s: float,
        pause_s: float,
        last_error: str,
        pause_reason: str = "",
        hold_s: float = 0.0,
        deadline_s: float = 120.0,
    ) -> tuple[str, bool]:
        """Record an attempt and its consequence atomically; rides out a Redis restart."""
        key_list = [
            keys.delivery(delivery_id),
            keys.attempts(delivery_id),
            keys.SCHEDULE,
            keys.DEAD,
            claim.dedupe_key or keys.dedupe("unknown"),
            keys.PAUSED,
            keys.PROBE,
            keys.PROBE_LOCK,
            keys.RATE,
        ]
        args = [
            delivery_id,
            claim.token,
            outcome,
            json.dumps(attempt, separators=(",", ":")),
            "1" if counted else "0",
            retry_in_s,
            self.dedupe_ttl_s,
            pause_s,
            last_error,
            pause_reason,
            hold_s,
            HISTORY,
        ]
        verdict, first_pause = persist(lambda: self._finish(key_list, args), deadline_s)
        return str(verdict), bool(int(first_pause))

    def promote(
        self, queue: str, *, limit: int, high_water: int, probe_lease_s: float, pause_s: float
    ) -> tuple[int, list[str]]:
        """The queue's length and the due deliveries to dispatch now (each pushed out by
        requeue_after meanwhile)."""
        depth, ids = self._promote(
            [keys.SCHEDULE, keys.PAUSED, keys.PROBE, keys.PROBE_LOCK, queue],
            [
                limit,
                self.requeue_after_s,
                high_water,
                max(int(probe_lease_s * 1000), 1),
                max(int(pause_s * 1000), 1),
            ],
        )
        return int(depth), [str(i) for i in ids]

    def beat(self, node: str, fields: Mapping[str, str], ttl_s: int) -> None:
        """Write one worker's heartbeat hash (see ``worker.heartbeat``)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.worker(node), items=[part for pair in fields.items() for part in pair])
        pipe.expire(keys.worker(node), ttl_s)
        pipe.execute()

    def beats(self, node: str | None = None) -> dict[str, dict[str, str]]:
        """The live workers' heartbeats by node (just ``node``'s when given)."""
        names = (
            [keys.worker(node)]
            if node
            else sorted(self.redis.scan_iter(keys.WORKER + "*", count=1000))
        )
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        found = zip(names, pipe.execute(), strict=True)
        return {name[len(keys.WORKER) :]: beat for name, beat in found if beat}

    def status(self, delivery_id: str) -> dict[str, Any] | None:
        """The delivery's stored fields and every attempt, or None if unknown."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.delivery(delivery_id))
        pipe.lrange(keys.attempts(delivery_id), 0, -1)
        fields, attempts = pipe.execute()
        if not fields:
            return None
        return {
            "delivery_id": delivery_id,
            **{k: v for k, v in fields.items() if k not in ("dedupe", "claims")},
            "attempts_made": [json.loads(a) for a in attempts],
        }

    def states(self, delivery_ids: Iterable[str]) -> list[str | None]:
        """The state of each delivery (pending, delivered, dead) in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id in delivery_ids:
            pipe.hget(keys.delivery(delivery_id), "state")
        return list(pipe.execute())

    def dead_ids(self, *, limit: int = 100, offset: int = 0) -> list[tuple[str, float]]:
        """Dead-lettered deliveries, newest first, with when they died."""
        rows = self.redis.zrevrange(keys.DEAD, offset, offset + limit - 1, withscores=True)
        return [(str(row[0]), float(row[1])) for row in rows]

    def replay(self, delivery_id: str) -> bool:
        """Make a dead delivery pending again with a fresh attempt budget."""
        return bool(
            self._replay(
                [keys.delivery(delivery_id), keys.SCHEDULE, keys.DEAD],
                [delivery_id, self.dedupe_ttl_s, self.requeue_after_s],
            )
        )

    def purge(self, delivery_id: str) -> bool:
        """Delete a dead delivery for good; refuses deliveries that are not dead."""
        key = keys.delivery(delivery_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    if pipe.hget(key, "state") != "dead":
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.delete(key, keys.attempts(delivery_id))
                    pipe.zrem(keys.DEAD, delivery_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def pause_state(self) -> tuple[str, float] | None:
        """The reason and remaining seconds of a fleet-wide pause, or None."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.PAUSED)
        pipe.pttl(keys.PAUSED)
        reason, ttl_ms = list(pipe.execute())
        if reason is None:
            return None
        return str(reason), max(int(ttl_ms), 0) / 1000.0

    def gauges(self, queue: str, now: float) -> dict[str, float]:
        """Fleet figures for metrics: queue depth, pending, waiting, dead, paused."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.zcard(keys.SCHEDULE)
        pipe.zcount(keys.SCHEDULE, f"({now}", "+inf")
        pipe.zcard(keys.DEAD)
        pipe.exists(keys.PAUSED)
        depth, pending, waiting, dead, paused = pipe.execute()
        return {
            "queue_depth": depth,
            "pending": pending,
            "waiting_retries": waiting,
            "dead_letters": dead,
            "paused": 1 if paused else 0,
        }

    def counts(self) -> dict[str, int]:
        """How many deliveries are scheduled (pending) and dead-lettered."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(keys.SCHEDULE)
        pipe.zcard(keys.DEAD)
        pending, dead = pipe.execute()
        return {"pending": int(pending), "dead": int(dead)}


def persist(write: Callable[[], T], deadline_s: float) -> T:
    """Run a Redis write, retrying connection failures until ``deadline_s`` has passed."""
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    while True:
        try:
            return write()
        except _TRANSIENT_REDIS:
            if time.monotonic() >= give_up:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
