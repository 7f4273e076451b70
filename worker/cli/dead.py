"""``backfill dead``: list, group, show, replay and purge the dead letters."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from worker.cli.common import exits
from worker.cli.records import status

if TYPE_CHECKING:
    from worker.state.store import Store

F = TypeVar("F", bound=Callable[..., Any])
Pick = Callable[[list[str]], list[str]]  # a group's letters out of a batch


@click.group()
def dead() -> None:
    """The dead-letter store: list, groups, show, replay, purge."""


@dead.command("list")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--before", "cursor", help="Cursor: the 'next page' value printed by the "
              "previous page; or epoch seconds: only letters older than that.")  # fmt: skip
@click.option("--since", help="Only letters that died at or after this (ISO date or epoch s).")
@click.option("--app-id", help="Only this app's letters (read from its own index).")
@exits
def dead_list(limit: int, cursor: str | None, since: str | None, app_id: str | None) -> None:
    """Dead letters, newest first, a page at a time: id, app, masked number, attempts, error."""
    from worker.operate.redact import mask_number
    from worker.runtime import get_store

    store = get_store()
    rows = _dead_page(store, limit, _cursor(cursor), _epoch(since), app_id)
    click.echo(f"{'delivery_id':16}  {'app_id':16}  {'number':20}  att  {'when':20}  last_error")
    for delivery_id, died in rows:
        info = store.status(delivery_id) or {}
        click.echo(
            f"{delivery_id:16}  {info.get('app_id', '')[:16]:16}  "
            f"{mask_number(info.get('number', ''))[:20]:20}  {info.get('attempts', '?'):>3}  "
            f"{_when(died):20}  {info.get('last_error', '')}"
        )
    more = f"; next page: --before {rows[-1][1]!r}:{rows[-1][0]}" if len(rows) == limit else ""
    click.echo(f"{len(rows)} shown, {store.counts()['dead']} dead in all{more}", err=True)


def _dead_page(
    store: Any, limit: int, cursor: tuple[float, str] | None, since: float | None,
    app_id: str | None,
) -> list[tuple[str, float]]:  # fmt: skip
    """A page of dead letters after ``cursor`` (the last row shown: when it died, its id).

    Letters often die in the same millisecond, and a page may end inside such a group: the
    rest of the group comes first on the next page. An index lists one millisecond's
    letters by id, descending, so those already shown are the ones from the cursor's id up.
    """
    if cursor is None or not cursor[1]:
        before = cursor[0] if cursor else None
        rows: list[tuple[str, float]] = store.dead_page(
            limit=limit, before=before, since=since, app_id=app_id
        )
        return rows
    ms, last = round(cursor[0] * 1000), cursor[1]
    want = limit + 16
    while True:  # read the cursor's millisecond too, and skip what was shown of it
        rows = store.dead_page(limit=want, before=(ms + 1) / 1000, since=since, app_id=app_id)
        fresh = [(i, t) for i, t in rows if not (round(t * 1000) == ms and i >= last)]
        if len(fresh) >= limit or len(rows) < want:
            return fresh[:limit]
        want *= 2


def _cursor(text: str | None) -> tuple[float, str] | None:
    """--before: "<epoch s>:<delivery_id>" as a page prints it, or epoch seconds alone."""
    if text is None:
        return None
    at, _, last = text.partition(":")
    try:
        value = float(at)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (last and not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", last)):
        raise click.BadParameter(
            "expected the 'next page' value a page printed, or epoch seconds",
            param_hint="--before",
        )
    return value, last


@dead.command("show")
@click.argument("delivery_id")
@click.pass_context
def dead_show(ctx: click.Context, delivery_id: str) -> None:
    """Every attempt of one dead letter (JSON)."""
    ctx.invoke(status, delivery_id=delivery_id)


SCOPE = (
    "Which letters: one DELIVERY_ID (at once), or --all, --app-id A (that app's) or "
    "--group KEY (those whose last error is the group's, as `dead groups` and the console "
    "show it); --app-id and --group together narrow each other."
)


def _scoped(verb: str) -> Callable[[F], F]:
    """The options that choose what a mass action acts on, and --yes."""

    def add(func: F) -> F:
        for option in reversed((
            click.argument("delivery_id", required=False),
            click.option("--all", "everything", is_flag=True, help=f"{verb} every dead letter."),
            click.option("--app-id", help=f"{verb} this app's dead letters."),
            click.option("--group", "group", metavar="KEY",
                         help=f"{verb} the dead letters of this group (last error)."),
            click.option("--yes", is_flag=True, help="Confirm without being asked."),
        )):  # fmt: skip
            func = option(func)
        return func

    return add


@dead.command("replay", epilog=SCOPE)
@_scoped("Replay")
@exits
def dead_replay(
    delivery_id: str | None, everything: bool, app_id: str | None, group: str | None, yes: bool
) -> None:
    """Re-enqueue dead letters (bulk lane, fresh attempt budget, same delivery_id).

    A mass action asks first (or --yes), then works through the letters that had died
    when it began, 1,000 at a time, in constant memory: a letter that dies after that (a
    replay killed again) is left alone. The workers' wakers pick the replays up at the
    pace of the fleet, behind live records.
    """
    _mass("replay", delivery_id, everything, app_id, group, yes)


@dead.command("purge", epilog=SCOPE)
@_scoped("Purge")
@exits
def dead_purge(
    delivery_id: str | None, everything: bool, app_id: str | None, group: str | None, yes: bool
) -> None:
    """Delete dead letters for good (a mass action asks first, or --yes; 1,000 per script
    run; only the letters that had died when it began)."""
    _mass("purge", delivery_id, everything, app_id, group, yes)


@dead.command("groups")
@exits
def dead_groups() -> None:
    """The newest 1,000 dead letters grouped by last error, as the console groups them:
    each group's KEY (for --group), its count among them, and the error."""
    from worker.console import queries
    from worker.runtime import get_store

    store = get_store()
    groups = queries.dead_groups(store)
    click.echo(f"{'group':16}  {'count':>5}  last_error")
    for found in groups:
        click.echo(f"{found.key:16}  {found.count:5d}  {found.error}")
    shown = sum(found.count for found in groups)
    click.echo(f"{shown} grouped (the newest), {store.counts()['dead']} dead in all", err=True)


