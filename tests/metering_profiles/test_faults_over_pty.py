"""Every fault the simulator injects, met by the gateway's RTU master over a real pty."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from meterlink import modbus
from meterlink.errors import DeviceError, ProtocolError
from meterlink.gateway.poller import MeterReader, read_meter
from meterlink.sim.meter import Faults

from .conftest import START, pty_bus

ALL = {"32.7.0", "52.7.0", "72.7.0", "31.7.0", "51.7.0", "71.7.0", "1.7.0", "14.7.0", "1.8.0", "2.8.0"}


def obis(result):
    return {r.obis for r in result.readings}


def test_a_dead_meter_times_out_and_the_other_meter_on_the_bus_still_answers(clock):
    with pty_bus(clock, "eastron_sdm630", units=(1, 2), faults={1: Faults(silent=True)}) as (srv, master, p):
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"no complete answer from unit 1 on .* within 0.3 s"):
            read_meter(master, 1, p, "dead", clock)
        assert 0.25 < time.monotonic() - t0 < 1.0
        assert master.counters.timeouts == 1
        assert obis(read_meter(master, 2, p, "alive", clock)) == ALL


def test_a_slow_reply_within_the_timeout_is_read(clock):
    with pty_bus(clock, "eastron_sdm630", faults={1: Faults(delay_s=0.1)}) as (srv, master, p):
        assert obis(read_meter(master, 1, p, "slow", clock)) == ALL
        assert master.counters.timeouts == 0


def test_a_reply_later_than_the_timeout_is_a_timeout_and_never_mistaken_for_the_next_answer(clock):
    faults = Faults(delay_s=0.4)
    with pty_bus(clock, "eastron_sdm630", units=(1, 2), faults={1: faults}) as (srv, master, p):
        with pytest.raises(DeviceError):
            master.execute(modbus.read_request(1, 4, 0x0048, 2))
        # the late answer of unit 1 arrives while we talk to unit 2: it is skipped, not taken
        words = master.execute(modbus.read_request(2, 4, 0x0000, 2))
        assert words == master.execute(modbus.read_request(2, 4, 0x0000, 2))
        assert master.counters.timeouts == 1


@pytest.mark.parametrize("code", [1, 2, 4])
def test_an_exception_code_reaches_the_caller_with_its_code(clock, code):
    with pty_bus(clock, "eastron_sdm630", faults={1: Faults(exception_code=code)}) as (srv, master, p):
        with pytest.raises(modbus.ModbusException) as err:
            master.execute(modbus.read_request(1, 4, 0x0048, 2))
        assert err.value.code == code
        assert master.counters.exceptions == 1


def test_server_failure_exception_4_fails_the_meter_read_but_2_on_every_block_reads_nothing(clock):
    with pty_bus(clock, "eastron_sdm630", faults={1: Faults(exception_code=4)}) as (srv, master, p):
        with pytest.raises(modbus.ModbusException, match="server device failure"):
            read_meter(master, 1, p, "m", clock)
    with pty_bus(clock, "eastron_sdm630", faults={1: Faults(exception_code=2)}) as (srv, master, p):
        result = read_meter(master, 1, p, "m", clock)
        assert result.readings == [] and {0x0048, 0x0000, 0x0034} <= result.refused


def test_a_corrupt_crc_is_counted_and_refused_quickly_then_the_next_answer_is_read(clock):
    with pty_bus(clock, "eastron_sdm630", faults={1: Faults(corrupt_crc_every=2)}) as (srv, master, p):
        req = modbus.read_request(1, 4, 0x0048, 4)
        good = master.execute(req)                   # answer 1: fine
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="bad CRC"):
            master.execute(req)                      # answer 2: corrupt
        assert time.monotonic() - t0 < 0.25          # did not wait for the whole timeout
        assert master.counters.crc_errors == 1 and master.counters.timeouts == 0
        assert master.execute(req) == good           # answer 3: fine again, nothing left over


def test_garbage_before_and_after_every_frame_is_skipped_and_counted(clock):
    junk = bytes.fromhex("00ff01048a55aa01")          # even contains our unit and function bytes
    faults = {1: Faults(garbage_before=junk, garbage_after=junk)}
    with pty_bus(clock, "eastron_sdm630", faults=faults) as (srv, master, p):
        for _ in range(3):
            assert obis(read_meter(master, 1, p, "m", clock)) == ALL
        assert master.counters.garbage_bytes >= 3 * len(junk)
        assert master.counters.crc_errors == 0 and master.counters.timeouts == 0


def test_a_meter_that_disappears_and_comes_back_is_read_again(clock):
    gone = (START + timedelta(minutes=15), START + timedelta(minutes=45))
    with pty_bus(clock, "eastron_sdm630", faults={1: Faults(absent=(gone,))}) as (srv, master, p):
        reader = MeterReader("m", 1, p)
        assert obis(reader.read(master, clock)) == ALL
        clock.advance(timedelta(minutes=15))
        with pytest.raises(DeviceError):
            reader.read(master, clock)
        clock.advance(timedelta(minutes=30))
        back = reader.read(master, clock)
        assert obis(back) == ALL and reader.refused == frozenset()


def test_an_exchanged_meter_reports_another_serial_number_and_a_restarted_register(clock):
    at = START + timedelta(hours=1)
    faults = Faults(exchange_at=at, exchange_serial=77_000_001, exchange_import_wh=50)
    with pty_bus(clock, "eastron_sdm630", faults={1: faults}) as (srv, master, p):
        before = read_meter(master, 1, p, "m", clock, with_serial=True)
        clock.advance(timedelta(hours=2))
        after = read_meter(master, 1, p, "m", clock, with_serial=True)
    assert before.serial == 10_000_010            # MeterModel.starting_at: 10_000_000 + seed
    assert after.serial == 77_000_001
    imp = lambda r: next(x.value for x in r.readings if x.obis == "1.8.0")  # noqa: E731
    assert imp(after) < imp(before)
