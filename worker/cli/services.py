"""The long-running commands: ``worker``, ``intake``, ``stub`` and ``demo``."""

from __future__ import annotations

import os
import sys

import click

from worker.cli.common import exits
from worker.operate.errors import ConfigError


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
    from worker.app import app
    from worker.lifecycle import worker_exit_status
    from worker.operate import metrics
    from worker.operate.audit import configure_logging
    from worker.runtime import checked_store, get_client, get_settings, get_store, reset

    reset()  # read the environment as it is now
    settings = get_settings()
    get_client()  # fails fast with exit 2 when the credentials are missing
    checked_store()  # and when Redis evicts keys (records could vanish)
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
@click.option(
    "--api-key",
    envvar="BACKFILL_API_KEY",
    show_envvar=True,
    help="Api-Key the stub expects [default: local-test-key, printed at start].",
)
@click.option(
    "--api-secret",
    envvar="BACKFILL_API_SECRET",
    show_envvar=True,
    help="Secret the Sign is checked with [default: local-test-secret-not-for-production].",
)
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
    api_key: str | None,
    api_secret: str | None,
    fault_rate: float,
    faults: str,
    slow_s: float,
    latency_ms: float,
    seed: int | None,
) -> None:
    """Run the local provider stand-in (never a stand-in for the real provider).

    It checks the Api-Key and Sign of every call against BACKFILL_API_KEY and
    BACKFILL_API_SECRET (or the flags); without them, against made-up local test
    credentials that it prints at start. Point a worker at it with BACKFILL_BASE_URL.
    """
    from worker.local.stub import FAULT_KINDS, LOCAL_API_KEY, LOCAL_API_SECRET, ProviderStub

    kinds = [f.strip() for f in faults.split(",") if f.strip()]
    unknown = [k for k in kinds if k.split(":")[0] not in FAULT_KINDS]
    if unknown:
        raise click.BadParameter(f"unknown fault kinds {unknown}", param_hint="--faults")
    server = ProviderStub(
        api_key or LOCAL_API_KEY,
        api_secret or LOCAL_API_SECRET,
        host=host,
        port=port,
        fault_rate=fault_rate,
        faults=kinds,
        slow_s=slow_s,
        latency_s=latency_ms / 1000,
        seed=seed,
    )
    click.echo(f"stub listening on {server.url} (fault rate {fault_rate:.0%})", err=True)
    click.echo(_stub_credentials(server.url, api_key, api_secret), err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def _stub_credentials(url: str, api_key: str | None, api_secret: str | None) -> str:
    """What the stub expects, in words; a key or secret that was given is never echoed."""
    from worker.local.stub import LOCAL_API_KEY, LOCAL_API_SECRET

    if api_key or api_secret:
        return (
            "expects the Api-Key and secret given (BACKFILL_API_KEY, BACKFILL_API_SECRET or "
            "the flags; a missing one is the local test default)\n"
            f"point a worker with the same two at it: BACKFILL_BASE_URL={url}"
        )
    return (
        f"expects the local test credentials: Api-Key {LOCAL_API_KEY}, "
        f"secret {LOCAL_API_SECRET}\npoint a worker at it: BACKFILL_BASE_URL={url} "
        f"BACKFILL_API_KEY={LOCAL_API_KEY} BACKFILL_API_SECRET={LOCAL_API_SECRET}"
    )


@click.command()
@click.option("--records", "-n", default=200, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--fault-rate", default=0.25, show_default=True, type=click.FloatRange(0, 1))
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep logs here.")
@click.option(
    "--keep",
    is_flag=True,
    help="After the summary, leave Redis, the stub and the worker running, add the console, "
    "print the variables to export and commands to try, and wait for Ctrl-C.",
)
@exits
def demo(records: int, fault_rate: float, workdir: str | None, keep: bool) -> None:
    """Run the whole path here: private Redis, stub with faults, a worker, N records."""
    from worker.local.demo import run_demo

    sys.exit(run_demo(records=records, fault_rate=fault_rate, workdir=workdir, keep=keep))


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
    from worker.enqueue.intake import create_app
    from worker.enqueue.intake_server import Limits, health_client, intake_store, serve
    from worker.operate.audit import configure_logging, redactor
    from worker.operate.checks import parse_tokens
    from worker.runtime import get_settings
    from worker.state import capacity

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
    store = intake_store(settings)
    capacity.refuse_eviction(store.redis, settings.accept_eviction)  # exit 2, the fix named
    application = create_app(store, tokens, health_client(settings), limits)
    serve(application, host, port, limits)
