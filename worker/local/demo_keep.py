"""``backfill demo --keep``: leave the demo running for a person to look around in.

After the summary, a console joins the demo's Redis, stub and worker; the demo prints
the variables to export and the commands to try in another terminal, then waits for
Ctrl-C (or SIGTERM), after which the demo stops everything it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click

from worker.local.processes import free_port
from worker.operate.errors import BackfillError

# A made-up user for the demo's console, on loopback only: never a real password.
CONSOLE_USER, CONSOLE_PASSWORD = "demo", "demo-password-not-secret"
_SHOWN = ("BACKFILL_REDIS_URL", "BACKFILL_BASE_URL", "BACKFILL_API_KEY", "BACKFILL_API_SECRET")


def keep_running(env: dict[str, str], root: Path) -> None:
    """Start the console, print what to try, and block until Ctrl-C or SIGTERM."""
    port = free_port()
    console = _start_console(env, port, root / "console.log")
    # SIGINT too: a demo started in the background of a script ignores it otherwise
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _wait_listening(console, port)
        click.echo(next_steps(env, f"http://127.0.0.1:{port}/"))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("\nstopping the console, the worker, the stub and Redis")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.terminate()
        try:
            console.wait(10)
        except subprocess.TimeoutExpired:
            console.kill()
            console.wait(10)


def next_steps(env: dict[str, str], console_url: str) -> str:
    """The block a person reads after the summary: variables, commands, how to stop."""
    exports = "\n".join(f"  export {name}={env[name]}" for name in _SHOWN)
    bin_dir = Path(sys.executable).parent
    now_ms = int(time.time() * 1000)
    return f"""
Still running: Redis, the stub, one worker and the console. In another terminal:

  export PATH="{bin_dir}:$PATH"
{exports}

  backfill dead list                      # the dead letters, newest first
  backfill dead show ID                   # one of them, with every attempt
  backfill dead replay ID                 # the stub accepts it this time: delivered
  backfill find --msgid demo-00001        # by msgid, as a web app knows it
  backfill enqueue --app-id demo-app-0 --msgid mine-1 --number 8613512345678 --time {now_ms}
  backfill status ID                      # its state and attempts, as JSON
  curl -s {env["BACKFILL_BASE_URL"].rsplit("/", 1)[0]}/_stub/stats     # what the stub saw

  console: {console_url}  (user {CONSOLE_USER}, password {CONSOLE_PASSWORD})

Press Ctrl-C here to stop them all."""


def _start_console(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    users = {"BACKFILL_CONSOLE_USERS": f"{CONSOLE_USER}:{CONSOLE_PASSWORD}"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "console", "--port", str(port)],
            env={**os.environ, **env, **users},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops it in turn
        )


def _wait_listening(process: subprocess.Popen[bytes], port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackfillError(f"the console exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise BackfillError(f"the console did not listen on port {port} within {timeout_s:g} s")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
