"""Customer and market reports as pictures (matplotlib PNG, HTML with the PNG and the numbers); never computes money itself.

`build_customer_report` gathers everything into a plain `CustomerReport` from the same functions
billing uses (rating.quote, vat.apply_vat) or from a given bill, so the numbers on the page are the
invoice's numbers. Only the drawing converts integers to floats, for pixel positions; every figure
printed as text comes from the integers and Decimals of the report.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from meterlink.errors import ValidationError

from .insights import IMPORT_OBIS, local_window
from .rating import Promotion, quote
from .tariff import Tariff
from .vat import Market, VatTable, apply_vat
from .vee import Interval

BAND_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


@dataclass(frozen=True)
class BillLine:
    description: str
    kind: str                   # energy | standing | export | tier | promotion | adjustment
    quantity: Decimal
    unit: str                   # KWH | DAY
    net_minor: int


@dataclass(frozen=True)
class VatRow:
    rate: Decimal
    taxable_minor: int
    vat_minor: int


@dataclass(frozen=True)
class Bill:
    lines: tuple[BillLine, ...]
    vat: tuple[VatRow, ...]
    net_minor: int
    vat_minor: int
    gross_minor: int


@dataclass(frozen=True)
class PaygHistory:
    balance: tuple[tuple[datetime, int], ...]          # (instant, balance in minor units) after each movement
    topups: tuple[tuple[datetime, int], ...] = ()
    disconnections: tuple[tuple[datetime, datetime | None], ...] = ()


@dataclass(frozen=True)
class CustomerReport:
    account_id: str
    market: str
    currency: str
    exponent: int
    zone: str
    start: date
    end: date                                           # exclusive
    bands: tuple[str, ...]
    daily_wh: tuple[tuple[date, tuple[int, ...]], ...]  # per local day, Wh per band (order of `bands`)
    intervals: tuple[tuple[datetime, int, str], ...]    # local start, Wh, band
    bill: Bill
    payg: PaygHistory | None = None

    def money(self, minor: int) -> str:
        return f"{Decimal(minor).scaleb(-self.exponent):.{self.exponent}f}"

    @property
    def total_wh(self) -> int:
        return sum(sum(v) for _, v in self.daily_wh)


def bill_from_quote(market: Market, table: VatTable, q, start: date, end: date) -> Bill:
    """Bill of a quote with the market's VAT: the computation billing does, not a copy of it."""
    res = apply_vat(market, table, q.lines, default_start=start, default_end=end)
    lines = tuple(BillLine(l.description, l.kind, l.quantity_kwh, l.unit_code, l.net_minor) for l in q.lines)
    vat = tuple(VatRow(b.rate, b.taxable_minor, b.vat_minor) for b in res.breakdown)
    return Bill(lines, vat, res.net_minor, res.vat_minor, res.gross_minor)


def bill_from_item(item) -> Bill:
    """Bill of an issued billable item (headend.billing.BillableItem): the invoice's own numbers."""
    lines = tuple(BillLine(il.line.description, il.line.kind, il.line.quantity_kwh, il.line.unit_code,
                           il.line.net_minor) for il in item.lines)
    vat = tuple(VatRow(b.rate, b.taxable_minor, b.vat_minor) for b in item.vat.breakdown)
    return Bill(lines, vat, item.net_minor, item.vat_minor, item.gross_minor)


def bill_from_item_dict(d: dict) -> Bill:
    """Bill of an issued billable item as stored (BillableItem.to_dict): the invoice's own numbers."""
    lines = tuple(BillLine(l["description"], l["kind"], Decimal(l["quantity"]), l["unit_code"], int(l["net_minor"]))
                  for l in d["lines"])
    vat = tuple(VatRow(Decimal(b["rate"]), int(b["taxable_minor"]), int(b["vat_minor"])) for b in d["vat_breakdown"])
    return Bill(lines, vat, int(d["net_minor"]), int(d["vat_minor"]), int(d["gross_minor"]))


