"""The intake's ``/healthz`` check: Redis answers, and has room, within half a second.

One INFO on a client of its own, from the event loop, so it never waits behind the
enqueue pool; concurrent checks share one. A full Redis (``noeviction`` at
``maxmemory``) is a failed check: every enqueue would get 503.
"""

from __future__ import annotations

import asyncio

import anyio
import redis
import redis.asyncio as aioredis

from worker.state.capacity import Memory

HEALTH_TIMEOUT_S = 0.5


class RedisCheck:
    """INFO memory on a client of its own, from the event loop; concurrent checks share one."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._ping: asyncio.Future[str] | None = None

    async def problem(self) -> str:
        """Why Redis did not answer within HEALTH_TIMEOUT_S, or that it is full; empty when
        it answered with room."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._ping)  # one caller leaving does not cancel the rest

    async def _check(self) -> str:
        try:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                info = await self.client.info("memory")
        except (redis.RedisError, TimeoutError) as exc:
            return type(exc).__name__
        memory = Memory(None, int(info.get("used_memory") or 0), int(info.get("maxmemory") or 0))
        return memory.full_message() if memory.full else ""
