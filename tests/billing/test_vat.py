"""VAT: dated rates per market, splitting at a change, per-invoice and per-line VAT."""

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import pytest

from meterlink.errors import ConfigError, ValidationError
from meterlink.headend.vat import (Market, apply_vat, load_markets, load_vat_table, split_period,
                                   vat_table_from_toml)


@dataclass
class L:
    kind: str
    net_minor: int
    period_start: date | None = None
    period_end: date | None = None


TABLE = load_vat_table()
MARKETS = load_markets()


@pytest.mark.parametrize("market,category,on,rate", [
    ("GB", "energy", date(2026, 11, 1), "0.05"),
    ("IE", "energy", date(2026, 11, 1), "0.09"),
    ("IE", "energy", date(2031, 1, 1), "0.135"),
    ("IT", "energy", date(2026, 11, 1), "0.10"),
    ("ES", "energy", date(2026, 11, 1), "0.21"),
    ("FR", "energy", date(2025, 7, 31), "0.20"),
    ("FR", "standing", date(2025, 7, 31), "0.055"),
    ("FR", "standing", date(2025, 8, 1), "0.20"),
])
def test_bundled_rates_are_the_documented_ones(market, category, on, rate):
    assert TABLE.rate(market, category, on).rate == Decimal(rate)
    assert TABLE.rate(market, category, on).source


def test_every_market_has_zone_currency_and_rounding():
    assert set(MARKETS) == {"GB", "IE", "IT", "ES", "FR"}
    assert MARKETS["FR"].timezone == "Europe/Paris" and MARKETS["GB"].currency == "GBP"
    assert MARKETS["GB"].interval_minutes == 30


def test_french_july_august_2025_is_split_at_the_abonnement_rate_change():
    assert split_period(TABLE, "FR", date(2025, 7, 1), date(2025, 9, 1)) == [
        (date(2025, 7, 1), date(2025, 8, 1)), (date(2025, 8, 1), date(2025, 9, 1))]
    assert split_period(TABLE, "GB", date(2025, 7, 1), date(2025, 9, 1)) == [(date(2025, 7, 1), date(2025, 9, 1))]


def test_a_line_that_crosses_a_rate_change_is_refused():
    with pytest.raises(ValidationError, match="crosses a standing VAT rate change"):
        apply_vat(MARKETS["FR"], TABLE, [L("standing", 1000, date(2025, 7, 20), date(2025, 8, 10))],
                  default_start=date(2025, 7, 1), default_end=date(2025, 9, 1))


def test_french_standing_charge_before_and_after_the_change_gets_two_rates():
    lines = [L("standing", 1000, date(2025, 7, 1), date(2025, 8, 1)),
             L("standing", 1000, date(2025, 8, 1), date(2025, 9, 1)),
             L("energy", 5000, date(2025, 7, 1), date(2025, 8, 1))]
    res = apply_vat(MARKETS["FR"], TABLE, lines, default_start=date(2025, 7, 1), default_end=date(2025, 9, 1))
    by_rate = {b.rate: (b.taxable_minor, b.vat_minor) for b in res.breakdown}
    assert by_rate == {Decimal("0.20"): (6000, 1200), Decimal("0.055"): (1000, 55)}
    assert res.vat_minor == 1255 and res.gross_minor == 7000 + 1255


def test_invoice_stage_rounds_once_per_rate_line_stage_rounds_each_line():
    lines = [L("energy", 11), L("energy", 11), L("energy", 11)]   # 5 % of 11 = 0.55 each
    inv = MARKETS["GB"]
    res = apply_vat(inv, TABLE, lines, default_start=date(2026, 11, 1), default_end=date(2026, 12, 1))
    assert res.vat_minor == 2                    # round(33 x 0.05 = 1.65) = 2
    line_market = Market(**{**inv.__dict__, "vat_stage": "line"})
    res = apply_vat(line_market, TABLE, lines, default_start=date(2026, 11, 1), default_end=date(2026, 12, 1))
    assert [v.vat_minor for v in res.lines] == [1, 1, 1] and res.vat_minor == 3


def test_negative_lines_reduce_the_taxable_amount():
    res = apply_vat(MARKETS["ES"], TABLE, [L("energy", 10000), L("export", -2500)],
                    default_start=date(2026, 11, 1), default_end=date(2026, 12, 1))
    assert res.breakdown[0].taxable_minor == 7500 and res.vat_minor == 1575


def test_overlapping_rates_are_refused_with_the_file_named():
    data = {"rate": [
        {"market": "X", "category": "energy", "valid_from": "2025-01-01", "rate": "0.1"},
        {"market": "X", "category": "energy", "valid_from": "2025-06-01", "rate": "0.2"}]}
    with pytest.raises(ConfigError, match="vat.toml.*overlap"):
        vat_table_from_toml(data, "", "vat.toml")


def test_a_rate_written_as_percent_is_refused():
    data = {"rate": [{"market": "X", "category": "energy", "valid_from": "2025-01-01", "rate": "20"}]}
    with pytest.raises(ConfigError, match="fraction"):
        vat_table_from_toml(data, "", "vat.toml")
