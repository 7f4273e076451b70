"""``backfill console``: serve the operators' web console (``worker.console``).

Kept apart from ``worker.cli`` (which registers it) so the console's imports load only
when it runs. Users come from ``BACKFILL_CONSOLE_USERS``; a missing or bad value is exit
2 with a line naming the variable and the user, never a password.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click
import structlog

from worker.operate.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

DEFAULT_PORT = 5557
MAX_CONNECTIONS = 64


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--per-address", default=16, show_default=True, type=click.IntRange(0, MAX_CONNECTIONS),
    help=f"Connections one client address may hold (of {MAX_CONNECTIONS}); 0: no cap "
    "(behind a reverse proxy, whose clients all share its address).",
)  # fmt: skip
def console(host: str, port: int, per_address: int) -> None:
    """Serve the operators' web console (HTTP Basic users from BACKFILL_CONSOLE_USERS).

    \b
    Exit codes:
      0  stopped
      2  bad configuration: BACKFILL_CONSOLE_USERS missing or malformed, a bad setting
    """
    try:
        application = _application()
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    from worker.enqueue.intake_server import Limits, serve

    structlog.get_logger("worker.console").info("console.ready", host=host, port=port)
    serve(application, host, port, Limits(max_connections=MAX_CONNECTIONS), per_address)


def _application() -> FastAPI:
    """The console app for this environment's settings and users (ConfigError if bad)."""
    from worker.console.app import create_app
    from worker.console.auth import VARIABLE, Guard, parse_users
    from worker.operate.audit import configure_logging, redactor
    from worker.runtime import build_store, get_settings
    from worker.state.connection import connect

    settings = get_settings()
    spec = settings.console_users.get_secret_value() if settings.console_users else ""
    if not spec.strip():
        raise ConfigError(f"{VARIABLE}: required by the console (NAME:PASSWORD,...)")
    users = parse_users(spec)
    for secret in (*users.values(), settings.api_key, settings.api_secret):
        if secret:  # shown text is scrubbed of them too, should a stored one carry them
            redactor.add_secret(secret if isinstance(secret, str) else secret.get_secret_value())
    configure_logging(settings.log_format, settings.log_level)
    client = connect(
        settings.redis_url, settings.redis_master_name, connect_timeout_s=1.0, timeout_s=10.0,
        retries=1,
    )  # fmt: skip
    store = build_store(settings, client)
    return create_app(store, Guard(users), settings.queue)
