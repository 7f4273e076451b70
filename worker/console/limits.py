"""How many wrong passwords the console takes: per client address and per user name.

Each address, and each user name, may fail ``allowed`` times in a window of
``window_s``; past that the console answers 429 with ``Retry-After`` until the window
ends, without looking at the password (so guessing on learns nothing). A name's limit
does not shut out an address that has logged in as that name before (an operator whose
browser already holds the password keeps working while someone else guesses it).

A burst (a window in which a key reached the limit) writes few lines:
``console.auth_failed`` at the first failure of an address's window,
``console.login_limited`` when the limit is reached, and ``console.login_burst`` with
the failures and refusals counted, once, when the window is over. A thread of the
limiter's own writes that summary as the window ends, whether or not another request
comes (it runs only while a limited window is open); ``flush`` writes those of the
windows still open when the console stops.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog

log = structlog.get_logger("worker.console")
TRUSTED_S = 12 * 3600  # how long a login is remembered for its address and name
MAX_KEYS = 10_000  # windows and logins kept at most (the oldest go first)


@dataclass(slots=True)
class Window:
    """The failures of one address or user name since ``start``."""

    start: float
    shown: dict[str, str]  # what its log lines say it is: the address, or a user's name
    failures: int = 0
    refused: int = 0


class LoginLimiter:
    """Failed logins per client address and per user name, in fixed windows."""

    def __init__(self, allowed: int = 10, window_s: float = 60.0) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self._windows: OrderedDict[tuple[str, str], Window] = OrderedDict()
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None  # alive while a limited window is open
        self._wake = threading.Event()  # set by flush: the sweeper looks again at once

    def retry_after(self, address: str, name: str, now: float | None = None) -> int:
        """Seconds to wait before this address may try ``name`` again (0: it may now);
        a refusal is counted for the burst's summary."""
        now = time.monotonic() if now is None else now
        with self._lock:
            keys = [("address", address)]
            if self._trusted.get((address, name), -math.inf) < now - TRUSTED_S:
                keys.append(("user", name))
            wait = 0.0
            for key in keys:
                window = self._current(key, now)
                if window is not None and window.failures >= self.allowed:
                    window.refused += 1
                    wait = max(wait, window.start + self.window_s - now)
            return math.ceil(wait)

    def failed(self, address: str, name: str, known: bool, now: float | None = None) -> None:
        """Count a wrong password (or unknown name) from ``address`` for ``name``;
        ``known``: the name is a console user's (only those are logged by name)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in (("address", address), ("user", name)):
                shown = key[1] if key[0] == "address" or known else "(not a console user)"
                window = self._current(key, now) or self._open(key, now, {key[0]: shown})
                window.failures += 1
                if window.failures == 1 and key[0] == "address":
                    log.warning("console.auth_failed", client=address)
                if window.failures == self.allowed:
                    log.warning("console.login_limited", **window.shown, failures=self.allowed,
                                retry_after_s=math.ceil(self.window_s))  # fmt: skip
                    self._sweep_later()

    def succeeded(self, address: str, name: str, now: float | None = None) -> None:
        """Remember that ``address`` logged in as ``name``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trusted[(address, name)] = now
            self._trusted.move_to_end((address, name))
            while len(self._trusted) > MAX_KEYS:
                self._trusted.popitem(last=False)

    def flush(self) -> None:
        """Write the summary of every burst still going on (the console stops)."""
        with self._lock:
            for key in [k for k, w in self._windows.items() if w.failures >= self.allowed]:
                self._close(key)
        self._wake.set()

    def _sweep_later(self) -> None:
        """Make sure the sweeper runs: it sums up each limited window as it ends."""
        if self._sweeper is None:
            self._sweeper = threading.Thread(
                target=self._sweep, name="console-login-bursts", daemon=True
            )
            self._sweeper.start()

    def _sweep(self) -> None:
        """Until no limited window is open: sleep until the first ends, sum up the ended."""
        while True:
            with self._lock:
                now = time.monotonic()
                ends = [w.start + self.window_s for w in self._windows.values()
                        if w.failures >= self.allowed]  # fmt: skip
                for key in [k for k, w in self._windows.items() if now >= w.start + self.window_s]:
                    self._close(key)
                waiting = [end for end in ends if end > now]
                if not waiting:
                    self._sweeper = None
                    return
            self._wake.wait(min(waiting) - now + 0.01)
            self._wake.clear()

    def _current(self, key: tuple[str, str], now: float) -> Window | None:
        """The key's window if it is still open; an ended one is summed up and dropped."""
        window = self._windows.get(key)
        if window is None or now < window.start + self.window_s:
            return window
        self._close(key)
        return None

    def _open(self, key: tuple[str, str], now: float, shown: dict[str, str]) -> Window:
        while self._windows:  # oldest first: ended windows (or, if full, the oldest) go
            oldest = next(iter(self._windows))
            ended = now >= self._windows[oldest].start + self.window_s
            if not ended and len(self._windows) < MAX_KEYS:
                break
            self._close(oldest)
        window = self._windows[key] = Window(now, shown)
        return window

    def _close(self, key: tuple[str, str]) -> None:
        window = self._windows.pop(key)
        if window.failures >= self.allowed:
            log.warning("console.login_burst", **window.shown, failures=window.failures,
                        refused=window.refused)  # fmt: skip