def build_customer_report(account_id: str, intervals: Iterable[Interval], tariff: Tariff, market: Market,
                          vat_table: VatTable, start: date, end: date, *,
                          promotions: Sequence[Promotion] = (), bill: Bill | None = None,
                          payg: PaygHistory | None = None) -> CustomerReport:
    """Everything the customer view shows for local dates [start, end)."""
    if end <= start:
        raise ValidationError(f"report period {start}..{end} is empty")
    zone = ZoneInfo(market.timezone)
    lo, hi = local_window(start, end, zone)
    ivs = sorted(i for i in intervals if i.obis == IMPORT_OBIS and lo <= i.start < hi)
    if bill is None:
        q = quote(tariff, ivs, account_id, start, end, zone, rounding_mode=market.rounding_mode,
                  rounding_stage=market.rounding_stage, promotions=promotions)
        bill = bill_from_quote(market, vat_table, q, start, end)
    banded = []
    names: list[str] = []
    for iv in ivs:
        local = iv.start.astimezone(zone)
        band = tariff.band_at(local.replace(tzinfo=None)).name
        if band not in names:
            names.append(band)
        banded.append((local, iv.wh, band))
    per_day: dict[date, dict[str, int]] = {start + timedelta(days=i): {} for i in range((end - start).days)}
    for local, wh, band in banded:
        d = per_day[local.date()]
        d[band] = d.get(band, 0) + wh
    bands = tuple(names)
    daily = tuple((d, tuple(v.get(b, 0) for b in bands)) for d, v in per_day.items())
    return CustomerReport(account_id, market.id, market.currency, market.exponent, market.timezone, start, end,
                          bands, daily, tuple(banded), bill, payg)


# --------------------------------------------------------------------------- drawing

def _figure(report: CustomerReport):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    rows = 4 if report.payg else 3
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.2 * rows), constrained_layout=True)
    colour = {b: BAND_COLOURS[i % len(BAND_COLOURS)] for i, b in enumerate(report.bands)}
    fig.suptitle(f"Account {report.account_id} — {report.start} to {report.end - timedelta(days=1)} "
                 f"({report.market}, {report.total_wh / 1000:.1f} kWh)", fontsize=13)

    ax = axes[0]
    days = [d for d, _ in report.daily_wh]
    bottom = [0.0] * len(days)
    for i, b in enumerate(report.bands):
        vals = [v[i] / 1000 for _, v in report.daily_wh]
        ax.bar(days, vals, bottom=bottom, color=colour[b], label=b, width=0.8)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_ylabel("kWh per day")
    ax.set_title("Consumption per day by tariff band")
    ax.legend(loc="upper right", fontsize=8)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%d %b"))
    if days:
        ax.set_xlim(days[0] - timedelta(days=1), days[-1] + timedelta(days=1))
        if len(days) <= 10:
            ax.set_xticks(days)

    ax = axes[1]
    if report.intervals:
        step = (report.intervals[1][0] - report.intervals[0][0]) if len(report.intervals) > 1 else timedelta(minutes=15)
        hours = step.total_seconds() / 3600
        for b in report.bands:
            pts = [(t, wh) for t, wh, band in report.intervals if band == b]
            ax.bar([t.replace(tzinfo=None) for t, _ in pts], [wh / 1000 / hours for _, wh in pts],
                   width=step.total_seconds() / 86400, color=colour[b], label=b, align="edge")
    ax.set_ylabel("average kW")
    ax.set_title(f"Every interval, coloured by band (local time, {report.zone})")
    short = (report.end - report.start).days <= 3
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if short else "%d %b"))

    ax = axes[2]
    items = [(l.description, l.net_minor) for l in report.bill.lines]
    items += [(f"VAT {r.rate * 100:.1f} %", r.vat_minor) for r in report.bill.vat]
    labels = [t for t, _ in items]
    vals = [v / 10 ** report.exponent for _, v in items]
    cols = ["#2ca02c" if v < 0 else ("#7f7f7f" if t.startswith("VAT") else "#1f77b4") for t, v in zip(labels, vals)]
    ax.barh(labels[::-1], vals[::-1], color=cols[::-1])
    for y, (t, v) in enumerate(reversed(items)):
        ax.text(0, y, f" {report.money(v)} {report.currency}", va="center", fontsize=8)
    ax.set_title(f"Bill: {report.money(report.bill.gross_minor)} {report.currency} incl. VAT "
                 f"({report.money(report.bill.net_minor)} net + {report.money(report.bill.vat_minor)} VAT)")
    ax.set_xlabel(report.currency)

    if report.payg:
        ax = axes[3]
        ts = [t for t, _ in report.payg.balance]
        ax.step(ts, [b / 10 ** report.exponent for _, b in report.payg.balance], where="post", color="#1f77b4")
        for t, amount in report.payg.topups:
            ax.axvline(t, color="#2ca02c", linestyle="--", linewidth=1)
            ax.annotate(f"+{report.money(amount)}", (t, 0), textcoords="offset points", xytext=(2, 5), fontsize=7,
                        color="#2ca02c")
        for a, b in report.payg.disconnections:
            ax.axvspan(a, b or (ts[-1] if ts else a), color="#d62728", alpha=0.2, label="disconnected")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title("Prepaid balance, top-ups (green) and disconnections (red)")
        ax.set_ylabel(report.currency)
    return fig


