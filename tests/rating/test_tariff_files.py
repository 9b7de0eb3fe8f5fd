"""Tariff files: bundled examples load, bands resolve in local time, loader errors name file, line and key."""

import tomllib
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from meterlink.errors import ConfigError, ValidationError
from meterlink.headend.tariff import BUNDLED_DIR, bundled_tariffs, load_tariff, tariff_from_toml

HEADER = """
[tariff]
id = "t"
currency = "GBP"
timezone = "Europe/London"
country = "GB"
subdivision = "ENG"
"""


def parse(body: str, header: str = HEADER):
    text = header + body
    return tariff_from_toml(tomllib.loads(text), text, "test_tariff.toml")


def load(name: str):
    return load_tariff(BUNDLED_DIR / f"tariff_{name}.toml")


def test_every_bundled_tariff_loads_and_cites_where_its_shape_comes_from():
    paths = bundled_tariffs()
    assert {p.name for p in paths} >= {"tariff_gb_economy7.toml", "tariff_ie_standard.toml",
                                        "tariff_fr_hphc.toml", "tariff_es_20td.toml"}
    for p in paths:
        t = load_tariff(p)
        assert t.versions and t.source == str(p)
        assert "Shape:" in Path(p).read_text(), f"{p.name} must say where its shape comes from"


def test_economy7_night_band_crosses_midnight_in_local_time():
    t = load("gb_economy7")
    at = lambda *a: t.band_at(datetime(*a)).name  # noqa: E731  (local wall-clock times)
    assert [at(2026, 1, 5, 23, 15), at(2026, 1, 5, 23, 30), at(2026, 1, 6, 0, 0),
            at(2026, 1, 6, 6, 15), at(2026, 1, 6, 6, 30)] == ["day", "night", "night", "night", "day"]


def test_version_in_force_is_chosen_by_local_date():
    t = load("gb_economy7")
    assert t.version_for(date(2025, 12, 31)).standing_charge == Decimal("51.12")
    assert t.version_for(date(2026, 1, 1)).standing_charge == Decimal("52.14")
    with pytest.raises(ValidationError, match="gb-economy7: no version in force on 2025-09-30"):
        t.version_for(date(2025, 9, 30))


def test_spanish_20td_prices_national_holidays_and_weekends_as_valle_but_not_good_friday():
    t = load("es_20td")
    at = lambda d: t.band_at(datetime(d.year, d.month, d.day, 11, 0)).name  # noqa: E731
    assert at(date(2026, 10, 13)) == "punta"        # Tuesday
    assert at(date(2026, 10, 12)) == "valle"        # Monday, Fiesta Nacional de España
    assert at(date(2026, 10, 17)) == "valle"        # Saturday
    assert at(date(2026, 4, 3)) == "punta"          # Good Friday: no fixed date, excluded by 2.0TD
    assert t.band_at(datetime(2026, 10, 13, 23, 0)).name == "llano"
    assert t.band_at(datetime(2026, 10, 13, 7, 59)).name == "valle"


def test_most_specific_day_type_wins_and_gb_christmas_is_priced_as_holiday():
    t = parse("""
[[version]]
valid_from = "2026-01-01"
standing_charge = "0"
[[version.band]]
name = "peak"
rate = "30"
windows = [{ days = ["weekday"], from = "00:00", to = "24:00" }]
[[version.band]]
name = "offpeak"
rate = "10"
windows = [{ days = ["weekend", "holiday"], from = "00:00", to = "24:00" }]
""")
    noon = lambda *d: t.band_at(datetime(*d, 12, 0)).name  # noqa: E731
    assert noon(2026, 12, 24) == "peak"             # Thursday
    assert noon(2026, 12, 25) == "offpeak"          # Christmas Day, a Friday
    assert noon(2026, 12, 28) == "offpeak"          # Boxing Day (observed), a Monday
    assert noon(2026, 12, 29) == "peak"


