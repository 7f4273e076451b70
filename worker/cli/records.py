"""``backfill enqueue`` (one record or a file) and ``backfill status``."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from typing import IO, Any

import click

from worker.cli.common import cli_logging, exits


@click.command()
@click.option("--app-id", help="The provider's appId.")
@click.option("--msgid", help="The provider's message id (optional).")
@click.option("--number", help="End user's number with country prefix.")
@click.option("--time", "time_", help="Verification time, epoch milliseconds (13 digits).")
@click.option("--file", "file_", help="UTF-8 JSON lines or CSV with a header; - for stdin.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), help="Input format.")
@click.option("--rejects", help="Where rejected rows go (default: beside the input).")
@exits
def enqueue(
    app_id: str | None,
    msgid: str | None,
    number: str | None,
    time_: str | None,
    file_: str | None,
    fmt: str | None,
    rejects: str | None,
) -> None:
    """Enqueue one record and print its delivery_id, or every row of --file.

    \b
    Exit codes:
      0  enqueued (with --file: every row accepted or a duplicate)
      1  Redis unavailable or full (a runtime failure; with --file the summary
         says how many rows got in before it stopped)
      2  bad input: a bad field, a rejected row, a --file that is missing, a
         directory or not UTF-8 (the error names the line)
    """
    from worker.enqueue.producer import enqueue_record
    from worker.enqueue.record import BackfillRecord

    if file_ is not None:
        if any(v is not None for v in (app_id, msgid, number, time_)):
            raise click.UsageError("give either --file or the record's fields, not both")
        cli_logging()
        sys.exit(_enqueue_file(file_, fmt, rejects))
    record = BackfillRecord.parse(
        {"app_id": app_id, "msgid": msgid, "number": number, "time": time_}
    )
    cli_logging()
    click.echo(enqueue_record(record, source="cli"))


def _enqueue_file(path: str, fmt: str | None, rejects: str | None) -> int:
    """Enqueue every row of --file; returns the exit code (0 all accepted, 2 otherwise)."""
    from worker.enqueue import bulk
    from worker.runtime import checked_store

    fmt = fmt or bulk.format_of(path)
    rejects_path = bulk.rejects_path_for(path, rejects)
    if path != "-" and rejects_path.exists() and os.path.samefile(path, rejects_path):
        click.echo(f"error: --rejects: {rejects_path} is the input file", err=True)
        return 2
    if rejects_path.is_dir() or not os.access(rejects_path.parent, os.W_OK):
        click.echo(f"error: --rejects: cannot write {rejects_path}", err=True)
        return 2
    try:
        raw, is_file = bulk.open_input(path)
        with raw:
            if rejects_path.exists():  # a rejects file is always the last run's
                rejects_path.unlink()
                click.echo(f"removed the rejects file of an earlier run: {rejects_path}", err=True)
            # a file is checked whole first, so one that is not UTF-8 enqueues nothing
            total = _count_lines(raw, fmt) if is_file else None
            progress, done = _progress(total)
            with bulk.Rejects(rejects_path) as out:
                rows = bulk.read_rows(raw, fmt)
                result = bulk.enqueue_rows(checked_store(), rows, out, progress=progress)
            done(result)
    except bulk.UnreadableInput as exc:
        click.echo(f"error: --file: {exc}", err=True)
        return 2
    return _bulk_summary(path, result, rejects_path)


def _progress(total: int | None) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    """A progress callback for enqueue_rows and what to call at the end."""
    bar = None
    if total is not None and sys.stderr.isatty():
        bar = click.progressbar(length=total, label="enqueue", file=sys.stderr)

    def progress(result: Any) -> None:
        if bar is not None:
            bar.update(result.rows - bar.pos)
        elif result.rows % 10_000 < 1000:
            click.echo(f"rows {result.rows}  rejected {result.rejected}", err=True)

    def done(result: Any) -> None:
        if bar is not None:
            bar.update(result.rows - bar.pos)
            bar.render_finish()

    return progress, done


def _bulk_summary(path: str, result: Any, rejects_path: Any) -> int:
    """Print and log what a bulk run came to; returns its exit code."""
    import structlog

    rate = result.rows / result.seconds if result.seconds else 0.0
    click.echo(
        f"accepted {result.accepted}  duplicates {result.duplicates}  "
        f"rejected {result.rejected}  ({result.rows} rows, {rate:,.0f} rows/s)"
    )
    if result.rejected:
        click.echo(f"rejected rows with line numbers and reasons: {rejects_path}", err=True)
    if result.stopped:
        click.echo(
            f"error: --file: {result.stopped}; the rows before it were read and the good ones "
            "enqueued: they stay (enqueue is idempotent: fix the input and run it again)",
            err=True,
        )
    structlog.get_logger("worker.bulk").info(
        "postback.bulk_enqueued",
        source="bulk",
        file=path,
        accepted=result.accepted,
        duplicates=result.duplicates,
        rejected=result.rejected,
        stopped=result.stopped,
    )
    if result.full:
        return 1  # a runtime failure: the input is fine, run it again once Redis has room
    return 2 if result.rejected or result.stopped else 0


def _count_lines(raw: IO[bytes], fmt: str | None) -> int:
    """Rows in a file for the progress bar, then back to its start (UnreadableInput at a
    line that is not UTF-8)."""
    from worker.enqueue.bulk import count_lines

    lines = count_lines(raw)
    raw.seek(0)
    return max(lines - (1 if fmt == "csv" else 0), 0)


NO_SUCH_DELIVERY = 3  # apart from 1 (Redis unavailable), so a script can tell them apart


@click.command()
@click.argument("delivery_id")
@exits
def status(delivery_id: str) -> None:
    """Print a delivery's state and every attempt (JSON).

    \b
    Exit codes:
      0  found
      1  Redis unavailable (a runtime failure)
      2  malformed DELIVERY_ID (1 to 128 printable ASCII characters, no spaces)
      3  no such delivery
    """
    from worker.runtime import get_store

    if not re.fullmatch(r"[\x21-\x7e]{1,128}", delivery_id):
        click.echo(
            "error: DELIVERY_ID: expected 1 to 128 printable ASCII characters without spaces",
            err=True,
        )
        sys.exit(2)
    found = get_store().status(delivery_id)
    if found is None:
        click.echo(f"error: no delivery {delivery_id}", err=True)
        sys.exit(NO_SUCH_DELIVERY)
    from worker.operate.redact import mask_number

    found["number"] = mask_number(found.get("number", ""))
    click.echo(json.dumps(found, indent=2))
