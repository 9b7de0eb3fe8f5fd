"""Consumption behaviour features per account and period, from interval data; pure, never reads a clock or a store.

Input is the account's import intervals (OBIS 1.8.0, integer Wh, aware UTC starts on the market's
grid) and the market's IANA time zone; everything local (hour of day, weekend, night, peak) is
evaluated in that zone, so DST days count their 23 or 25 hours as they happened.

Numbers stay exact: energies are integer Wh, powers integer W (interval energy × 3600 / seconds,
rounded half-even once, here), shares and trends are `Decimal` fractions quantized to four places
with ROUND_HALF_EVEN. No floats anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from meterlink.errors import ValidationError

from .vee import Interval

IMPORT_OBIS = "1.8.0"
SHARE_PLACES = Decimal("0.0001")
ONE = Decimal(1)


@dataclass(frozen=True)
class Hours:
    """A local-time window [start, end) in whole hours; end < start wraps midnight (22-7 = night)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= 23 and 0 <= self.end <= 24) or self.start == self.end:
            raise ValidationError(f"hour window {self.start}-{self.end}: hours must be 0..24 and differ")

    def contains(self, hour: int) -> bool:
        if self.start < self.end:
            return self.start <= hour < self.end
        return hour >= self.start or hour < self.end


@dataclass(frozen=True)
class FeatureConfig:
    """Per-market definitions of the windows the shares are computed over (local hours)."""

    night: Hours = Hours(0, 7)
    peak: Hours = Hours(16, 19)
    base_load_percentile: int = 10      # base load = this percentile of interval power


@dataclass(frozen=True)
class Features:
    account_id: str
    start: date                         # local dates, end exclusive
    end: date
    days: int
    days_with_data: int
    intervals: int
    estimated_intervals: int
    total_wh: int
    avg_daily_wh: int                   # total / days_with_data, half-even
    weekday_profile_wh: tuple[int, ...]  # 24 values: mean Wh in each local hour of a weekday
    weekend_profile_wh: tuple[int, ...]
    night_share: Decimal                # 0..1, 4 places
    peak_share: Decimal
    weekend_share: Decimal
    base_load_w: int
    peak_demand_w: int
    peak_demand_at: datetime | None
    trend_prev: Decimal | None = None       # (this - previous) / previous, per average day
    trend_last_year: Decimal | None = None
    peer_ratio: Decimal | None = None       # avg daily use / median of the peer group
    peer_percentile: int | None = None      # 0..100: share of peers using less per day

    def value(self, name: str):
        """A feature by name, for segment rules; unknown names are an error naming the feature."""
        if name not in FEATURE_NAMES:
            raise ValidationError(f"unknown feature {name!r}; known: {', '.join(sorted(FEATURE_NAMES))}")
        return getattr(self, name)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            if isinstance(v, Decimal):
                v = str(v)
            elif isinstance(v, (date, datetime)):
                v = v.isoformat()
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out


FEATURE_NAMES = frozenset({
    "days", "days_with_data", "intervals", "estimated_intervals", "total_wh", "avg_daily_wh",
    "night_share", "peak_share", "weekend_share", "base_load_w", "peak_demand_w", "trend_prev",
    "trend_last_year", "peer_ratio", "peer_percentile",
})


def _share(part: int, whole: int) -> Decimal:
    if whole == 0:
        return Decimal(0).quantize(SHARE_PLACES)
    return (Decimal(part) / Decimal(whole)).quantize(SHARE_PLACES, rounding=ROUND_HALF_EVEN)


def _div_round(num: int, den: int) -> int:
    """num / den rounded half-even to an integer (exact: Decimal of two ints)."""
    return int((Decimal(num) / Decimal(den)).to_integral_value(rounding=ROUND_HALF_EVEN))


def _power_w(iv: Interval) -> int:
    seconds = int((iv.end - iv.start).total_seconds())
    return _div_round(iv.wh * 3600, seconds)


