"""The process's wiring, in one place: settings, the store, the provider client, wake-ups.

Everything else asks here; tests and tools call ``reset()`` after changing the
environment. Nothing is built until first asked for, so importing the package in a web
app costs nothing until its first enqueue.
"""

from __future__ import annotations

import os
from functools import cache

import redis

from worker.deliver.messages import wake_messages
from worker.deliver.provider import ProviderClient, ca_bundle
from worker.operate.audit import redactor
from worker.operate.errors import ConfigError
from worker.operate.redact import cap
from worker.settings import Settings, load_settings
from worker.state import capacity
from worker.state.connection import connect
from worker.state.store import Store


@cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return load_settings()


@cache
def get_store() -> Store:
    """The process's Store on ``BACKFILL_REDIS_URL``."""
    settings = get_settings()
    return build_store(settings, connect(settings.redis_url, settings.redis_master_name))


@cache
def checked_store() -> Store:
    """The process's Store, once its Redis is known not to evict keys: ConfigError (exit 2)
    naming the fix when its maxmemory-policy evicts, unless BACKFILL_ACCEPT_EVICTION."""
    store = get_store()
    capacity.refuse_eviction(store.redis, get_settings().accept_eviction)
    return store


def build_store(settings: Settings, client: redis.Redis) -> Store:
    """A Store over ``client`` with what ``settings`` say (the intake's and the console's
    fail-fast clients get theirs here too)."""
    return Store(
        client,
        dedupe_ttl_s=settings.dedupe_ttl_s,
        keep_delivered_s=settings.keep_delivered_s,
        pause_s=settings.pause_s,
        lookup_index=settings.lookup_index,
        outage=settings.outage_rules,
    )


@cache
def get_client() -> ProviderClient:
    """The provider client; needs the API credentials and a CA bundle that exists."""
    settings = get_settings()
    api_key, api_secret = settings.credentials()
    bundle = ca_bundle()
    if bundle is not None and not os.path.exists(bundle):
        name = "REQUESTS_CA_BUNDLE" if os.environ.get("REQUESTS_CA_BUNDLE") else "CURL_CA_BUNDLE"
        raise ConfigError(f"{name}: no such file or directory: {cap(bundle, 200)}")
    redactor.add_secret(api_secret)
    redactor.add_secret(api_key)  # a credential too: never in a log line
    return ProviderClient(
        settings.base_url,
        api_key,
        api_secret,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        code_table=settings.code_table,
        on_sign=redactor.add_sign,
    )


def wake(count: int = 1) -> None:
    """Push ``count`` wake-ups onto the queue (one LPUSH): that many drains start."""
    if count > 0:
        queue = get_settings().queue
        get_store().redis.lpush(queue, *wake_messages(count, queue))


def wake_message() -> tuple[str, str]:
    """The queue and one wake-up message, for a script that pushes it itself."""
    queue = get_settings().queue
    return queue, wake_messages(1, queue)[0]


def reset() -> None:
    """Forget settings and clients built from an earlier environment."""
    get_settings.cache_clear()
    get_store.cache_clear()
    checked_store.cache_clear()
    get_client.cache_clear()
