"""Every Redis key the project uses, in one screen (the broker's own keys are kombu's).

- ``backfill:delivery:<id>``  hash: the record, state, attempt count, due time, lease
- ``backfill:attempts:<id>``  list: one JSON object per attempt, oldest first
- ``backfill:dedupe:<sha256>`` string: delivery_id of a pending or delivered record (expires)
- ``backfill:schedule``       sorted set: every pending delivery, scored by when to look at it
- ``backfill:dead``           sorted set: dead-lettered deliveries, scored by when they died
- ``backfill:paused``         string with a TTL: the fleet-wide pause after an account block
- ``backfill:pause:probe``    flag: the pause ended but no answer has proven the account yet
- ``backfill:pause:probe-lock`` string with a TTL: one probe attempt in flight
- ``backfill:ratelimit``      string: the fleet's rate-limit clock (GCRA arrival time)
- ``backfill:worker:<node>``  hash with a TTL: one worker's heartbeat (see heartbeat.py)
"""

from __future__ import annotations

PREFIX = "backfill:"
DELIVERY = PREFIX + "delivery:"
ATTEMPTS = PREFIX + "attempts:"
DEDUPE = PREFIX + "dedupe:"
SCHEDULE = PREFIX + "schedule"
DEAD = PREFIX + "dead"
PAUSED = PREFIX + "paused"
PROBE = PREFIX + "pause:probe"
PROBE_LOCK = PREFIX + "pause:probe-lock"
RATE = PREFIX + "ratelimit"
WORKER = PREFIX + "worker:"


def delivery(delivery_id: str) -> str:
    """The hash of one delivery."""
    return DELIVERY + delivery_id


def attempts(delivery_id: str) -> str:
    """The attempt list of one delivery."""
    return ATTEMPTS + delivery_id


def dedupe(fingerprint: str) -> str:
    """The idempotency key of one record's four fields."""
    return DEDUPE + fingerprint


def worker(node: str) -> str:
    """The heartbeat hash of one worker node."""
    return WORKER + node