def test_float_price_is_refused_naming_file_line_and_key():
    with pytest.raises(ConfigError) as err:
        parse("""
[[version]]
valid_from = "2026-01-01"
standing_charge = 45.67
[[version.band]]
name = "all"
rate = "10"
windows = [{ days = ["all"], from = "00:00", to = "24:00" }]
""")
    msg = str(err.value)
    assert "test_tariff.toml:11" in msg and "version[0].standing_charge" in msg and "floats are not exact" in msg


@pytest.mark.parametrize("windows, problem", [
    ('[{ days = ["all"], from = "00:00", to = "12:00" }]', "on mondays 12:00 is in no band"),
    ('[{ days = ["all"], from = "00:00", to = "24:00" }, { days = ["all"], from = "23:00", to = "01:00" }]',
     "23:00 is in both"),
    ('[{ days = ["weekday"], from = "00:00", to = "24:00" }]', "no band covers saturdays"),
    ('[{ days = ["someday"], from = "00:00", to = "24:00" }]', "days must be"),
    ('[{ days = ["all"], from = "7:00", to = "24:00" }]', "HH:MM"),
])
def test_bands_must_cover_each_local_day_exactly_once(windows, problem):
    body = f"""
[[version]]
valid_from = "2026-01-01"
standing_charge = "1"
[[version.band]]
name = "a"
rate = "1"
windows = {windows}
"""
    if "23:00" in windows:   # two bands overlapping
        body = body.replace('windows = [{ days = ["all"], from = "00:00", to = "24:00" }, ',
                            'windows = [{ days = ["all"], from = "00:00", to = "24:00" }]\n'
                            '[[version.band]]\nname = "b"\nrate = "2"\nwindows = [')
    with pytest.raises(ConfigError, match=problem) as err:
        parse(body)
    assert "test_tariff.toml" in str(err.value)


def test_loader_names_unknown_keys_out_of_order_versions_and_bad_zones():
    band = '[[version.band]]\nname = "a"\nrate = "1"\nwindows = [{ days = ["all"], from = "00:00", to = "00:00" }]\n'
    with pytest.raises(ConfigError, match="key 'version\\[0\\].standng_charge'.*unknown key"):
        parse('[[version]]\nvalid_from = "2026-01-01"\nstandng_charge = "1"\n' + band)
    with pytest.raises(ConfigError, match="is not after the previous version"):
        parse('[[version]]\nvalid_from = "2026-02-01"\nstanding_charge = "1"\n' + band
              + '[[version]]\nvalid_from = "2026-01-01"\nstanding_charge = "1"\n' + band)
    with pytest.raises(ConfigError, match="unknown IANA time zone 'Europe/Londres'"):
        parse('[[version]]\nvalid_from = "2026-01-01"\nstanding_charge = "1"\n' + band,
              HEADER.replace("Europe/London", "Europe/Londres"))
    with pytest.raises(ConfigError, match="test_tariff.toml.*TOML syntax error|does-not-exist"):
        load_tariff("does-not-exist.toml")


def test_tiers_are_blocks_with_an_open_ended_last_block():
    band = '[[version.band]]\nname = "a"\nrate = "20"\nwindows = [{ days = ["all"], from = "00:00", to = "24:00" }]\n'
    t = parse('[[version]]\nvalid_from = "2026-01-01"\nstanding_charge = "1"\n' + band
              + '[[version.tier]]\nup_to_kwh = 100\nadder = "0"\n[[version.tier]]\nadder = "5.00"\n')
    first, second = t.versions[0].tiers
    assert (first.from_wh, first.to_wh, second.from_wh, second.to_wh) == (0, 100_000, 100_000, None)
    with pytest.raises(ConfigError, match="last block must be open-ended"):
        parse('[[version]]\nvalid_from = "2026-01-01"\nstanding_charge = "1"\n' + band
              + '[[version.tier]]\nup_to_kwh = 100\nadder = "0"\n')
