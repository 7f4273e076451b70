"""Local processes for the demo, the chaos script and the tests: Redis and workers.

A private ``redis-server`` binds loopback on a free port and keeps its files in a
directory of its own; a worker is a real ``backfill worker`` process writing its audit
log to a file. Whoever starts them stops (or, for chaos, kills) them. Never production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from worker.operate.errors import BackfillError

INSTALL_HINT = (
    "redis-server not found on PATH: install Redis 6.2 or newer, e.g. "
    "'apt-get install redis-server' (Debian/Ubuntu), 'dnf install redis' (Fedora) "
    "or 'brew install redis' (macOS)"
)


def local_env(
    redis_url: str, stub_url: str, api_key: str, api_secret: str, **settings: object
) -> dict[str, str]:
    """``BACKFILL_*`` variables for a worker on a private Redis and the stub.

    ``settings`` are further settings by field name, e.g. ``max_attempts=4``.
    """
    env = {
        "BACKFILL_REDIS_URL": redis_url,
        "BACKFILL_BASE_URL": stub_url,
        "BACKFILL_API_KEY": api_key,
        "BACKFILL_API_SECRET": api_secret,
    }
    env.update({f"BACKFILL_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """One private Redis server process; ``appendonly`` turns AOF (everysec) on."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise BackfillError(INSTALL_HINT)
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.prefix = prefix  # a command the server runs under, e.g. faketime and its offset
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING (loading the AOF if any)."""
        assert self.binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            *self.prefix,
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.workdir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise BackfillError(
                            f"redis-server did not start on port {self.port}; "
                            f"see {self.workdir / 'redis.log'}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (chaos): nothing is flushed beyond what AOF already has."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """Stop the server politely, killing it if it does not go within 5 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class WorkerProcess:
    """A real ``backfill worker`` subprocess; its JSON log lines go to ``log_path``."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        concurrency: int | None = 8,
        extra_args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.env = {**os.environ, **env}
        self.prefix = prefix  # a command the worker runs under, e.g. faketime and its offset
        self.log_path = log_path
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._ready_seen = 0

    def start(self) -> WorkerProcess:
        """Start the worker; its log is appended to, so restarts keep one file."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "worker",
                    "worker",
                    *([f"--concurrency={self.concurrency}"] if self.concurrency else []),
                    *self.extra_args,
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait for the worker's ``worker.ready`` line (logged once its waker runs)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BackfillError(
                    f"worker exited with {self.process.returncode}: {self.log_path}"
                )
            if self.log_path.exists() and self._ready_count() > self._ready_seen:
                self._ready_seen += 1
                return
            time.sleep(0.05)
        raise BackfillError(f"worker not ready after {timeout_s:g} s: {self.log_path}")

    def _ready_count(self) -> int:
        return self.log_path.read_bytes().count(b'"event":"worker.ready"')

    def signal(self, signum: int) -> None:
        """Send a signal to the worker's main process only (kombu #1836); under a prefix
        (``faketime`` forks and does not pass signals on) to the process group it leads."""
        if self.process is not None and self.process.poll() is None:
            if self.prefix:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL if it has not exited in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker (chaos), and under a prefix the process group it leads."""
        if self.process is None:
            return
        if self.prefix:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None
