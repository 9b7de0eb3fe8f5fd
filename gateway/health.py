"""Progress-based watchdog: ping systemd only while every poller and the journal writer progress.

`ProgressMonitor` is pure bookkeeping over monotonic instants given by the caller. A component is
either idle (waiting for work: healthy however long it waits, e.g. a bus between two polls) or busy
since an instant; a component busy for longer than `max_silence_s` (a bus read that hangs, a journal
commit stuck on flash) is stalled. `Watchdog` is the shell: a thread that sends WATCHDOG=1 every
`period_s` only while nothing is stalled, and STATUS= lines, so a stuck poller gets the daemon
restarted by systemd (WatchdogSec) instead of silently polling nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ProgressMonitor:
    """Each named component calls `beat(name, now)` whenever it completes a unit of work, or
    `busy(name, now)` / `idle(name, now)` around each unit of work."""

    max_silence_s: float
    _last: dict[str, float] = field(default_factory=dict)
    _idle: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def register(self, name: str, now: float) -> None:
        with self._lock:
            self._last[name] = now

    def beat(self, name: str, now: float) -> None:
        with self._lock:
            self._last[name] = now

    def busy(self, name: str, now: float) -> None:
        """`name` starts a unit of work at `now` (it must end within `max_silence_s`)."""
        with self._lock:
            self._last[name] = now
            self._idle.discard(name)

    def idle(self, name: str, now: float) -> None:
        """`name` finished its work and waits for more: never stalled while idle."""
        with self._lock:
            self._last[name] = now
            self._idle.add(name)

    def stalled(self, now: float) -> list[str]:
        """Components not idle and silent for longer than `max_silence_s`."""
        with self._lock:
            return sorted(n for n, t in self._last.items() if n not in self._idle and now - t > self.max_silence_s)

    def healthy(self, now: float) -> bool:
        return bool(self._last) and not self.stalled(now)


class Watchdog:
    """The thread that pings systemd's watchdog while `monitor` is healthy (shell; real time).

    `notifier`: meterlink.sdnotify.Notifier; `status()`: the STATUS= text while healthy;
    `monotonic`: the real-time source (time.monotonic), injected for tests.
    """

    def __init__(self, notifier, monitor: ProgressMonitor, period_s: float, monotonic: Callable[[], float],
                 status: Callable[[], str] | None = None) -> None:
        self.notifier, self.monitor, self.period_s = notifier, monitor, period_s
        self.monotonic, self.status = monotonic, status
        self.pings = 0
        self.stalled: list[str] = []
        self._last_status = ""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def tick(self) -> bool:
        """One period: ping if healthy (returns True), else report what is stalled."""
        stalled = self.monitor.stalled(self.monotonic())
        if stalled:
            if stalled != self.stalled:
                self._last_status = "stalled: " + ", ".join(stalled) + " (watchdog pings stopped)"
                self.notifier.status(self._last_status)
            self.stalled = stalled
            return False
        self.stalled = []
        if self.status is not None:
            text = self.status()
            if text != self._last_status:       # STATUS= only when it changed
                self.notifier.status(text)
                self._last_status = text
        self.notifier.watchdog()
        self.pings += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()
