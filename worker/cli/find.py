"""``backfill find``: deliveries by msgid and/or app_id, read from the lookup index."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import redis

from worker.state.lookup import MAX_LIMIT, InvalidQuery

NOTHING_FOUND = 3  # as `backfill status` for an unknown id, apart from 1 (Redis unavailable)
_COLUMNS = (
    ("delivery_id", 16), ("app_id", 16), ("msgid", 24), ("number", 20), ("state", 13),
    ("attempts", 3), ("created", 24),
)  # fmt: skip


@click.command()
@click.option("--msgid", help="The provider's message id, as enqueued.")
@click.option("--app-id", help="Only this app's deliveries (alone: all of them, a page at a time).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, MAX_LIMIT))
@click.option("--cursor", help="The 'next page' value the previous page printed.")
@click.option("--json", "as_json", is_flag=True, help="Print {deliveries, next_cursor} as JSON.")
def find(
    msgid: str | None, app_id: str | None, limit: int, cursor: str | None, as_json: bool
) -> None:
    """Deliveries with this msgid (and app_id), or an app's: state, attempts, last error.

    Numbers are masked to their last 4 digits. A delivered record compacted after
    BACKFILL_KEEP_DELIVERED_S is still found (state delivered) for the dedupe window.

    \b
    Exit codes:
      0  found (a page; stderr gives the --cursor of the next one)
      1  Redis unavailable (a runtime failure)
      2  bad input: the error names the field (--msgid, --app-id, --cursor)
      3  nothing found
    """
    from worker.runtime import get_store
    from worker.state.lookup import find as lookup

    try:
        rows, next_cursor = lookup(get_store().redis, msgid, app_id, limit=limit, cursor=cursor)
    except InvalidQuery as exc:
        for field, reason in exc.errors.items():
            click.echo(f"error: --{field.replace('_', '-')}: {reason}", err=True)
        sys.exit(2)
    except redis.RedisError as exc:
        click.echo(f"error: Redis unavailable: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"deliveries": rows, "next_cursor": next_cursor}, indent=2))
    else:
        header = (name[:width].ljust(width) for name, width in _COLUMNS)
        click.echo("  ".join(header) + "  last_error")
        for row in rows:
            click.echo(_line(row))
    more = f"; next page: --cursor {next_cursor}" if next_cursor else ""
    click.echo(f"{len(rows)} shown{more}", err=True)
    if not rows and not next_cursor:
        sys.exit(NOTHING_FOUND)


def _line(row: dict[str, Any]) -> str:
    cells = []
    for name, width in _COLUMNS:
        value = row.get(name)
        text = ("-" if value is None else str(value))[:width]
        cells.append(text.rjust(width) if name == "attempts" else text.ljust(width))
    return "  ".join(cells) + "  " + (row.get("last_error") or "")
