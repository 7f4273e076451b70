"""Everything the project keeps in Redis: deliveries, their lanes, dead letters, the pause.

The two lanes (sorted sets of pending deliveries by due time) are the source of truth;
Celery messages only wake a worker up, and a woken worker drains the lanes itself. Each
state change is one Lua script (``lua/``, called through its contract in ``scripts.py``),
so a delivery is never half-written, and the scripts read Redis's own clock, so worker
clocks may drift.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis

from worker.deliver.policy import OutageRules, Outcome
from worker.deliver.steps import BULK, LIVE, Finish, StepResult, parse_step_reply
from worker.enqueue.record import BackfillRecord
from worker.operate.clock import clock
from worker.state import capacity, delivery, keys, scripts
from worker.state.connection import TRANSIENT_REDIS, persist

# How many attempt documents a delivery keeps (the audit log has every one).
HISTORY = 50
DEFAULT_OUTAGE = OutageRules()
# Scripts run on a full Redis (``noeviction`` at ``maxmemory``) only when their contract
# says so (``when_full``: a step, a purge, a heartbeat). Every other script is refused
# whole by a full Redis before its first command: it never half-writes.


class Store:
    """Typed access to the project's Redis state; one instance per process."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        dedupe_ttl_s: int,
        keep_delivered_s: int = 0,
        pause_s: float = 60.0,
        outage: OutageRules = DEFAULT_OUTAGE,
        lookup_index: bool = True,
    ) -> None:
        self.redis, self.lookup_index = client, lookup_index
        self._outage_args = dict(zip(scripts.OUTAGE_ARGS, [
            outage.failures, outage.deliveries, max(int(outage.window_s * 1000), 1),
            max(int(outage.probe_cap_s * 1000), 1), outage.ramp_start_per_s,
            max(int(outage.ramp_double_s * 1000), 1), outage.retried,
            max(int(outage.short_s * 1000), 0),
        ], strict=True))  # fmt: skip
        self.dedupe_ttl_s, self.keep_delivered_s, self.pause_s = (
            dedupe_ttl_s, keep_delivered_s, pause_s,
        )  # fmt: skip
        self._scripts = {
            name: client.register_script(script.source()) for name, script in scripts.ALL.items()
        }
        self._step_keys = scripts.STEP.key_list()

    def _call(self, name: str, argv: Sequence[Any]) -> Any:
        """Run a script with its declared keys and ``argv`` (built by its contract)."""
        return self._scripts[name](scripts.ALL[name].key_list(), list(argv))

    def enqueue(
        self, record: BackfillRecord, *, caller: str | None = None, wake_queue: str = "",
        wake: str = "", due_in_s: float = 0.0, source: str = "api",
    ) -> tuple[str, bool]:  # fmt: skip
        """Store one live delivery (or find the same record's) and wake a worker if new.

        ``source`` is for the caller's audit line only: a single record is always live.
        """
        return self.enqueue_many(
            [record], lane=LIVE, caller=caller, wake_queue=wake_queue, wake=wake,
            due_in_s=due_in_s,
        )[0]  # fmt: skip

    def enqueue_many(
        self,
        records: Sequence[BackfillRecord],
        *,
        lane: str = BULK,
        caller: str | None = None,
        due_in_s: float = 0.0,
        wake_queue: str = "",
        wake: str = "",
        source: str = "bulk",
    ) -> list[tuple[str, bool]]:
        """Store deliveries in one script run; (delivery_id, created) per record, in order.

        A batch goes to the bulk lane unless ``lane`` says otherwise (``source`` is for
        the caller's audit line only).

        ``caller`` (an intake token's name) joins each delivery's callers, new or not: the
        intake lets a caller read only the deliveries listed for it. ``wake`` is a wake-up
        message pushed onto ``wake_queue`` when anything was created.
        """
        if not records:
            return []
        argv = scripts.ENQUEUE.argv(
            {
                "lane": lane, "caller": caller or "", "due_in_ms": int(due_in_s * 1000),
                "wake_queue": wake_queue, "wake": wake, "index": int(self.lookup_index),
            },
            (
                {
                    "id": delivery.delivery_id(record), "app_id": record.app_id,
                    "msgid": record.msgid or "", "number": record.number, "time": record.time,
                }
                for record in records
            ),
        )  # fmt: skip
        try:
            flat = self._call("enqueue", argv)
        except redis.exceptions.OutOfMemoryError:
            raise capacity.full_error(self.redis) from None  # refused whole: nothing stored
        return [(str(flat[i + 1]), bool(int(flat[i]))) for i in range(0, len(flat), 2)]

    def step(
        self,
        done: Finish | Sequence[Finish] | None,
        *,
        claim: bool | int,
        prefer_bulk: bool,
        lease_s: float,
        max_attempts: int,
        rate_per_s: float = 0.0,
        burst: int = 1,
        max_wait_s: float = 5.0,
        gap_s: float = 0.25,
        deadline_s: float = 120.0,
    ) -> StepResult:
        """Record the attempts ``done`` and claim up to ``claim`` due deliveries: one trip.

        The i-th delivery claimed (from 0) is leased for ``lease_s`` plus i ``gap_s``: the
        caller sends them in turn and gives the rest back once an attempt is slow.

        Recording rides out a Redis restart (``deadline_s``); when Redis fails during a
        step, the attempts are recorded alone and the claim is asked again ('again').
        """
        finished = [] if done is None else [done] if isinstance(done, Finish) else list(done)
        want = int(claim)
        settings = {
            "n": len(finished), "k": want, "lease_ms": int(lease_s * 1000), "rate": rate_per_s,
            "burst": burst, "max_wait_ms": int(max_wait_s * 1000), "max_attempts": max_attempts,
            "prefer": BULK if prefer_bulk else LIVE, "pause_ms": self._pause_ms,
            "gap_ms": int(gap_s * 1000), "marker_ttl_s": self.dedupe_ttl_s,
            "keep_s": self.keep_delivered_s, "history": HISTORY, **self._outage_args,
        }  # fmt: skip
        args = scripts.STEP.argv(settings, [self._finish_args(item) for item in finished])
        try:
            reply = self._run_step(args)
        except TRANSIENT_REDIS:
            if not finished:
                raise
            args[1] = 0  # record the attempts alone; the drain asks for a claim again
            reply = persist(lambda: self._run_step(args), deadline_s)
            reply[1] = ["again"]
        return parse_step_reply(reply)

    def _run_step(self, args: list[Any]) -> Any:
        # EVALSHA straight away: redis-py's Script wrapper costs ~2% of a worker's CPU
        try:
            return self.redis.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self._scripts["step"].sha, len(self._step_keys), *self._step_keys, *args
            )
        except redis.exceptions.NoScriptError:
            return self._call("step", args)  # loads it (a restarted Redis has no scripts)

    def _finish_args(self, done: Finish) -> dict[str, Any]:
        answer = done.answer
        doc = ""  # a delivered record compacted at once keeps no history: none to send
        if self.keep_delivered_s or done.outcome not in (Outcome.DELIVERED, Outcome.DUPLICATE):
            doc = delivery.attempt_doc(
                done.claim.attempts, int(clock.now() * 1000), done.outcome,
                http_status=answer.http_status, api_status=answer.api_status,
                api_reason=answer.api_reason, error=answer.error, latency_ms=answer.latency_ms,
                retry_in_s=done.retry_in_s,
            )  # fmt: skip
        return {
            "id": done.claim.delivery_id, "token": done.claim.token, "outcome": done.outcome,
            "doc": doc, "counted": "1" if done.verdict.counted else "0",
            "retry_ms": int((done.retry_in_s or 0.0) * 1000), "last_error": done.last_error,
            "hold_ms": int(done.verdict.hold_s * 1000), "lane": done.claim.lane,
            "callers": done.claim.callers, "evidence": done.verdict.evidence,
        }  # fmt: skip

    @property
    def _pause_ms(self) -> int:
        return max(int(self.pause_s * 1000), 1)

    def wake_figures(self, queue: str) -> tuple[int, int, bool, bool]:
        """The queue's length, how many deliveries are due now, whether sends may go (no
        pause), and whether a probe must go first (a pause just ended)."""
        now = int(clock.now() * 1000)  # due times are Redis's: read by the shared clock
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.zcount(keys.LIVE, "-inf", now)
        pipe.zcount(keys.BULK, "-inf", now)
        pipe.pttl(keys.PAUSED)
        pipe.exists(keys.PROBE)
        depth, live, bulk, pause_ms, probe = pipe.execute()
        if pause_ms == -1:
            # a pause always has a TTL; one without (a manual SET) is given the configured one
            self.redis.pexpire(keys.PAUSED, self._pause_ms)
        return int(depth), int(live) + int(bulk), int(pause_ms) == -2, bool(probe)

    def beat(self, node: str, fields: Mapping[str, str], ttl_s: int) -> None:
        """Write one worker's heartbeat hash (see ``worker.operate.heartbeat``) and list the node
        in ``bf:workers`` by its expiry, dropping nodes whose beats ended long ago."""
        pairs = [{"field": name, "value": value} for name, value in fields.items()]
        self._call("beat", scripts.BEAT.argv({"node": node, "ttl_s": ttl_s}, pairs))

    def beats(self, node: str | None = None) -> dict[str, dict[str, str]]:
        """The live workers' heartbeats by node (just ``node``'s when given), read from the
        nodes listed in ``bf:workers``: as many keys as workers, whatever else Redis holds."""
        nodes = [node] if node else sorted(str(n) for n in self.redis.zrange(keys.WORKERS, 0, -1))
        pipe = self.redis.pipeline(transaction=False)
        for name in nodes:
            pipe.hgetall(keys.worker(name))
        found = zip(nodes, pipe.execute(raise_on_error=False), strict=True)
        return {name: beat for name, beat in found if isinstance(beat, dict) and beat}

    def status(self, delivery_id: str) -> dict[str, Any] | None:
        """The delivery's readable document with its attempts (delivery.status), or None."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.delivery(delivery_id))
        pipe.lrange(keys.attempts(delivery_id), 0, -1)
        pipe.get(keys.marker(delivery_id))
        try:
            fields, history, marker = pipe.execute()
        except redis.ResponseError:  # a key of the wrong type, left for the claim to bury
            return None
        if fields:
            return delivery.status(delivery_id, fields, history)
        if marker:
            return delivery.compacted_status(delivery_id, marker)
        return None

    def states(self, delivery_ids: Sequence[str]) -> list[str | None]:
        """The state of each delivery (pending, delivered, dead, None) in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id in delivery_ids:
            pipe.exists(keys.marker(delivery_id))
            pipe.hget(keys.delivery(delivery_id), keys.FIELD["state"])
        flat = pipe.execute()
        return [
            "delivered" if flat[i] else delivery.STATES.get(flat[i + 1] or "")
            for i in range(0, len(flat), 2)
        ]

    def pause_state(self) -> tuple[str, float] | None:
        """The reason and remaining seconds of a fleet-wide pause, or None."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.PAUSED)
        pipe.pttl(keys.PAUSED)
        reason, ttl_ms = list(pipe.execute())
        if reason is None:
            return None
        return str(reason), max(int(ttl_ms), 0) / 1000.0

    def outage_state(self) -> tuple[float, float] | None:
        """While the fleet holds for a provider outage: since when (epoch s) and the
        probe's current wait (s); else None."""
        value = self.redis.get(keys.OUTAGE)
        if value is None:
            return None
        start, _, rest = str(value).partition("|")
        wait = rest.partition("|")[0]  # "<start>|<wait>|<probes sent>"
        try:
            return int(start) / 1000, int(wait) / 1000
        except (ValueError, OverflowError):  # hand-edited: not digits, or past any float
            return 0.0, 0.0  # unreadable, but the fleet holds all the same

    def gauges(self, queue: str, now: float) -> dict[str, float]:
        """Fleet figures for metrics: queue depth, pending, waiting, dead, paused, and per
        lane how long its most overdue delivery has been due (s; 0 when none is due)."""
        now_ms = int(now * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        for lane in (keys.LIVE, keys.BULK):
            pipe.zcard(lane)
            pipe.zcount(lane, f"({now_ms}", "+inf")
            pipe.zrange(lane, 0, 0, withscores=True)  # the lowest due time
        pipe.zcard(keys.DEAD)
        pipe.exists(keys.PAUSED)
        pipe.exists(keys.OUTAGE)
        depth, live, live_later, live_first, bulk, bulk_later, bulk_first, dead, paused, out = (
            pipe.execute()
        )
        return {
            "queue_depth": depth,
            "pending": live + bulk,
            "waiting_retries": live_later + bulk_later,
            "dead_letters": dead,
            "paused": 1 if paused else 0,
            "outage": 1 if out else 0,
            "overdue_live_s": max(now_ms - live_first[0][1], 0) / 1000 if live_first else 0.0,
            "overdue_bulk_s": max(now_ms - bulk_first[0][1], 0) / 1000 if bulk_first else 0.0,
        }

    def counts(self) -> dict[str, int]:
        """How many deliveries are pending (both lanes) and dead-lettered."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(keys.LIVE)
        pipe.zcard(keys.BULK)
        pipe.zcard(keys.DEAD)
        live, bulk, dead = pipe.execute()
        return {"pending": int(live) + int(bulk), "dead": int(dead)}

    def dead_page(
        self, *, limit: int = 50, before: float | None = None, since: float | None = None,
        app_id: str | None = None,
    ) -> list[tuple[str, float]]:  # fmt: skip
        """Dead letters newest first, with when they died (epoch s): a page of ``limit``
        older than ``before`` (a cursor: the last row's time) and not older than ``since``;
        ``app_id`` reads that app's own index, never every letter."""
        index = keys.dead_app(app_id) if app_id else keys.DEAD
        top = f"({round(before * 1000)}" if before is not None else "+inf"
        bottom = round(since * 1000) if since is not None else "-inf"
        rows: list[Any] = self.redis.zrevrangebyscore(
            index, top, bottom, start=0, num=limit, withscores=True
        )
        return [(str(member), float(score) / 1000) for member, score in rows]

    def dead_batches(self, app_id: str | None = None, batch: int = 1000) -> Iterator[list[str]]:
        """The dead letters' ids, a batch at a time, oldest first (``dead_letters.batches``:
        a mass action fixes its end there first)."""
        from worker.state.dead_letters import batches

        return batches(self.redis, app_id, batch)

    def replay(self, delivery_ids: Sequence[str]) -> list[str]:
        """Make dead deliveries pending again (bulk lane, fresh budget); the ids replayed."""
        if not delivery_ids:
            return []
        argv = scripts.REPLAY.argv({}, ({"id": i} for i in delivery_ids))
        return [str(i) for i in self._call("replay", argv)]

    def purge(self, delivery_ids: Sequence[str]) -> int:
        """Delete dead deliveries for good (others are left alone); how many went."""
        if not delivery_ids:
            return 0
        return int(self._call("purge", scripts.PURGE.argv({}, ({"id": i} for i in delivery_ids))))
