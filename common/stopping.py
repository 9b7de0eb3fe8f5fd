"""How the long-running commands stop on SIGTERM/SIGINT: a signal-safe stop flag and a bounded shutdown; never
anything else.

`threading.Event.set()` from a signal handler can deadlock: the handler runs in the main thread between two
bytecodes, and if the main thread is at that moment inside `Event.wait()` holding the event's internal lock, the
handler blocks on the same non-reentrant lock forever. `StopFlag` instead wakes waiters through a self-pipe
(os.write takes no Python lock), so setting it from a handler is always safe.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import sys
import threading
import time


class StopFlag:
    """A stop flag with the `threading.Event` methods the daemons use (set, is_set, wait), safe to set from a
    signal handler or any thread."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._set = False

    def set(self) -> None:
        self._set = True                 # a plain attribute store: atomic, no lock
        try:
            os.write(self._w, b"x")
        except (BlockingIOError, OSError):   # pipe full or closed: the flag is set all the same
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or `timeout` seconds pass; True when set. Signals interrupt the select (PEP 475 retries
        it with the remaining time after the handler has run), so a handler's set() is seen at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                os.read(self._r, 64)
        return self._set

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def stop_on_signals(*signums: int) -> StopFlag:
    """A StopFlag set by SIGTERM (and SIGINT, unless other signals are named). Call it before announcing that the
    process is ready, so a supervisor's early SIGTERM is always an orderly stop. Main thread only."""
    flag = StopFlag()
    for s in signums or (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: flag.set())
    return flag


def bound_shutdown(seconds: float = 20.0) -> None:
    """From now on the process has `seconds` to finish: if it has not exited by then (a stuck RPC, a database call
    that never returns, a non-daemon thread), every thread's stack is written to stderr and the process exits
    with status 1, so a supervisor sees a failed stop with the reason instead of a hang until SIGKILL.
    Work already committed is not affected; nothing is committed by exiting."""
    if threading.current_thread() is threading.main_thread():
        sys.stderr.flush()
    faulthandler.dump_traceback_later(seconds, exit=True)
