"""The Celery app: broker settings for at-least-once delivery (its signals: ``lifecycle.py``).

Configuration is read lazily from the environment (``BACKFILL_*``), so importing the
package in a web app costs nothing until the first enqueue. The broker transport is
kombu's Redis transport behind the project's guard (``worker.deliver.transport``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker import lifecycle  # Celery's signals for this app's workers are handled there
from worker.deliver import transport as transport_module
from worker.runtime import get_settings
from worker.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours (one place for every broker knob)."""
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 30,
        # held to the Celery task shape, ETA headers cleared (worker/deliver/transport.py)
        transport_module.GUARDED_QUEUES: [settings.queue],
    }
    sentinel = settings.redis_url.startswith("sentinel://")
    if sentinel:
        transport["master_name"] = settings.redis_master_name
    return {
        "broker_url": settings.redis_url,
        # chosen here rather than by the URL's scheme, so a malformed message cannot stop
        # a worker (worker/deliver/transport.py)
        "broker_transport": (
            transport_module.SENTINEL_TRANSPORT if sentinel else transport_module.TRANSPORT
        ),
        "broker_transport_options": transport,
        # kombu reads this one too: the shortest among apps sharing the broker wins
        "visibility_timeout": settings.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # at-least-once: a message is acknowledged only after its attempt is recorded
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Retries wait in the lanes in Redis, never as ETA tasks; the broker guard clears the
        # ETA of any that arrives (a producer using countdown=). A second line only.
        "worker_eta_task_limit": 1000,
        "worker_pool": "threads",
        "worker_concurrency": settings.drains,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": settings.shutdown_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


app = Celery("backfill", include=["worker.deliver.tasks"], amqp="worker.deliver.transport:AMQP")
app.add_defaults(lambda: celery_config(get_settings()))

__all__ = ["app", "celery_config", "lifecycle"]
