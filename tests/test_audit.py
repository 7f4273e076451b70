"""Audit logging: one JSON stream for our events and stdlib/Celery records, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker.deliver.policy import AnswerClass, Outcome
from worker.deliver.provider import Answer, sign
from worker.enqueue.record import BackfillRecord
from worker.operate.audit import REDACTED, configure_logging, log_attempt, redactor

SECRET = "unit-test-secret-xyz"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    configure_logging("json", "INFO", stream=buffer)
    redactor.add_secret(SECRET)
    yield buffer
    structlog.contextvars.clear_contextvars()
    configure_logging("json", "INFO", stream=io.StringIO())


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_attempt_event_has_every_spec_field_and_a_masked_number(stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(task_id="task-1")
    log_attempt(
        delivery_id="d-1",
        attempt=2,
        max_attempts=16,
        record=BackfillRecord("app", "8613512345678", "1681184764000", msgid="m"),
        answer=Answer(AnswerClass.TRANSIENT, http_status=503, error="HTTP 503", latency_ms=1.5),
        outcome=Outcome.RETRY,
        retry_in_s=3.21,
    )
    (event,) = lines(stream)
    assert event["event"] == "postback.attempt"
    for field in [
        "delivery_id",
        "attempt",
        "max_attempts",
        "app_id",
        "msgid",
        "number",
        "http_status",
        "api_status",
        "api_reason",
        "error",
        "latency_ms",
        "outcome",
        "retry_in_s",
        "timestamp",
        "task_id",
    ]:
        assert field in event, field
    assert event["number"] == "*********5678"
    assert event["outcome"] == "retry"
    assert event["task_id"] == "task-1"
    assert str(event["timestamp"]).endswith("Z")


def test_stdlib_records_share_the_json_stream_and_context(stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(task_id="task-2")
    logging.getLogger("celery.app.trace").warning("Task %s failed", "backfill.deliver")
    (event,) = lines(stream)
    assert event["event"] == "Task backfill.deliver failed"
    assert event["task_id"] == "task-2"
    assert event["logger"] == "celery.app.trace"


def test_secret_and_sign_are_redacted_even_in_tracebacks(stream: io.StringIO) -> None:
    signed = sign("key", SECRET, "1700000000")
    redactor.add_sign(signed)
    try:
        raise RuntimeError(f"boom with {SECRET} and {signed}")
    except RuntimeError:
        logging.getLogger("celery.worker").exception("task raised")
        structlog.get_logger().error("ours", detail={"Sign": signed, "nested": [SECRET]})
    output = stream.getvalue()
    assert SECRET not in output
    assert signed not in output
    assert REDACTED in output
    assert "RuntimeError" in output


def test_unknown_hex_strings_are_left_alone(stream: io.StringIO) -> None:
    msgid = "0123456789abcdef0123456789abcdef"
    structlog.get_logger().info("x", msgid=msgid)
    assert lines(stream)[0]["msgid"] == msgid


def test_celery_per_task_info_lines_are_off_unless_debugging() -> None:
    trace, strategy = (
        logging.getLogger("celery.app.trace"),
        logging.getLogger("celery.worker.strategy"),
    )
    try:
        configure_logging("json", "INFO", stream=io.StringIO())
        assert not trace.isEnabledFor(logging.INFO)  # "Task ... succeeded": the audit says it
        assert not strategy.isEnabledFor(logging.INFO)  # "Task ... received"
        assert trace.isEnabledFor(logging.ERROR)  # a task that raised is still logged
        configure_logging("json", "DEBUG", stream=io.StringIO())
        assert trace.isEnabledFor(logging.INFO)
        assert strategy.isEnabledFor(logging.INFO)
    finally:
        configure_logging("json", "INFO", stream=io.StringIO())
