"""Redis's memory, read before trusting it: an evicting policy loses records without a
trace, and a full Redis (``noeviction`` at ``maxmemory``) refuses every new record.

Every entry point (the worker, the intake, ``enqueue``, ``health``, ``enqueue_backfill``)
refuses a Redis whose ``maxmemory-policy`` evicts keys, naming the fix, unless the
operator set ``BACKFILL_ACCEPT_EVICTION``. A full Redis is named as full, never as
"unavailable": the scripts that free memory (a delivery's step, a purge) still run then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from worker.operate.errors import ConfigError, RedisFull
from worker.state import keys

SAFE_POLICY = "noeviction"
FULL_AT = 0.99  # of maxmemory: past this, a batch of records no longer fits
FIX = (
    "set maxmemory-policy noeviction (redis.conf, or CONFIG SET maxmemory-policy "
    "noeviction), or BACKFILL_ACCEPT_EVICTION=true to accept losing records"
)
FULL = (
    "Redis is full (used_memory {used} of maxmemory {limit} bytes, maxmemory-policy "
    "noeviction): new records are refused until deliveries free memory or maxmemory is raised"
)


@dataclass(frozen=True, slots=True)
class Memory:
    """What ``INFO memory`` says of the policy and the room left (None: not told)."""

    policy: str | None
    used: int
    limit: int  # maxmemory; 0: no limit

    @property
    def evicting(self) -> bool:
        """Whether Redis may drop keys to make room (any policy but noeviction)."""
        return self.policy is not None and self.policy != SAFE_POLICY

    @property
    def full(self) -> bool:
        """Whether Redis refuses writes that need memory now (within FULL_AT of maxmemory:
        a write is refused when it would pass it, so "just under" is full too)."""
        return self.limit > 0 and self.used >= self.limit * FULL_AT

    @property
    def used_ratio(self) -> float:
        """used_memory / maxmemory (0 without a limit)."""
        return self.used / self.limit if self.limit > 0 else 0.0

    def full_message(self) -> str:
        """The sentence every reader shows for a full Redis."""
        return FULL.format(used=self.used, limit=self.limit)


def read(client: redis.Redis) -> Memory:
    """``INFO memory`` (works where CONFIG is renamed away, as on managed Redis)."""
    info: dict[str, Any] = client.info("memory")
    policy = info.get("maxmemory_policy")
    return Memory(
        policy=str(policy) if policy is not None else None,
        used=int(info.get("used_memory") or 0),
        limit=int(info.get("maxmemory") or 0),
    )


def refuse_eviction(client: redis.Redis, accept: bool) -> Memory:
    """Raise ConfigError (exit 2) for an evicting policy unless ``accept``; the memory read."""
    memory = read(client)
    if memory.evicting and not accept:
        raise ConfigError(
            f"Redis maxmemory-policy is {memory.policy}: it evicts keys when memory runs "
            f"out, so accepted records can vanish without a trace; {FIX}"
        )
    return memory


def refuses_writes(client: redis.Redis) -> bool:
    """Whether Redis refuses a small write now (what Celery's broker bookkeeping needs):
    one short-lived key is set to find out."""
    try:
        client.set(keys.ROOM, "1", px=1000)
    except redis.exceptions.OutOfMemoryError:
        return True
    return False


def is_full_error(exc: BaseException) -> bool:
    """Whether a Redis error is its refusal for lack of memory (OOM)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError)


def full_error(client: redis.Redis) -> RedisFull:
    """The RedisFull to raise after an OOM refusal, with the figures when they can be read."""
    try:
        return RedisFull(read(client).full_message())
    except redis.RedisError:
        return RedisFull(FULL.format(used="?", limit="?"))
