"""Rating: intervals -> per-account, per-local-day, per-band aggregates -> priced lines; never edits issued lines or rounds outside `round_minor`.

Aggregates hold exact Decimal amounts in minor units (no rounding), keyed by
(account_id, local_date, band), and merge by addition, so rating is incremental and associative:
rating a month is the sum of rating its days in any order and any batching. Standing charges are
one aggregate per local day (band "standing"), whatever the day's length (23/25 h DST days count
as one day). An interval belongs to the local day and band of its LOCAL start. Tiers (blocks of
the billing period's import energy) are applied when lines are built, over the sum. Lines are
rounded with the market's rounding mode either per line ("line") or once per invoice
("invoice": Decimal kept to the end, the total rounded once, the residue reported for booking).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Context, Decimal
from typing import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from meterlink.errors import ValidationError
from meterlink.money import round_minor

from .tariff import Tariff, Tier
from .vee import Interval, IntervalChange

IMPORT_OBIS = "1.8.0"
EXPORT_OBIS = "2.8.0"
STANDING = "standing"
EXPORT = "export"
ROUNDING_STAGES = ("line", "invoice")
KINDS = ("energy", "export", "tier", "standing", "promotion")

_CTX = Context(prec=80)          # wide enough that no product or sum of amounts is ever rounded
_ZERO = Decimal(0)

AggKey = tuple[str, date, str]


@dataclass(frozen=True)
class DayBandAggregate:
    account_id: str
    local_date: date
    band: str                    # a tariff band name, "export" or "standing"
    wh: int                      # energy in the band that day (export: Wh exported, positive)
    amount_dec: Decimal          # exact minor units; export credit is negative
    kind: str = "energy"         # energy | export | standing
    unit_price: Decimal = _ZERO  # minor units per kWh (energy/export) or per day (standing), >= 0 for export
    days: int = 0                # standing: number of day charges (1 per local day)

    @property
    def key(self) -> AggKey:
        return (self.account_id, self.local_date, self.band)

    def __add__(self, other: "DayBandAggregate") -> "DayBandAggregate":
        if other.key != self.key or other.kind != self.kind:
            raise ValueError(f"cannot add aggregates {self.key}/{self.kind} and {other.key}/{other.kind}")
        if other.unit_price != self.unit_price:
            raise ValueError(f"aggregate {self.key}: unit price {self.unit_price} vs {other.unit_price}; "
                             f"aggregates rated with different tariffs must be kept apart (use rerate)")
        return DayBandAggregate(self.account_id, self.local_date, self.band, self.wh + other.wh,
                                _CTX.add(self.amount_dec, other.amount_dec), self.kind, self.unit_price,
                                self.days + other.days)

    def negated(self) -> "DayBandAggregate":
        return replace(self, wh=-self.wh, amount_dec=-self.amount_dec, days=-self.days)


@dataclass(frozen=True)
class RatedLine:
    description: str
    band: str
    quantity_kwh: Decimal        # kWh for energy/export/tier lines, days for standing (see unit_code)
    unit_price: Decimal          # major units per kWh or per day, never negative (credits: negative quantity)
    net_minor: int
    kind: str                    # energy | standing | export | tier | promotion
    unit_code: str = "KWH"       # UN/ECE Rec 20: KWH or DAY
    amount_dec: Decimal = _ZERO  # exact amount in minor units before rounding
    period_start: date | None = None   # local dates, end exclusive
    period_end: date | None = None


@dataclass(frozen=True)
class Promotion:
    """An accepted offer: `percent_off` % of the energy amount of `bands` (None: all) on local dates [valid_from, valid_to),
    plus a fixed `per_kwh_off` (minor units per kWh) off the same energy; never more than that energy's amount."""

    id: str
    description: str
    percent_off: Decimal
    bands: frozenset[str] | None = None
    valid_from: date | None = None
    valid_to: date | None = None
    per_kwh_off: Decimal = _ZERO

    def applies(self, local_date: date, band: str) -> bool:
        return ((self.bands is None or band in self.bands)
                and (self.valid_from is None or local_date >= self.valid_from)
                and (self.valid_to is None or local_date < self.valid_to))


@dataclass(frozen=True)
class Quote:
    account_id: str
    tariff_id: str
    currency: str
    start: date
    end: date                    # exclusive
    lines: tuple[RatedLine, ...]
    exact_total: Decimal         # minor units, unrounded
    total_minor: int             # == sum(line.net_minor)
    residue: Decimal             # total_minor - exact_total: rounding residue to book
    rounding_mode: str
    rounding_stage: str


