"""Invoices: a billable item + customer + seller -> an invoice document (JSON) whose fields are EN 16931 business terms; pure, never numbers or stores invoices itself.

Amounts are integer minor units in the model and exact decimal strings in the JSON (major units,
the currency's exponent); the JSON names the EN 16931 business term (BT-xx) of each total. Document
level allowances and charges are not used: promotions and adjustments are invoice lines, so
BT-107 = BT-108 = 0 and BT-109 = BT-106.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from meterlink.money import CURRENCY_EXPONENT

from .billing import BillableItem
from .binding import Customer
from .vat import Market

INVOICE = "380"          # UNCL 1001 commercial invoice
CREDIT_NOTE = "381"


@dataclass(frozen=True)
class Party:
    name: str
    country: str
    vat_id: str = ""
    email: str = ""
    id: str = ""


@dataclass(frozen=True)
class InvoiceLine:
    id: str                      # BT-126
    description: str             # BT-153 item name
    quantity: Decimal            # BT-129
    unit_code: str               # BT-130 (UN/ECE Rec 20: KWH, DAY, C62)
    unit_price: Decimal          # BT-146, major units, never negative (BR-27)
    net_minor: int               # BT-131
    vat_code: str                # BT-151
    vat_rate: Decimal            # BT-152 as a fraction (0.05)
    period_start: date | None    # BT-134
    period_end: date | None      # BT-135 (inclusive, as EN 16931 dates are)


@dataclass(frozen=True)
class TaxSubtotal:
    code: str                    # BT-118
    rate: Decimal                # BT-119 as a fraction
    taxable_minor: int           # BT-116
    vat_minor: int               # BT-117


@dataclass(frozen=True)
class Invoice:
    id: str                      # BT-1
    issue_date: date             # BT-2
    due_date: date               # BT-9
    type_code: str               # BT-3
    currency: str                # BT-5
    account_id: str              # BT-10 buyer reference
    period: str
    period_start: date           # BT-73
    period_end: date             # BT-74 (inclusive)
    seller: Party
    buyer: Party
    lines: tuple[InvoiceLine, ...]
    tax: tuple[TaxSubtotal, ...]
    note: str = ""

    @property
    def exponent(self) -> int:
        return CURRENCY_EXPONENT.get(self.currency, 2)

    @property
    def line_total_minor(self) -> int:          # BT-106
        return sum(line.net_minor for line in self.lines)

    @property
    def tax_exclusive_minor(self) -> int:       # BT-109 = BT-106 - BT-107 + BT-108 (no document allowances)
        return self.line_total_minor

    @property
    def vat_minor(self) -> int:                 # BT-110
        return sum(t.vat_minor for t in self.tax)

    @property
    def tax_inclusive_minor(self) -> int:       # BT-112
        return self.tax_exclusive_minor + self.vat_minor

    @property
    def payable_minor(self) -> int:             # BT-115 (no prepaid amount, no rounding amount)
        return self.tax_inclusive_minor

    def major(self, minor: int) -> Decimal:
        return Decimal(minor).scaleb(-self.exponent).quantize(Decimal(1).scaleb(-self.exponent))


def invoice_id(item: BillableItem) -> str:
    return f"INV-{item.period}-{item.account_id}"


def make_invoice(item: BillableItem, customer: Customer, market: Market, issue_date: date,
                 due_days: int = 14) -> Invoice:
    """The invoice of one billable item; issue date is given (the caller's clock), due `due_days` later."""
    lines = tuple(
        InvoiceLine(str(i + 1), il.line.description, il.line.quantity_kwh, il.line.unit_code, il.line.unit_price,
                    il.line.net_minor, il.vat_code, il.vat_rate, il.line.period_start,
                    il.line.period_end - timedelta(days=1) if il.line.period_end else None)
        for i, il in enumerate(item.lines))
    tax = tuple(TaxSubtotal(b.code, b.rate, b.taxable_minor, b.vat_minor) for b in item.vat.breakdown)
    note = (f"Electricity supply {item.period}, tariff {item.tariff_id}"
            + (" (prepaid account: statement, settled from credit)" if item.payment == "prepaid" else ""))
    return Invoice(invoice_id(item), issue_date, issue_date + timedelta(days=due_days), INVOICE, item.currency,
                   item.account_id, item.period, item.start, item.end - timedelta(days=1),
                   Party(market.seller_name or f"Supplier {market.id}", market.country, market.seller_vat_id),
                   Party(customer.name or customer.id, market.country, "", customer.email, customer.id),
                   lines, tax, note)


def _pct(rate: Decimal) -> str:
    return format((rate * 100).normalize(), "f")


def invoice_to_dict(inv: Invoice) -> dict:
    m = inv.major
    return {
        "invoice_id": inv.id, "type_code": inv.type_code, "issue_date": inv.issue_date.isoformat(),
        "due_date": inv.due_date.isoformat(), "currency": inv.currency, "buyer_reference": inv.account_id,
        "period": inv.period, "period_start": inv.period_start.isoformat(), "period_end": inv.period_end.isoformat(),
        "note": inv.note,
        "seller": {"name": inv.seller.name, "country": inv.seller.country, "vat_id": inv.seller.vat_id},
        "buyer": {"id": inv.buyer.id, "name": inv.buyer.name, "country": inv.buyer.country, "email": inv.buyer.email},
        "lines": [{"id": line.id, "description": line.description, "quantity": str(line.quantity),
                   "unit_code": line.unit_code, "unit_price": str(line.unit_price),
                   "net": str(m(line.net_minor)), "net_minor": line.net_minor,
                   "vat_code": line.vat_code, "vat_percent": _pct(line.vat_rate),
                   "period_start": line.period_start.isoformat() if line.period_start else None,
                   "period_end": line.period_end.isoformat() if line.period_end else None} for line in inv.lines],
        "vat_breakdown": [{"code": t.code, "percent": _pct(t.rate), "taxable": str(m(t.taxable_minor)),
                           "vat": str(m(t.vat_minor)), "taxable_minor": t.taxable_minor, "vat_minor": t.vat_minor}
                          for t in inv.tax],
        "totals": {"BT-106_line_total": str(m(inv.line_total_minor)),
                   "BT-109_tax_exclusive": str(m(inv.tax_exclusive_minor)),
                   "BT-110_vat": str(m(inv.vat_minor)),
                   "BT-112_tax_inclusive": str(m(inv.tax_inclusive_minor)),
                   "BT-115_payable": str(m(inv.payable_minor)),
                   "net_minor": inv.line_total_minor, "vat_minor": inv.vat_minor, "gross_minor": inv.payable_minor},
    }


def invoice_to_json(inv: Invoice) -> str:
    return json.dumps(invoice_to_dict(inv), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_json_totals(doc: dict) -> list[str]:
    """Totals of an invoice JSON document recomputed from its lines and breakdown (empty list = consistent)."""
    problems = []
    t = doc["totals"]
    if sum(line["net_minor"] for line in doc["lines"]) != t["net_minor"]:
        problems.append(f"{doc['invoice_id']}: sum of line nets != net total {t['net_minor']}")
    if sum(b["vat_minor"] for b in doc["vat_breakdown"]) != t["vat_minor"]:
        problems.append(f"{doc['invoice_id']}: sum of VAT breakdown != VAT total {t['vat_minor']}")
    if t["net_minor"] + t["vat_minor"] != t["gross_minor"]:
        problems.append(f"{doc['invoice_id']}: net + VAT != gross")
    if sum(b["taxable_minor"] for b in doc["vat_breakdown"]) != t["net_minor"]:
        problems.append(f"{doc['invoice_id']}: taxable amounts do not add up to the net total")
    return problems
