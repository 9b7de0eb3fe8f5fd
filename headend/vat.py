"""Markets and VAT: dated rates per market and line category, period splitting at rate changes, VAT per line or per invoice; never reads a clock, a database or rounds outside `round_minor`.

A market (headend/data/markets.toml) fixes currency, IANA zone, rounding mode and stage, the VAT
stage and the VEE interval. VAT rates (headend/data/vat_rates.toml) are dated per market and
category ("energy", "standing"); dates are LOCAL dates of the market, valid_from inclusive,
valid_to exclusive. A priced line must lie inside one rate's validity: billing splits the period
at `change_dates` first (rating's `split_at`), and `apply_vat` refuses a line that still crosses.

VAT stages:
  * ``invoice`` (EN 16931): per (category code, rate) the taxable amount is the sum of line nets
    and its VAT is ``round_minor(taxable x rate)`` once (BR-CO-17 holds by construction);
  * ``line``: each line's VAT is ``round_minor(net x rate)`` and a rate's VAT is their sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, Sequence

from meterlink.config import Section, load_toml
from meterlink.errors import ConfigError, ValidationError
from meterlink.money import CURRENCY_EXPONENT, ROUNDING_MODES, round_minor

DATA_DIR = Path(__file__).parent / "data"
CATEGORIES = ("energy", "standing")
VAT_STAGES = ("line", "invoice")
STANDARD = "S"                    # UNCL 5305 / EN 16931 VAT category code for any non-zero rate
ZERO_RATED = "Z"

# rating line kind -> VAT category
KIND_CATEGORY = {"energy": "energy", "tier": "energy", "export": "energy", "promotion": "energy",
                 "adjustment": "energy", "standing": "standing"}


@dataclass(frozen=True)
class Market:
    id: str
    country: str
    currency: str
    timezone: str
    rounding_mode: str = "half_up"
    rounding_stage: str = "line"
    vat_stage: str = "invoice"
    interval_minutes: int = 15
    default_tariff: str = ""
    seller_name: str = ""
    seller_vat_id: str = ""

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENT.get(self.currency, 2)


@dataclass(frozen=True)
class VatRate:
    market: str
    category: str
    valid_from: date
    valid_to: date | None         # exclusive; None = open
    rate: Decimal                 # 0.05 for 5 %
    source: str = ""

    def covers(self, d: date) -> bool:
        return self.valid_from <= d and (self.valid_to is None or d < self.valid_to)

    @property
    def percent(self) -> Decimal:
        return (self.rate * 100).normalize()


@dataclass(frozen=True)
class VatTable:
    rates: tuple[VatRate, ...]

    def for_market(self, market: str) -> list[VatRate]:
        return [r for r in self.rates if r.market == market]

    def rate(self, market: str, category: str, on: date) -> VatRate:
        """The rate in force for `category` in `market` on local date `on`."""
        for r in self.rates:
            if r.market == market and r.category == category and r.covers(on):
                return r
        raise ValidationError(f"no VAT rate for market {market} category {category!r} on {on} "
                              f"(add one to vat_rates.toml)")

    def change_dates(self, market: str, start: date, end: date) -> list[date]:
        """Local dates strictly inside (start, end) on which any of the market's rates changes."""
        edges = set()
        for r in self.for_market(market):
            for d in (r.valid_from, r.valid_to):
                if d is not None and start < d < end:
                    edges.add(d)
        return sorted(edges)


@dataclass(frozen=True)
class VatLine:
    """VAT facts of one priced line: its category code, rate and (line stage) its own VAT."""

    index: int
    category: str                 # energy | standing
    code: str                     # S | Z
    rate: Decimal
    net_minor: int
    vat_minor: int | None         # only in the "line" stage


@dataclass(frozen=True)
class VatBreakdown:
    """One EN 16931 VAT breakdown (BG-23): per category code and rate."""

    code: str
    rate: Decimal
    taxable_minor: int            # BT-116
    vat_minor: int                # BT-117
    exact_vat: Decimal            # taxable x rate, unrounded (minor units)


