"""One clock protocol for every component; the core takes instants, only clocks read time.

`SystemClock` reads the host's time (the only place that does), `SimClock` is moved by hand
(tests: days of metering in milliseconds), and `ScaledClock` runs simulated time at N times real
speed from a shared anchor, so that separate processes (demo: simulator, gateway, head-end)
agree on the simulated instant without talking to each other.

Trust: every clock has a `trusted` attribute saying whether its time may be relied on (for a
timestamp of a billing reading). `SystemClock` asks the kernel whether NTP has synchronised
it (adjtimex: TIME_ERROR means unsynchronised; where that cannot be asked it is assumed
trusted, and `SystemClock(trusted=...)` overrides); simulated clocks are trusted unless a test
sets `clock.trusted = False`. Read it through `clock_trusted(clock)`, which also accepts clocks
that predate the attribute (trusted).
"""

from __future__ import annotations

import threading
import time as _time
from datetime import datetime, timedelta, timezone
from typing import Protocol, runtime_checkable

UTC = timezone.utc


@runtime_checkable
class Clock(Protocol):
    def now(self) -> datetime:
        """Current instant, timezone-aware UTC."""

    def sleep_until(self, when: datetime) -> None:
        """Block until `when` (a simulated clock may simply jump there)."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale (for timeouts and durations only)."""


def utc(dt: datetime) -> datetime:
    """Return `dt` as aware UTC; naive datetimes are refused (they are a bug)."""
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt.isoformat()} where a UTC instant is required")
    return dt.astimezone(UTC)


def parse_instant(text: str) -> datetime:
    """Parse an ISO-8601 instant with offset ('Z' accepted)."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return utc(dt)


def to_ms(dt: datetime) -> int:
    """UTC instant -> integer milliseconds since the Unix epoch (exact)."""
    delta = utc(dt) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def clock_trusted(clock) -> bool:
    """Whether `clock`'s time may be relied on now (clocks without a `trusted` attribute: yes)."""
    return bool(getattr(clock, "trusted", True))


def _kernel_clock_synchronised() -> bool | None:
    """adjtimex(2) with modes=0: False when the kernel reports TIME_ERROR (not synchronised)."""
    try:
        import ctypes
        import ctypes.util
        name = ctypes.util.find_library("c")
        if not name:
            return None
        buf = ctypes.create_string_buffer(512)   # larger than struct timex; modes = 0: read only
        state = ctypes.CDLL(name, use_errno=True).adjtimex(buf)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != 5  # TIME_ERROR


class SystemClock:
    """Wall-clock time; used by the daemons in production."""

    def __init__(self, trusted: bool | None = None) -> None:
        self._trusted_override = trusted

    @property
    def trusted(self) -> bool:
        if self._trusted_override is not None:
            return self._trusted_override
        synced = _kernel_clock_synchronised()
        return True if synced is None else synced

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep_until(self, when: datetime) -> None:
        delay = (utc(when) - self.now()).total_seconds()
        if delay > 0:
            _time.sleep(delay)

    def monotonic(self) -> float:
        return _time.monotonic()


class SimClock:
    """A clock that only moves when told to; `sleep_until` jumps forward (discrete-event)."""

    trusted = True   # tests may set False to simulate an unsynchronised gateway clock

    def __init__(self, start: datetime) -> None:
        self._now = utc(start)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            when = utc(when)
            if when < self._now:
                raise ValueError("SimClock cannot run backwards")
            self._now = when

    def advance(self, delta: timedelta | float) -> datetime:
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        with self._lock:
            self._now += delta
            return self._now

    def sleep_until(self, when: datetime) -> None:
        with self._lock:
            when = utc(when)
            if when > self._now:
                self._now = when

    def monotonic(self) -> float:
        with self._lock:
            return (self._now - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()


class ScaledClock:
    """Simulated time = start + (real time - anchor) * speed.

    Processes given the same (start, speed, anchor) agree on the simulated instant.
    """

    trusted = True

    def __init__(self, start: datetime, speed: float, anchor: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.start = utc(start)
        self.speed = speed
        self.anchor = _time.time() if anchor is None else anchor

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(_time.time() - self.anchor) * self.speed)

    def sleep_until(self, when: datetime) -> None:
        delay = (utc(when) - self.now()).total_seconds() / self.speed
        if delay > 0:
            _time.sleep(delay)

    def monotonic(self) -> float:
        return _time.monotonic() * self.speed

    def spec(self) -> str:
        return f"scaled:{self.start.isoformat()},{self.speed},{self.anchor}"


def clock_from_spec(spec: str | None) -> Clock:
    """'system' (default), 'sim:ISO' or 'scaled:ISO,SPEED[,ANCHOR]' -> a clock."""
    if not spec or spec == "system":
        return SystemClock()
    kind, _, rest = spec.partition(":")
    if kind == "sim":
        return SimClock(parse_instant(rest))
    if kind == "scaled":
        fields = rest.split(",")
        try:
            if len(fields) not in (2, 3):
                raise ValueError("expected scaled:ISO,SPEED[,ANCHOR]")
            anchor = float(fields[2]) if len(fields) == 3 else None
            return ScaledClock(parse_instant(fields[0]), float(fields[1]), anchor)
        except ValueError as exc:
            raise ValueError(f"bad clock spec {spec!r}: {exc}") from None
    raise ValueError(f"unknown clock spec {spec!r} (use system, sim:ISO or scaled:ISO,SPEED[,ANCHOR])")
