"""Supervises `serve --processes N`'s further processes like a pre-fork server: one that exits unexpectedly is
started again after a bounded exponential backoff; never restarts anything once the head-end is stopping, and
never decides how a process is started (the caller's spawn and ready functions do).

One thread per further process blocks in `wait()` on it (no polling); the backoff waits on an event that `stop()`
sets, so a stop interrupts them at once. `stop()` and every spawn take one lock: after `stop()` returns, no
further process is started, and the processes it returns are all there are to stop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger("meterlink.headend.supervise")


class Process(Protocol):
    pid: int

    def wait(self) -> int: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """The delay before restarting a process that exited: `first_s` after the first exit, doubling with each
    further exit or failed start up to `max_s`; a process that ran `reset_after_s` or longer starts the count
    afresh (a crash after a day of serving waits `first_s` again)."""
    first_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th exit in a row (1-based)."""
        return min(self.max_s, self.first_s * 2 ** min(failures - 1, 64))


def describe_exit(returncode: int | None) -> str:
    """`exited with status 3`, `was killed by signal 9 (SIGKILL)` (subprocess: a negative code is a signal)."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


class Supervisor:
    """Watches `procs` (already listening); restarts any that exits while not stopping.

    spawn() starts a new process (returns at once); ready(proc) blocks until it listens (True) or has exited
    (False). clock/sleep are injectable: sleep(seconds) returns True when the supervisor is stopping (default: the
    stop event's wait). `stopping` is an extra predicate, e.g. the signal StopFlag's is_set, so an exit that a
    SIGTERM to the whole process group caused is not taken for a crash. With a prometheus `registry`, the counters
    meterlink_headend_process_exits_total and meterlink_headend_process_restarts_total are registered on it."""

    def __init__(self, procs: list, spawn: Callable[[], Process], ready: Callable[[Process], bool], *,
                 what: str = "further serve process", backoff: Backoff = Backoff(),
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], bool] | None = None,
                 stopping: Callable[[], bool] | None = None, registry=None) -> None:
        self._procs = list(procs)
        self._spawn, self._ready = spawn, ready
        self.what, self.backoff = what, backoff
        self._clock = clock
        self._stop_event = threading.Event()
        self._sleep = sleep or self._stop_event.wait
        self._extra_stopping = stopping or (lambda: False)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.exits = 0          # unexpected exits, failed starts included
        self.restarts = 0       # processes started again and listening
        self._exit_counter = self._restart_counter = None
        if registry is not None:
            from prometheus_client import Counter
            self._exit_counter = Counter("meterlink_headend_process_exits_total",
                                         "Further serve processes (--processes) that exited unexpectedly or failed "
                                         "to start", registry=registry)
            self._restart_counter = Counter("meterlink_headend_process_restarts_total",
                                            "Further serve processes (--processes) started again and listening "
                                            "after one exited", registry=registry)

    def stopping(self) -> bool:
        return self._stop_event.is_set() or self._extra_stopping()

    def start(self) -> "Supervisor":
        """One daemon thread per process, each running watch(index)."""
        for i in range(len(self._procs)):
            t = threading.Thread(target=self.watch, args=(i,), name=f"supervise-{i + 1}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list:
        """From now on nothing is restarted; returns the processes to stop (a restart being started included)."""
        with self._lock:
            self._stop_event.set()
            return list(self._procs)

    def processes(self) -> list:
        with self._lock:
            return list(self._procs)

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def _spawn_unless_stopping(self, index: int) -> Process | None:
        with self._lock:
            if self.stopping():
                return None
            proc = self._spawn()
            self._procs[index] = proc
            return proc

    def watch(self, index: int) -> None:
        """Until stopping: wait for process `index` to exit, then start it again after the backoff."""
        proc = self._procs[index]
        failures = 0
        since = self._clock()
        while True:
            code = proc.wait()
            if self.stopping():
                return
            ran = self._clock() - since
            failures = 1 if ran >= self.backoff.reset_after_s else failures + 1
            delay = self.backoff.delay(failures)
            self._count_exit()
            log.warning("%s %d %s after %.1f s; restarting it in %g s", self.what, proc.pid, describe_exit(code),
                        ran, delay)
            while True:
                if self._sleep(delay) or self.stopping():
                    return
                try:
                    proc = self._spawn_unless_stopping(index)
                except Exception as exc:             # fork/exec failed (EMFILE, ENOMEM…): retried like an exit
                    failure = f"could not be started ({exc!r})"
                else:
                    if proc is None:
                        return
                    if self._listens(proc):
                        break
                    failure = f"{proc.pid} did not start: it {describe_exit(proc.wait())}"
                if self.stopping():
                    return
                failures += 1
                delay = self.backoff.delay(failures)
                self._count_exit()
                log.warning("%s %s; next attempt in %g s", self.what, failure, delay)
            since = self._clock()
            with self._lock:
                self.restarts += 1
            if self._restart_counter is not None:
                self._restart_counter.inc()
            log.warning("%s restarted: pid %d (restart %d)", self.what, proc.pid, self.restarts)

    def _listens(self, proc) -> bool:
        try:
            return self._ready(proc)
        except Exception:
            log.exception("%s %d: reading whether it listens failed; killing it", self.what, proc.pid)
            proc.kill()                          # then waited for like one that exited at start
            return False

    def _count_exit(self) -> None:
        with self._lock:
            self.exits += 1
        if self._exit_counter is not None:
            self._exit_counter.inc()