@dataclass(frozen=True)
class VatResult:
    lines: tuple[VatLine, ...]
    breakdown: tuple[VatBreakdown, ...]
    net_minor: int
    vat_minor: int

    @property
    def gross_minor(self) -> int:
        return self.net_minor + self.vat_minor


# --------------------------------------------------------------------------- loading

def _date(sec: Section, key: str, default=...) -> date | None:
    text = sec.get(key, str, default)
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise sec.error(key, f"must be a date YYYY-MM-DD, got {text!r}") from None


def _decimal(sec: Section, key: str) -> Decimal:
    text = sec.get(key, str)
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise sec.error(key, f"must be a decimal string like \"0.05\", got {text!r}") from None
    if not value.is_finite() or value < 0 or value >= 1:
        raise sec.error(key, f"must be a fraction in [0, 1) (0.05 for 5 %), got {text}")
    return value


MARKET_KEYS = {"id", "country", "currency", "timezone", "rounding_mode", "rounding_stage", "vat_stage",
               "interval_minutes", "default_tariff", "seller_name", "seller_vat_id"}


def markets_from_toml(data: dict, text: str = "", path: str = "<markets>") -> dict[str, Market]:
    from zoneinfo import ZoneInfo

    root = Section(data, path, text)
    out: dict[str, Market] = {}
    for sec in root.sections("market"):
        sec.check_known(MARKET_KEYS)
        mid = sec.get("id", str)
        if mid in out:
            raise sec.error("id", f"market {mid} defined twice")
        tz = sec.get("timezone", str)
        try:
            ZoneInfo(tz)
        except Exception:
            raise sec.error("timezone", f"unknown IANA time zone {tz!r}") from None
        mode = sec.get("rounding_mode", str, "half_up")
        if mode not in ROUNDING_MODES:
            raise sec.error("rounding_mode", f"unknown rounding mode {mode!r}; known: {', '.join(ROUNDING_MODES)}")
        stage = sec.get("rounding_stage", str, "line")
        if stage not in ("line", "invoice"):
            raise sec.error("rounding_stage", f"must be line or invoice, got {stage!r}")
        vat_stage = sec.get("vat_stage", str, "invoice")
        if vat_stage not in VAT_STAGES:
            raise sec.error("vat_stage", f"must be line or invoice, got {vat_stage!r}")
        minutes = sec.get("interval_minutes", int, 15)
        if minutes <= 0 or 1440 % minutes:
            raise sec.error("interval_minutes", f"must divide a day, got {minutes}")
        currency = sec.get("currency", str)
        if len(currency) != 3 or not currency.isupper():
            raise sec.error("currency", f"must be an ISO 4217 code, got {currency!r}")
        out[mid] = Market(mid, sec.get("country", str), currency, tz, mode, stage, vat_stage, minutes,
                          sec.get("default_tariff", str, ""), sec.get("seller_name", str, ""),
                          sec.get("seller_vat_id", str, ""))
    return out


def vat_table_from_toml(data: dict, text: str = "", path: str = "<vat rates>") -> VatTable:
    root = Section(data, path, text)
    rates = []
    for sec in root.sections("rate"):
        sec.check_known({"market", "category", "valid_from", "valid_to", "rate", "source"})
        category = sec.get("category", str)
        if category not in CATEGORIES:
            raise sec.error("category", f"unknown VAT category {category!r}; known: {', '.join(CATEGORIES)}")
        vf, vt = _date(sec, "valid_from"), _date(sec, "valid_to", None)
        if vt is not None and vt <= vf:
            raise sec.error("valid_to", f"valid_to {vt} must be after valid_from {vf}")
        rates.append(VatRate(sec.get("market", str), category, vf, vt, _decimal(sec, "rate"),
                             sec.get("source", str, "")))
    table = VatTable(tuple(sorted(rates, key=lambda r: (r.market, r.category, r.valid_from))))
    check_no_overlap(table, path)
    return table


