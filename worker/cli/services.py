"""The long-running commands: ``worker``, ``intake``, ``stub``, ``demo``, and ``health``."""

from __future__ import annotations

import os
import sys

import click
import redis

from worker.cli.common import exits
from worker.errors import ConfigError


@click.command()
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 512),
    help="Requests in flight at most (default: sized from the provider's latency, up to 256).",
)
@click.option("--hostname", "-n", help="Celery node name, e.g. backfill1@%h.")
@exits
def worker(concurrency: int | None, hostname: str | None) -> None:
    """Run a worker (threads pool) with the project's defaults."""
    if concurrency is not None:  # the same cap as BACKFILL_CONCURRENCY
        os.environ["BACKFILL_CONCURRENCY"] = str(concurrency)
    from worker import metrics
    from worker.app import app
    from worker.audit import configure_logging
    from worker.lifecycle import worker_exit_status
    from worker.runtime import get_client, get_settings, get_store, reset

    reset()  # read the environment as it is now
    settings = get_settings()
    get_client()  # fails fast with exit 2 when the credentials are missing
    # before Celery starts, so its start-up warnings are JSON lines too
    configure_logging(settings.log_format, settings.log_level)
    if settings.metrics_port is not None:  # a taken port is exit 2, before Celery starts
        metrics.serve(settings.metrics_port, get_store(), settings.queue, settings.metrics_host)
    argv = [
        "--quiet",  # the banner is not JSON; worker.ready says the same in one line
        "worker",
        f"--concurrency={settings.drains}",
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


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8099, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="BACKFILL_API_KEY", required=True, help="Expected Api-Key.")
@click.option("--api-secret", envvar="BACKFILL_API_SECRET", required=True, help="Signing secret.")
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--faults", default="status,500,503,429,slow,drop,nonjson", show_default=True)
@click.option("--slow-s", default=20.0, show_default=True, type=click.FloatRange(0))
@click.option(
    "--latency-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 60_000),
    help="Answer every call after this long (a far-away provider).",
)
@click.option("--seed", type=int, help="Seed the fault dice for a repeatable run.")
@exits
def stub(
    host: str,
    port: int,
    api_key: str,
    api_secret: str,
    fault_rate: float,
    faults: str,
    slow_s: float,
    latency_ms: float,
    seed: int | None,
) -> None:
    """Run the local provider stand-in (never a stand-in for the real provider)."""
    from worker.local.stub import FAULT_KINDS, ProviderStub

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
        latency_s=latency_ms / 1000,
        seed=seed,
    )
    click.echo(f"stub listening on {server.url} (fault rate {fault_rate:.0%})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@click.command()
@click.option("--records", "-n", default=200, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--fault-rate", default=0.25, show_default=True, type=click.FloatRange(0, 1))
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep logs here.")
@exits
def demo(records: int, fault_rate: float, workdir: str | None) -> None:
    """Run the whole path here: private Redis, stub with faults, a worker, N records."""
    from worker.local.demo import run_demo

    sys.exit(run_demo(records=records, fault_rate=fault_rate, workdir=workdir))


@click.command()
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
@exits
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
    from worker.checks import parse_tokens
    from worker.intake import Limits, create_app
    from worker.intake_server import health_client, intake_store, serve
    from worker.runtime import get_settings

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


@click.command()
@click.option("--timeout", default=2.0, show_default=True, type=click.FloatRange(0.1, 30))
@click.option(
    "--node",
    help="Only this worker counts, e.g. celery@%h: the default name of the worker on "
    "this host (%h is the host name). Without it any worker's reply counts.",
)
@exits
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
        lasted = f"for {max(time.time() - since, 0):.0f} s" if since > 0 else "since ?"
        return f"; HOLDING for a provider outage {lasted} (probe every {wait:g} s): {reason}"
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
