"""``backfill health``: whether the fleet is at work, for healthchecks and probes.

Redis answers and a worker replies to a Celery ping within the timeout, and no worker's
heartbeat says it is stalled (or its clock is too far off, uncorrected); holds and a full
Redis are named. Against a full Redis, which refuses the ping (its reply queue is a
write) and whose workers may deliver without Celery, a live heartbeat stands in for the
reply.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click
import redis

from worker.cli.common import exits

if TYPE_CHECKING:
    from worker.state.capacity import Memory


@click.command()
@click.option("--timeout", default=2.0, show_default=True, type=click.FloatRange(0.1, 30))
@click.option(
    "--node",
    help="Only this worker counts, e.g. celery@%h: the default name of the worker on "
    "this host (%h is the host name). Without it any worker's reply counts.",
)
@exits
def health(timeout: float, node: str | None) -> None:
    """Exit 0 when Redis answers and a worker replies to a Celery ping, else 1.

    Without --node it waits for as many replies as workers wrote a heartbeat lately
    (at least one), or the timeout; it never scans Redis's keys. On a full Redis (named),
    which refuses the ping, a worker's live heartbeat stands in for its reply."""
    from celery.utils.nodenames import host_format

    from worker.app import app
    from worker.operate.clock import clock
    from worker.operate.heartbeat import BEAT_TTL_S
    from worker.runtime import checked_store, get_store
    from worker.state import capacity

    try:
        get_store().redis.ping()
        checked_store()  # an evicting Redis is refused: exit 2, the fix named
        memory = capacity.read(get_store().redis)
        clock.measure(get_store().redis)  # judge the heartbeats by the shared clock
    except redis.RedisError as exc:
        click.echo(f"unhealthy: Redis does not answer ({type(exc).__name__})")
        sys.exit(1)
    name = host_format(node) if node else None
    beats = get_store().beats(name)  # the workers listed in bf:workers: never a SCAN
    # stop waiting once every worker with a heartbeat replied (a node: once it did)
    expected = None if name else max(len(beats), 1)
    try:
        replies = app.control.ping(
            destination=[name] if name else None, timeout=timeout, limit=expected
        )
        unanswered = f"no reply within {timeout:g} s"
    except redis.exceptions.OutOfMemoryError:  # its reply queue is a write: refused
        replies, unanswered = [], "a full Redis refuses the ping"
        memory = capacity.read(get_store().redis)
    who = _at_work(name, replies, beats, memory, unanswered)
    if who is None:
        missing = f"worker {name} did not reply" if name else "no worker replied"
        if memory.full:  # and nothing delivers, so nothing frees it
            missing = (
                f"{memory.full_message()}; {missing} ({unanswered}) nor wrote a heartbeat "
                f"in the last {BEAT_TTL_S} s: nothing delivers to free it"
            )
        else:
            missing += f" to a ping within {timeout:g} s"
        click.echo(f"unhealthy: {missing}")
        sys.exit(1)
    clocks = _clocks(beats)
    bad = [f"{who} stalled: {why}" for who, why in _stalled_workers(name, beats)]
    bad += [f"{who} {why}" for who, (why, fatal) in clocks.items() if fatal]
    bad += [memory.full_message()] if bad and memory.full else []  # named in every line
    if bad:
        click.echo("unhealthy: " + "; ".join(bad))
        sys.exit(1)
    notes = "".join(f"; {who} {why}" for who, (why, _) in clocks.items())
    if memory.full:  # the workers still deliver (and so free memory): named, not fatal
        notes += f"; WARNING: {memory.full_message()}"
    click.echo(f"healthy: Redis answers, {who}, making progress{_holding()}{notes}")


def _at_work(
    name: str | None,
    replies: list[Any],
    beats: dict[str, dict[str, str]],
    memory: Memory,
    unanswered: str,
) -> str | None:
    """Who shows the fleet is at work (with a destination only that node answers), in
    words; None when nobody does. A worker draining a full Redis delivers without Celery
    until it has room, so it may not answer a ping: there its live heartbeat (a script
    that runs on a full Redis) answers for it."""
    if replies:
        return f"worker {name} replied" if name else f"{len(replies)} worker(s) replied"
    if memory.full and beats:
        who = f"worker {name}" if name else f"{len(beats)} worker(s)"
        return f"{who} wrote a heartbeat ({unanswered})"
    return None


def _clocks(beats: dict[str, dict[str, str]]) -> dict[str, tuple[str, bool]]:
    """The workers whose clock is over BACKFILL_CLOCK_MAX_OFFSET_S off the shared clock:
    what to say, and whether it is fatal (only when they do not correct it)."""
    from worker.operate.clock import offset_problem
    from worker.runtime import get_settings

    limit = get_settings().clock_max_offset_s
    found = {who: offset_problem(beat, limit) for who, beat in beats.items()}
    return {who: problem for who, problem in found.items() if problem}


def _holding() -> str:
    """What holds the fleet (a provider outage, an account pause), for `health`; '' if none.
    A hold is not a worker's fault: the workers stay healthy while it lasts."""
    from worker.operate.clock import clock
    from worker.runtime import get_store

    store = get_store()
    outage, pause = store.outage_state(), store.pause_state()
    if outage is not None:
        since, wait = outage
        reason = pause[0].removeprefix("outage: ") if pause else "no answer from the provider"
        lasted = f"for {max(clock.now() - since, 0):.0f} s" if since > 0 else "since ?"
        if reason.startswith("status -16"):  # the provider refuses our timestamps
            return (
                f"; HOLDING {lasted}: the provider refuses our timestamps ({reason}): check "
                f"the workers' clocks (probe every {wait:g} s)"
            )
        return f"; HOLDING for a provider outage {lasted} (probe every {wait:g} s): {reason}"
    if pause is not None:
        return f"; PAUSED for {pause[1]:.0f} s more: {pause[0]}"
    return ""


def _stalled_workers(node: str | None, beats: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """The workers (just ``node`` when given) whose heartbeat says they are stalled."""
    from worker.operate.clock import clock
    from worker.operate.heartbeat import BEAT_TTL_S, stalled
    from worker.runtime import get_settings

    if node and node not in beats:
        return [(node, f"no heartbeat in the last {BEAT_TTL_S} s")]
    now, limit = clock.now(), get_settings().stall_after_s
    found = [(who, stalled(beat, now, limit)) for who, beat in beats.items()]
    return [(who, why) for who, why in found if why]
