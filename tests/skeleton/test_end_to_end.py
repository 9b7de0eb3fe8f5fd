"""Simulated meters on a real pty and TCP -> gateway -> real gRPC -> head-end database."""

from __future__ import annotations

import threading
from datetime import timedelta

from meterlink.clock import SimClock
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.profiles import decode, encode
from meterlink.sim.meter import MeterModel

from .conftest import START


def write_config(tmp_path, rtu_path, tcp_addr, headend_addr):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
id = "gw-test"
database = "{tmp_path / 'gw.db'}"
poll_interval_s = 900

[headend]
address = "{headend_addr}"

[[bus]]
port = "{rtu_path}"
baud = 9600
timeout_s = 0.5

[[bus.meter]]
id = "RTU-1"
unit = 1
profile = "eastron_sdm630"

[[bus.meter]]
id = "RTU-2"
unit = 2
profile = "eastron_sdm630"

[[bus]]
port = "tcp://{tcp_addr}"

[[bus.meter]]
id = "TCP-1"
unit = 1
profile = "eastron_sdm630"
""")
    return str(cfg)


def expected_register(meter: MeterModel, initial_mj: int, at) -> int:
    """What the simulator's 1.8.0 register said at `at`, replayed on a fresh clock, as the wire carries it."""
    clock = SimClock(START)
    twin = MeterModel.starting_at(meter.profile, clock, unit=meter.unit, seed=meter.seed,
                                  import_wh=0, scale_pct=meter.scale_pct)
    twin.import_mj = initial_mj
    clock.set(at)
    twin.advance()
    q = meter.profile.quantity("1.8.0")
    return decode(q, encode(q, twin.import_wh))


def test_a_day_of_readings_arrives_at_the_headend_equal_to_the_simulators_registers(
        tmp_path, clock, rtu_bus, tcp_bus, headend):
    repo, addr = headend
    sims = {"RTU-1": rtu_bus.meters[1], "RTU-2": rtu_bus.meters[2], "TCP-1": tcp_bus.meters[1]}
    initial_mj = {k: m.import_mj for k, m in sims.items()}
    gw = Gateway(load_config(write_config(tmp_path, rtu_bus.client_path, tcp_bus.address, addr)), clock)
    try:
        gw.run(threading.Event(), until=START + timedelta(hours=24), first=START)
        assert gw.journal.unacked_count() == 0
    finally:
        gw.close()
    for meter_id, sim in sims.items():
        got = repo.readings(meter_id, "1.8.0")
        assert len(got) == 97, meter_id  # 00:00 .. 24:00 every 15 minutes
        assert [r.taken_at for r in got] == [START + timedelta(minutes=15 * i) for i in range(97)]
        for r in got:
            assert r.value == expected_register(sim, initial_mj[meter_id], r.taken_at), (meter_id, r.taken_at)
        assert got[-1].value > got[0].value  # the household consumed something
    # every quantity of the profile arrived, not just the billing register
    assert {r.obis for r in repo.readings("TCP-1")} == {q.obis for q in sims["TCP-1"].profile.quantities}


def test_an_open_relay_stops_consumption_on_the_simulator(clock, sdm630):
    meter = MeterModel.starting_at(sdm630, clock, import_wh=1000)
    clock.advance(timedelta(hours=1))
    before = meter.import_wh
    assert before > 1000
    meter.set_relay(False)
    clock.advance(timedelta(hours=5))
    assert meter.import_wh == before
    assert meter.values()["1.7.0"] == 0