def render_png(report: CustomerReport, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig = _figure(report)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def render_html(report: CustomerReport, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig = _figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    e = html.escape
    rows = "".join(f"<tr><td>{e(l.description)}</td><td class=n>{l.quantity}</td><td>{e(l.unit)}</td>"
                   f"<td class=n data-minor='{l.net_minor}'>{report.money(l.net_minor)}</td></tr>"
                   for l in report.bill.lines)
    vat = "".join(f"<tr><td>VAT {r.rate * 100:.2f} % on {report.money(r.taxable_minor)}</td><td></td><td></td>"
                  f"<td class=n data-minor='{r.vat_minor}'>{report.money(r.vat_minor)}</td></tr>"
                  for r in report.bill.vat)
    daily = "".join(f"<tr><td>{d}</td>" + "".join(f"<td class=n>{wh}</td>" for wh in v)
                    + f"<td class=n>{sum(v)}</td></tr>" for d, v in report.daily_wh)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Account {e(report.account_id)} {report.start}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}} td.n{{text-align:right}}
table{{border-collapse:collapse}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>Account {e(report.account_id)}: {report.start} to {report.end - timedelta(days=1)}</h1>
<p>Market {e(report.market)}, amounts in {e(report.currency)}; energy {report.total_wh} Wh.</p>
<img alt="consumption, bill and balance charts" src="data:image/png;base64,{img}" style="width:100%">
<h2>Bill</h2><table id="bill"><tr><th>line</th><th>quantity</th><th>unit</th><th>net</th></tr>{rows}{vat}
<tr><th>net total</th><td></td><td></td><td class=n id="net" data-minor="{report.bill.net_minor}">{report.money(report.bill.net_minor)}</td></tr>
<tr><th>VAT</th><td></td><td></td><td class=n id="vat" data-minor="{report.bill.vat_minor}">{report.money(report.bill.vat_minor)}</td></tr>
<tr><th>to pay</th><td></td><td></td><td class=n id="gross" data-minor="{report.bill.gross_minor}">{report.money(report.bill.gross_minor)}</td></tr>
</table>
<h2>Energy per day (Wh)</h2><table id="daily"><tr><th>day</th>{''.join(f'<th>{e(b)}</th>' for b in report.bands)}<th>total</th></tr>{daily}</table>
</body></html>"""
    Path(out).write_text(page)
    return Path(out)


def render(report: CustomerReport, out: str | Path) -> Path:
    suffix = Path(out).suffix.lower()
    if suffix == ".png":
        return render_png(report, out)
    if suffix in (".html", ".htm"):
        return render_html(report, out)
    raise ValidationError(f"report output {out}: use a .png or .html file name")


# --------------------------------------------------------------------------- operator view

@dataclass(frozen=True)
class MarketReport:
    market: str
    start: date
    end: date
    segment_wh: Mapping[str, int]              # segment id -> import Wh of its accounts
    segment_accounts: Mapping[str, int]
    promotion_outcomes: Sequence               # promotions.Outcome
    parked_wh: int                             # unbound usage
    pending_wh: int = 0                        # estimated, awaiting real readings


def render_market(report: MarketReport, out: str | Path) -> Path:
    """The operator's view of a market: consumption by segment, promotion outcomes, parked energy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    segs = sorted(report.segment_wh)
    axes[0].bar(segs, [report.segment_wh[s] / 1000 for s in segs], color="#1f77b4")
    for i, s in enumerate(segs):
        axes[0].text(i, 0, f"{report.segment_accounts.get(s, 0)} acc.", ha="center", va="bottom", fontsize=8)
    axes[0].set_title("Consumption by segment (kWh)")
    axes[0].tick_params(axis="x", rotation=30)
    outs = list(report.promotion_outcomes)
    names = [o.promotion_id for o in outs]
    axes[1].bar(names, [o.offered for o in outs], label="offered", color="#aec7e8")
    axes[1].bar(names, [o.accepted for o in outs], label="accepted", color="#1f77b4")
    axes[1].set_title("Promotion outcomes")
    axes[1].legend(fontsize=8)
    axes[1].tick_params(axis="x", rotation=30)
    axes[2].bar(["parked (unbound)", "estimated, pending"], [report.parked_wh / 1000, report.pending_wh / 1000],
                color=["#d62728", "#ff7f0e"])
    axes[2].set_title("Energy not yet billed (kWh)")
    fig.suptitle(f"Market {report.market}: {report.start} to {report.end - timedelta(days=1)}")
    suffix = Path(out).suffix.lower()
    if suffix == ".png":
        fig.savefig(out, dpi=90)
    elif suffix in (".html", ".htm"):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        rows = "".join(f"<tr><td>{html.escape(o.promotion_id)}</td><td>{o.offered}</td><td>{o.accepted}</td>"
                       f"<td>{o.cost_minor}</td><td>{o.consumption_change}</td></tr>" for o in outs)
        Path(out).write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>Market {html.escape(report.market)}</title></head>"
            f"<body><h1>Market {html.escape(report.market)}</h1><img style='width:100%' alt='market charts' "
            f"src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
            f"<table><tr><th>promotion</th><th>offered</th><th>accepted</th><th>cost (minor)</th>"
            f"<th>consumption change</th></tr>{rows}</table><p>parked {report.parked_wh} Wh, "
            f"pending {report.pending_wh} Wh</p></body></html>")
    else:
        plt.close(fig)
        raise ValidationError(f"report output {out}: use a .png or .html file name")
    plt.close(fig)
    return Path(out)


def payg_history(entries: Iterable, customer: str, currency: str,
                 disconnections: Sequence[tuple[datetime, datetime | None]] = ()) -> PaygHistory:
    """Balance after each ledger transaction touching the customer's prepaid account, and the top-ups."""
    from .ledger import prepaid

    acct = prepaid(customer)
    running = 0
    balance, topups = [], []
    for t in sorted(entries, key=lambda t: (t.at, t.business_key)):
        delta = -t.amount(acct, currency)           # credit on the prepaid account = customer's money
        if delta == 0:
            continue
        running += delta
        balance.append((t.at, running))
        if t.kind == "top-up" and delta > 0:
            topups.append((t.at, delta))
    return PaygHistory(tuple(balance), tuple(topups), tuple(disconnections))