def _mass(verb: str, delivery_id: str | None, everything: bool, app_id: str | None,
          group: str | None, yes: bool) -> None:  # fmt: skip
    """One letter at once, or every one (of an app, of a group) up to an end fixed now,
    asked first."""
    from worker.console.actions import count_group
    from worker.runtime import get_store
    from worker.state import dead_letters

    if bool(delivery_id) == (everything or bool(app_id) or bool(group)):
        raise click.UsageError("give one DELIVERY_ID, or --all, --app-id or --group")
    if group is not None and not re.fullmatch(r"[0-9a-f]{16}", group):
        raise click.BadParameter("a group's key: 16 hex digits, as `backfill dead groups` "
                                 "and the console show it", param_hint="--group")  # fmt: skip
    store = get_store()
    past = {"replay": "replayed", "purge": "purged"}[verb]
    if delivery_id:
        done = len(store.replay([delivery_id])) if verb == "replay" else store.purge([delivery_id])
        click.echo(f"{past} {done} of 1")
        sys.exit(0 if done else 1)
    end = dead_letters.fixed_end(store.redis, app_id)
    whose = (f" of group {group}" if group else "") + (f" of app {app_id}" if app_id else "")
    pick = _group_of(store, group)
    count = end.count if group is None else count_group(store, group, end, app_id)
    if not count:
        click.echo(f"{past} 0 of 0: no dead letters{whose}")
        return
    assert end.ms is not None  # there are letters: the end has a time
    _confirm(f"{verb} {count} dead letter(s){whose}, those that died by {_when_ms(end.ms)}", yes)
    act = dead_letters.replay_until if verb == "replay" else dead_letters.purge_until
    result = act(store, app_id=app_id, end=end, choose=pick)
    click.echo(f"{past} {result.done} of {result.seen} (dead letters{whose} that died by "
               f"{_when_ms(end.ms)})")  # fmt: skip
    if result.later:
        click.echo(f"{result.later} dead letter(s){whose} died after the {verb} began: left alone")


def _group_of(store: Store, group: str | None) -> Pick | None:
    """What picks the letters of ``group`` from a batch (None: no group asked for)."""
    if group is None:
        return None
    from worker.console.actions import choose

    return choose(store, group)


def _confirm(what: str, yes: bool) -> None:
    """Ask before a mass action; without a terminal and without --yes, refuse (exit 2)."""
    if yes:
        return
    if not sys.stdin.isatty():
        click.echo(f"error: this would {what}: add --yes to confirm (no terminal to ask on)",
                   err=True)  # fmt: skip
        sys.exit(2)
    click.confirm(f"This will {what}. Go on?", default=False, abort=True, err=True)


def _when_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise click.BadParameter("expected a finite epoch", param_hint="--since")
        return value
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            "expected an ISO date or epoch seconds", param_hint="--since"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
