"""``worker.deliver.messages``: the wake-up messages, built by hand as kombu's Redis transport keeps
Celery protocol-2 messages.

That a wake-up equals what ``deliver.apply_async`` writes is ``test_tasks.py``'s; these
check the envelope's structure, the edge cases (arguments, no messages, odd queue names),
and that kombu itself reads one back from a real Redis list.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Message, Queue

from worker.deliver.messages import DELIVER_TASK, wake_message, wake_messages
from worker.local.processes import LocalRedis

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


def parsed(raw: str) -> dict[str, Any]:
    """The envelope, its body decoded (base64, then JSON)."""
    envelope: dict[str, Any] = json.loads(raw)
    assert envelope["properties"]["body_encoding"] == "base64"
    envelope["body"] = json.loads(base64.b64decode(envelope["body"], validate=True))
    return envelope


def test_a_wake_up_is_a_protocol_2_deliver_task_in_kombu_s_redis_envelope() -> None:
    doc = parsed(wake_message("backfill", "me@host"))
    assert set(doc) == {"body", "content-encoding", "content-type", "headers", "properties"}
    assert (doc["content-type"], doc["content-encoding"]) == ("application/json", "utf-8")
    assert doc["body"] == [[], {}, EMBED]  # protocol 2: args, kwargs, embed
    headers, properties = doc["headers"], doc["properties"]
    assert (headers["task"], headers["lang"], headers["origin"]) == (DELIVER_TASK, "py", "me@host")
    task_id = headers["id"]
    assert uuid.UUID(task_id).version == 4
    assert headers["root_id"] == properties["correlation_id"] == task_id
    assert headers["parent_id"] is None
    assert headers["group"] is None
    assert (headers["eta"], headers["expires"], headers["retries"]) == (None, None, 0)
    assert (headers["argsrepr"], headers["kwargsrepr"]) == ("()", "{}")
    assert headers["ignore_result"] is True
    assert properties["delivery_info"] == {"exchange": "", "routing_key": "backfill"}
    assert (properties["delivery_mode"], properties["priority"]) == (2, 0)
    assert uuid.UUID(properties["delivery_tag"]) != uuid.UUID(task_id)


@pytest.mark.parametrize(
    ("args", "argsrepr"),
    [
        (("a",), "('a',)"),
        (("a", 1, None), "('a', 1, None)"),
        ([["x"], {"k": 2}], "(['x'], {'k': 2})"),
    ],
)
def test_given_arguments_the_body_and_its_repr_carry_them(args: Any, argsrepr: str) -> None:
    doc = parsed(wake_message("backfill", "me@host", args))
    assert doc["body"] == [list(args), {}, EMBED]
    assert doc["headers"]["argsrepr"] == argsrepr


def test_no_arguments_given_as_a_list_is_the_same_as_none() -> None:
    assert parsed(wake_message("q", "o", []))["body"] == parsed(wake_message("q", "o"))["body"]


@pytest.mark.parametrize("queue", ["backfill", "with space", "ünïcödé-队列", 'quo"te\\back', ""])
def test_the_queue_name_is_routed_as_given(queue: str) -> None:
    raw = wake_message(queue, "o")
    assert raw.isascii()  # JSON escapes what is not: the envelope is plain bytes in Redis
    assert parsed(raw)["properties"]["delivery_info"]["routing_key"] == queue


def test_wake_messages_gives_count_messages_from_this_process_each_with_its_own_ids() -> None:
    assert wake_messages(0, "backfill") == []
    docs = [parsed(raw) for raw in wake_messages(5, "backfill")]
    assert len(docs) == 5
    task_ids = {d["headers"]["id"] for d in docs}
    tags = {d["properties"]["delivery_tag"] for d in docs}
    assert len(task_ids) == len(tags) == 5
    assert task_ids.isdisjoint(tags)
    assert {d["headers"]["origin"] for d in docs} == {ORIGIN}
    assert all(d["properties"]["delivery_info"]["routing_key"] == "backfill" for d in docs)


def test_kombu_reads_wake_ups_pushed_onto_a_real_redis_list(module_redis: LocalRedis) -> None:
    """What the waker does (LPUSH onto the queue's list) is what a Celery worker consumes."""
    queue = Queue("wake-test", Exchange("wake-test", type="direct"), routing_key="wake-test")
    received: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []

    def on_message(body: Any, message: Message) -> None:
        received.append((body, message.headers, message.delivery_info))
        message.ack()

    with Connection(module_redis.url) as connection:
        bound = queue(connection.default_channel)
        bound.declare()
        client = connection.default_channel.client
        client.lpush("wake-test", *wake_messages(2, "wake-test"))
        client.lpush("wake-test", wake_message("wake-test", "o", ["older"]))
        with Consumer(connection, [queue], callbacks=[on_message], accept=["json"]):
            while len(received) < 3:
                connection.drain_events(timeout=5)
    assert [body for body, _, _ in received] == [[[], {}, EMBED]] * 2 + [[["older"], {}, EMBED]]
    assert {headers["task"] for _, headers, _ in received} == {DELIVER_TASK}
    assert {info["routing_key"] for _, _, info in received} == {"wake-test"}
