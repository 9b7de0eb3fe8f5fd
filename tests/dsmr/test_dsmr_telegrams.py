"""DSMR P1 parsing against real field telegrams, the dsmr-parser package as a peer, and bad input."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterlink.errors import ProtocolError
from meterlink.gateway.dsmr import (TelegramError, TelegramFramer, crc16_arc, parse_telegram, timestamp,
                                    to_readings)

DATA = Path(__file__).parent / "data"
UTC = timezone.utc
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SAMPLES = {"v2_2_iskra_nocrc.txt": "2.2", "v4_2_kaifa.txt": "4", "v5_iskra.txt": "5",
           "v5_sagemcom_t210_d_r.txt": "5"}


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def values_of(name: str) -> dict[str, int]:
    t = parse_telegram(sample(name), version=SAMPLES[name])
    return {r.obis: r.value for r in to_readings(t, received_at=NOW, meter_id="M")}


def with_crc(body_through_bang: bytes) -> bytes:
    return body_through_bang + f"{crc16_arc(body_through_bang):04X}\r\n".encode()


def edit_v5(old: bytes, new: bytes) -> bytes:
    """The v5 field telegram with one edit, re-signed with a correct CRC (so only the content is wrong)."""
    raw = sample("v5_iskra.txt")
    assert raw.count(old) == 1
    raw = raw.replace(old, new)
    return with_crc(raw[:raw.rindex(b"!") + 1])


# ---------------------------------------------------------------- field telegrams

EXPECTED = {
    "v2_2_iskra_nocrc.txt": {"1.8.1": 1001, "1.8.2": 1001, "2.8.1": 1001, "2.8.2": 1001, "1.7.0": 1010},
    "v4_2_kaifa.txt": {"1.8.1": 1581123, "1.8.2": 1435706, "2.8.1": 0, "2.8.2": 0, "1.7.0": 2027,
                       "24.2.1": 981443},
    "v5_iskra.txt": {"1.8.1": 4426, "1.8.2": 2399, "2.8.1": 2444, "2.8.2": 0, "1.7.0": 244, "24.2.1": 107},
    "v5_sagemcom_t210_d_r.txt": {"1.8.0": 6545766, "1.8.1": 5017120, "1.8.2": 1528646, "2.8.0": 58,
                                 "1.7.0": 286},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_field_telegrams_give_the_documented_exact_integer_readings(name):
    got = values_of(name)
    assert {k: got[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert all(type(v) is int for v in got.values())


def test_v5_telegram_time_with_winter_flag_becomes_utc_and_equipment_id_is_decoded():
    t = parse_telegram(sample("v5_iskra.txt"), version="5")
    assert t.timestamp == datetime(2017, 1, 2, 18, 20, 2, tzinfo=UTC)      # 19:20:02 CET
    assert t.serial == "K8EG004046395507"
    assert t.crc == 0x6EEE and t.version == "50" and t.tariff == 2
    readings = to_readings(t, received_at=NOW)
    elec = [r for r in readings if r.obis != "24.2.1"]
    assert {r.meter_id for r in elec} == {"K8EG004046395507"}
    assert {r.taken_at for r in elec} == {t.timestamp}
    volts = {r.obis: (r.value, r.unit) for r in elec if r.unit in ("mV", "mA")}
    assert volts["32.7.0"] == (230_000, "mV") and volts["72.7.0"] == (229_000, "mV")
    assert volts["31.7.0"] == (480, "mA") and volts["71.7.0"] == (860, "mA")


def test_gas_reading_belongs_to_the_gas_meter_and_keeps_its_own_capture_time():
    t = parse_telegram(sample("v4_2_kaifa.txt"), version="4")
    gas = [r for r in to_readings(t, received_at=NOW) if r.obis == "24.2.1"]
    assert len(gas) == 1
    g = gas[0]
    assert (g.value, g.unit) == (981_443, "dm3")
    assert g.taken_at == datetime(2016, 11, 29, 19, 0, tzinfo=UTC)          # 20:00 W
    assert g.meter_id == "4819243993373755377509728609491464"               # not printable hex: kept as sent
    named = to_readings(t, received_at=NOW, meter_id="E-1", gas_meter_ids={1: "G-1"})
    assert {r.meter_id for r in named} == {"E-1", "G-1"}


def test_dsmr22_has_no_crc_and_its_gas_value_on_the_next_line_is_read_in_dutch_local_time():
    t = parse_telegram(sample("v2_2_iskra_nocrc.txt"), version="2.2")
    assert t.crc is None and t.timestamp is None
    readings = to_readings(t, received_at=NOW, meter_id="M")
    assert {r.taken_at for r in readings if r.obis != "24.2.1"} == {NOW}    # no meter time: when received
    (gas,) = [r for r in readings if r.obis == "24.2.1"]
    assert gas.value == 1001 and gas.taken_at == datetime(2016, 11, 7, 18, 0, tzinfo=UTC)


def test_a_telegram_without_equipment_id_needs_a_configured_meter_id():
    t = parse_telegram(sample("v5_sagemcom_t210_d_r.txt"), version="5")
    with pytest.raises(ProtocolError, match="no equipment identifier"):
        to_readings(t, received_at=NOW)
    assert {r.meter_id for r in to_readings(t, received_at=NOW, meter_id="LU-1")} == {"LU-1"}


# ---------------------------------------------------------------- dsmr-parser as an independent peer

@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_value_agrees_with_dsmr_parser_on_the_field_telegrams(name, compare_with_peer):
    assert compare_with_peer(sample(name), SAMPLES[name]) >= 5


def test_dsmr_parser_also_refuses_what_we_refuse_for_a_bad_crc(peer_parse):
    from dsmr_parser.exceptions import InvalidChecksumError
    bad = sample("v5_iskra.txt").replace(b"000004.426", b"000004.427")
    with pytest.raises(InvalidChecksumError):
        peer_parse(bad, "5")
    with pytest.raises(TelegramError) as exc:
        parse_telegram(bad, version="5")
    assert exc.value.kind == "crc" and "6EEE" in str(exc.value)


# ---------------------------------------------------------------- CRC, truncation, malformed

def test_crc16_arc_check_value():
    assert crc16_arc(b"123456789") == 0xBB3D          # the catalogue's check value for CRC-16/ARC


@pytest.mark.parametrize("name", ["v4_2_kaifa.txt", "v5_iskra.txt", "v5_sagemcom_t210_d_r.txt"])
def test_changing_any_byte_before_the_bang_fails_the_crc(name):
    raw = sample(name)
    end = raw.rindex(b"!")
    for i in range(end):
        bad = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]
        with pytest.raises(TelegramError) as exc:
            parse_telegram(bad, version=SAMPLES[name])
        assert exc.value.kind in ("crc", "malformed"), i   # 'malformed' only when byte 0 stops being '/'


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_of_a_field_telegram_is_refused(name):
    raw = sample(name)
    for cut in range(len(raw) - 2):        # '!XXXX' without its CRLF is still whole; shorter is not
        if name.startswith("v2_2") and cut >= raw.rindex(b"!") + 1:
            continue                       # 2.2 has no CRC: '!' alone ends it
        with pytest.raises(ProtocolError):
            parse_telegram(raw[:cut], version=SAMPLES[name])


def test_v5_without_crc_is_refused_as_truncated():
    raw = sample("v5_iskra.txt")
    with pytest.raises(TelegramError, match="requires a CRC") as exc:
        parse_telegram(raw[:raw.rindex(b"!") + 1] + b"\r\n", version="5")
    assert exc.value.kind == "truncated"


@pytest.mark.parametrize("old, new, message", [
    (b"1-0:1.8.1(000004.426*kWh)", b"1-0:1.8.1(000004.426*kW)", "unit 'kW' where Wh"),
    (b"1-0:1.8.1(000004.426*kWh)", b"1-0:1.8.1(000004.4265*kWh)", "more precision than whole Wh"),
    (b"1-0:1.8.1(000004.426*kWh)", b"1-0:1.8.1(0000-4.426*kWh)", "not a decimal number"),
    (b"1-0:1.8.1(000004.426*kWh)", b"1-0:1.8.1(000004.426)", "has no unit"),
    (b"0-0:1.0.0(170102192002W)", b"0-0:1.0.0(171302192002W)", "not a valid date"),
    (b"0-0:1.0.0(170102192002W)", b"0-0:1.0.0(170102192002X)", "YYMMDDhhmmss"),
    (b"1-0:1.7.0(00.244*kW)", b"1-0:1.7.0(00.244*kW", "malformed object"),
    (b"0-1:24.2.1(170102161005W)(00000.107*m3)", b"0-1:24.2.1(00000.107*m3)", "where 2 were expected"),
])
def test_a_malformed_object_refuses_the_whole_telegram_naming_line_and_problem(old, new, message):
    with pytest.raises(TelegramError, match=message) as exc:
        parse_telegram(edit_v5(old, new), version="5")
    assert exc.value.kind == "malformed" and str(exc.value).startswith("line ")


def test_a_bad_energy_line_in_a_crc_less_22_telegram_names_its_line():
    raw = sample("v2_2_iskra_nocrc.txt").replace(b"1-0:2.8.1(00001.001*kWh)", b"1-0:2.8.1(00001.0x1*kWh)")
    with pytest.raises(TelegramError, match=r"line 6: 1-0:2\.8\.1"):
        parse_telegram(raw, version="2.2")


@pytest.mark.parametrize("text, expected", [
    ("170102192002W", datetime(2017, 1, 2, 18, 20, 2, tzinfo=UTC)),
    ("220601120000S", datetime(2022, 6, 1, 10, 0, 0, tzinfo=UTC)),
    ("220601120000", datetime(2022, 6, 1, 10, 0, 0, tzinfo=UTC)),        # 2.2: local summer time
    ("221030023000S", datetime(2022, 10, 30, 0, 30, tzinfo=UTC)),       # the repeated hour, first pass
    ("221030023000W", datetime(2022, 10, 30, 1, 30, tzinfo=UTC)),       # ... and second pass
])
def test_timestamps_with_dst_flag_become_aware_utc(text, expected):
    assert timestamp(text) == expected


@settings(max_examples=200, deadline=None)
@given(wh=st.integers(min_value=0, max_value=999_999_999))
def test_kwh_with_three_decimals_is_exactly_the_integer_wh(wh):
    line = f"1-0:1.8.1({wh // 1000:06d}.{wh % 1000:03d}*kWh)".encode()
    raw = edit_v5(b"1-0:1.8.1(000004.426*kWh)", line)
    assert {r.obis: r.value for r in to_readings(parse_telegram(raw, version="5"), received_at=NOW)}["1.8.1"] == wh


# ---------------------------------------------------------------- the streaming framer

def stream_of(*parts: bytes) -> bytes:
    return b"".join(parts)


@settings(max_examples=60, deadline=None)
@given(chunk=st.integers(min_value=1, max_value=700), junk=st.binary(max_size=40))
def test_framer_finds_every_telegram_between_garbage_in_any_chunking(chunk, junk):
    junk = junk.replace(b"/", b"")           # a '/' in junk would look like a (truncated) telegram start
    telegrams = [sample(n) for n in ("v4_2_kaifa.txt", "v5_iskra.txt", "v5_sagemcom_t210_d_r.txt")]
    data = stream_of(junk, telegrams[0], junk, telegrams[1], b"\x00\xff" + junk, telegrams[2], junk)
    framer = TelegramFramer()
    frames = []
    for i in range(0, len(data), chunk):
        frames += framer.feed(data[i:i + chunk])
    assert frames == telegrams
    assert framer.stats.truncated == 0
    assert framer.stats.garbage_bytes + framer.buffered == 3 * len(junk) + 2 + len(junk)


def test_framer_counts_a_telegram_cut_off_by_the_next_one_and_keeps_the_next():
    a, b = sample("v5_iskra.txt"), sample("v4_2_kaifa.txt")
    framer = TelegramFramer()
    frames = framer.feed(a[:400] + b)
    assert frames == [b] and framer.stats.truncated == 1


def test_framer_buffer_stays_bounded_on_an_endless_line_without_telegram_ends():
    framer = TelegramFramer(max_bytes=4096)
    noise = b"/ISk5 never ends " + b"x" * 1000
    for _ in range(2000):                    # 2 MB of noise
        assert framer.feed(noise) == []
        assert framer.buffered <= 4096
    framer.feed(b"\r\n")
    assert framer.feed(sample("v5_iskra.txt")) == [sample("v5_iskra.txt")]
    assert framer.stats.oversized > 0 or framer.stats.truncated > 0


def test_framer_drops_a_start_that_never_ends_once_it_exceeds_the_bound():
    framer = TelegramFramer(max_bytes=4096)
    framer.feed(b"/KFM5 header\r\n")
    for _ in range(100):
        assert framer.feed(b"1-0:1.8.1(000001.000*kWh)\r\n" * 10) == []
        assert framer.buffered <= 4096
    assert framer.stats.oversized >= 1
    assert framer.feed(sample("v4_2_kaifa.txt")) == [sample("v4_2_kaifa.txt")]


def test_belgian_gas_reference_24_2_3_is_read_like_24_2_1():
    raw = edit_v5(b"0-1:24.2.1(170102161005W)(00000.107*m3)", b"0-1:24.2.3(170102161005W)(00012.345*m3)")
    (gas,) = [r for r in to_readings(parse_telegram(raw, version="5"), received_at=NOW) if r.obis == "24.2.1"]
    assert gas.value == 12_345 and gas.taken_at == datetime(2017, 1, 2, 15, 10, 5, tzinfo=UTC)


def test_a_crc_less_22_telegram_that_lost_a_line_or_a_digit_is_refused():
    raw = sample("v2_2_iskra_nocrc.txt")
    without_line = raw.replace(b"1-0:1.8.2(00001.001*kWh)\r\n", b"")
    with pytest.raises(TelegramError, match=r"lacks 1-0:1\.8\.2") as exc:
        parse_telegram(without_line, version="2.2")
    assert exc.value.kind == "truncated"
    lost_digit = raw.replace(b"1-0:1.8.2(00001.001*kWh)", b"1-0:1.8.2(0001.001*kWh)")
    with pytest.raises(TelegramError, match=r"line 5: 1-0:1\.8\.2: .* not the DSMR 2\.2 format"):
        parse_telegram(lost_digit, version="2.2")
