"""What every ``backfill`` command shares: the exit codes and the CLI's logging.

Exit codes: 0 success, 1 runtime failure, 2 bad input or bad configuration.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
import redis

from worker.operate.errors import ConfigError, InvalidRecord, RedisFull

F = TypeVar("F", bound=Callable[..., Any])


def exits(func: F) -> F:
    """Turn project errors into the documented exit codes with a one-line reason."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, InvalidRecord) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except RedisFull as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except redis.exceptions.OutOfMemoryError:
            from worker.runtime import get_store
            from worker.state.capacity import full_error

            click.echo(f"error: {full_error(get_store().redis)}", err=True)
            sys.exit(1)
        except redis.RedisError as exc:
            click.echo(f"error: Redis unavailable: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def cli_logging() -> None:
    from worker.operate.audit import configure_logging
    from worker.runtime import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr)
