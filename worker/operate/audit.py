"""Logging: one structlog JSON stream for our events and Celery's, with secrets redacted.

Configure once per process (``configure_logging``); then ``structlog.get_logger()``.
Celery's own records go through the same ``ProcessorFormatter``, so a worker writes
one JSON line per record, each carrying the bound ``task_id`` while a task runs.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.deliver.policy import Outcome
from worker.deliver.provider import Answer
from worker.enqueue.record import BackfillRecord
from worker.operate.clock import clock
from worker.operate.redact import REDACTED, cap, mask_number

_SECRET_KEYS = frozenset({"sign", "api_secret", "secret", "password", "authorization"})
_HEX32 = re.compile(r"[0-9a-f]{32}")
_SIGNS_KEPT = 8192
# Every string in a log line is capped: a hostile message (a 1 MB delivery id) or a
# provider's answer must not become a 1 MB line. Tracebacks get more room.
VALUE_LIMIT = 1024
TRACEBACK_LIMIT = 16384

log = structlog.get_logger("worker.audit")


class Redactor:
    """Knows the secrets of this process and the Signs it made; blanks them in log lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._secret_pattern: re.Pattern[str] | None = None
        self._signs: OrderedDict[str, None] = OrderedDict()

    def add_secret(self, value: str) -> None:
        """Redact this literal wherever it appears (the API secret, tokens)."""
        if len(value) < 4:
            return  # too short to redact without mangling ordinary text
        with self._lock:
            self._secrets.add(value)
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def add_sign(self, value: str) -> None:
        """Remember a Sign this process sent, so it is blanked if it ever reaches a log."""
        with self._lock:
            self._signs[value] = None
            if len(self._signs) > _SIGNS_KEPT:
                self._signs.popitem(last=False)

    def scrub(self, text: str) -> str:
        """The text with every known secret and Sign replaced by ``[REDACTED]``."""
        pattern = self._secret_pattern
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        if self._signs and _HEX32.search(text):
            text = _HEX32.sub(lambda m: REDACTED if m.group() in self._signs else m.group(), text)
        return text

    def __call__(self, _logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if key.lower() in _SECRET_KEYS:
                event[key] = REDACTED
            elif isinstance(value, str):
                limit = TRACEBACK_LIMIT if key in ("exception", "stack") else VALUE_LIMIT
                event[key] = cap(self.scrub(value), limit)
            elif isinstance(value, BaseException):
                event[key] = cap(self.scrub(repr(value)), VALUE_LIMIT)
            elif isinstance(value, dict | list | tuple):
                event[key] = _scrub_nested(self, value)
        return event


def _scrub_nested(redactor: Redactor, value: Any) -> Any:
    if isinstance(value, str):
        return cap(redactor.scrub(value), VALUE_LIMIT)
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in _SECRET_KEYS else _scrub_nested(redactor, v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_nested(redactor, v) for v in value]
    return value


redactor = Redactor()
_configured: dict[str, Any] = {}


def iso_now() -> str:
    """Now by the shared clock (``worker.operate.clock``), ISO-8601 UTC: the audit line's timestamp,
    so it agrees with the due and dead-letter times the scripts take from Redis."""
    return datetime.fromtimestamp(clock.now(), UTC).isoformat().replace("+00:00", "Z")


def _timestamp(_: Any, __: str, event: EventDict) -> EventDict:
    event["timestamp"] = iso_now()
    return event


def configure_logging(fmt: str = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging (Celery's too) through one redacting renderer."""
    stream = stream or sys.stdout
    key = {"fmt": fmt, "level": level, "stream": stream}
    if _configured == key:
        return
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings become JSON lines too
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Celery's "Task received" / "Task succeeded" INFO pair repeats what the audit line says
    # (task_id, outcome) and costs ~5% of worker CPU; failures still log at ERROR.
    per_task = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for chatty in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(chatty).setLevel(per_task)
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured.clear()
    _configured.update(key)
    _audit.handler = handler if fmt == "json" else None


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=repr).decode()


class _AuditLine:
    """The audit lines' own path to the log stream (one per attempt, one per enqueued
    record): the same fields, redaction, JSON and stream (under the handler's lock) as
    every other line, without stdlib logging's and structlog's per-call machinery, which
    cost as much as the rest of the attempt."""

    def __init__(self) -> None:
        self.handler: logging.StreamHandler[TextIO] | None = None

    def write(self, logger: str, level: int, fields: MutableMapping[str, Any]) -> bool:
        """Write the line; False when the slow path must (console format, not configured)."""
        handler = self.handler
        if handler is None:
            return False
        if not logging.getLogger(logger).isEnabledFor(level):
            return True
        fields.update(structlog.contextvars.get_contextvars())
        fields["level"] = logging.getLevelName(level).lower()
        fields["logger"] = logger
        fields["timestamp"] = iso_now()
        line = _dumps(redactor(None, "", fields))
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(line + "\n")
            handler.stream.flush()
        return True


_audit = _AuditLine()


def audit_line(logger: str, event: str, fields: MutableMapping[str, Any]) -> None:
    """An INFO audit line through the fast path (or structlog when it is not configured)."""
    fields["event"] = event
    if not _audit.write(logger, logging.INFO, fields):
        del fields["event"]
        structlog.get_logger(logger).info(event, **fields)


def log_attempt(
    *,
    delivery_id: str,
    attempt: int,
    max_attempts: int,
    record: BackfillRecord | None,
    answer: Answer | None,
    outcome: Outcome,
    retry_in_s: float | None,
    error: str | None = None,
    replay: bool = False,
) -> None:
    """The ``postback.attempt`` audit event (SPEC section 4): one per attempt."""
    fields: MutableMapping[str, Any] = {
        "delivery_id": delivery_id,
        "attempt": attempt,
        "max_attempts": max_attempts,
        "app_id": record.app_id if record else None,
        "msgid": record.msgid if record else None,
        "number": mask_number(record.number) if record else None,
        "http_status": answer.http_status if answer else None,
        "api_status": answer.api_status if answer else None,
        "api_reason": answer.api_reason if answer else None,
        "error": error if error is not None else (answer.error if answer else None),
        "latency_ms": answer.latency_ms if answer else 0.0,
        "outcome": outcome.value,
        "retry_in_s": None if retry_in_s is None else round(retry_in_s, 3),
    }
    if replay:
        fields["replay"] = True
    level = logging.WARNING if outcome is Outcome.DEAD else logging.INFO
    fields["event"] = "postback.attempt"
    if not _audit.write("worker.audit", level, fields):
        del fields["event"]
        log.log(level, "postback.attempt", **fields)
