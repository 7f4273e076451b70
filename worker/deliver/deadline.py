"""A hard deadline for one HTTP attempt, whatever the server does.

requests' read timeout bounds each socket read, not the answer: a server that sends a
byte every few seconds (headers or body) holds a worker thread for as long as it likes.
Every connection the provider client uses is checked out of a urllib3 pool of ours,
which notes it as the current connection of the calling thread; a watchdog thread shuts
down the socket of any attempt still running at its deadline, so the blocked read
returns at once and the attempt fails with ``DeadlineExceeded``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_TICK_S = 0.1


class DeadlineExceeded(Exception):
    """The attempt had no complete answer by its deadline; its connection was cut."""


class _Slot:
    """One running attempt: its deadline and the connection it uses right now."""

    __slots__ = ("connection", "deadline", "fired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.connection: Any = None
        self.fired = False


_current = threading.local()


def _note_connection(connection: Any) -> None:
    slot: _Slot | None = getattr(_current, "slot", None)
    if slot is not None:
        slot.connection = connection
        if slot.fired:  # the deadline passed while waiting for a pooled connection
            _cut(connection)


def _cut(connection: Any) -> None:
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPPool(HTTPConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> Any:
        connection = super()._get_conn(timeout)
        _note_connection(connection)
        return connection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    def _get_conn(self, timeout: float | None = None) -> Any:
        connection = super()._get_conn(timeout)
        _note_connection(connection)
        return connection


class WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections the deadline watchdog can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Build the pool manager with the watched pool classes."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """The proxy manager, with the watched pool classes too."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
        return manager


class Watchdog:
    """One daemon thread that cuts the connections of attempts past their deadline."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[_Slot]:
        """Run the body under a deadline; raises DeadlineExceeded if it was cut."""
        slot = _Slot(time.monotonic() + seconds)
        key = threading.get_ident()
        with self._lock:
            self._slots[key] = slot
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadline", daemon=True)
                self._thread.start()
        _current.slot = slot
        try:
            yield slot
        except Exception as exc:
            if slot.fired:
                raise DeadlineExceeded from exc
            raise
        finally:
            _current.slot = None
            with self._lock:
                self._slots.pop(key, None)
        if slot.fired:
            raise DeadlineExceeded

    def _run(self) -> None:
        while True:
            time.sleep(_TICK_S)
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._slots.values() if not s.fired and s.deadline <= now]
                for slot in late:
                    slot.fired = True
            for slot in late:
                if slot.connection is not None:
                    _cut(slot.connection)
