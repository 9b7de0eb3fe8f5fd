"""Billing: bound interval usage -> one billable item per account per period (all bands, standing, export, promotions, adjustments, VAT); pure, never reads a clock or a database and never edits an issued item.

The unit of truth is a `UsageRow`: one VEE interval of one meter register, the account bound to it
at its start (None = parked), and how much of it has already been billed (`billed_wh`, to
`billed_account`). A bill run for period P (a local month of the market) bills, per account, the
*delta* ``wh - billed_wh`` of every bound, non-held row that starts before the end of P:
  * rows inside P are the period's usage;
  * rows of earlier periods with a delta are catch-up: usage parked then bound by a back-dated
    binding, late readings that replaced estimates, released exceptions. They are priced at the
    tariff and VAT of their own dates, as separate lines dated with their own sub-period;
and then marks those rows billed. So every Wh is billed exactly once, to one account, and an
issued item is never touched again (corrections arrive as delta lines on the next item).
Catch-up is priced as if it had arrived on time: blocks (tiers) count the period's whole import
(what its rows already billed + the delta, `rating.tier_delta`), and the standing charges of supply
days no earlier item carried (a supply back-dated over billed months) are added and those of charged
days no supply covers any more (a back-dated move-out) credited, dated in their own month
(`standing_due`, with the charged ranges the caller keeps with `charged_after`).
Rows once billed keep their account: `check_rebinding` refuses a binding edit that would move
billed usage to another account (issue a credit first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from meterlink.errors import ValidationError

from .binding import Bindings
from .rating import EXPORT_OBIS, IMPORT_OBIS, Promotion, RatedLine, has_tiers, lines_from_aggregates, \
    rate_intervals, standing_charges, merge_aggregates
from .tariff import Tariff
from .vat import Market, VatResult, VatTable, apply_vat
from .vee import HOLD_FLAGS, Interval

UTC = timezone.utc
RATED_OBIS = (IMPORT_OBIS, EXPORT_OBIS)
RowKey = tuple[str, str, datetime]          # meter, obis, start


@dataclass(frozen=True)
class UsageRow:
    meter_id: str
    obis: str
    start: datetime
    end: datetime
    wh: int
    estimated: bool = False
    flags: frozenset[str] = frozenset()
    account_id: str | None = None          # None = parked (no binding at `start`)
    billed_wh: int = 0
    billed_account: str | None = None
    revision: int = 0

    @property
    def key(self) -> RowKey:
        return (self.meter_id, self.obis, self.start)

    @property
    def held(self) -> bool:
        return bool(self.flags & HOLD_FLAGS)

    @property
    def unbilled_wh(self) -> int:
        return self.wh - self.billed_wh

    def as_interval(self, wh: int) -> Interval:
        return Interval(self.meter_id, self.obis, self.start, self.end, wh, self.estimated,
                        self.flags - HOLD_FLAGS if self.flags else self.flags)


# --------------------------------------------------------------------------- periods

def parse_period(period: str) -> tuple[date, date]:
    """'2026-11' -> local dates [2026-11-01, 2026-12-01)."""
    try:
        y, m = (int(p) for p in period.split("-"))
        start = date(y, m, 1)
    except (ValueError, TypeError):
        raise ValidationError(f"bad billing period {period!r} (want YYYY-MM, e.g. 2026-11)") from None
    end = date(y + (m == 12), m % 12 + 1, 1)
    return start, end


def period_of(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def local_midnight(d: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(d, time(0), zone).astimezone(UTC)


def period_instants(period: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    start, end = parse_period(period)
    return local_midnight(start, zone), local_midnight(end, zone)


# --------------------------------------------------------------------------- binding usage

def bind_intervals(intervals: Iterable[Interval], bindings: Bindings) -> list[UsageRow]:
    """Fresh rows: each interval with the account bound to its meter at the interval's start."""
    spans: dict[str, list] = {}
    out = []
    for iv in intervals:
        if iv.obis not in RATED_OBIS:
            continue
        sp = spans.get(iv.meter_id)
        if sp is None:
            sp = spans[iv.meter_id] = bindings.spans(iv.meter_id)
        account = None
        for s in sp:
            if s.start <= iv.start and (s.end is None or iv.start < s.end):
                account = s.account_id
                break
        out.append(UsageRow(iv.meter_id, iv.obis, iv.start, iv.end, iv.wh, iv.estimated, iv.flags, account))
    return out


