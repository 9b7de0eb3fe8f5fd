"""Friendly-credit periods (nights, weekends, public holidays) in the market's local time; never reads a clock or a file.

A friendly-credit period is a span during which a prepayment supply is never disconnected
(GB smart prepayment "friendly hours"; DLMS/COSEM Account "credit status" stays "in use").
The market configures it as weekly windows of LOCAL wall-clock time per day type, like tariff
bands (see `meterlink.headend.tariff.Window`): a window `18:00`-`10:00` on weekdays covers, on
each weekday's local date, 00:00-10:00 and 18:00-24:00 — so Friday 18:00 runs into the whole
weekend and on to Monday 10:00 as one contiguous span. Public holidays of the market (the
`holidays` package, country + subdivision) are friendly all local day.

Instants are UTC; membership is decided by the local date and local wall-clock minute of the
instant in the market's IANA zone, so DST days of 23 or 25 hours need no special case. A
window edge that falls into the skipped hour of a spring-forward night takes effect at the
first wall-clock minute that exists after it (the transition instant).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as _holidays

from meterlink.clock import utc
from meterlink.errors import ConfigError

UTC = timezone.utc
MINUTES_PER_DAY = 1440
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_GROUPS = {
    "weekday": frozenset(range(5)),
    "weekend": frozenset({5, 6}),
    "all": frozenset(range(7)),
    **{name: frozenset({i}) for i, name in enumerate(WEEKDAY_NAMES)},
}
_TIME = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
# How far ahead friendly_period_end looks for the end of a span before giving up (a market
# configured as friendly all the time has no end).
MAX_SPAN_DAYS = 400


@dataclass(frozen=True)
class FriendlyWindow:
    """Local wall-clock minutes [start, end) on local dates whose weekday is in `weekdays`.

    `end <= start` means the window covers [start, 24:00) and [00:00, end) of the SAME date
    (the tariff-band convention); `start == 0, end == 1440` is the whole day.
    """

    weekdays: frozenset[int]   # 0 = Monday .. 6 = Sunday
    start: int                 # minute of the local day, 0..1439
    end: int                   # 1..1440

    def ranges(self) -> tuple[tuple[int, int], ...]:
        if self.end > self.start:
            return ((self.start, self.end),)
        return ((0, self.end), (self.start, MINUTES_PER_DAY))


@dataclass(frozen=True)
class FriendlyConfig:
    """A market's friendly-credit configuration (hashable, so per-date results are cached)."""

    timezone: str                               # the market's IANA zone, e.g. "Europe/London"
    windows: tuple[FriendlyWindow, ...] = ()
    country: str | None = None                  # ISO 3166 code for `holidays`; None: no holidays
    subdivision: str | None = None              # e.g. "ENG", "SCT"
    public_holidays: bool = True                # holidays are friendly all day
    exclude_holidays: tuple[str, ...] = ()      # holiday names (as `holidays` spells them) to ignore

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def _minute(text: Any, where: str) -> int:
    if not isinstance(text, str) or not _TIME.match(text):
        raise ConfigError(f"time must be 'HH:MM' (00:00..24:00), got {text!r}", key=where)
    hh, mm = int(text[:2]), int(text[3:])
    if hh == 24 and mm:
        raise ConfigError(f"time {text!r} is past 24:00", key=where)
    return hh * 60 + mm


