"""Every shipped profile's examples decode as declared; Modbus framing against known vectors."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from meterlink import modbus
from meterlink.errors import ConfigError, ProtocolError
from meterlink.gateway.profiles import decode, decode_example, encode, known_profiles, load_profile, parse_profile


@pytest.mark.parametrize("name", known_profiles())
def test_every_profile_example_decodes_to_its_declared_values(name):
    profile = load_profile(name)
    assert profile.examples, f"profile {name} has no [[example]]"
    for ex in profile.examples:
        got = decode_example(profile, ex)
        assert {k: got.get(k) for k in ex.expect} == ex.expect


@pytest.mark.parametrize("name", known_profiles())
def test_every_profile_encodes_and_decodes_energy_exactly_at_its_resolution(name):
    profile = load_profile(name)
    for q in profile.quantities:
        if q.unit == "Wh":
            value = 1234 * q.resolution
            assert decode(q, encode(q, value), profile.no_value) == value


@given(st.integers(min_value=0, max_value=9_999_999).map(lambda v: v * 10))
def test_sdm630_float_energy_round_trips_within_float32_precision(value):
    q = load_profile("eastron_sdm630").quantity("1.8.0")
    got = decode(q, encode(q, value))
    assert got % 10 == 0
    assert abs(got - value) <= max(10, value >> 23)  # float32 keeps 24 significant bits


def test_crc16_matches_the_modbus_specification_example():
    # "Modbus over serial line" spec: 01 03 00 00 00 0A -> CRC C5 CD (low byte first)
    assert modbus.rtu_frame(1, bytes.fromhex("030000000a")).hex() == "01030000000ac5cd"


def test_a_response_with_a_bad_crc_is_refused_naming_both_crcs():
    req = modbus.read_request(1, 4, 0, 1)
    frame = bytearray(modbus.rtu_frame(1, bytes([4, 2, 0x12, 0x34])))
    frame[-1] ^= 0x01
    with pytest.raises(ProtocolError, match="bad CRC"):
        modbus.parse_rtu_response(req, bytes(frame))


def test_an_exception_response_carries_its_code():
    req = modbus.read_request(1, 4, 0x5C, 2)
    with pytest.raises(modbus.ModbusException) as err:
        modbus.parse_rtu_response(req, modbus.rtu_frame(1, bytes([0x84, 2])))
    assert err.value.code == 2 and "illegal data address" in str(err.value)


def test_a_short_or_mismatched_response_is_a_protocol_error():
    req = modbus.read_request(1, 4, 0, 2)
    with pytest.raises(ProtocolError, match="byte count"):
        modbus.parse_rtu_response(req, modbus.rtu_frame(1, bytes([4, 2, 0, 1])))
    with pytest.raises(ProtocolError, match="unit 2"):
        modbus.parse_rtu_response(req, modbus.rtu_frame(2, bytes([4, 4, 0, 1, 0, 2])))


def test_a_profile_with_a_float_scale_or_unknown_type_names_the_key():
    base = {"meter": {"model": "X", "max_block": 10},
            "quantity": [{"obis": "1.8.0", "address": 0, "type": "float32", "unit": "Wh", "scale": 1000.0}]}
    with pytest.raises(ConfigError, match=r"quantity\[0\]\.scale"):
        parse_profile(base, "x", "x.toml")
    base["quantity"][0].update(scale="1000", type="float16")
    with pytest.raises(ConfigError, match=r"quantity\[0\]\.type"):
        parse_profile(base, "x", "x.toml")


def test_wire_time_model_uses_3_5_characters_below_19200_baud():
    assert modbus.char_time_s(9600) == pytest.approx(10 / 9600)
    assert modbus.interframe_gap_s(9600) == pytest.approx(35 / 9600)
    assert modbus.interframe_gap_s(115200) == 0.00175
