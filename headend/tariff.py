"""Tariffs as data: the TOML model (versions, time-of-use bands in local time, tiers, export credit); never rounds money or reads a clock.

Prices are Decimal *minor units* (pence, cents) per kWh or per day, written as strings in TOML
("28.62", "45.67") so sub-minor precision is exact; floats are refused. Bands are defined in the
market's LOCAL wall time per day type; an instant is priced by the local date and local time of
its start. See docs/tariffs.md for the file format and the resolution rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as _holidays

from meterlink.config import Section, load_toml
from meterlink.errors import ValidationError
from meterlink.money import CURRENCY_EXPONENT

BUNDLED_DIR = Path(__file__).parent / "data"

WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAY_TYPES = frozenset({*WEEKDAY_NAMES, "weekday", "weekend", "holiday", "all"})
RESERVED_BANDS = frozenset({"standing", "export"})
MINUTES_PER_DAY = 1440
_TIME = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")


@dataclass(frozen=True)
class Window:
    """Local wall-clock minutes [start, end) on dates of the given day types; end <= start crosses midnight."""

    days: frozenset[str]
    start: int            # minute of the local day, 0..1439
    end: int              # 1..1440; end <= start: runs to midnight and on from 00:00 of the SAME date class

    def minutes(self) -> range | tuple[range, range]:
        if self.end > self.start:
            return (range(self.start, self.end),)
        return (range(self.start, MINUTES_PER_DAY), range(0, self.end))


@dataclass(frozen=True)
class Band:
    name: str
    rate: Decimal         # minor units per kWh
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class Tier:
    """A block of the billing period's import energy; `adder` (minor/kWh) is added to the band rate inside it."""

    name: str
    from_wh: int
    to_wh: int | None     # None: no upper bound
    adder: Decimal
    description: str = ""


@dataclass(frozen=True)
class TariffVersion:
    valid_from: date                      # local date from which this version prices (inclusive)
    standing_charge: Decimal              # minor units per local day
    bands: tuple[Band, ...]
    tiers: tuple[Tier, ...] = ()
    export_rate: Decimal | None = None    # minor units per kWh credited for 2.8.0
    # resolved schedules: day class ('monday'..'sunday', 'holiday') -> band name per local minute
    schedules: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def band(self, name: str) -> Band:
        for b in self.bands:
            if b.name == name:
                return b
        raise KeyError(name)


@dataclass(frozen=True)
class Tariff:
    id: str
    name: str
    currency: str
    timezone: str                         # the market's IANA zone
    country: str                          # ISO 3166 code for the `holidays` package
    subdivision: str | None
    versions: tuple[TariffVersion, ...]
    exclude_holidays: tuple[str, ...] = ()   # holiday names (as `holidays` spells them) not treated as holidays
    billing_period: str = "month"
    source: str = ""                      # file it was loaded from

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENT.get(self.currency, 2)

    def version_for(self, local_date: date) -> TariffVersion:
        """The version in force on a local date (latest valid_from <= date)."""
        chosen = None
        for v in self.versions:
            if v.valid_from <= local_date:
                chosen = v
            else:
                break
        if chosen is None:
            raise ValidationError(f"tariff {self.id}: no version in force on {local_date} "
                                  f"(first valid_from {self.versions[0].valid_from})")
        return chosen

    def is_holiday(self, local_date: date) -> bool:
        return _is_holiday(self.country, self.subdivision, self.exclude_holidays, local_date)

    def day_class(self, local_date: date, version: TariffVersion | None = None) -> str:
        """'holiday' when the date is a holiday the version prices specially, else the weekday name."""
        version = version or self.version_for(local_date)
        if "holiday" in version.schedules and self.is_holiday(local_date):
            return "holiday"
        return WEEKDAY_NAMES[local_date.weekday()]

    def band_at(self, local: datetime) -> Band:
        """The band pricing an instant given in LOCAL time (its date and wall-clock minute)."""
        d = local.date()
        version = self.version_for(d)
        name = version.schedules[self.day_class(d, version)][local.hour * 60 + local.minute]
        return version.band(name)


@lru_cache(maxsize=64)
def _calendar(country: str, subdivision: str | None):
    return _holidays.country_holidays(country, subdiv=subdivision)


@lru_cache(maxsize=65536)
def _is_holiday(country: str, subdivision: str | None, exclude: tuple[str, ...], d: date) -> bool:
    name = _calendar(country, subdivision).get(d)
    if name is None:
        return False
    names = [n.strip() for n in name.split(";")]
    return any(n not in exclude for n in names)