def check_no_overlap(table: VatTable, path: str = "<vat rates>") -> None:
    by_key: dict[tuple[str, str], list[VatRate]] = {}
    for r in table.rates:
        by_key.setdefault((r.market, r.category), []).append(r)
    for (market, category), rates in by_key.items():
        for a, b in zip(rates, rates[1:]):
            if a.valid_to is None or a.valid_to > b.valid_from:
                raise ConfigError(f"VAT rates of market {market} category {category} overlap: "
                                  f"{a.valid_from}..{a.valid_to or 'open'} and {b.valid_from}..", path=path)


def load_markets(path: str | Path = DATA_DIR / "markets.toml") -> dict[str, Market]:
    data, text = load_toml(path)
    return markets_from_toml(data, text, str(path))


def load_vat_table(path: str | Path = DATA_DIR / "vat_rates.toml") -> VatTable:
    data, text = load_toml(path)
    return vat_table_from_toml(data, text, str(path))


# --------------------------------------------------------------------------- VAT

def category_of(kind: str) -> str:
    try:
        return KIND_CATEGORY[kind]
    except KeyError:
        raise ValidationError(f"line kind {kind!r} has no VAT category (known: {', '.join(KIND_CATEGORY)})") from None


def _line_rate(table: VatTable, market: Market, category: str, start: date, end: date) -> VatRate:
    first = table.rate(market.id, category, start)
    last_day = end - timedelta(days=1) if end > start else start
    if not first.covers(last_day):
        raise ValidationError(f"line {start}..{end} of market {market.id} crosses a {category} VAT rate change "
                              f"(split the period at {table.change_dates(market.id, start, end)})")
    return first


def apply_vat(market: Market, table: VatTable, lines: Sequence, *, default_start: date,
              default_end: date) -> VatResult:
    """Priced lines (objects with kind, net_minor, period_start, period_end) -> per-line rates and the breakdown.

    A line without its own period is dated by [default_start, default_end).
    """
    vat_lines = []
    groups: dict[tuple[str, Decimal], list] = {}    # (code, rate) -> [taxable, line vat sum, exact vat]
    for i, line in enumerate(lines):
        category = category_of(line.kind)
        start = line.period_start or default_start
        end = line.period_end or default_end
        rate = _line_rate(table, market, category, start, end).rate
        code = STANDARD if rate > 0 else ZERO_RATED
        exact = Decimal(line.net_minor) * rate
        line_vat = round_minor(exact, market.rounding_mode) if market.vat_stage == "line" else None
        vat_lines.append(VatLine(i, category, code, rate, line.net_minor, line_vat))
        acc = groups.setdefault((code, rate), [0, 0, Decimal(0)])
        acc[0] += line.net_minor
        acc[1] += line_vat or 0
        acc[2] += exact
    breakdown = []
    for (code, rate), (taxable, line_vat_sum, exact) in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        vat = line_vat_sum if market.vat_stage == "line" else round_minor(Decimal(taxable) * rate, market.rounding_mode)
        breakdown.append(VatBreakdown(code, rate, taxable, vat, exact))
    net = sum(v.net_minor for v in vat_lines)
    return VatResult(tuple(vat_lines), tuple(breakdown), net, sum(b.vat_minor for b in breakdown))


def split_period(table: VatTable, market: str, start: date, end: date) -> list[tuple[date, date]]:
    """[start, end) cut at every VAT change date of the market: the sub-periods billing prices separately."""
    bounds = [start, *table.change_dates(market, start, end), end]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def rates_in_force(table: VatTable, market: str, on: date) -> dict[str, VatRate]:
    return {c: table.rate(market, c, on) for c in CATEGORIES
            if any(r.category == c and r.covers(on) for r in table.for_market(market))}


def all_categories(lines: Iterable) -> set[str]:
    return {category_of(line.kind) for line in lines}


__all__ = ["Market", "VatRate", "VatTable", "VatLine", "VatBreakdown", "VatResult", "apply_vat", "load_markets",
           "load_vat_table", "split_period", "category_of", "rates_in_force"]
