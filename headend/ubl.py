"""UBL 2.1 XML shaped to EN 16931 for an `Invoice`, its parse-back, and a checker of the EN 16931 total rules; pure, never writes files.

`to_ubl` writes the elements in the order of the UBL 2.1 Invoice schema (CustomizationID
``urn:cen.eu:en16931:2017``). `parse_ubl` reads back what the rules need, as Decimals, and
`check_en16931` applies them to the XML itself, so a test can prove every generated invoice obeys:
  BR-CO-10  sum of invoice line net amounts (BT-131) = BT-106
  BR-CO-13  BT-109 = BT-106 - BT-107 + BT-108
  BR-CO-14  BT-110 = sum of VAT category tax amounts (BT-117)
  BR-CO-15  BT-112 = BT-109 + BT-110
  BR-CO-16  BT-115 = BT-112 - BT-113 + BT-114
  BR-CO-17  BT-117 = BT-116 x BT-119 / 100, rounded to two decimals
  BR-S-08   per standard rate, BT-116 = sum of the line nets with that category and rate
  BR-27     item net price (BT-146) is not negative
and that every amount has at most two decimals (BR-DEC-*).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from xml.etree import ElementTree as ET

from .invoice import Invoice

NS_INV = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
NS_CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
NS_CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
CUSTOMIZATION = "urn:cen.eu:en16931:2017"
NS = {"inv": NS_INV, "cac": NS_CAC, "cbc": NS_CBC}

ET.register_namespace("", NS_INV)
ET.register_namespace("cac", NS_CAC)
ET.register_namespace("cbc", NS_CBC)


def _cac(parent: ET.Element, name: str) -> ET.Element:
    return ET.SubElement(parent, f"{{{NS_CAC}}}{name}")


def _cbc(parent: ET.Element, name: str, text: object, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, f"{{{NS_CBC}}}{name}", attrs)
    el.text = str(text)
    return el


def _percent(rate: Decimal) -> str:
    return format((rate * 100).normalize(), "f")


def _party(parent: ET.Element, role: str, party, with_tax: bool) -> None:
    p = _cac(_cac(parent, role), "Party")
    if party.email:
        _cbc(p, "EndpointID", party.email, schemeID="EM")
    if party.id:
        _cbc(_cac(p, "PartyIdentification"), "ID", party.id)
    _cbc(_cac(p, "PartyName"), "Name", party.name)
    _cbc(_cac(_cac(p, "PostalAddress"), "Country"), "IdentificationCode", party.country)
    if with_tax and party.vat_id:
        pts = _cac(p, "PartyTaxScheme")
        _cbc(pts, "CompanyID", party.vat_id)
        _cbc(_cac(pts, "TaxScheme"), "ID", "VAT")
    _cbc(_cac(p, "PartyLegalEntity"), "RegistrationName", party.name)


def _tax_category(parent: ET.Element, name: str, code: str, rate: Decimal) -> None:
    cat = _cac(parent, name)
    _cbc(cat, "ID", code)
    _cbc(cat, "Percent", _percent(rate))
    _cbc(_cac(cat, "TaxScheme"), "ID", "VAT")


def to_ubl(inv: Invoice) -> str:
    """The invoice as a UBL 2.1 Invoice document (UTF-8 XML text)."""
    cur = {"currencyID": inv.currency}
    m = inv.major
    root = ET.Element(f"{{{NS_INV}}}Invoice")
    _cbc(root, "CustomizationID", CUSTOMIZATION)
    _cbc(root, "ID", inv.id)
    _cbc(root, "IssueDate", inv.issue_date.isoformat())
    _cbc(root, "DueDate", inv.due_date.isoformat())
    _cbc(root, "InvoiceTypeCode", inv.type_code)
    if inv.note:
        _cbc(root, "Note", inv.note)
    _cbc(root, "DocumentCurrencyCode", inv.currency)
    _cbc(root, "BuyerReference", inv.account_id)
    period = _cac(root, "InvoicePeriod")
    _cbc(period, "StartDate", inv.period_start.isoformat())
    _cbc(period, "EndDate", inv.period_end.isoformat())
    _party(root, "AccountingSupplierParty", inv.seller, True)
    _party(root, "AccountingCustomerParty", inv.buyer, False)
    tax_total = _cac(root, "TaxTotal")
    _cbc(tax_total, "TaxAmount", m(inv.vat_minor), **cur)
    for t in inv.tax:
        sub = _cac(tax_total, "TaxSubtotal")
        _cbc(sub, "TaxableAmount", m(t.taxable_minor), **cur)
        _cbc(sub, "TaxAmount", m(t.vat_minor), **cur)
        _tax_category(sub, "TaxCategory", t.code, t.rate)
    totals = _cac(root, "LegalMonetaryTotal")
    _cbc(totals, "LineExtensionAmount", m(inv.line_total_minor), **cur)
    _cbc(totals, "TaxExclusiveAmount", m(inv.tax_exclusive_minor), **cur)
    _cbc(totals, "TaxInclusiveAmount", m(inv.tax_inclusive_minor), **cur)
    _cbc(totals, "PayableAmount", m(inv.payable_minor), **cur)
    for line in inv.lines:
        el = _cac(root, "InvoiceLine")
        _cbc(el, "ID", line.id)
        _cbc(el, "InvoicedQuantity", format(line.quantity, "f"), unitCode=line.unit_code)
        _cbc(el, "LineExtensionAmount", m(line.net_minor), **cur)
        if line.period_start and line.period_end:
            lp = _cac(el, "InvoicePeriod")
            _cbc(lp, "StartDate", line.period_start.isoformat())
            _cbc(lp, "EndDate", line.period_end.isoformat())
        item = _cac(el, "Item")
        _cbc(item, "Name", line.description)
        _tax_category(item, "ClassifiedTaxCategory", line.vat_code, line.vat_rate)
        _cbc(_cac(el, "Price"), "PriceAmount", format(line.unit_price, "f"), **cur)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------- parse-back and rules

@dataclass(frozen=True)
class ParsedLine:
    id: str
    net: Decimal
    code: str
    percent: Decimal
    price: Decimal
    quantity: Decimal


@dataclass(frozen=True)
class ParsedSubtotal:
    taxable: Decimal
    tax: Decimal
    code: str
    percent: Decimal


@dataclass(frozen=True)
class ParsedInvoice:
    id: str
    currency: str
    line_extension: Decimal       # BT-106
    allowances: Decimal           # BT-107
    charges: Decimal              # BT-108
    tax_exclusive: Decimal        # BT-109
    tax_total: Decimal            # BT-110
    tax_inclusive: Decimal        # BT-112
    prepaid: Decimal              # BT-113
    rounding: Decimal             # BT-114
    payable: Decimal              # BT-115
    subtotals: tuple[ParsedSubtotal, ...]
    lines: tuple[ParsedLine, ...]


def _dec(el: ET.Element | None, default: str | None = None) -> Decimal:
    if el is None:
        if default is None:
            raise ValueError("required amount element missing")
        return Decimal(default)
    return Decimal(el.text.strip())


def parse_ubl(xml: str) -> ParsedInvoice:
    root = ET.fromstring(xml.encode())
    if root.tag != f"{{{NS_INV}}}Invoice":
        raise ValueError(f"not a UBL Invoice: root element {root.tag}")
    f = root.find
    lmt = f("cac:LegalMonetaryTotal", NS)
    tax_totals = root.findall("cac:TaxTotal", NS)
    subtotals = tuple(ParsedSubtotal(_dec(s.find("cbc:TaxableAmount", NS)), _dec(s.find("cbc:TaxAmount", NS)),
                                     s.find("cac:TaxCategory/cbc:ID", NS).text,
                                     _dec(s.find("cac:TaxCategory/cbc:Percent", NS)))
                      for t in tax_totals for s in t.findall("cac:TaxSubtotal", NS))
    lines = tuple(ParsedLine(el.find("cbc:ID", NS).text, _dec(el.find("cbc:LineExtensionAmount", NS)),
                             el.find("cac:Item/cac:ClassifiedTaxCategory/cbc:ID", NS).text,
                             _dec(el.find("cac:Item/cac:ClassifiedTaxCategory/cbc:Percent", NS)),
                             _dec(el.find("cac:Price/cbc:PriceAmount", NS)),
                             _dec(el.find("cbc:InvoicedQuantity", NS)))
                  for el in root.findall("cac:InvoiceLine", NS))
    return ParsedInvoice(
        f("cbc:ID", NS).text, f("cbc:DocumentCurrencyCode", NS).text,
        _dec(lmt.find("cbc:LineExtensionAmount", NS)), _dec(lmt.find("cbc:AllowanceTotalAmount", NS), "0"),
        _dec(lmt.find("cbc:ChargeTotalAmount", NS), "0"), _dec(lmt.find("cbc:TaxExclusiveAmount", NS)),
        sum((_dec(t.find("cbc:TaxAmount", NS)) for t in tax_totals), Decimal(0)),
        _dec(lmt.find("cbc:TaxInclusiveAmount", NS)), _dec(lmt.find("cbc:PrepaidAmount", NS), "0"),
        _dec(lmt.find("cbc:PayableRoundingAmount", NS), "0"), _dec(lmt.find("cbc:PayableAmount", NS)),
        subtotals, lines)


def _round2(x: Decimal) -> Decimal:
    return x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def check_en16931(xml: str) -> list[str]:
    """EN 16931 total rules on a UBL invoice; returns the violations (empty = all hold)."""
    p = parse_ubl(xml)
    out = []

    def rule(name: str, ok: bool, detail: str) -> None:
        if not ok:
            out.append(f"{p.id}: {name} violated: {detail}")

    line_sum = sum((line.net for line in p.lines), Decimal(0))
    rule("BR-CO-10", p.line_extension == line_sum, f"BT-106 {p.line_extension} != sum of line nets {line_sum}")
    rule("BR-CO-13", p.tax_exclusive == p.line_extension - p.allowances + p.charges,
         f"BT-109 {p.tax_exclusive} != {p.line_extension} - {p.allowances} + {p.charges}")
    sub_tax = sum((s.tax for s in p.subtotals), Decimal(0))
    rule("BR-CO-14", p.tax_total == sub_tax, f"BT-110 {p.tax_total} != sum of BT-117 {sub_tax}")
    rule("BR-CO-15", p.tax_inclusive == p.tax_exclusive + p.tax_total,
         f"BT-112 {p.tax_inclusive} != {p.tax_exclusive} + {p.tax_total}")
    rule("BR-CO-16", p.payable == p.tax_inclusive - p.prepaid + p.rounding,
         f"BT-115 {p.payable} != {p.tax_inclusive} - {p.prepaid} + {p.rounding}")
    for s in p.subtotals:
        expected = _round2(s.taxable * s.percent / 100)
        rule("BR-CO-17", s.tax == expected, f"{s.code} {s.percent} %: BT-117 {s.tax} != round({s.taxable} x "
                                            f"{s.percent} %) = {expected}")
        if s.code == "S":
            base = sum((line.net for line in p.lines if line.code == "S" and line.percent == s.percent), Decimal(0))
            rule("BR-S-08", s.taxable == base, f"S {s.percent} %: BT-116 {s.taxable} != sum of line nets {base}")
    for line in p.lines:
        rule("BR-27", line.price >= 0, f"line {line.id} price {line.price} is negative")
    for name, amount in (("BT-106", p.line_extension), ("BT-109", p.tax_exclusive), ("BT-110", p.tax_total),
                         ("BT-112", p.tax_inclusive), ("BT-115", p.payable),
                         *((f"BT-131 line {line.id}", line.net) for line in p.lines)):
        rule("BR-DEC", amount.as_tuple().exponent >= -2, f"{name} {amount} has more than two decimals")
    return out