# --------------------------------------------------------------------------- schedule resolution

def _levels(day_class: str) -> list[str]:
    if day_class == "holiday":
        return ["holiday"]
    weekendness = "weekend" if day_class in ("saturday", "sunday") else "weekday"
    return [day_class, weekendness, "all"]


def resolve_schedules(bands: tuple[Band, ...]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Day class -> band name for each of the 1440 local minutes; plus problems found (gaps, overlaps).

    For a date, the most specific day type any window names wins: holiday, then the weekday name
    (monday..sunday), then weekday/weekend, then all. The windows of that level must cover the
    whole local day exactly once.
    """
    mentioned = {d for b in bands for w in b.windows for d in w.days}
    schedules: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    classes = list(WEEKDAY_NAMES) + (["holiday"] if "holiday" in mentioned else [])
    for cls in classes:
        level = next((lv for lv in _levels(cls) if lv in mentioned), None)
        if level is None:
            problems.append(f"no band covers {cls}s (no window names {' / '.join(_levels(cls))})")
            continue
        minute_band: list[str | None] = [None] * MINUTES_PER_DAY
        for b in bands:
            for w in b.windows:
                if level not in w.days:
                    continue
                for rng in w.minutes():
                    for m in rng:
                        if minute_band[m] is not None and minute_band[m] != b.name:
                            problems.append(f"on {cls}s {_hhmm(m)} is in both '{minute_band[m]}' and "
                                            f"'{b.name}' (day type '{level}')")
                            break
                        minute_band[m] = b.name
        gaps = [m for m, name in enumerate(minute_band) if name is None]
        if gaps:
            problems.append(f"on {cls}s {_hhmm(gaps[0])} is in no band (day type '{level}')")
            continue
        schedules[cls] = tuple(minute_band)  # type: ignore[arg-type]
    return schedules, problems


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# --------------------------------------------------------------------------- loading

def _price(sec: Section, key: str, default=...) -> Decimal | None:
    value = sec.get(key, (str, int, float), default)
    if value is None:
        return None
    if isinstance(value, bool):
        raise sec.error(key, f"must be a decimal amount, got {value!r}")
    if isinstance(value, float):
        raise sec.error(key, f"write prices as strings (\"{value}\"): floats are not exact")
    try:
        dec = Decimal(value) if isinstance(value, int) else Decimal(value.strip())
    except InvalidOperation:
        raise sec.error(key, f"not a decimal amount: {value!r}") from None
    if not dec.is_finite():
        raise sec.error(key, f"not a finite amount: {value!r}")
    return dec


def _minute(sec: Section, key: str, text: object) -> int:
    if not isinstance(text, str) or not _TIME.match(text):
        raise sec.error(key, f"time must be \"HH:MM\" (00:00..24:00), got {text!r}")
    h, m = int(text[:2]), int(text[3:])
    if h == 24 and m:
        raise sec.error(key, f"time after 24:00: {text!r}")
    return h * 60 + m


def _date(sec: Section, key: str) -> date:
    value = sec.get(key, (str, date))
    if isinstance(value, datetime):
        raise sec.error(key, f"must be a date, got a date-time {value!r}")
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise sec.error(key, f"must be a date YYYY-MM-DD, got {value!r}") from None


def _windows(sec: Section) -> tuple[Window, ...]:
    raw = sec.get("windows", list)
    out = []
    for i, item in enumerate(raw):
        key = f"windows[{i}]"
        if not isinstance(item, dict):
            raise sec.error(key, "must be an inline table {days=[...], from=\"HH:MM\", to=\"HH:MM\"}")
        unknown = set(item) - {"days", "from", "to"}
        if unknown:
            raise sec.error(key, f"unknown key(s) {sorted(unknown)} (known: days, from, to)")
        days = item.get("days", ["all"])
        if not isinstance(days, list) or not days or any(d not in DAY_TYPES for d in days):
            raise sec.error(key, f"days must be a non-empty list of {sorted(DAY_TYPES)}, got {days!r}")
        start = _minute(sec, key, item.get("from"))
        end = _minute(sec, key, item.get("to"))
        if start == MINUTES_PER_DAY:
            raise sec.error(key, "a window cannot start at 24:00")
        out.append(Window(frozenset(days), start, end))
    return tuple(out)


def _tiers(vsec: Section) -> tuple[Tier, ...]:
    tiers = []
    lower = 0
    secs = vsec.sections("tier")
    for i, t in enumerate(secs):
        t.check_known({"up_to_kwh", "adder", "name", "description"})
        adder = _price(t, "adder")
        up = t.get("up_to_kwh", (int, str), None)
        name = t.get("name", str, f"block{i + 1}")
        upper = None
        if up is not None:
            try:
                kwh = Decimal(str(up))
            except InvalidOperation:
                raise t.error("up_to_kwh", f"not a number: {up!r}") from None
            wh = kwh * 1000
            if wh != wh.to_integral_value() or wh <= lower:
                raise t.error("up_to_kwh", f"must be whole Wh above the previous block ({lower} Wh), got {up!r}")
            upper = int(wh)
        elif i != len(secs) - 1:
            raise t.error("up_to_kwh", "only the last block may omit up_to_kwh")
        tiers.append(Tier(name, lower, upper, adder, t.get("description", str, "")))
        if upper is not None:
            lower = upper
    if tiers and tiers[-1].to_wh is not None:
        raise secs[-1].error("up_to_kwh", "the last block must be open-ended (omit up_to_kwh)")
    return tuple(tiers)


def tariff_from_toml(data: dict, text: str = "", path: str = "<tariff>") -> Tariff:
    """Build a Tariff from parsed TOML; every ConfigError names file, line (best effort) and key."""
    root = Section(data, path, text)
    root.check_known({"tariff", "version"})
    head = root.section("tariff")
    head.check_known({"id", "name", "market", "currency", "timezone", "country", "subdivision",
                      "exclude_holidays", "billing_period", "source"})
    currency = head.get("currency", str)
    if currency not in CURRENCY_EXPONENT:
        raise head.error("currency", f"unknown currency {currency!r} (known: {', '.join(sorted(CURRENCY_EXPONENT))})")
    tzname = head.get("timezone", str)
    try:
        ZoneInfo(tzname)
    except (ZoneInfoNotFoundError, ValueError):
        raise head.error("timezone", f"unknown IANA time zone {tzname!r}") from None
    country = head.get("country", str, head.get("market", str, ""))
    subdivision = head.get("subdivision", str, None)
    try:
        _calendar(country, subdivision)
    except NotImplementedError as exc:
        raise head.error("country", f"holidays has no calendar for {country!r}/{subdivision!r}: {exc}") from None
    exclude = head.get("exclude_holidays", list, [])
    if any(not isinstance(n, str) for n in exclude):
        raise head.error("exclude_holidays", "must be a list of holiday names")
    period = head.get("billing_period", str, "month")
    if period != "month":
        raise head.error("billing_period", f"only \"month\" is supported, got {period!r}")

    versions = []
    vsecs = root.sections("version")
    if not vsecs:
        raise root.error("version", "a tariff needs at least one [[version]]")
    for vsec in vsecs:
        vsec.check_known({"valid_from", "standing_charge", "export_rate", "band", "tier"})
        valid_from = _date(vsec, "valid_from")
        if versions and valid_from <= versions[-1].valid_from:
            raise vsec.error("valid_from", f"{valid_from} is not after the previous version's "
                                           f"{versions[-1].valid_from} (list versions in date order)")
        standing = _price(vsec, "standing_charge")
        export = _price(vsec, "export_rate", None)
        bands = []
        bsecs = vsec.sections("band")
        if not bsecs:
            raise vsec.error("band", "a version needs at least one [[version.band]]")
        for bsec in bsecs:
            bsec.check_known({"name", "rate", "windows"})
            name = bsec.get("name", str)
            if name in RESERVED_BANDS or any(b.name == name for b in bands):
                raise bsec.error("name", f"band name {name!r} is reserved or repeated")
            bands.append(Band(name, _price(bsec, "rate"), _windows(bsec)))
        schedules, problems = resolve_schedules(tuple(bands))
        if problems:
            raise vsec.error("band", f"bands of version {valid_from}: " + "; ".join(problems))
        versions.append(TariffVersion(valid_from, standing, tuple(bands), _tiers(vsec), export, schedules))
    return Tariff(id=head.get("id", str), name=head.get("name", str, head.get("id", str)), currency=currency,
                  timezone=tzname, country=country, subdivision=subdivision, versions=tuple(versions),
                  exclude_holidays=tuple(exclude), billing_period=period, source=path)


def load_tariff(path: str | Path) -> Tariff:
    """Read one tariff TOML file (the only I/O in the rating core)."""
    data, text = load_toml(path)
    return tariff_from_toml(data, text, str(path))


def bundled_tariffs() -> list[Path]:
    """The example tariff files shipped in meterlink.headend's data directory."""
    return sorted(BUNDLED_DIR.glob("tariff_*.toml"))
