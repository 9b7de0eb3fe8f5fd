"""Vendor settlement runs: period parsing, one statement per vendor reconciled to the ledger, text/JSON rendering; reads the store, decides nothing itself.

`settle(store, period)` loads each vendor's sales, refusals and reversals of the period from
`PaygStore`, builds the statement with `vendors.settlement_statement` and checks it against the
ledger's postings with `vendors.reconcile_statement_to_ledger`. A statement that does not
reconcile to the cent is reported (`SettlementRun.ok` is False) and the CLI exits non-zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from meterlink.clock import parse_instant, utc
from meterlink.errors import ValidationError
from meterlink.money import Money

from . import vendors as V
from .payg_store import PaygStore

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


def parse_period(text: str, tz: str = "UTC") -> V.Period:
    """``2026-03`` (a month), ``2026-03-05`` (a day) in zone `tz`, or ``START/END`` ISO instants."""
    text = text.strip()
    zone = ZoneInfo(tz)
    if "/" in text:
        start_s, _, end_s = text.partition("/")
        try:
            start, end = parse_instant(start_s), parse_instant(end_s)
        except ValueError as exc:
            raise ValidationError(f"period {text!r}: {exc}") from None
    elif m := _MONTH.match(text):
        y, mo = int(m[1]), int(m[2])
        if not 1 <= mo <= 12:
            raise ValidationError(f"period {text!r}: month {mo} outside 1..12")
        start = datetime(y, mo, 1, tzinfo=zone)
        end = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=zone)
    elif m := _DAY.match(text):
        try:
            d = date(int(m[1]), int(m[2]), int(m[3]))
        except ValueError as exc:
            raise ValidationError(f"period {text!r}: {exc}") from None
        start = datetime(d.year, d.month, d.day, tzinfo=zone)
        nxt = d + timedelta(days=1)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    else:
        raise ValidationError(f"period {text!r}: expected YYYY-MM, YYYY-MM-DD or START/END ISO instants")
    start, end = utc(start), utc(end)
    if end <= start:
        raise ValidationError(f"period {text!r}: end is not after start")
    return V.Period(start, end, text)


@dataclass(frozen=True)
class SettlementRun:
    period: V.Period
    results: tuple[tuple[V.Statement, V.Reconciliation], ...]

    @property
    def ok(self) -> bool:
        return all(rec.ok for _, rec in self.results)


def settle(store: PaygStore, period: V.Period, vendor: str | None = None) -> SettlementRun:
    """One statement per vendor (or just `vendor`) for `period`, each reconciled to the ledger."""
    contracts = store.vendors()
    if vendor is not None:
        if vendor not in contracts:
            raise ValidationError(f"vendor {vendor} has no contract in {store.path}")
        contracts = {vendor: contracts[vendor]}
    ledger = list(store.transactions(period.start, period.end))
    results = []
    for vid, contract in sorted(contracts.items()):
        stmt = V.settlement_statement(vid, period, store.sales(vid, period.start, period.end),
                                      store.refusals(vid, period.start, period.end),
                                      store.reversals(vid, period.start, period.end), contract)
        results.append((stmt, V.reconcile_statement_to_ledger(stmt, ledger)))
    return SettlementRun(period, tuple(results))


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_json(run: SettlementRun) -> dict:
    return {"period": {"label": run.period.label, "start": _iso(run.period.start), "end": _iso(run.period.end)},
            "ok": run.ok,
            "statements": [{
                "vendor": s.vendor_id, "contract": s.contract_id, "currency": s.currency,
                "sales_count": s.sales_count, "gross_sales_minor": s.gross_sales_minor,
                "refused_count": s.refused_count, "refused_minor": s.refused_minor,
                "reversed_count": s.reversed_count, "reversed_minor": s.reversed_minor,
                "commission_minor": s.commission_minor, "vat_on_commission_minor": s.vat_on_commission_minor,
                "net_payable_minor": s.net_payable_minor,
                "reconciled": rec.ok,
                "ledger": {name: led for name, _, led in rec.figures},
                "lines": [{"kind": ln.kind, "sale_id": ln.sale_id, "at": _iso(ln.at), "gross_minor": ln.gross_minor,
                           "commission_minor": ln.commission_minor,
                           "vat_on_commission_minor": ln.vat_on_commission_minor} for ln in s.lines],
            } for s, rec in run.results]}


def render_text(run: SettlementRun) -> str:
    out = [f"Settlement {run.period.label}: {_iso(run.period.start)} .. {_iso(run.period.end)}"]
    if not run.results:
        out.append("no vendors")
    for s, rec in run.results:
        m = lambda minor: str(Money(minor, s.currency))  # noqa: E731
        out += ["", f"Vendor {s.vendor_id}" + (f" (contract {s.contract_id})" if s.contract_id else ""),
                f"  gross sales          {s.sales_count:>5}  {m(s.gross_sales_minor):>14}",
                f"  refused sales        {s.refused_count:>5}  {m(s.refused_minor):>14}  (no money moved)",
                f"  reversed sales       {s.reversed_count:>5}  {m(-s.reversed_minor):>14}",
                f"  commission                  {m(-s.commission_minor):>14}",
                f"  VAT on commission           {m(-s.vat_on_commission_minor):>14}",
                f"  net payable to us           {m(s.net_payable_minor):>14}",
                "  reconciled to ledger: " + ("yes, to the cent" if rec.ok else "NO: " + "; ".join(
                    f"{n} statement {a} ledger {b}" for n, a, b in rec.differences))]
    return "\n".join(out)


@dataclass(frozen=True)
class OverUsageLine:
    account_id: str
    meter: str
    source: str
    events: int
    amount_minor: int
    wh: int


def over_usage_report(store: PaygStore, period: V.Period) -> list[OverUsageLine]:
    """Over-usage booked as debt in `period`, per (account, meter, source), from the CRM event log."""
    acc: dict[tuple[str, str, str], list[int]] = {}
    cursor = 0
    while batch := store.events(cursor, 5000):
        for e in batch:
            if e.kind == "over_usage" and period.start <= e.at < period.end:
                key = (e.account_id, str(e.payload.get("meter", "")), str(e.payload.get("source", "headend")))
                row = acc.setdefault(key, [0, 0, 0])
                row[0] += 1
                row[1] += int(e.payload.get("amount_minor", 0))
                row[2] += int(e.payload.get("wh") or 0)
        cursor = batch[-1].seq
    return [OverUsageLine(a, m, s, n, minor, wh) for (a, m, s), (n, minor, wh) in sorted(acc.items())]


__all__ = ["OverUsageLine", "SettlementRun", "over_usage_report", "parse_period", "render_text", "settle", "to_json"]
