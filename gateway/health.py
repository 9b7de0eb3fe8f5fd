"""Progress-based watchdog: ping systemd only while every poller and the journal writer progress.

Pure bookkeeping over monotonic instants given by the caller; the daemon feeds it and decides to
send WATCHDOG=1 from `healthy()`. A stuck poller therefore gets the daemon restarted by systemd.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class ProgressMonitor:
    """Each named component calls `beat(name, now)` whenever it completes a unit of work."""

    max_silence_s: float
    _last: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def register(self, name: str, now: float) -> None:
        with self._lock:
            self._last[name] = now

    def beat(self, name: str, now: float) -> None:
        with self._lock:
            self._last[name] = now

    def stalled(self, now: float) -> list[str]:
        """Components silent for longer than `max_silence_s`."""
        with self._lock:
            return sorted(n for n, t in self._last.items() if now - t > self.max_silence_s)

    def healthy(self, now: float) -> bool:
        return bool(self._last) and not self.stalled(now)