def friendly_config_from_mapping(data: Mapping[str, Any], *, source: str = "friendly_credit") -> FriendlyConfig:
    """Build a FriendlyConfig from a market's `[friendly_credit]` table (parsed TOML/JSON).

    Example::

        timezone = "Europe/London"
        country = "GB"
        subdivision = "ENG"
        public_holidays = true
        windows = [
          { days = ["weekday"], start = "18:00", end = "10:00" },
          { days = ["weekend"], start = "00:00", end = "24:00" },
        ]
    """
    known = {"timezone", "windows", "country", "subdivision", "public_holidays", "exclude_holidays"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", key=source)
    tz = data.get("timezone")
    try:
        ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown IANA time zone {tz!r}", key=f"{source}.timezone") from None
    windows = []
    for i, w in enumerate(data.get("windows", [])):
        where = f"{source}.windows[{i}]"
        if not isinstance(w, Mapping):
            raise ConfigError("must be a table with days, start, end", key=where)
        days = w.get("days")
        if not isinstance(days, list) or not days:
            raise ConfigError("days must be a non-empty list of day types", key=f"{where}.days")
        weekdays: set[int] = set()
        for d in days:
            if d not in _DAY_GROUPS:
                raise ConfigError(f"unknown day type {d!r}; known: {', '.join(_DAY_GROUPS)}", key=f"{where}.days")
            weekdays |= _DAY_GROUPS[d]
        start, end = _minute(w.get("start"), f"{where}.start"), _minute(w.get("end"), f"{where}.end")
        if start == MINUTES_PER_DAY:
            raise ConfigError("start cannot be 24:00", key=f"{where}.start")
        if end == 0:
            end = MINUTES_PER_DAY
        windows.append(FriendlyWindow(frozenset(weekdays), start, end))
    country = data.get("country")
    subdivision = data.get("subdivision")
    if country is not None:
        try:
            _calendar(country, subdivision)
        except (NotImplementedError, KeyError) as exc:
            raise ConfigError(f"holidays has no calendar for {country!r}/{subdivision!r}: {exc}",
                              key=f"{source}.country") from None
    public = data.get("public_holidays", True)
    if not isinstance(public, bool):
        raise ConfigError(f"must be true or false, got {public!r}", key=f"{source}.public_holidays")
    return FriendlyConfig(str(tz), tuple(windows), country, subdivision, public,
                          tuple(data.get("exclude_holidays", ())))


@lru_cache(maxsize=64)
def _calendar(country: str, subdivision: str | None):
    return _holidays.country_holidays(country, subdiv=subdivision)


def is_public_holiday(cfg: FriendlyConfig, local_date: date) -> bool:
    """True when the market's calendar has a (non-excluded) public holiday on this local date."""
    if not cfg.public_holidays or cfg.country is None:
        return False
    name = _calendar(cfg.country, cfg.subdivision).get(local_date)
    if name is None:
        return False
    return any(n.strip() not in cfg.exclude_holidays for n in name.split(";"))


@lru_cache(maxsize=8192)
def friendly_minutes(cfg: FriendlyConfig, local_date: date) -> tuple[tuple[int, int], ...]:
    """The friendly wall-clock minute ranges [start, end) of one local date, sorted and merged."""
    if is_public_holiday(cfg, local_date):
        return ((0, MINUTES_PER_DAY),)
    wd = local_date.weekday()
    ranges = sorted(r for w in cfg.windows if wd in w.weekdays for r in w.ranges())
    merged: list[list[int]] = []
    for s, e in ranges:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return tuple((s, e) for s, e in merged)


def _local(cfg: FriendlyConfig, instant: datetime) -> tuple[date, int]:
    local = utc(instant).astimezone(cfg.zone)
    return local.date(), local.hour * 60 + local.minute


def in_friendly_period(cfg: FriendlyConfig, instant_utc: datetime) -> bool:
    """Is the supply inside a friendly-credit period at this UTC instant?"""
    d, m = _local(cfg, instant_utc)
    return any(s <= m < e for s, e in friendly_minutes(cfg, d))


def _instant(cfg: FriendlyConfig, local_date: date, minute: int) -> datetime:
    """The first UTC instant whose local wall time is at or after (local_date, minute)."""
    zone = cfg.zone
    for m in range(minute, minute + 180):      # a skipped DST hour is at most 2 h (Lord Howe: 30 min)
        wall = (datetime.combine(local_date, time(0)) + timedelta(minutes=m)).replace(tzinfo=zone)
        back = wall.astimezone(UTC).astimezone(zone)
        if back.replace(tzinfo=None) == wall.replace(tzinfo=None):   # this wall time exists
            return wall.astimezone(UTC)
    raise ValueError(f"{cfg.timezone}: no wall time exists within 3 h after {local_date} minute {minute}")


def friendly_period_end(cfg: FriendlyConfig, instant_utc: datetime) -> datetime | None:
    """UTC end of the contiguous friendly span containing this instant; None when not in one.

    Adjacent windows across midnight are merged: with weekday nights 18:00-10:00 and whole
    weekends, Friday 23:00 lies in a span that ends Monday 10:00 local (Tuesday 10:00 when the
    Monday is a public holiday). Returns None too when no end is found within MAX_SPAN_DAYS.
    """
    d, m = _local(cfg, instant_utc)
    current = next(((s, e) for s, e in friendly_minutes(cfg, d) if s <= m < e), None)
    if current is None:
        return None
    for _ in range(MAX_SPAN_DAYS):
        end = current[1]
        if end < MINUTES_PER_DAY:
            return _instant(cfg, d, end)
        d = d + timedelta(days=1)
        first = friendly_minutes(cfg, d)
        if not first or first[0][0] != 0:
            return _instant(cfg, d, 0)
        current = first[0]
    return None

