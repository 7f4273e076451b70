"""The ``backfill`` command line (SPEC section 6): thin wrappers that parse, call, print.

Exit codes: 0 success, 1 runtime failure, 2 bad input or bad configuration.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import wraps
from typing import IO, Any, TypeVar

import click
import redis

from worker.cli_console import console
from worker.cli_find import find
from worker.errors import ConfigError, InvalidRecord

F = TypeVar("F", bound=Callable[..., Any])


def _exits(func: F) -> F:
    """Turn project errors into the documented exit codes with a one-line reason."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, InvalidRecord) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except redis.RedisError as exc:
            click.echo(f"error: Redis unavailable: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _cli_logging() -> None:
    from worker.audit import configure_logging
    from worker.runtime import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver postback backfill records to the SMS provider."""


main.add_command(console)
main.add_command(find)


@main.command()
@click.option("--concurrency", "-c", type=click.IntRange(1, 512), help="Threads (default 16).")
@click.option("--hostname", "-n", help="Celery node name, e.g. backfill1@%h.")
@_exits
def worker(concurrency: int | None, hostname: str | None) -> None:
    """Run a worker (threads pool) with the project's defaults."""
    from worker import metrics
    from worker.app import app, worker_exit_status
    from worker.audit import configure_logging
    from worker.runtime import get_client, get_settings, get_store

    settings = get_settings()
    get_client()  # fails fast with exit 2 when the credentials are missing
    # before Celery starts, so its start-up warnings are JSON lines too
    configure_logging(settings.log_format, settings.log_level)
    if settings.metrics_port is not None:  # a taken port is exit 2, before Celery starts
        metrics.serve(settings.metrics_port, get_store(), settings.queue, settings.metrics_host)
    argv = [
        "--quiet",  # the banner is not JSON; worker.ready says the same in one line
        "worker",
        f"--concurrency={concurrency or settings.concurrency}",
        "--pool=threads",
        f"--queues={settings.queue}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)
    sys.exit(worker_exit_status())


@main.command()
@click.option("--app-id", help="The provider's appId.")
@click.option("--msgid", help="The provider's message id (optional).")
@click.option("--number", help="End user's number with country prefix.")
@click.option("--time", "time_", help="Verification time, epoch milliseconds (13 digits).")
@click.option("--file", "file_", help="UTF-8 JSON lines or CSV with a header; - for stdin.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), help="Input format.")
@click.option("--rejects", help="Where rejected rows go (default: beside the input).")
@_exits
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
      1  Redis unavailable (a runtime failure)
      2  bad input: a bad field, a rejected row, a --file that is missing, a
         directory or not UTF-8 (the error names the line)
    """
    from worker.producer import enqueue_record
    from worker.record import BackfillRecord

    if file_ is not None:
        if any(v is not None for v in (app_id, msgid, number, time_)):
            raise click.UsageError("give either --file or the record's fields, not both")
        _cli_logging()
        sys.exit(_enqueue_file(file_, fmt, rejects))
    record = BackfillRecord.parse(
        {"app_id": app_id, "msgid": msgid, "number": number, "time": time_}
    )
    _cli_logging()
    click.echo(enqueue_record(record, source="cli"))


def _enqueue_file(path: str, fmt: str | None, rejects: str | None) -> int:
    """Enqueue every row of --file; returns the exit code (0 all accepted, 2 otherwise)."""
    from worker import bulk
    from worker.runtime import get_store

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
                result = bulk.enqueue_rows(get_store(), rows, out, progress=progress)
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
    return 2 if result.rejected or result.stopped else 0


def _count_lines(raw: IO[bytes], fmt: str | None) -> int:
    """Rows in a file for the progress bar, then back to its start (UnreadableInput at a
    line that is not UTF-8)."""
    from worker.bulk import count_lines

    lines = count_lines(raw)
    raw.seek(0)
    return max(lines - (1 if fmt == "csv" else 0), 0)


NO_SUCH_DELIVERY = 3  # apart from 1 (Redis unavailable), so a script can tell them apart


@main.command()
@click.argument("delivery_id")
@_exits
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
    from worker.redact import mask_number

    found["number"] = mask_number(found.get("number", ""))
    click.echo(json.dumps(found, indent=2))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8099, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="BACKFILL_API_KEY", required=True, help="Expected Api-Key.")
@click.option("--api-secret", envvar="BACKFILL_API_SECRET", required=True, help="Signing secret.")
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--faults", default="status,500,503,429,slow,drop,nonjson", show_default=True)
@click.option("--slow-s", default=20.0, show_default=True, type=click.FloatRange(0))
@click.option("--seed", type=int, help="Seed the fault dice for a repeatable run.")
@_exits
def stub(
    host: str,
    port: int,
    api_key: str,
    api_secret: str,
    fault_rate: float,
    faults: str,
    slow_s: float,
    seed: int | None,
) -> None:
    """Run the local provider stand-in (never a stand-in for the real provider)."""
    from worker.stub import FAULT_KINDS, ProviderStub

    kinds = [f.strip() for f in faults.split(",") if f.strip()]
    unknown = [k for k in kinds if k.split(":")[0] not in FAULT_KINDS]
    if unknown:
        raise click.BadParameter(f"unknown fault kinds {unknown}", param_hint="--faults")
    server = ProviderStub(
        api_key,
        api_secret,
        host=host,
        port=port,
        fault_rate=fault_rate,
        faults=kinds,
        slow_s=slow_s,
        seed=seed,
    )
    click.echo(f"stub listening on {server.url} (fault rate {fault_rate:.0%})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@main.command()
@click.option("--records", "-n", default=200, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--fault-rate", default=0.25, show_default=True, type=click.FloatRange(0, 1))
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep logs here.")
@_exits
def demo(records: int, fault_rate: float, workdir: str | None) -> None:
    """Run the whole path here: private Redis, stub with faults, a worker, N records."""
    from worker.demo import run_demo

    sys.exit(run_demo(records=records, fault_rate=fault_rate, workdir=workdir))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 300),
    help="Seconds a client has to send a request's line and headers.",
)
@click.option(
    "--body-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 300),
    help="Seconds a client has to send the whole body (then 408).",
)
@click.option(
    "--max-connections",
    default=512,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Open connections beyond which new requests get 503.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Threads for single records, and processes for batches, that decode, validate "
    "and enqueue bodies (each batch process has its own interpreter lock).",
)
@_exits
def intake(
    host: str,
    port: int,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    threads: int,
) -> None:
    """Serve the HTTP intake (POST /v1/backfills) for non-Python producers."""
    from worker.audit import configure_logging, redactor
    from worker.intake import Limits, create_app
    from worker.intake_server import health_client, intake_store, serve
    from worker.runtime import get_settings
    from worker.settings import parse_tokens

    settings = get_settings()
    if settings.intake_tokens is None:
        raise ConfigError("BACKFILL_INTAKE_TOKENS: required by the intake (NAME:TOKEN,...)")
    tokens = parse_tokens(settings.intake_tokens.get_secret_value())
    for token in tokens.values():
        redactor.add_secret(token)
    configure_logging(settings.log_format, settings.log_level)
    limits = Limits(
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        max_connections=max_connections,
        threads=threads,
    )
    application = create_app(intake_store(settings), tokens, health_client(settings), limits)
    serve(application, host, port, limits)


@main.command()
@click.option("--timeout", default=2.0, show_default=True, type=click.FloatRange(0.1, 30))
@click.option(
    "--node",
    help="Only this worker counts, e.g. celery@%h: the default name of the worker on "
    "this host (%h is the host name). Without it any worker's reply counts.",
)
@_exits
def health(timeout: float, node: str | None) -> None:
    """Exit 0 when Redis answers and a worker replies to a Celery ping, else 1."""
    from celery.utils.nodenames import host_format

    from worker.app import app
    from worker.runtime import get_store

    try:
        get_store().redis.ping()
    except redis.RedisError as exc:
        click.echo(f"unhealthy: Redis does not answer ({type(exc).__name__})")
        sys.exit(1)
    name = host_format(node) if node else None
    replies = app.control.ping(destination=[name] if name else None, timeout=timeout)
    if not replies:  # with a destination only that node answers
        missing = f"worker {name} did not reply" if name else "no worker replied"
        click.echo(f"unhealthy: {missing} to a ping within {timeout:g} s")
        sys.exit(1)
    stalled = _stalled_workers(name)
    if stalled:
        click.echo("unhealthy: " + "; ".join(f"{who} stalled: {why}" for who, why in stalled))
        sys.exit(1)
    who = f"worker {name} replied" if name else f"{len(replies)} worker(s) replied"
    click.echo(f"healthy: Redis answers, {who}, making progress{_holding()}")


def _holding() -> str:
    """What holds the fleet (a provider outage, an account pause), for `health`; '' if none.
    A hold is not a worker's fault: the workers stay healthy while it lasts."""
    import time

    from worker.runtime import get_store

    store = get_store()
    outage, pause = store.outage_state(), store.pause_state()
    if outage is not None:
        since, wait = outage
        reason = pause[0].removeprefix("outage: ") if pause else "no answer from the provider"
        return (
            f"; HOLDING for a provider outage for {max(time.time() - since, 0):.0f} s "
            f"(probe every {wait:g} s): {reason}"
        )
    if pause is not None:
        return f"; PAUSED for {pause[1]:.0f} s more: {pause[0]}"
    return ""


def _stalled_workers(node: str | None) -> list[tuple[str, str]]:
    """The workers (just ``node`` when given) whose heartbeat says they are stalled."""
    import time

    from worker.heartbeat import BEAT_TTL_S, stalled
    from worker.runtime import get_settings, get_store

    beats = get_store().beats(node)
    if node and node not in beats:
        return [(node, f"no heartbeat in the last {BEAT_TTL_S} s")]
    now, limit = time.time(), get_settings().stall_after_s
    found = [(who, stalled(beat, now, limit)) for who, beat in beats.items()]
    return [(who, why) for who, why in found if why]


@main.group()
def dead() -> None:
    """The dead-letter store: list, show, replay, purge."""


@dead.command("list")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--before", "cursor", help="Cursor: the 'next page' value printed by the "
              "previous page; or epoch seconds: only letters older than that.")  # fmt: skip
@click.option("--since", help="Only letters that died at or after this (ISO date or epoch s).")
@click.option("--app-id", help="Only this app's letters (read from its own index).")
@_exits
def dead_list(limit: int, cursor: str | None, since: str | None, app_id: str | None) -> None:
    """Dead letters, newest first, a page at a time: id, app, masked number, attempts, error."""
    from worker.redact import mask_number
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


@dead.command("replay")
@click.argument("delivery_id", required=False)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
@click.option("--app-id", help="With --all: only this app's dead letters.")
@_exits
def dead_replay(delivery_id: str | None, everything: bool, app_id: str | None) -> None:
    """Re-enqueue dead letters (bulk lane, fresh attempt budget, same delivery_id).

    --all works through the letters 1,000 at a time, in constant memory; the workers'
    wakers pick the replays up at the pace of the fleet, behind live records.
    """
    from worker.runtime import get_store

    store = get_store()
    replayed = seen = 0
    for ids in _chosen(store, delivery_id, everything, app_id):
        seen += len(ids)
        replayed += len(store.replay(ids))
    click.echo(f"replayed {replayed} of {seen}")
    if delivery_id and not replayed:
        sys.exit(1)


@dead.command("purge")
@click.argument("delivery_id", required=False)
@click.option("--all", "everything", is_flag=True, help="Purge every dead letter.")
@click.option("--app-id", help="With --all: only this app's dead letters.")
@click.option("--yes", is_flag=True, help="Confirm --all.")
@_exits
def dead_purge(delivery_id: str | None, everything: bool, app_id: str | None, yes: bool) -> None:
    """Delete dead letters for good (--all needs --yes; 1,000 per script run)."""
    from worker.runtime import get_store

    if everything and not yes:
        raise click.UsageError("--all deletes every dead letter: add --yes to confirm")
    store = get_store()
    purged = seen = 0
    for ids in _chosen(store, delivery_id, everything, app_id):
        seen += len(ids)
        purged += store.purge(ids)
    click.echo(f"purged {purged} of {seen}")
    if delivery_id and not purged:
        sys.exit(1)


def _chosen(
    store: Any, delivery_id: str | None, everything: bool, app_id: str | None
) -> Iterator[list[str]]:
    if bool(delivery_id) == everything:
        raise click.UsageError("give one DELIVERY_ID or --all")
    if delivery_id:
        return iter([[delivery_id]])
    return store.dead_batches(app_id)  # type: ignore[no-any-return]


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