def _percentile(sorted_values: Sequence[int], pct: int) -> int:
    """Nearest-rank percentile of sorted integers (pct in 0..100)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-pct * len(sorted_values) // 100))   # ceil(pct/100 * n), at least 1
    return sorted_values[rank - 1]


def local_window(start: date, end: date, zone: ZoneInfo | str) -> tuple[datetime, datetime]:
    """UTC instants of local midnight at `start` and at `end` (exclusive), as billing bounds its periods."""
    from .billing import local_midnight
    tz = ZoneInfo(zone) if isinstance(zone, str) else zone
    return local_midnight(start, tz), local_midnight(end, tz)


def compute_features(account_id: str, intervals: Iterable[Interval], start: date, end: date,
                     zone: ZoneInfo | str, config: FeatureConfig = FeatureConfig()) -> Features:
    """Features of one account over local dates [start, end) from its import intervals."""
    if end <= start:
        raise ValidationError(f"feature period {start}..{end} is empty (end is exclusive)")
    tz = ZoneInfo(zone) if isinstance(zone, str) else zone
    lo, hi = local_window(start, end, tz)
    hourly_weekday = [0] * 24
    hourly_weekend = [0] * 24
    total = night = peak = weekend = estimated = 0
    powers: list[int] = []
    peak_w, peak_at = -1, None
    days_seen: set[date] = set()
    weekday_days: set[date] = set()
    weekend_days: set[date] = set()
    n = 0
    for iv in intervals:
        if iv.obis != IMPORT_OBIS or not (lo <= iv.start < hi):
            continue
        n += 1
        local = iv.start.astimezone(tz)
        d, h = local.date(), local.hour
        days_seen.add(d)
        is_weekend = local.weekday() >= 5
        total += iv.wh
        if iv.estimated:
            estimated += 1
        if config.night.contains(h):
            night += iv.wh
        if config.peak.contains(h):
            peak += iv.wh
        if is_weekend:
            weekend += iv.wh
            hourly_weekend[h] += iv.wh
            weekend_days.add(d)
        else:
            hourly_weekday[h] += iv.wh
            weekday_days.add(d)
        p = _power_w(iv)
        powers.append(p)
        if p > peak_w or (p == peak_w and peak_at is not None and iv.start < peak_at):
            peak_w, peak_at = p, iv.start
    powers.sort()
    nd = len(days_seen)
    return Features(
        account_id=account_id, start=start, end=end, days=(end - start).days, days_with_data=nd,
        intervals=n, estimated_intervals=estimated, total_wh=total,
        avg_daily_wh=_div_round(total, nd) if nd else 0,
        weekday_profile_wh=tuple(_div_round(v, len(weekday_days)) if weekday_days else 0 for v in hourly_weekday),
        weekend_profile_wh=tuple(_div_round(v, len(weekend_days)) if weekend_days else 0 for v in hourly_weekend),
        night_share=_share(night, total), peak_share=_share(peak, total), weekend_share=_share(weekend, total),
        base_load_w=_percentile(powers, config.base_load_percentile),
        peak_demand_w=max(peak_w, 0), peak_demand_at=peak_at,
    )


def trend(current: Features, previous: Features | None) -> Decimal | None:
    """Relative change of average daily use against another period; None when it has no data."""
    if previous is None or previous.days_with_data == 0 or previous.avg_daily_wh == 0:
        return None
    return ((Decimal(current.avg_daily_wh) - Decimal(previous.avg_daily_wh))
            / Decimal(previous.avg_daily_wh)).quantize(SHARE_PLACES, rounding=ROUND_HALF_EVEN)


def with_trends(current: Features, previous: Features | None, last_year: Features | None) -> Features:
    from dataclasses import replace
    return replace(current, trend_prev=trend(current, previous), trend_last_year=trend(current, last_year))


def median(values: Sequence[int]) -> Decimal:
    s = sorted(values)
    if not s:
        raise ValidationError("median of an empty peer group")
    mid = len(s) // 2
    return Decimal(s[mid]) if len(s) % 2 else (Decimal(s[mid - 1]) + Decimal(s[mid])) / 2


def compare_with_peers(features: Mapping[str, Features], peer_group: Mapping[str, str]) -> dict[str, Features]:
    """Fill peer_ratio and peer_percentile: each account against the accounts of its group (e.g. market).

    `peer_group` maps account id -> group key. Accounts without data in the period are left out
    of their group's statistics and get no comparison.
    """
    from dataclasses import replace
    groups: dict[str, list[int]] = {}
    for acc, f in features.items():
        if f.days_with_data:
            groups.setdefault(peer_group.get(acc, ""), []).append(f.avg_daily_wh)
    out: dict[str, Features] = {}
    for acc, f in features.items():
        values = groups.get(peer_group.get(acc, ""), [])
        if not f.days_with_data or len(values) < 2:
            out[acc] = f
            continue
        med = median(values)
        ratio = (Decimal(f.avg_daily_wh) / med).quantize(SHARE_PLACES, rounding=ROUND_HALF_EVEN) if med else None
        below = sum(1 for v in values if v < f.avg_daily_wh)
        pct = _div_round(below * 100, len(values) - 1) if len(values) > 1 else 0
        out[acc] = replace(f, peer_ratio=ratio, peer_percentile=min(pct, 100))
    return out


def daily_totals(intervals: Iterable[Interval], zone: ZoneInfo | str, start: date, end: date) -> dict[date, int]:
    """Import Wh per local day in [start, end), zero-filled (for reports)."""
    tz = ZoneInfo(zone) if isinstance(zone, str) else zone
    out = {start + timedelta(days=i): 0 for i in range((end - start).days)}
    for iv in intervals:
        if iv.obis != IMPORT_OBIS:
            continue
        d = iv.start.astimezone(tz).date()
        if d in out:
            out[d] += iv.wh
    return out