# --------------------------------------------------------------------------- aggregates

def merge_aggregates(*maps: Mapping[AggKey, DayBandAggregate]) -> dict[AggKey, DayBandAggregate]:
    """Sum aggregate maps (associative and commutative); zero entries are kept so keys stay stable."""
    out: dict[AggKey, DayBandAggregate] = {}
    for m in maps:
        for key, agg in m.items():
            have = out.get(key)
            out[key] = agg if have is None else have + agg
    return out


def _zone(tariff: Tariff, tz: ZoneInfo | str | None) -> ZoneInfo:
    if tz is None:
        return tariff.zone
    return tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)


def rate_interval(interval: Interval, tariff: Tariff, account_id: str,
                  tz: ZoneInfo | str | None = None) -> DayBandAggregate:
    """One interval -> its contribution to one day-band aggregate (exact, unrounded)."""
    if interval.held:
        raise ValidationError(f"meter {interval.meter_id} register {interval.obis} interval "
                              f"{interval.start.isoformat()} is held by VEE ({', '.join(sorted(interval.flags))}); "
                              f"resolve the exception before rating")
    local = interval.start.astimezone(_zone(tariff, tz))
    d = local.date()
    version = tariff.version_for(d)
    if interval.obis == IMPORT_OBIS:
        band = tariff.band_at(local)
        amount = _CTX.multiply(Decimal(interval.wh), band.rate).scaleb(-3)
        return DayBandAggregate(account_id, d, band.name, interval.wh, amount, "energy", band.rate)
    if interval.obis == EXPORT_OBIS:
        if version.export_rate is None:
            raise ValidationError(f"tariff {tariff.id} version {version.valid_from} has no export_rate; "
                                  f"meter {interval.meter_id} exported {interval.wh} Wh at {interval.start.isoformat()}")
        amount = -_CTX.multiply(Decimal(interval.wh), version.export_rate).scaleb(-3)
        return DayBandAggregate(account_id, d, EXPORT, interval.wh, amount, "export", version.export_rate)
    raise ValidationError(f"meter {interval.meter_id}: register {interval.obis} is not rated "
                          f"(import {IMPORT_OBIS}, export {EXPORT_OBIS})")


def rate_intervals(aggregates: Mapping[AggKey, DayBandAggregate], intervals: Iterable[Interval],
                   tariff: Tariff, account_id: str,
                   tz: ZoneInfo | str | None = None) -> dict[AggKey, DayBandAggregate]:
    """Existing aggregates + new intervals -> updated aggregates (a new dict; the input is not changed).

    Same result as adding `rate_interval` of each interval, computed per (day, band) in bulk:
    the amount is linear in Wh, so sum(wh_i) x rate is exactly sum(wh_i x rate).
    """
    zone = _zone(tariff, tz)
    days: dict[date, tuple] = {}
    sums: dict[AggKey, list] = {}          # key -> [wh, kind, unit price]
    for interval in intervals:
        if interval.flags and interval.held or interval.obis not in (IMPORT_OBIS, EXPORT_OBIS):
            rate_interval(interval, tariff, account_id, zone)      # raises the precise error
        local = interval.start.astimezone(zone)
        d = local.date()
        day = days.get(d)
        if day is None:
            version = tariff.version_for(d)
            day = days[d] = (version, version.schedules[tariff.day_class(d, version)],
                             {b.name: b.rate for b in version.bands})
        if interval.obis == IMPORT_OBIS:
            band = day[1][local.hour * 60 + local.minute]
            key, kind, price = (account_id, d, band), "energy", day[2][band]
        else:
            if day[0].export_rate is None:
                rate_interval(interval, tariff, account_id, zone)  # raises: no export rate
            key, kind, price = (account_id, d, EXPORT), "export", day[0].export_rate
        acc = sums.get(key)
        if acc is None:
            sums[key] = [interval.wh, kind, price]
        else:
            acc[0] += interval.wh
    out = dict(aggregates)
    for key, (wh, kind, price) in sums.items():
        amount = _CTX.multiply(Decimal(wh), price).scaleb(-3)
        agg = DayBandAggregate(account_id, key[1], key[2], wh, -amount if kind == "export" else amount, kind, price)
        have = out.get(key)
        out[key] = agg if have is None else have + agg
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_SLOTS: dict[tuple[int, str], tuple[Tariff, dict]] = {}   # (id(tariff), zone) -> (tariff, {start ms: slot})


