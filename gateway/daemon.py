"""The gateway daemon loop: poll on schedule, journal first, then push; the clock decides when."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from meterlink.clock import Clock, to_ms, from_ms
from meterlink.errors import DeviceError, ProtocolError

from .config import GatewayConfig
from .journal import Journal
from .poller import read_meter
from .sync import Pusher
from .transport import open_master

log = logging.getLogger("meterlink.gateway")


def next_boundary(now: datetime, interval_s: int) -> datetime:
    """The next poll instant aligned to the interval grid (e.g. :00, :15, :30, :45)."""
    ms = to_ms(now)
    step = interval_s * 1000
    return from_ms((ms // step + 1) * step)


@dataclass
class Stats:
    polls: int = 0
    readings: int = 0
    read_errors: int = 0
    pushed: int = 0
    push_errors: int = 0
    errors: list[str] = field(default_factory=list)


class Gateway:
    def __init__(self, config: GatewayConfig, clock: Clock) -> None:
        self.config, self.clock = config, clock
        self.journal = Journal(config.database)
        self.masters = [open_master(b.port, baud=b.baud, parity=b.parity, stopbits=b.stopbits, timeout=b.timeout_s)
                        for b in config.buses]
        self.pusher = Pusher(config.id, config.headend, self.journal, config.push_batch) if config.headend else None
        self.stats = Stats()

    def close(self) -> None:
        for m in self.masters:
            m.close()
        if self.pusher:
            self.pusher.close()
        self.journal.close()

    def poll_once(self) -> int:
        """Read every configured meter once; each meter's readings are journaled in one commit."""
        n = 0
        for bus, master in zip(self.config.buses, self.masters):
            for meter in bus.meters:
                try:
                    result = read_meter(master, meter.unit, meter.profile, meter.id, self.clock)
                except (DeviceError, ProtocolError) as exc:
                    self.stats.read_errors += 1
                    self._note(f"meter {meter.id} (unit {meter.unit}) on {bus.port}: {exc}")
                    continue
                self.journal.append(result.readings)
                n += len(result.readings)
        self.stats.polls += 1
        self.stats.readings += n
        return n

    def sync_once(self) -> int:
        if self.pusher is None:
            return 0
        try:
            sent = self.pusher.drain()
        except DeviceError as exc:
            self.stats.push_errors += 1
            self._note(str(exc))
            return 0
        self.stats.pushed += sent
        return sent

    def _note(self, message: str) -> None:
        log.warning(message)
        self.stats.errors.append(message)
        del self.stats.errors[:-20]  # bounded

    def run(self, stop: threading.Event, until: datetime | None = None, first: datetime | None = None) -> None:
        """Poll at every interval boundary (from `first`) until `stop` is set or the clock passes `until`."""
        interval = self.config.poll_interval_s
        when = first or next_boundary(self.clock.now() - timedelta(milliseconds=1), interval)
        while not stop.is_set():
            if until is not None and when > until:
                break
            self.clock.sleep_until(when)
            if stop.is_set():
                break
            self.poll_once()
            self.sync_once()
            when = next_boundary(when, interval)