def merge_rows(stored: Mapping[RowKey, UsageRow], fresh: Iterable[UsageRow],
               released: Iterable[RowKey] = ()) -> dict[RowKey, UsageRow]:
    """Fresh derivation + stored billing state -> the rows that changed (new or different), keyed.

    Billed state is kept; a billed row keeps its billed account; a stored row the new derivation no
    longer has becomes 0 Wh (so what was billed of it is credited). `released` rows lose hold flags.
    """
    released = set(released)
    changed: dict[RowKey, UsageRow] = {}
    seen = set()
    for row in fresh:
        key = (row.meter_id, row.obis, row.start)
        if stored:
            seen.add(key)
        if released and key in released:
            row = replace(row, flags=row.flags - HOLD_FLAGS)
        old = stored.get(key) if stored else None
        if old is not None:
            account = old.billed_account if old.billed_account is not None and old.billed_wh else row.account_id
            row = replace(row, account_id=account, billed_wh=old.billed_wh, billed_account=old.billed_account,
                          revision=old.revision)
            if (row.wh, row.estimated, row.flags, row.account_id, row.end) == \
                    (old.wh, old.estimated, old.flags, old.account_id, old.end):
                continue
            row = replace(row, revision=old.revision + 1)
        changed[key] = row
    for key, old in stored.items():
        if key not in seen and (old.wh != 0 or old.flags):
            changed[key] = replace(old, wh=0, estimated=False, flags=frozenset(), revision=old.revision + 1)
    return changed


def rebind(rows: Iterable[UsageRow], bindings: Bindings) -> dict[RowKey, UsageRow]:
    """Rows whose account changes under new bindings (parked rows bound by a back-dated binding, ...)."""
    out = {}
    for row in rows:
        account = bindings.account_at(row.meter_id, row.start)
        if row.billed_wh and row.billed_account is not None:
            continue                              # billed usage stays with its account (see check_rebinding)
        if account != row.account_id:
            out[row.key] = replace(row, account_id=account, revision=row.revision + 1)
    return out


def check_rebinding(rows: Iterable[UsageRow], bindings: Bindings) -> None:
    """Refuse bindings under which usage already billed to one account would belong to another."""
    bad = []
    for row in rows:
        if row.billed_wh and row.billed_account is not None:
            now = bindings.account_at(row.meter_id, row.start)
            if now != row.billed_account:
                bad.append(f"meter {row.meter_id} {row.obis} {row.start.isoformat()} ({row.billed_wh} Wh) was billed "
                           f"to {row.billed_account}, would belong to {now or 'nobody (parked)'}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValidationError("binding change refused, it moves billed usage: " + "; ".join(bad[:3]) + more
                              + "; credit the billed usage first")


# --------------------------------------------------------------------------- billable items

@dataclass(frozen=True)
class Adjustment:
    """A manual adjustment for an account in a period (goodwill credit, correction); VAT by `category`."""

    account_id: str
    period: str
    description: str
    net_minor: int
    kind: str = "adjustment"                  # rated as the energy VAT category; "standing" for fixed-part fixes


@dataclass(frozen=True)
class ItemLine:
    line: RatedLine
    vat_code: str
    vat_rate: Decimal


@dataclass(frozen=True)
class UsageTotal:
    meter_id: str
    obis: str
    usage_period: str                         # local month the intervals belong to
    wh: int