def _slot(tariff: Tariff, zone: ZoneInfo, start_ms: int) -> tuple:
    """Where an interval starting at `start_ms` is rated: (local date, import band, its unit price, export
    unit price or None, local month 'YYYY-MM'); the same choices `rate_intervals` makes for that instant."""
    local = (_EPOCH + start_ms * _ONE_MS).astimezone(zone)
    d = local.date()
    version = tariff.version_for(d)
    band = version.schedules[tariff.day_class(d, version)][local.hour * 60 + local.minute]
    return d, band, version.band(band).rate, version.export_rate, f"{d.year:04d}-{d.month:02d}"


def rate_starts(tariff: Tariff, zone: ZoneInfo, account_id: str, meter_id: str, obis: str,
                starts_ms: Sequence[int], whs: Sequence[int]) -> tuple[dict[AggKey, DayBandAggregate],
                                                                       dict[tuple[str, str, str], int]] | None:
    """Plain intervals of one register of one account, as columns (interval start in ms since the epoch,
    Wh; no VEE flag, not held) -> (aggregates, pending usage per (meter, obis, local month)), the same as
    `rate_intervals({}, ...)` and the usage `billing.pending_contributions` counts for them as new rows,
    zero entries left out; None for an export interval whose tariff version has no export rate (the
    general way then raises the precise error).

    The local date and band of an instant are looked up once per tariff and zone (a poll's instant is
    shared by every meter), not converted per interval; amounts are computed once per (day, band) from
    the summed Wh, exactly as `rate_intervals` does.
    """
    key = (id(tariff), zone.key)
    cached = _SLOTS.get(key)
    if cached is None or cached[0] is not tariff:
        if len(_SLOTS) > 64:
            _SLOTS.clear()
        cached = _SLOTS[key] = (tariff, {})
    slots = cached[1]
    if len(slots) > 400_000:
        slots.clear()
    export = obis == EXPORT_OBIS
    if not export and obis != IMPORT_OBIS:
        raise ValidationError(f"meter {meter_id}: register {obis} is not rated "
                              f"(import {IMPORT_OBIS}, export {EXPORT_OBIS})")
    sums: dict[tuple[date, str], list] = {}       # (day, band) -> [wh, unit price]
    usage: dict[str, int] = {}
    get = slots.get
    for ms, wh in zip(starts_ms, whs):
        s = get(ms)
        if s is None:
            s = slots[ms] = _slot(tariff, zone, ms)
        if export:
            if s[3] is None:
                return None
            k, price = (s[0], EXPORT), s[3]
        else:
            k, price = (s[0], s[1]), s[2]
        acc = sums.get(k)
        if acc is None:
            sums[k] = [wh, price]
        else:
            acc[0] += wh
        usage[s[4]] = usage.get(s[4], 0) + wh
    aggs: dict[AggKey, DayBandAggregate] = {}
    for (d, band), (wh, price) in sums.items():
        amount = _CTX.multiply(Decimal(wh), price).scaleb(-3)
        if export:
            agg = DayBandAggregate(account_id, d, band, wh, -amount, "export", price)
        else:
            agg = DayBandAggregate(account_id, d, band, wh, amount, "energy", price)
        if agg.wh or agg.amount_dec:
            aggs[(account_id, d, band)] = agg
    return aggs, {(meter_id, obis, p): wh for p, wh in usage.items() if wh}


def rate_changes(aggregates: Mapping[AggKey, DayBandAggregate], changes: Iterable[IntervalChange],
                 tariff: Tariff, account_id: str,
                 tz: ZoneInfo | str | None = None) -> dict[AggKey, DayBandAggregate]:
    """Apply VEE re-derivation changes: un-rate each old billable interval, rate each new billable one."""
    out = dict(aggregates)
    for ch in changes:
        for interval, sign in ((ch.old, -1), (ch.new, 1)):
            if interval is None or interval.held:
                continue
            agg = rate_interval(interval, tariff, account_id, tz)
            if sign < 0:
                agg = agg.negated()
            have = out.get(agg.key)
            out[agg.key] = agg if have is None else have + agg
    return out


def _dates(start: date, end: date) -> Iterable[date]:
    d = start
    while d < end:
        yield d
        d += timedelta(days=1)


