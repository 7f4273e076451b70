"""The Celery app: broker settings for at-least-once delivery, and logging wired to structlog.

Configuration is read lazily from the environment (``BACKFILL_*``), so importing the
package in a web app costs nothing until the first enqueue.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import structlog
from celery import Celery, signals
from celery.apps import worker as celery_worker_module

from worker.audit import configure_logging
from worker.settings import Settings, load_settings


@cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return load_settings()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours (one place for every broker knob)."""
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 30,
    }
    if settings.redis_url.startswith("sentinel://"):
        transport["master_name"] = settings.redis_master_name
    return {
        "broker_url": settings.redis_url,
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
        # Retries wait in backfill:schedule, never as ETA tasks; should one arrive anyway
        # (a producer using countdown=), cap how many a worker keeps in memory.
        "worker_eta_task_limit": 1000,
        "worker_pool": "threads",
        "worker_concurrency": settings.concurrency,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": settings.shutdown_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


app = Celery("backfill", include=["worker.tasks"])
app.add_defaults(lambda: celery_config(get_settings()))


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # While this handler is connected Celery leaves logging alone; ours renders it all.
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    # Celery prints shutdown notices straight to stdout; make them JSON lines as well.
    celery_worker_module.safe_say = _say


def _say(message: str, _file: Any = None) -> None:
    structlog.get_logger("celery.apps.worker").warning(message.strip())


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()