@dataclass(frozen=True)
class BillableItem:
    account_id: str
    period: str
    market: str
    currency: str
    payment: str
    tariff_id: str
    start: date                               # local, inclusive
    end: date                                 # local, exclusive
    lines: tuple[ItemLine, ...]
    usage: tuple[UsageTotal, ...]
    vat: VatResult
    exact_total: Decimal                      # minor units, before rounding (lines; adjustments are exact)
    residue: Decimal                          # net_minor - exact_total: rounding residue to book
    rounding_mode: str
    rounding_stage: str
    # local date ranges [from, to) whose standing charges this item carries (the period's supply days and
    # any back-dated ones caught up), and those it credits (charged before, no longer supplied); the caller
    # keeps `charged_after(charged, item)` for the next bill (`standing_charged`)
    standing_charged: tuple[tuple[date, date], ...] = ()
    standing_credited: tuple[tuple[date, date], ...] = ()

    @property
    def net_minor(self) -> int:
        return sum(il.line.net_minor for il in self.lines)

    @property
    def vat_minor(self) -> int:
        return self.vat.vat_minor

    @property
    def gross_minor(self) -> int:
        return self.net_minor + self.vat_minor

    def to_dict(self) -> dict:
        return {
            "account_id": self.account_id, "period": self.period, "market": self.market,
            "currency": self.currency, "payment": self.payment, "tariff_id": self.tariff_id,
            "start": self.start.isoformat(), "end": self.end.isoformat(),
            "net_minor": self.net_minor, "vat_minor": self.vat_minor, "gross_minor": self.gross_minor,
            "exact_total": str(self.exact_total), "residue": str(self.residue),
            "rounding_mode": self.rounding_mode, "rounding_stage": self.rounding_stage,
            "lines": [{"description": il.line.description, "kind": il.line.kind, "band": il.line.band,
                       "quantity": str(il.line.quantity_kwh), "unit_code": il.line.unit_code,
                       "unit_price": str(il.line.unit_price), "net_minor": il.line.net_minor,
                       "amount_exact": str(il.line.amount_dec),
                       "period_start": il.line.period_start.isoformat() if il.line.period_start else None,
                       "period_end": il.line.period_end.isoformat() if il.line.period_end else None,
                       "vat_code": il.vat_code, "vat_rate": str(il.vat_rate)} for il in self.lines],
            "vat_breakdown": [{"code": b.code, "rate": str(b.rate), "taxable_minor": b.taxable_minor,
                               "vat_minor": b.vat_minor} for b in self.vat.breakdown],
            "usage": [{"meter_id": u.meter_id, "obis": u.obis, "usage_period": u.usage_period, "wh": u.wh}
                      for u in self.usage],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class AccountBill:
    item: BillableItem
    billed_rows: tuple[UsageRow, ...] | None  # the rows with their new billed state (None: summed from
                                              # stored aggregates; the store marks the rows)


def standing_dates(bindings: Bindings, account_id: str, start: date, end: date, zone: ZoneInfo,
                   supplies: Sequence | None = None) -> list[date]:
    """Local dates in [start, end) on which the account holds a supply for any part of the day.

    `supplies`: the account's supplies when the caller has them indexed (a bill run over many accounts
    would otherwise scan every supply per account)."""
    t0, t1 = local_midnight(start, zone), local_midnight(end, zone)
    if supplies is None:
        supplies = bindings.supplied_between(account_id, t0, t1)
    out = []
    d = start
    while d < end:
        a, b = local_midnight(d, zone), local_midnight(d + timedelta(days=1), zone)
        if any(s.valid_from < b and (s.valid_to is None or s.valid_to > a) for s in supplies):
            out.append(d)
        d += timedelta(days=1)
    return out


DateRange = tuple[date, date]                 # local dates [from, to)


def _local_day_after(t: datetime, zone: ZoneInfo) -> date:
    """The first local date that starts at or after instant t (t itself when it is a local midnight)."""
    d = t.astimezone(zone).date()
    return d if local_midnight(d, zone) == t else d + timedelta(days=1)


def merge_ranges(ranges: Iterable[DateRange]) -> list[DateRange]:
    """Sorted, merged (overlapping or adjacent joined) date ranges; empty ranges dropped."""
    out: list[list[date]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract_ranges(ranges: Iterable[DateRange], minus: Iterable[DateRange]) -> list[DateRange]:
    """The dates of `ranges` not in `minus`, as merged ranges."""
    minus = merge_ranges(minus)
    out = []
    for a, b in merge_ranges(ranges):
        for ma, mb in minus:
            if mb <= a or ma >= b:
                continue
            if ma > a:
                out.append((a, ma))
            a = max(a, mb)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def supply_ranges(supplies: Iterable, zone: ZoneInfo, start: date, end: date) -> list[DateRange]:
    """Local date ranges within [start, end) on which any of `supplies` covers some part of the day
    (the days that owe a standing charge; same rule as `standing_dates`), merged."""
    out = []
    for s in supplies:
        a = max(s.valid_from.astimezone(zone).date(), start)
        b = end if s.valid_to is None else min(_local_day_after(s.valid_to, zone), end)
        out.append((a, b))
    return merge_ranges(out)


def standing_due(account_id: str, period: str, zone: ZoneInfo, *, bindings: Bindings,
                 charged: Sequence[DateRange] | None, since: date | None = None,
                 supplies: Sequence | None = None) -> tuple[list[DateRange], list[DateRange]]:
    """(charge, credit): the local date ranges whose standing charge a bill for `period` carries, and those
    it credits.

    `charged` None: charge the period's supply days, credit nothing (no memory of earlier bills).
    Otherwise, between `since` (the first period the system billed; default: this period's start) and
    the period's end: charge every supply day not in `charged` (the ranges earlier items carried: a
    supply back-dated over months already billed owes those days), and credit every day in `charged`
    that no supply covers any more (a move-out back-dated over charged days); both dated in their own
    month on this bill. The sum over all bills is one charge per supply day, whatever was entered when."""
    start, end = parse_period(period)
    if supplies is None:
        supplies = bindings.supplies_of_account(account_id)
    if charged is None:
        return supply_ranges(supplies, zone, start, end), []
    lo = min(since or start, start)
    due = supply_ranges(supplies, zone, lo, end)
    window = subtract_ranges(charged, [(date.min, lo), (end, date.max)])
    return subtract_ranges(due, charged), subtract_ranges(window, due)


def charged_after(charged: Sequence[DateRange], item: "BillableItem") -> list[DateRange]:
    """The account's charged standing ranges once `item` is issued: plus what it charged, minus what it credited."""
    return subtract_ranges([*charged, *item.standing_charged], item.standing_credited)


def billed_daily_import(rows: Iterable[UsageRow], account_id: str, zone: ZoneInfo) -> dict[date, int]:
    """Import (1.8.0) Wh per local date already billed to the account (the rows' billed_wh): what the blocks
    of a period already counted when a catch-up delta arrives (`rating.tier_delta`)."""
    out: dict[date, int] = {}
    for r in rows:
        if r.billed_wh and r.billed_account == account_id and r.obis == IMPORT_OBIS:
            d = r.start.astimezone(zone).date()
            out[d] = out.get(d, 0) + r.billed_wh
    return out


def _adjustment_line(adj: Adjustment, exponent: int, start: date, end: date) -> RatedLine:
    sign = -1 if adj.net_minor < 0 else 1
    return RatedLine(adj.description, "adjustment", Decimal(sign), Decimal(abs(adj.net_minor)).scaleb(-exponent),
                     adj.net_minor, adj.kind, "C62", Decimal(adj.net_minor), start, end)


def bill_account(account_id: str, period: str, *, bindings: Bindings, market: Market, tariff: Tariff,
                 vat: VatTable, rows: Iterable[UsageRow], promotions: Sequence[Promotion] = (),
                 adjustments: Sequence[Adjustment] = (), standing: bool = True,
                 standing_charged: Sequence[DateRange] | None = None,
                 standing_since: date | None = None) -> AccountBill | None:
    """The billable item of one account for one period, or None when there is nothing to bill.

    `rows` may hold any rows; only this account's unbilled, non-held rows starting before the
    period's end are billed. The account's billed rows in `rows` tell the blocks (tiers) what the
    period already counted. `standing_charged`/`standing_since`: see `standing_due`.
    """
    zone = ZoneInfo(market.timezone)
    start, end = parse_period(period)
    t_end = local_midnight(end, zone)
    acct = bindings.accounts.get(account_id)
    if acct is None:
        raise ValidationError(f"unknown account {account_id}")
    rows = list(rows)
    todo = [r for r in rows if r.account_id == account_id and not r.held and r.unbilled_wh != 0
            and r.start < t_end]
    aggs, usage = pending_contributions(((None, r) for r in todo), tariff, zone)
    billed = billed_daily_import(rows, account_id, zone) if has_tiers(tariff) else None
    item = item_from_pending(account_id, period, bindings=bindings, market=market, tariff=tariff, vat=vat,
                             aggregates=aggs.values(), usage=usage, promotions=promotions,
                             adjustments=adjustments, standing=standing, billed_import=billed,
                             standing_charged=standing_charged, standing_since=standing_since)
    if item is None:
        return None
    billed = tuple(replace(r, billed_wh=r.wh, billed_account=account_id) for r in todo)
    return AccountBill(item, billed)


def _nonzero(agg) -> bool:
    return bool(agg.wh or agg.amount_dec or agg.days)


def item_from_pending(account_id: str, period: str, *, bindings: Bindings, market: Market, tariff: Tariff,
                      vat: VatTable, aggregates: Iterable, usage: Mapping[tuple[str, str, str], int],
                      promotions: Sequence[Promotion] = (), adjustments: Sequence[Adjustment] = (),
                      standing: bool = True, supplies: Sequence | None = None,
                      billed_import: Mapping[date, int] | None = None,
                      standing_charged: Sequence[DateRange] | None = None,
                      standing_since: date | None = None) -> BillableItem | None:
    """The billable item of one account for `period` from its PENDING (unbilled) day-band aggregates dated
    before the period's end and its pending usage totals ((meter, obis, local month) -> Wh); None when there
    is nothing to bill. Standing charges are added here: the supply days of the period, and with
    `standing_charged` (the ranges earlier items carried) the uncharged supply days since `standing_since`
    too (`standing_due`). `billed_import`: import Wh per local date already billed (blocks count the
    whole period, `rating.tier_delta`). Pure: the monthly bill run's summation
    (`billing_store.run_billing` feeds it the stored aggregates, `bill_account` the aggregates it rates
    from rows; both give the same item)."""
    zone = ZoneInfo(market.timezone)
    start, end = parse_period(period)
    acct = bindings.accounts.get(account_id)
    if acct is None:
        raise ValidationError(f"unknown account {account_id}")
    aggs = {a.key: a for a in aggregates if a.local_date < end and _nonzero(a)}
    ranges, credits = standing_due(account_id, period, zone, bindings=bindings, charged=standing_charged,
                                   since=standing_since, supplies=supplies) if standing else ([], [])
    for a, b in ranges:
        aggs = merge_aggregates(aggs, standing_charges(tariff, account_id, a, b))
    for a, b in credits:
        aggs = merge_aggregates(aggs, {k: c.negated() for k, c in standing_charges(tariff, account_id, a, b).items()})
    window_start = min([start, *(k[1] for k in aggs)])
    adjs = [a for a in adjustments if a.account_id == account_id and a.period == period]
    if not aggs and not adjs:
        return None
    item = item_from_aggregates(account_id, period, market=market, tariff=tariff, vat=vat, aggregates=aggs.values(),
                                window_start=window_start, payment=acct.payment, promotions=promotions,
                                adjustments=adjs, billed_import=billed_import,
                                usage=tuple(UsageTotal(m, o, p, wh) for (m, o, p), wh in sorted(usage.items())
                                            if wh and p <= period))
    return replace(item, standing_charged=tuple(ranges), standing_credited=tuple(credits))


# --------------------------------------------------------------------------- incremental rating

def _pending_account(row: UsageRow | None) -> str | None:
    """The account whose pending usage `row` counts in (`pending_contribution`'s), without building it."""
    if row is None or row.account_id is None or row.wh == row.billed_wh or (row.flags and row.flags & HOLD_FLAGS):
        return None
    return row.account_id


def pending_contribution(row: UsageRow | None) -> tuple[str, Interval] | None:
    """What a stored row adds to its account's pending (unbilled) rated usage: its unbilled Wh, when it is
    bound and not held; None otherwise."""
    if row is None or row.account_id is None or row.held or row.unbilled_wh == 0:
        return None
    return row.account_id, row.as_interval(row.unbilled_wh)


def pending_contributions(changes: Iterable[tuple[UsageRow | None, UsageRow | None]], tariff: Tariff,
                          zone: ZoneInfo) -> tuple[dict, dict[tuple[str, str, str], int]]:
    """Row changes (old, new) of ONE account's tariff -> the change of pending day-band aggregates and of
    pending usage ((meter, obis, local month) -> Wh): the new row's contribution minus the old one's.

    Exact and associative (amounts are linear in Wh, see `rating`): applying the deltas of any batching
    of changes to stored aggregates gives the aggregates of rating the final rows from scratch, so
    re-processing unchanged rows (no changes) adds nothing and a replaced estimate adds only its delta.
    """
    intervals: list[Interval] = []
    usage: dict[tuple[str, str, str], int] = {}
    account = None
    for old, new in changes:
        for row, sign in ((old, -1), (new, 1)):
            a = _pending_account(row)
            if a is None:
                continue
            if account is None:
                account = a
            elif a != account:
                raise ValueError(f"pending_contributions: rows of accounts {account} and {a} in one call")
            wh = row.wh - row.billed_wh if sign > 0 else row.billed_wh - row.wh
            intervals.append(row.as_interval(wh))
            k = (row.meter_id, row.obis, period_of(row.start.astimezone(zone).date()))
            usage[k] = usage.get(k, 0) + wh
    if account is None:
        return {}, {}
    aggs = rate_intervals({}, intervals, tariff, account, zone)
    return ({k: a for k, a in aggs.items() if _nonzero(a)}, {k: wh for k, wh in usage.items() if wh})


def split_by_account(changes: Iterable[tuple[UsageRow | None, UsageRow | None]]) -> dict[str, list]:
    """(old, new) row changes -> per account the (old, new) pairs touching its pending usage; a row that
    moves between accounts is (old, None) for the one and (None, new) for the other."""
    out: dict[str, list] = {}
    for old, new in changes:
        a_old = _pending_account(old)
        a_new = _pending_account(new)
        if a_old is not None and a_old == a_new:
            out.setdefault(a_old, []).append((old, new))
            continue
        if a_old is not None:
            out.setdefault(a_old, []).append((old, None))
        if a_new is not None:
            out.setdefault(a_new, []).append((None, new))
    return out


_DIGESTS: dict[int, tuple[Tariff, str]] = {}   # id(tariff) -> (tariff, digest): a Tariff is immutable


def tariff_digest(tariff: Tariff) -> str:
    """A stable fingerprint of what day-band rating depends on (bands, windows, rates, export rate, zone,
    holidays): pending aggregates rated with another digest are rated again from their rows. Computed once
    per Tariff object (`process` and the bill run ask once per account)."""
    known = _DIGESTS.get(id(tariff))
    if known is not None and known[0] is tariff:
        return known[1]
    if len(_DIGESTS) > 256:
        _DIGESTS.clear()
    digest = _tariff_digest(tariff)
    _DIGESTS[id(tariff)] = (tariff, digest)
    return digest


def _tariff_digest(tariff: Tariff) -> str:
    import hashlib
    parts = [tariff.id, tariff.timezone, tariff.country, str(tariff.subdivision), repr(tuple(tariff.exclude_holidays))]
    for v in tariff.versions:
        parts.append(f"{v.valid_from}|{v.export_rate}")
        for b in v.bands:
            parts.append(f"{b.name}|{b.rate}|" + ";".join(f"{','.join(sorted(w.days))}:{w.start}-{w.end}"
                                                          for w in b.windows))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def item_from_aggregates(account_id: str, period: str, *, market: Market, tariff: Tariff, vat: VatTable,
                         aggregates: Iterable, window_start: date | None = None, payment: str = "postpaid",
                         promotions: Sequence[Promotion] = (), adjustments: Sequence[Adjustment] = (),
                         usage: tuple[UsageTotal, ...] = (),
                         billed_import: Mapping[date, int] | None = None) -> BillableItem:
    """Day-band aggregates of one account -> its billable item: lines split at the period start, at every
    month before it (catch-up) and at VAT changes; VAT per market rule. The monthly bill run's summation."""
    start, end = parse_period(period)
    window_start = min(window_start or start, start)
    splits = {start, *vat.change_dates(market.id, window_start, end)}
    d = date(window_start.year, window_start.month, 1)
    while d < start:                                   # catch-up lines keep their own month
        d = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
        splits.add(d)
    splits = sorted(x for x in splits if window_start < x < end)
    quote = lines_from_aggregates(tariff, aggregates, window_start, end, account_id=account_id,
                                  rounding_mode=market.rounding_mode, rounding_stage=market.rounding_stage,
                                  split_at=splits, promotions=promotions, billed_import=billed_import)
    lines = list(quote.lines) + [_adjustment_line(a, market.exponent, start, end) for a in adjustments]
    vat_result = apply_vat(market, vat, lines, default_start=start, default_end=end)
    item_lines = tuple(ItemLine(line, v.code, v.rate) for line, v in zip(lines, vat_result.lines))
    exact = quote.exact_total + sum((Decimal(a.net_minor) for a in adjustments), Decimal(0))
    return BillableItem(account_id, period, market.id, market.currency, payment, tariff.id, window_start, end,
                        item_lines, usage, vat_result, exact, Decimal(sum(line.net_minor for line in lines)) - exact,
                        market.rounding_mode, market.rounding_stage)


@dataclass(frozen=True)
class BillRun:
    period: str
    bills: tuple[AccountBill, ...]
    skipped: tuple[str, ...]                  # accounts that already have an item for the period

    @property
    def items(self) -> tuple[BillableItem, ...]:
        return tuple(b.item for b in self.bills)


def bill_run(period: str, *, bindings: Bindings, markets: Mapping[str, Market], tariffs: Mapping[str, Tariff],
             vat: VatTable, rows: Iterable[UsageRow], already_billed: Iterable[str] = (),
             promotions: Mapping[str, Sequence[Promotion]] | None = None,
             adjustments: Sequence[Adjustment] = (), accounts: Iterable[str] | None = None,
             standing_charged: Mapping[str, Sequence[DateRange]] | None = None,
             standing_since: date | None = None) -> BillRun:
    """One billable item per account for `period` (accounts already billed for it are skipped).

    `standing_charged`: account -> the local date ranges earlier items carried standing charges for
    (kept with `charged_after`); given, uncharged supply days since `standing_since` (default: the first
    day of the month of the earliest charged date of any account, i.e. the first billed period, else
    this period) are caught up and charged days no longer supplied are credited (`standing_due`)."""
    if standing_charged is not None and standing_since is None:
        first = min((r[0] for rs in standing_charged.values() for r in rs), default=None)
        standing_since = None if first is None else first.replace(day=1)
    by_account: dict[str | None, list[UsageRow]] = {}
    for r in rows:
        by_account.setdefault(r.account_id, []).append(r)
    done = set(already_billed)
    bills, skipped = [], []
    for account_id in sorted(accounts if accounts is not None else bindings.accounts):
        if account_id in done:
            skipped.append(account_id)
            continue
        acct = bindings.accounts[account_id]
        market = markets[bindings.market_of_account(account_id)]
        tariff_id = acct.tariff_id or market.default_tariff
        if tariff_id not in tariffs:
            raise ValidationError(f"account {account_id}: tariff {tariff_id!r} is not loaded "
                                  f"(known: {', '.join(sorted(tariffs))})")
        bill = bill_account(account_id, period, bindings=bindings, market=market, tariff=tariffs[tariff_id],
                            vat=vat, rows=by_account.get(account_id, ()),
                            promotions=(promotions or {}).get(account_id, ()), adjustments=adjustments,
                            standing_charged=None if standing_charged is None else standing_charged.get(account_id, ()),
                            standing_since=standing_since)
        if bill is not None:
            bills.append(bill)
    return BillRun(period, tuple(bills), tuple(skipped))


__all__ = ["UsageRow", "bind_intervals", "merge_rows", "rebind", "check_rebinding", "bill_account", "bill_run",
           "BillableItem", "AccountBill", "BillRun", "Adjustment", "parse_period", "period_instants", "item_from_aggregates",
           "item_from_pending", "pending_contribution", "pending_contributions", "split_by_account", "tariff_digest",
           "standing_due", "charged_after", "billed_daily_import", "merge_ranges", "subtract_ranges", "supply_ranges"]


@dataclass(frozen=True)
class WindowQuote:
    account_id: str
    start: date
    end: date                                 # exclusive
    currency: str
    lines: tuple[ItemLine, ...]
    vat: VatResult
    usage_wh: int

    @property
    def net_minor(self) -> int:
        return sum(il.line.net_minor for il in self.lines)


def quote_window(account_id: str, start: date, end: date, *, bindings: Bindings, market: Market, tariff: Tariff,
                 vat: VatTable, rows: Iterable[UsageRow], promotions: Sequence[Promotion] = ()) -> WindowQuote:
    """Price any window of LOCAL dates [start, end) for an account from its bound, non-held usage
    (billed or not) plus standing charges for its supply days, VAT included; changes nothing."""
    if end <= start:
        raise ValidationError(f"quote window end {end} must be after start {start}")
    zone = ZoneInfo(market.timezone)
    t0, t1 = local_midnight(start, zone), local_midnight(end, zone)
    mine = [r for r in rows if r.account_id == account_id and not r.held and t0 <= r.start < t1]
    aggs = rate_intervals({}, [r.as_interval(r.wh) for r in mine], tariff, account_id, zone)
    for d in standing_dates(bindings, account_id, start, end, zone):
        aggs = merge_aggregates(aggs, standing_charges(tariff, account_id, d, d + timedelta(days=1)))
    quote = lines_from_aggregates(tariff, aggs.values(), start, end, account_id=account_id,
                                  rounding_mode=market.rounding_mode, rounding_stage=market.rounding_stage,
                                  split_at=vat.change_dates(market.id, start, end), promotions=promotions)
    vat_result = apply_vat(market, vat, quote.lines, default_start=start, default_end=end)
    lines = tuple(ItemLine(line, v.code, v.rate) for line, v in zip(quote.lines, vat_result.lines))
    return WindowQuote(account_id, start, end, market.currency, lines, vat_result, sum(r.wh for r in mine))
