"""Invoices: JSON and UBL 2.1 shaped to EN 16931; the total rules hold on every generated invoice."""

import json
from datetime import date
from decimal import Decimal

import pytest

from meterlink.headend.billing import Adjustment, bill_account, bind_intervals
from meterlink.headend.invoice import check_json_totals, invoice_to_dict, invoice_to_json, make_invoice
from meterlink.headend.rating import Promotion
from meterlink.headend.ubl import check_en16931, parse_ubl, to_ubl
from meterlink.headend.vee import VeeConfig, derive_intervals

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc


def make(market="GB", tariff="gb-economy7", export=True, promotions=(), adjustments=()):
    b = gb_bindings(market=market, tariff=tariff).move_in("SP1", "A1", utc(2026, 10, 1))
    readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 30, wh_per_hour=437)
    if export:
        readings += hourly_readings("M1", utc(2026, 11, 1), 24 * 30, wh_per_hour=113, base=5, obis="2.8.0")
    rows = bind_intervals(derive_intervals(readings, VeeConfig()).intervals, b)
    bill = bill_account("A1", "2026-11", bindings=b, market=MARKETS[market], tariff=TARIFFS[tariff], vat=VAT,
                        rows=rows, promotions=promotions, adjustments=adjustments)
    return bill.item, make_invoice(bill.item, b.customers["C1"], MARKETS[market], date(2026, 12, 2))


CASES = [dict(), dict(promotions=(Promotion("P1", "Night saver 10 %", Decimal(10), frozenset({"night"})),)),
         dict(adjustments=(Adjustment("A1", "2026-11", "Goodwill credit", -1234),)),
         dict(market="FR", tariff="fr-hphc", export=False), dict(market="IE", tariff="ie-standard", export=False),
         dict(market="ES", tariff="es-20td", export=False)]


@pytest.mark.parametrize("case", CASES, ids=["gb-export", "gb-promo", "gb-adjust", "fr", "ie", "es"])
def test_every_generated_invoice_obeys_en16931_total_rules_after_xml_parse_back(case):
    item, inv = make(**case)
    xml = to_ubl(inv)
    assert check_en16931(xml) == []
    parsed = parse_ubl(xml)
    assert parsed.payable == inv.major(item.gross_minor)
    assert parsed.line_extension == inv.major(item.net_minor)
    assert len(parsed.lines) == len(item.lines)
    doc = json.loads(invoice_to_json(inv))
    assert check_json_totals(doc) == []
    assert doc["totals"]["gross_minor"] == item.gross_minor
    assert sum(line["net_minor"] for line in doc["lines"]) == item.net_minor


def test_export_credit_is_a_negative_quantity_at_a_positive_price():
    _, inv = make()
    line = next(line for line in inv.lines if "Export" in line.description)
    assert line.quantity < 0 and line.unit_price > 0 and line.net_minor < 0


def test_checker_catches_a_tampered_total_and_a_wrong_vat_amount():
    _, inv = make()
    xml = to_ubl(inv)
    total = str(inv.major(inv.payable_minor))
    bad = xml.replace(f">{total}</cbc:PayableAmount>", f">{Decimal(total) + Decimal('0.01')}</cbc:PayableAmount>")
    assert any("BR-CO-16" in p for p in check_en16931(bad))
    vat = str(inv.major(inv.tax[0].vat_minor))
    bad = xml.replace(f">{vat}</cbc:TaxAmount>", f">{Decimal(vat) + 1}</cbc:TaxAmount>")
    problems = check_en16931(bad)
    assert any("BR-CO-17" in p for p in problems) and any("BR-CO-14" in p or "BR-CO-15" in p for p in problems)
    line_net = str(inv.major(inv.lines[0].net_minor))
    bad = xml.replace(f">{line_net}</cbc:LineExtensionAmount>", ">0.00</cbc:LineExtensionAmount>", 1)
    bad = bad.replace(f">{line_net}</cbc:LineExtensionAmount>", ">0.00</cbc:LineExtensionAmount>", 1)
    assert any("BR-CO-10" in p for p in check_en16931(bad))


def test_ubl_carries_the_en16931_identifiers():
    _, inv = make()
    xml = to_ubl(inv)
    assert "<cbc:CustomizationID>urn:cen.eu:en16931:2017</cbc:CustomizationID>" in xml
    assert "<cbc:InvoiceTypeCode>380</cbc:InvoiceTypeCode>" in xml
    assert 'unitCode="KWH"' in xml and 'unitCode="DAY"' in xml
    assert "<cbc:CompanyID>GB123456789</cbc:CompanyID>" in xml
    assert inv.period_end == date(2026, 11, 30)       # EN 16931 dates are inclusive


def test_invoice_json_names_business_terms():
    _, inv = make()
    d = invoice_to_dict(inv)
    assert d["invoice_id"] == "INV-2026-11-A1" and d["buyer_reference"] == "A1"
    assert set(d["totals"]) >= {"BT-106_line_total", "BT-109_tax_exclusive", "BT-110_vat", "BT-112_tax_inclusive",
                                "BT-115_payable"}