def _check_dates(start: date, end: date) -> None:
    if isinstance(start, datetime) or isinstance(end, datetime):
        raise TypeError("rating windows are LOCAL dates (date objects), not instants")
    if end < start:
        raise ValueError(f"window end {end} before start {start}")


def standing_charges(tariff: Tariff, account_id: str, start: date, end: date) -> dict[AggKey, DayBandAggregate]:
    """One standing-charge aggregate per local day in [start, end); a 23 h or 25 h day is one day."""
    _check_dates(start, end)
    out = {}
    for d in _dates(start, end):
        price = tariff.version_for(d).standing_charge
        out[(account_id, d, STANDING)] = DayBandAggregate(account_id, d, STANDING, 0, price, "standing", price, 1)
    return out


# --------------------------------------------------------------------------- tiers

def _in_block(tier: Tier, cumulative_wh: int) -> int:
    """Wh of the first `cumulative_wh` of the period that fall in `tier`."""
    upper = cumulative_wh if tier.to_wh is None else min(cumulative_wh, tier.to_wh)
    return max(0, upper - tier.from_wh)


def tier_usage(tariff: Tariff, daily_import_wh: Mapping[date, int]) -> dict[tuple[date, str], int]:
    """(local date, tier name) -> Wh of that day in that block; blocks count per calendar month.

    Days are taken in date order and the month's import accumulates across them, so a day that
    crosses a threshold is split at it; each day uses the blocks of its own tariff version.
    """
    usage: dict[tuple[date, str], int] = {}
    period, cumulative = None, 0
    for d in sorted(daily_import_wh):
        p = d.replace(day=1)
        if p != period:
            period, cumulative = p, 0
        before, cumulative = cumulative, cumulative + daily_import_wh[d]
        for tier in tariff.version_for(d).tiers:
            wh = _in_block(tier, cumulative) - _in_block(tier, before)
            if wh:
                usage[(d, tier.name)] = usage.get((d, tier.name), 0) + wh
    return usage


def tier_delta(tariff: Tariff, daily_import_wh: Mapping[date, int],
               billed_import_wh: Mapping[date, int] | None = None) -> dict[tuple[date, str], int]:
    """(local date, tier name) -> Wh that `daily_import_wh` adds to each block, on top of what was already
    billed (`billed_import_wh`, per local date) in the same months: tier_usage(billed + new) minus
    tier_usage(billed). Blocks thus always count the period's cumulative import, whatever arrived when
    (a late delta is priced at the block the period's total reaches, not from 0), and the sum over every
    bill of a period equals `tier_usage` of its final import. Negative where a correction lowers a block."""
    if not billed_import_wh:
        return tier_usage(tariff, daily_import_wh)
    months = {d.replace(day=1) for d in daily_import_wh}
    before = {d: wh for d, wh in billed_import_wh.items() if d.replace(day=1) in months}
    after = dict(before)
    for d, wh in daily_import_wh.items():
        after[d] = after.get(d, 0) + wh
    old, new = tier_usage(tariff, before), tier_usage(tariff, after)
    out = {}
    for key in sorted({*old, *new}):
        wh = new.get(key, 0) - old.get(key, 0)
        if wh:
            out[key] = wh
    return out


def has_tiers(tariff: Tariff) -> bool:
    return any(v.tiers for v in tariff.versions)


# --------------------------------------------------------------------------- lines

_KIND_ORDER = {"energy": 0, "tier": 1, "export": 2, "promotion": 3, "standing": 4}


def _major(minor: Decimal, exponent: int) -> Decimal:
    return minor.scaleb(-exponent)


def _period_of(d: date, bounds: Sequence[date]) -> tuple[date, date]:
    lo = bounds[0]
    for b in bounds[1:]:
        if d < b:
            return lo, b
        lo = b
    raise AssertionError(d)


