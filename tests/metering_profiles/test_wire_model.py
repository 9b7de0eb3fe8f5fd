"""The bus wire-time model: bytes and seconds per sweep, and the check that refuses a bus too slow for its interval."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from meterlink.errors import ConfigError
from meterlink.gateway.poller import read_meter
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.readplan import check_bus, check_bus_plan, exchange_time_s, plan_meter, sweep_cost
from meterlink.gateway.transport import RtuMaster
from meterlink.modbus import SerialLine
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import RtuPtyServer

LINE = SerialLine(9600, "N", 1)


def test_one_sdm630_sweep_costs_two_requests_and_exactly_these_bytes_and_seconds():
    plan = plan_meter("m1", load_profile("eastron_sdm630"), LINE)
    assert plan.requests == 2 and plan.min_requests == 2
    # 0x0034+24 and 0x0000+12: requests 2 x 8 bytes, responses (5 + 48) + (5 + 24)
    assert plan.bytes_on_wire() == 16 + 53 + 29 == 98
    char = 10 / 9600
    expected = 98 * char + 2 * 2 * 3.5 * char + 2 * 0.020
    assert plan.wire_time_s(LINE) == pytest.approx(expected)
    # floor: the same 2 requests carrying only the 20 registers the 10 quantities occupy
    assert plan.min_wire_time_s(LINE) == pytest.approx((2 * 13 + 40) * char + 4 * 3.5 * char + 0.040)
    # one request per value (mbmd): 10 exchanges
    assert plan.per_value_wire_time_s(LINE) == pytest.approx((10 * 13 + 40) * char + 20 * 3.5 * char + 0.200)


def test_parity_and_a_second_stop_bit_lengthen_every_character():
    assert SerialLine(9600, "E", 1).char_time_s == pytest.approx(11 / 9600)
    assert SerialLine(9600, "N", 2).char_time_s == pytest.approx(11 / 9600)
    assert exchange_time_s(SerialLine(9600, "E"), 8, 9, 0) > exchange_time_s(LINE, 8, 9, 0)
    assert SerialLine(38400).gap_s == 0.00175


def test_a_sweep_sums_its_meters():
    plans = [plan_meter(f"m{i}", load_profile("eastron_sdm630"), LINE) for i in range(32)]
    cost = sweep_cost(LINE, plans)
    assert (cost.meters, cost.requests, cost.bytes_on_wire) == (32, 64, 32 * 98)
    assert cost.wire_time_s == pytest.approx(32 * plans[0].wire_time_s(LINE))
    assert cost.per_value_requests == 320
    assert 0 < cost.efficiency <= 1


def test_a_bus_whose_sweep_outlasts_the_poll_interval_is_refused_naming_the_bus():
    plans = [plan_meter(f"m{i}", load_profile("eastron_sdm630"), LINE) for i in range(100)]
    assert check_bus_plan("/dev/ttyUSB0", LINE, plans, 900).wire_time_s < 20
    with pytest.raises(ConfigError) as err:
        check_bus_plan("/dev/ttyUSB0", LINE, plans, 10, path="gateway.toml")
    msg = str(err.value)
    assert "gateway.toml" in msg and "bus /dev/ttyUSB0 (9600 8N1)" in msg
    assert "100 meter(s)" in msg and "poll interval of 10 s" in msg


def test_check_bus_takes_a_configured_bus_and_skips_modbus_tcp():
    meter = SimpleNamespace(id="m", unit=1, profile=load_profile("abb_b23"))
    rtu = SimpleNamespace(port="/dev/ttyUSB1", baud=2400, parity="E", stopbits=1, meters=(meter,) * 40)
    with pytest.raises(ConfigError, match=r"bus /dev/ttyUSB1 \(2400 8E1\)"):
        check_bus(rtu, 5)
    # at 2400 baud a request is cheap next to 16 registers: the frequency at 0x5B2C gets its own read
    assert check_bus(rtu, 900, with_serial=False, split_priorities=False).requests == 40 * 3
    # as the daemon polls: + the serial number (0x8900) with the billing read
    assert check_bus(rtu, 900).requests == 40 * 4
    tcp = SimpleNamespace(port="tcp://10.0.0.5:502", baud=9600, parity="N", stopbits=1, meters=(meter,))
    assert check_bus(tcp, 1) is None


def test_a_refused_register_is_left_out_of_the_modelled_plan():
    p = load_profile("carlo_gavazzi_em24")
    full = plan_meter("m", p, LINE)
    partial = plan_meter("m", p, LINE, refused=frozenset({0x5C, 0x5D}))
    assert partial.requests == full.requests - 1
    assert partial.bytes_on_wire() < full.bytes_on_wire()


def test_the_serial_read_costs_one_more_request_when_asked_for():
    p = load_profile("eastron_sdm630")
    assert plan_meter("m", p, LINE, with_serial=True).requests == plan_meter("m", p, LINE).requests + 1


def test_a_simulator_paced_at_9600_baud_takes_as_long_as_the_model_says(clock):
    profile = load_profile("eastron_sdm630")
    server = RtuPtyServer({1: MeterModel.starting_at(profile, clock)}, pace=LINE).start()
    master = RtuMaster(server.client_path, 9600, timeout=1.0)
    try:
        read_meter(master, 1, profile, "m", clock)                 # warm up
        t0 = time.perf_counter()
        read_meter(master, 1, profile, "m", clock)
        took = time.perf_counter() - t0
    finally:
        master.close()
        server.stop()
    modelled = plan_meter("m", profile, LINE).wire_time_s(LINE)
    assert modelled <= took < modelled + 0.15


def test_separate_billing_and_instantaneous_reads_cost_what_the_model_says():
    p = load_profile("eastron_sdm630")
    merged = plan_meter("m", p, LINE)
    split = plan_meter("m", p, LINE, split_priorities=True, with_serial=True)
    assert [(b.address, b.count) for b in split.blocks] == [(0x48, 4), (0x00, 12), (0x34, 20), (0xFC00, 2)]
    assert split.requests == 4 and merged.requests == 2
    assert split.wire_time_s(LINE) > merged.wire_time_s(LINE)
