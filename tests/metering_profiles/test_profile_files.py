"""Every profile file in the profile directory checks its own examples; bad files are refused naming file and key."""

from __future__ import annotations

import struct
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.errors import ConfigError
from meterlink.gateway.profiles import (check_profile_file, decode, decode_example, encode, load_profile,
                                        profile_dir)

PROFILE_FILES = sorted(profile_dir().glob("*.toml"))
GOOD = (profile_dir() / "eastron_sdm120.toml").read_text()


def test_the_issue_s_five_models_are_shipped():
    names = {p.stem for p in PROFILE_FILES}
    assert {"eastron_sdm120", "eastron_sdm630", "abb_b23", "carlo_gavazzi_em24", "janitza_b23"} <= names


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_profile_file_decodes_its_examples_to_the_declared_values(path):
    profile = check_profile_file(path)          # the validator itself checks every example
    assert profile.examples, f"{path.name} has no [[example]]"
    for ex in profile.examples:
        got = decode_example(profile, ex)
        assert {k: got.get(k) for k in ex.expect} == ex.expect
        assert all(k in got and got[k] is None for k in ex.missing)


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_profile_declares_the_block_limit_resolution_and_billing_registers(path):
    p = load_profile(str(path))
    assert 1 <= p.max_block <= 125
    assert p.quantity("1.8.0").unit == "Wh" and p.quantity("1.8.0").billing
    assert p.quantity("1.8.0").resolution == p.energy_resolution
    for q in p.quantities:
        assert q.count <= p.max_block


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_energy_register_survives_encode_then_decode_at_its_resolution(path):
    p = load_profile(str(path))
    for q in p.quantities:
        if q.unit == "Wh":
            for value in (0, 7 * q.resolution, 1234 * q.resolution):
                assert decode(q, encode(q, value), p.no_value) == value


def test_the_models_word_orders_are_as_their_datasheets_say():
    assert load_profile("carlo_gavazzi_em24").quantity("1.8.0").word_order == "little"
    assert load_profile("carlo_gavazzi_em24").quantity("1.8.0").address == 0x003E
    abb = load_profile("abb_b23").quantity("1.8.0")
    assert (abb.function, abb.type, abb.address, abb.scale) == (3, "u64", 0x5000, Decimal(10))
    janitza = load_profile("janitza_b23")
    assert (janitza.quantity("1.8.0").address, janitza.quantity("2.8.0").address) == (0x4A7C, 0x4A84)
    sdm = load_profile("eastron_sdm630")
    assert [sdm.quantity(o).address for o in ("1.8.0", "2.8.0", "1.7.0", "14.7.0")] == [0x48, 0x4A, 0x34, 0x46]
    assert load_profile("eastron_sdm120").quantity("1.7.0").address == 0x000C


def test_a_float_kwh_becomes_wh_from_its_exact_binary_value_rounded_half_even():
    q = load_profile("eastron_sdm630").quantity("1.8.0")      # 10 Wh resolution
    words = lambda v: list(struct.unpack(">HH", struct.pack(">f", v)))  # noqa: E731
    assert decode(q, words(0.125)) == 120     # exactly 125 Wh: tie -> even (12)
    assert decode(q, words(0.375)) == 380     # exactly 375 Wh: tie -> even (38)
    # 0.1 kWh is 0.100000001490116... as float32: just above 100 Wh, still 100 at 10 Wh steps
    assert decode(q, words(0.1)) == 100
    assert Decimal(struct.unpack(">f", struct.pack(">f", 0.1))[0]) > Decimal("0.1")


def test_abb_all_ff_words_mean_no_value_not_a_huge_number():
    p = load_profile("abb_b23")
    assert decode(p.quantity("1.8.0"), [0xFFFF] * 4, p.no_value) is None
    assert decode(p.quantity("1.8.0"), [0, 0, 0, 0xFFFF], p.no_value) == 655350


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad_meter.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("change, key", [
    (('type = "float32"\nunit = "mV"', 'type = "float24"\nunit = "mV"'), "quantity[0].type"),
    (('scale = "1000"               # kWh -> Wh', 'scale = 1000.0'), "quantity[4].scale"),
    (('max_block = 50 ', 'max_block = 500 '), "meter.max_block"),
    (('obis = "31.7.0"', 'obis = "32.7.0"'), "quantity[1].obis"),
    (('address = 0x0006', 'address = 0x0001'), "quantity[1].address"),
    (('unit = "mHz"', 'unit = "Hz"'), "quantity[3].unit"),
    (('count = 2\ntype = "float32"\nunit = "Wh"\nscale = "1000"               # kWh',
      'count = 4\ntype = "float32"\nunit = "Wh"\nscale = "1000"               # kWh'), "quantity[4].count"),
    (('word_order = "big"           # high word first', 'word_order = "middle"'), "meter.word_order"),
    (('name = "voltage"', 'name = "voltage"\nregister = 3'), "quantity[0].register"),
    (('"1.8.0" = 4321870', '"1.8.0" = 4321880'), "example[0].expect.1.8.0"),
    (('"1.8.0" = 4321870', '"9.9.9" = 4321870'), "example[0].expect"),
])
def test_a_bad_profile_file_is_refused_naming_file_line_and_key(tmp_path, change, key):
    old, new = change
    assert old in GOOD, old
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        check_profile_file(path)
    assert err.value.key == key
    assert str(path) in str(err.value)
    assert err.value.line is not None


def test_a_profile_without_examples_is_refused(tmp_path):
    path = write(tmp_path, GOOD.split("[[example]]")[0])
    with pytest.raises(ConfigError, match=r"key 'example'.*at least one \[\[example\]\]"):
        check_profile_file(path)


def test_the_line_number_points_into_the_offending_quantity_table(tmp_path):
    text = GOOD.replace('unit = "mHz"', 'unit = "Hz"', 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        check_profile_file(path)
    assert text.splitlines()[err.value.line - 1].strip() == 'unit = "Hz"'


def test_a_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("[meter]", "[meter", 1))
    with pytest.raises(ConfigError, match="bad_meter.toml:"):
        check_profile_file(path)


def test_an_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="abb_b23.*eastron_sdm630"):
        load_profile("landis_e350")


def test_an_unknown_variant_is_refused_listing_the_variants():
    with pytest.raises(ConfigError, match="import-only"):
        load_profile("carlo_gavazzi_em24").variant("export-only")


def test_the_profiles_check_command_reports_the_bad_file_and_key_and_exits_2(tmp_path, capsys):
    from meterlink.gateway.cli import main

    path = write(tmp_path, GOOD.replace('unit = "mHz"', 'unit = "Hz"', 1))
    assert main(["profiles", "check", "eastron_sdm630", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "eastron_sdm630.toml: ok" in out
    assert f"{path}:" in err and "key 'quantity[3].unit'" in err and "unknown unit 'Hz'" in err


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from([1, 10, 100]))
def test_float_decoding_equals_exact_rational_arithmetic_rounded_half_even(hi, lo, resolution):
    q = replace(load_profile("eastron_sdm630").quantity("1.8.0"), resolution=resolution)
    value = struct.unpack(">f", struct.pack(">HH", hi, lo))[0]
    got = decode(q, [hi, lo])
    if value != value or value in (float("inf"), float("-inf")):
        assert got is None
        return
    exact = Fraction(value) * 1000 / resolution            # independent of Decimal
    floor = exact.numerator // exact.denominator
    rest = exact - floor
    steps = floor + (1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2) else 0)
    assert got == steps * resolution