def _apportion_total(exacts: Sequence[Decimal], total: int) -> list[int]:
    """Integer nets, each within 1 of its exact amount, summing to `total` (largest remainder)."""
    floors = [round_minor(e, "floor") for e in exacts]
    left = total - sum(floors)
    if not 0 <= left <= len(exacts):
        raise AssertionError(f"cannot apportion {total} over {exacts}")
    order = sorted(range(len(exacts)), key=lambda i: (-(exacts[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def lines_from_aggregates(tariff: Tariff, aggregates: Iterable[DayBandAggregate], start: date, end: date, *,
                          account_id: str = "", rounding_mode: str = "half_up", rounding_stage: str = "line",
                          split_at: Sequence[date] = (), promotions: Sequence[Promotion] = (),
                          billed_import: Mapping[date, int] | None = None) -> Quote:
    """Day-band aggregates (one account) in [start, end) -> a Quote with lines per band, tier, export and standing.

    Lines are grouped per (sub-period, kind, band, unit price); `split_at` cuts the window into
    sub-periods (e.g. at a VAT rate change); a tariff version change splits lines by price.
    `billed_import`: import Wh per local date ALREADY BILLED (the aggregates then being the unbilled
    rest, e.g. a catch-up): blocks count the billing period's whole import, and the tier lines are the
    difference `tier_usage(billed + these)` - `tier_usage(billed)` (see `tier_delta`).
    """
    _check_dates(start, end)
    if rounding_stage not in ROUNDING_STAGES:
        raise ValueError(f"unknown rounding stage {rounding_stage!r}; known: {', '.join(ROUNDING_STAGES)}")
    bounds = sorted({start, end, *(d for d in split_at if start < d < end)})
    groups: dict[tuple, list] = {}     # key -> [wh or days, exact amount]
    daily_import: dict[date, int] = {}
    aggregates_in_window = [a for a in aggregates if start <= a.local_date < end]
    for agg in aggregates_in_window:
        if account_id and agg.account_id != account_id:
            raise ValidationError(f"aggregate of account {agg.account_id} in a quote for {account_id}")
        ps, pe = _period_of(agg.local_date, bounds)
        key = (ps, pe, agg.kind, agg.band, agg.unit_price)
        acc = groups.setdefault(key, [0, _ZERO])
        acc[0] += agg.days if agg.kind == "standing" else agg.wh
        acc[1] = _CTX.add(acc[1], agg.amount_dec)
        if agg.kind == "energy":
            daily_import[agg.local_date] = daily_import.get(agg.local_date, 0) + agg.wh

    # tiers: per billing period (month) over the sum of the window's import in that period
    tier_by_name = {t.name: t for v in tariff.versions for t in v.tiers}
    for (d, name), wh in tier_delta(tariff, daily_import, billed_import).items():
        adder = next(t.adder for t in tariff.version_for(d).tiers if t.name == name)
        if adder == 0:
            continue
        ps, pe = _period_of(max(d, start), bounds)     # a change is never dated before the first unbilled day
        acc = groups.setdefault((ps, pe, "tier", name, adder), [0, _ZERO])
        acc[0] += wh
        acc[1] = _CTX.add(acc[1], _CTX.multiply(Decimal(wh), adder).scaleb(-3))

    # promotions: a percentage off the energy amount of chosen bands, per sub-period
    promo_by_id = {}
    for promo in promotions:
        promo_by_id[promo.id] = promo
        base: dict[tuple[date, date], Decimal] = {}
        base_wh: dict[tuple[date, date], int] = {}
        for agg in aggregates_in_window:
            if agg.kind == "energy" and promo.applies(agg.local_date, agg.band):
                sub = _period_of(agg.local_date, bounds)
                base[sub] = _CTX.add(base.get(sub, _ZERO), agg.amount_dec)
                base_wh[sub] = base_wh.get(sub, 0) + agg.wh
        for (ps, pe), amount in base.items():
            off = _CTX.add(_CTX.multiply(amount, promo.percent_off).scaleb(-2),
                           _CTX.multiply(Decimal(base_wh[(ps, pe)]), promo.per_kwh_off).scaleb(-3))
            discount = -min(off, amount) if amount > 0 else _ZERO
            if discount:
                groups[(ps, pe, "promotion", promo.id, discount)] = [1, discount]

    exp = tariff.exponent
    drafts = []
    band_order = {b.name: i for v in tariff.versions for i, b in enumerate(v.bands)}
    for key in sorted(groups, key=lambda k: (k[0], _KIND_ORDER[k[2]], band_order.get(k[3], 99), k[3], k[4])):
        ps, pe, kind, band, price = key
        qty_raw, amount = groups[key]
        if qty_raw == 0 and amount == 0:
            continue                         # e.g. a day-band whose estimate was later moved away
        if kind == "standing":
            quantity, unit_code = Decimal(qty_raw), "DAY"
            desc = (f"Standing charge {ps} to {pe - timedelta(days=1)}" if qty_raw >= 0 else
                    f"Standing charge credit {ps} to {pe - timedelta(days=1)} (supply ended earlier)")
        elif kind == "promotion":            # one unit ("C62") priced at the discount
            quantity, unit_code = Decimal(1), "C62"
            desc = promo_by_id[band].description or f"Promotion {band}"
        else:
            quantity, unit_code = Decimal(qty_raw).scaleb(-3), "KWH"
            if kind == "export":
                quantity = -quantity
                desc = "Export credit (2.8.0)"
            elif kind == "tier":
                t = tier_by_name[band]
                desc = t.description or (f"Block {band}: {Decimal(t.from_wh).scaleb(-3)} kWh"
                                         + (f" to {Decimal(t.to_wh).scaleb(-3)} kWh" if t.to_wh else " and above"))
            else:
                desc = f"Energy, {band.replace('_', ' ')}"
        if price < 0:                       # EN 16931 BR-27: prices are never negative
            price, quantity = -price, -quantity
        drafts.append((desc, band, quantity, _major(price, exp), amount, kind, unit_code, ps, pe))

    exact_total = sum((d[4] for d in drafts), _ZERO)
    if rounding_stage == "line":
        nets = [round_minor(d[4], rounding_mode) for d in drafts]
        total = sum(nets)
    else:
        total = round_minor(exact_total, rounding_mode)
        nets = _apportion_total([d[4] for d in drafts], total) if drafts else []
    lines = tuple(RatedLine(desc, band, qty, price, net, kind, unit, amount, ps, pe)
                  for (desc, band, qty, price, amount, kind, unit, ps, pe), net in zip(drafts, nets))
    return Quote(account_id, tariff.id, tariff.currency, start, end, lines, exact_total, total,
                 Decimal(total) - exact_total, rounding_mode, rounding_stage)


def quote(tariff: Tariff, intervals: Iterable[Interval], account: str, start: date, end: date,
          tz: ZoneInfo | str | None = None, *, rounding_mode: str = "half_up", rounding_stage: str = "line",
          split_at: Sequence[date] = (), standing: bool = True, promotions: Sequence[Promotion] = ()) -> Quote:
    """Price a window of LOCAL dates [start, end) for one account's intervals (import 1.8.0, export 2.8.0).

    Intervals whose local start falls outside the window are ignored; held intervals are refused.
    """
    _check_dates(start, end)
    zone = _zone(tariff, tz)
    inside = [i for i in intervals if start <= i.start.astimezone(zone).date() < end]
    aggs = rate_intervals({}, inside, tariff, account, zone)
    if standing:
        aggs = merge_aggregates(aggs, standing_charges(tariff, account, start, end))
    return lines_from_aggregates(tariff, aggs.values(), start, end, account_id=account,
                                 rounding_mode=rounding_mode, rounding_stage=rounding_stage, split_at=split_at,
                                 promotions=promotions)


# --------------------------------------------------------------------------- re-rating

def rerate(old_lines: Iterable[RatedLine], new_lines: Iterable[RatedLine]) -> tuple[RatedLine, ...]:
    """Adjustment lines turning issued `old_lines` into `new_lines`: differences only, history untouched.

    Lines match on (kind, band, unit price, unit, period); a corrected price reverses the old line
    and adds the new one. sum(adjustment.net_minor) == sum(new.net_minor) - sum(old.net_minor).
    """
    def key(line: RatedLine) -> tuple:
        return (line.kind, line.band, line.unit_price, line.unit_code, line.period_start, line.period_end)

    table: dict[tuple, list] = {}     # key -> [old qty, old net, old amount, new qty, new net, new amount, desc]
    for side, lines in ((0, old_lines), (3, new_lines)):
        for line in lines:
            row = table.setdefault(key(line), [_ZERO, 0, _ZERO, _ZERO, 0, _ZERO, line.description])
            row[side] += line.quantity_kwh
            row[side + 1] += line.net_minor
            row[side + 2] = _CTX.add(row[side + 2], line.amount_dec)
    out = []
    for k, (oq, on, oa, nq, nn, na, desc) in table.items():
        if oq == nq and on == nn and oa == na:
            continue
        kind, band, price, unit, ps, pe = k
        out.append(RatedLine(f"Adjustment: {desc}", band, nq - oq, price, nn - on, kind, unit,
                             _CTX.subtract(na, oa), ps, pe))
    return tuple(out)
