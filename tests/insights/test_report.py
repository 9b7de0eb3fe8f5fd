"""Customer and market reports: real PNG/HTML files whose numbers are the bill's numbers."""

from __future__ import annotations

import re
import struct
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterlink.errors import ValidationError
from meterlink.headend import ledger, report
from meterlink.headend.promotions import Outcome
from meterlink.headend.rating import Promotion, quote
from meterlink.headend.tariff import bundled_tariffs, load_tariff
from meterlink.headend.vat import apply_vat, load_markets, load_vat_table
from meterlink.headend.vee import Interval

UTC = timezone.utc
Q = timedelta(minutes=30)       # GB market grid


def month_intervals(meter: str, start: date, days: int) -> list[Interval]:
    t0 = datetime(start.year, start.month, start.day, tzinfo=UTC)
    out = []
    for i in range(days * 48):
        t = t0 + i * Q
        wh = 300 if t.hour < 7 else (700 if 17 <= t.hour < 20 else 150)
        out.append(Interval(meter, "1.8.0", t, t + Q, wh))
    return out


@pytest.fixture(scope="module")
def gb():
    tariffs = {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}
    return tariffs["gb-economy7"], load_markets()["GB"], load_vat_table()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def test_png_report_is_a_real_multi_panel_picture(tmp_path: Path, gb):
    tariff, market, vat = gb
    rep = report.build_customer_report("ACC-1", month_intervals("M1", date(2026, 11, 1), 30), tariff, market, vat,
                                       date(2026, 11, 1), date(2026, 12, 1))
    out = report.render(rep, tmp_path / "acc.png")
    w, h = _png_size(out)
    assert w >= 800 and h >= 700 and out.stat().st_size > 30_000


def test_html_report_numbers_equal_the_rated_and_taxed_bill(tmp_path: Path, gb):
    tariff, market, vat = gb
    ivs = month_intervals("M1", date(2026, 11, 1), 30)
    promo = Promotion("winter10", "10 % off day energy", Decimal(10), frozenset({"day"}))
    rep = report.build_customer_report("ACC-1", ivs, tariff, market, vat, date(2026, 11, 1), date(2026, 12, 1),
                                       promotions=(promo,))
    page = report.render(rep, tmp_path / "acc.html").read_text()
    # the bill computed independently, the way billing does it
    q = quote(tariff, ivs, "ACC-1", date(2026, 11, 1), date(2026, 12, 1), market.timezone,
              rounding_mode=market.rounding_mode, rounding_stage=market.rounding_stage, promotions=(promo,))
    v = apply_vat(market, vat, q.lines, default_start=date(2026, 11, 1), default_end=date(2026, 12, 1))
    minors = [int(m) for m in re.findall(r"data-minor='(-?\d+)'", page)]
    assert minors[:len(q.lines)] == [l.net_minor for l in q.lines]
    assert any(l.kind == "promotion" and l.net_minor < 0 for l in q.lines)
    assert int(re.search(r'id="net" data-minor="(-?\d+)"', page).group(1)) == v.net_minor == q.total_minor
    assert int(re.search(r'id="vat" data-minor="(-?\d+)"', page).group(1)) == v.vat_minor
    assert int(re.search(r'id="gross" data-minor="(-?\d+)"', page).group(1)) == v.gross_minor
    # 5 % domestic VAT in GB on the whole bill (invoice stage, half up)
    assert v.vat_minor == int((Decimal(v.net_minor) * Decimal("0.05")).quantize(Decimal(1), rounding="ROUND_HALF_UP"))
    # energy per day table: 7 h x 600 + 3 h x 1400 + 14 h x 300 Wh = 12600 Wh a day
    assert page.count("<td class=n>12600</td></tr>") == 30
    assert rep.total_wh == 30 * 12_600 and "data:image/png;base64," in page


def test_payg_panel_shows_balance_from_the_ledger(tmp_path: Path, gb):
    tariff, market, vat = gb
    pv = ledger.PrepaidVat(Decimal("0.05"))
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    entries = [ledger.top_up("t1", t0, "CUST-1", "SHOP-1", 2000, "GBP", pv)]
    for d in range(5):
        entries.append(ledger.consumption_charge(f"c{d}", t0 + timedelta(days=d, hours=23), "CUST-1", "GBP", pv,
                                                 gross_minor=450))
    hist = report.payg_history(entries, "CUST-1", "GBP", disconnections=[(t0 + timedelta(days=4, hours=23), None)])
    assert [b for _, b in hist.balance] == [2000, 1550, 1100, 650, 200, -250]
    assert hist.topups == ((t0, 2000),)
    rep = report.build_customer_report("ACC-1", month_intervals("M1", date(2026, 11, 1), 5), tariff, market, vat,
                                       date(2026, 11, 1), date(2026, 11, 6), payg=hist)
    w, h = _png_size(report.render(rep, tmp_path / "payg.png"))
    assert h > 1000      # four panels


def test_report_refuses_unknown_output_types_and_empty_periods(tmp_path: Path, gb):
    tariff, market, vat = gb
    with pytest.raises(ValidationError, match="empty"):
        report.build_customer_report("A", [], tariff, market, vat, date(2026, 11, 2), date(2026, 11, 2))
    rep = report.build_customer_report("A", [], tariff, market, vat, date(2026, 11, 1), date(2026, 11, 2))
    with pytest.raises(ValidationError, match=r"\.png or \.html"):
        report.render(rep, tmp_path / "x.pdf")


def test_market_report_renders_segments_outcomes_and_parked_energy(tmp_path: Path):
    mr = report.MarketReport("GB", date(2026, 11, 1), date(2026, 12, 1), {"night_user": 120_000, "low_user": 30_000},
                             {"night_user": 3, "low_user": 2},
                             [Outcome("p1", 5, 2, Decimal("0.4"), 300, 9000, 8000, Decimal("-0.1111"))], 4_500)
    page = report.render_market(mr, tmp_path / "gb.html").read_text()
    assert "<td>p1</td><td>5</td><td>2</td>" in page and "parked 4500 Wh" in page
    assert _png_size(report.render_market(mr, tmp_path / "gb.png"))[0] >= 1000
