"""The broker guard: kombu's Redis transport, screening every message before kombu decodes it.

What it guards. kombu's Redis channel pops a message with ``BRPOP`` and decodes it in
``Channel._brpop_read`` (``loads(bytes_to_str(item))``), then
``virtual.Channel.basic_consume._callback`` builds a ``Message`` (``payload['properties']``,
``properties['delivery_tag']``, the base64 body) and ``QoS.append`` reads
``delivery_info['exchange']``; Celery's ``Consumer.on_task_received`` and the task
strategy then unpack the body as ``(args, kwargs, embed)``. None of these steps catches
its own errors, so one message that is not JSON, not an object, not base64, or not a
protocol-2 body raises out of the event loop: Celery logs "Unrecoverable error" and the
worker stops (and a body that fails after ``QoS.append`` is restored on restart, so it
stops the next worker too). kombu 5.7 / Celery 5.7; ``tests/test_queue_guard.py`` pins it.

How. Each Redis client the channel creates gets a response callback for ``BRPOP`` (and
``RPOP``, kombu's ``_get``), public redis-py API, that sees the raw reply before kombu
does. A message kombu or Celery would choke on is logged once
(``broker.malformed_message``, the first 200 characters, digit runs masked) and dropped:
kombu sees an empty poll. Nothing in the project's state is lost by that: a delivery
lives in its lane in Redis (``bf:q:live``, ``bf:q:bulk``), and a wake-up carries none.

ETA. The project never sends a message with an ETA (``worker.deliver.messages`` sets ``eta`` to
None). Celery holds ETA messages unacknowledged in worker memory, and
``worker_eta_task_limit`` of them stop the worker consuming, silently. On the task queues
the guard clears the ``eta`` header and logs ``broker.eta_ignored``: the message runs now
as an ordinary wake-up, and the claim refuses a delivery that is not due yet.

Selected by ``worker.app.celery_config`` (``broker_transport``); the queues held to the
Celery task shape are the ``guarded_queues`` transport option, others (pidbox replies)
only to kombu's envelope. ``AMQP`` keeps this transport when kombu fails over to the
next URL of a ``sentinel://a;sentinel://b`` list (``Connection.switch`` would otherwise
fall back to kombu's own class).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import structlog
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker.operate import metrics
from worker.operate.redact import mask_number

log = structlog.get_logger("worker.transport")

TRANSPORT = "worker.deliver.transport:Transport"
SENTINEL_TRANSPORT = "worker.deliver.transport:SentinelTransport"
GUARDED_QUEUES = "guarded_queues"  # the transport option naming the Celery task queues
EXCERPT_CHARS = 200
_DIGITS = re.compile(r"\d{6,}")
_OPTIONAL_STR = (str, type(None))

DecodeBody = Callable[[Any, Any], Any]


def envelope_problem(message: Any, decode_body: DecodeBody) -> str | None:
    """Why kombu could not turn this decoded message into a ``Message``, or None."""
    if not isinstance(message, dict):
        return "not a JSON object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "no properties object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "no delivery_tag string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        return "no delivery_info with exchange and routing_key"
    if not isinstance(message.get("headers"), dict | None):
        return "headers is not an object"
    if not all(
        isinstance(message.get(k), _OPTIONAL_STR) for k in ("content-type", "content-encoding")
    ):
        return "content-type or content-encoding is not a string"
    encoding = properties.get("body_encoding")
    if not isinstance(encoding, _OPTIONAL_STR):
        return "body_encoding is not a string"
    if message.get("body"):
        try:
            decode_body(message["body"], encoding)
        except Exception:
            return f"body does not decode as {encoding}"
    return None


def task_problem(message: dict[str, Any], decode_body: DecodeBody) -> str | None:
    """Why Celery's consumer would fail on this (envelope-valid) task message, or None.

    Only the fields Celery reads without catching its own errors are checked; an unknown
    task name or a bad ``expires`` is rejected and logged by Celery itself.
    """
    headers = message.get("headers") or {}
    if not isinstance(headers.get("task"), str) or not isinstance(headers.get("id"), str):
        return "not a Celery protocol-2 task message (headers task and id)"
    if message.get("content-type") != "application/json":
        return "content-type is not application/json"
    try:
        body = decode_body(message.get("body") or "", message["properties"].get("body_encoding"))
        payload = json.loads(body)
    except Exception:
        return "body is not JSON"
    if not (
        isinstance(payload, list)
        and len(payload) == 3
        and isinstance(payload[0], list)
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict)
    ):
        return "body is not [args, kwargs, embed]"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list)
        and len(limits) == 2
        and all(isinstance(x, int | float | None) for x in limits)
    ):
        return "timelimit is not [hard, soft]"
    return None


def excerpt(raw: bytes | str) -> str:
    """The first characters of a raw message for a log line, digit runs masked."""
    text = raw[: EXCERPT_CHARS * 4].decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return _DIGITS.sub(lambda m: mask_number(m.group()), text[:EXCERPT_CHARS])


class _Guard:
    """The screening, mixed into kombu's Redis and Sentinel channels."""

    connection: Any
    sep: str
    global_keyprefix: str
    _guarded: frozenset[str] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.connection.client.transport_options
        self._guarded = frozenset(options.get(GUARDED_QUEUES) or ())

    def _create_client(self, asynchronous: bool = False) -> Any:
        client = super()._create_client(asynchronous)  # type: ignore[misc]
        client.set_response_callback("BRPOP", self._screen_brpop)
        client.set_response_callback("RPOP", self._screen_rpop)
        return client

    def _screen_brpop(self, response: Any, **_: Any) -> tuple[Any, Any] | None:
        if not response:
            return None
        key, raw = response
        queue = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        queue = queue.removeprefix(self.global_keyprefix or "").rsplit(self.sep, 1)[0]
        screened = self.screen(raw, queue)
        return None if screened is None else (key, screened)

    def _screen_rpop(self, response: Any, **_: Any) -> Any:
        # kombu's _get does not say which queue: the envelope is all that can be checked
        if isinstance(response, bytes | str):
            return self.screen(response, None)
        return response

    def screen(self, raw: bytes | str, queue: str | None) -> bytes | str | None:
        """The message to hand to kombu (ETA cleared), or None when it is dropped (logged)."""
        problem: str | None
        decode_body: DecodeBody = self.decode_body  # type: ignore[attr-defined]  # kombu's
        try:
            message = loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]  # as kombu does
        except Exception:
            message, problem = None, "not JSON"
        else:
            problem = envelope_problem(message, decode_body)
            if problem is None and queue in self._guarded:
                problem = task_problem(message, decode_body)
        if problem is not None:
            metrics.GUARDED_MESSAGES.labels("dropped").inc()
            log.warning(
                "broker.malformed_message",
                queue=queue,
                problem=problem,
                size=len(raw),
                excerpt=excerpt(raw),
            )
            return None
        headers = message.get("headers") or {}
        if queue in self._guarded and headers.get("eta") is not None:
            metrics.GUARDED_MESSAGES.labels("eta_ignored").inc()
            log.warning(
                "broker.eta_ignored",
                queue=queue,
                task=str(headers.get("task"))[:100],
                task_id=str(headers.get("id"))[:100],
                eta=str(headers["eta"])[:40],
            )
            headers["eta"] = None
            return str(dumps(message))  # type: ignore[no-untyped-call]
        return raw


class Channel(_Guard, kombu_redis.Channel):
    """kombu's Redis channel with the guard."""


class SentinelChannel(_Guard, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with the guard."""


class Transport(kombu_redis.Transport):
    """``redis://`` and ``rediss://`` with the guard."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """``sentinel://`` with the guard."""

    Channel = SentinelChannel


class Connection(KombuConnection):
    """A kombu Connection that keeps a guarded transport when it fails over.

    ``Connection.switch`` (called on each failed connect when the URL lists alternates)
    takes the transport from the next URL's scheme, which would be kombu's own class.
    """

    def switch(self, conn_str: str) -> None:
        """Move to the next URL of the list, keeping the configured transport."""
        transport = self.transport_cls
        super().switch(conn_str)  # type: ignore[no-untyped-call]
        if transport in (TRANSPORT, SENTINEL_TRANSPORT):
            self.transport_cls = transport


class AMQP(CeleryAMQP):  # type: ignore[misc]
    """Celery's AMQP helper making its broker connections with ``Connection``."""

    Connection = Connection
