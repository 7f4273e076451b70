"""A child process that ends with its parent, however the parent ends (even SIGKILL).

The intake's body processes are spawned children: when the intake is killed, or its
shutdown never gets to stopping them, nothing else would. On Linux the kernel sends the
child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere, and for
the cases that signal misses (it fires when the parent's *thread* that started the child
ends), a daemon thread checks every second that the parent is still the one it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
CHECK_EVERY_S = 1.0


def end_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` (its parent's pid) does; at once if it has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no libc to call: the thread alone
            pass
    if os.getppid() != parent:  # it ended before the signal was asked for
        os._exit(0)
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(CHECK_EVERY_S)
    os._exit(0)
