"""The project's exception types: one per kind of failure, each naming what is wrong."""

from __future__ import annotations

from collections.abc import Mapping


class BackfillError(Exception):
    """Base class of every error the project raises on purpose."""


class InvalidRecord(BackfillError, ValueError):
    """A backfill record was rejected; ``errors`` maps each bad field to the reason."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        detail = "; ".join(f"{field}: {reason}" for field, reason in self.errors.items())
        super().__init__(f"invalid backfill record: {detail}")


class ConfigError(BackfillError):
    """A setting is missing or has a bad value; the message names the variable."""


class RedisFull(BackfillError):
    """Redis refused a write for lack of memory (``noeviction`` at ``maxmemory``): nothing of
    the write was stored; the message says so with the figures."""
