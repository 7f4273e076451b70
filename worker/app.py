"""The Celery app: broker settings for at-least-once delivery, and logging wired to structlog.

Configuration is read lazily from the environment (``BACKFILL_*``), so importing the
package in a web app costs nothing until the first enqueue. The broker transport is
kombu's Redis transport behind the project's guard (``worker.transport``).
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals
from celery.apps import worker as celery_worker_module

from worker import metrics
from worker import transport as transport_module
from worker.audit import configure_logging
from worker.errors import ConfigError
from worker.runtime import get_settings
from worker.settings import Settings

log = structlog.get_logger("worker.app")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours (one place for every broker knob)."""
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 30,
        # held to the Celery task shape, ETA headers cleared (worker/transport.py)
        transport_module.GUARDED_QUEUES: [settings.queue],
    }
    sentinel = settings.redis_url.startswith("sentinel://")
    if sentinel:
        transport["master_name"] = settings.redis_master_name
    return {
        "broker_url": settings.redis_url,
        # chosen here rather than by the URL's scheme, so a malformed message cannot stop
        # a worker (worker/transport.py)
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
        "worker_concurrency": settings.concurrency,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": settings.shutdown_timeout_s,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


app = Celery("backfill", include=["worker.tasks"], amqp="worker.transport:AMQP")
app.add_defaults(lambda: celery_config(get_settings()))
# the worker this process runs, once Celery has built it (for its exit status)
_workers: list[Any] = []


def worker_exit_status() -> int:
    """The status Celery's own ``celery worker`` command exits with for this process's worker.

    ``app.worker_main`` drops it, so an "Unrecoverable error" would otherwise exit 0.
    """
    if not _workers:
        return 1  # Celery returned before it built a worker: not a clean stop
    code = _workers[-1].exitcode
    if code is None or isinstance(code, int):
        return code or 0
    return 1  # SystemExit with a message


@signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    _workers.append(sender)
    settings = get_settings()
    if settings.metrics_port is None:
        return
    # `backfill worker` has bound the port already (a no-op then); under
    # `celery -A worker worker` this is the first chance, before the worker consumes.
    from worker.runtime import get_store

    try:
        metrics.serve(settings.metrics_port, get_store(), settings.queue, settings.metrics_host)
    except ConfigError as exc:
        # Celery sets logging up after worker_init: make this line JSON too
        configure_logging(settings.log_format, settings.log_level)
        log.critical("worker.config_error", error=str(exc))
        raise SystemExit(2) from None


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
