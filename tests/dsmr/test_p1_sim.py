"""The simulated P1 port over a real pty, read by our P1 reader; faults; the CLIs end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterlink.clock import SimClock
from meterlink.errors import DeviceError
from meterlink.gateway.cli import main as gateway_main
from meterlink.gateway.dsmr import parse_telegram, to_readings
from meterlink.gateway.p1 import P1Reader
from meterlink.gateway.profiles import load_profile
from meterlink.sim.dsmr import P1Faults, P1Meter, P1PtyServer, Snapshot, format_telegram
from meterlink.sim.meter import MeterModel

UTC = timezone.utc
START = datetime(2026, 3, 27, 21, 0, tzinfo=UTC)       # a Friday evening, two days before DST starts


def make_meter(version: str, clock: SimClock) -> P1Meter:
    meter = MeterModel.starting_at(load_profile("eastron_sdm630"), clock, seed=3, import_wh=2_000_000)
    return P1Meter(meter, version=version)


def make_server(version: str, clock: SimClock, faults: P1Faults | None = None, **kw) -> P1PtyServer:
    return P1PtyServer(make_meter(version, clock), faults=faults, **kw)


@pytest.fixture
def clock():
    return SimClock(START)


def values(readings) -> dict[str, int]:
    return {r.obis: r.value for r in readings}


@pytest.mark.parametrize("version", ["2.2", "4", "5"])
def test_sim_telegrams_over_a_real_pty_give_the_meter_registers_exactly(version, clock):
    server = make_server(version, clock)
    reader = P1Reader(server.client_path, version, clock=clock)
    try:
        meter = server.meter.meter
        server.emit_once()
        first = reader.read_one(2.0)
        v1 = values(first.readings)
        assert v1["1.8.1"] + v1["1.8.2"] == meter.import_wh == 2_000_000
        clock.advance(timedelta(hours=3))            # 21:00 UTC = 22:00 local (tariff 2) -> 01:00 local (tariff 1)
        server.emit_once()
        second = reader.read_one(2.0)
        v2 = values(second.readings)
        assert v2["1.8.1"] + v2["1.8.2"] == meter.import_wh > 2_000_000
        assert v2["1.8.2"] == v1["1.8.2"] and v2["1.8.1"] > v1["1.8.1"]   # the night went to tariff 1
        assert second.telegram.tariff == 1
        power = meter.power_w(clock.now())
        assert v2["1.7.0"] == (power // 10 * 10 if version == "2.2" else power)   # 2.2 sends kW with 2 decimals
        gas = next(r for r in second.readings if r.obis == "24.2.1")
        assert gas.unit == "dm3" and gas.value == 1_234_567 + 3 * 150 and gas.meter_id == "MLG0000010000003"
        if version != "2.2":
            assert second.telegram.timestamp == clock.now() and second.telegram.crc is not None
            assert {r.meter_id for r in second.readings if r.obis != "24.2.1"} == {"MLS0000010000003"}
        assert reader.counters.telegrams == 2 and reader.counters.crc_errors == 0
    finally:
        reader.close()
        server.stop()


def test_faults_are_counted_and_no_reading_comes_from_a_refused_telegram(clock):
    faults = P1Faults(bad_crc_every=2, truncate_every=3, garbage=b"\x00\xfe junk \r\n!!\x7f")
    server = make_server("5", clock, faults)
    reader = P1Reader(server.client_path, "5", clock=clock)
    try:
        meter = server.meter.meter
        expected_sums = []
        for n in range(1, 8):       # 1 ok, 2 crc, 3 cut, 4 crc, 5 ok, 6 cut, 7 ok
            clock.advance(timedelta(minutes=10))
            server.emit_once()
            if n in (1, 5, 7):
                expected_sums.append(meter.import_wh)
        got = []
        for received_at, telegram in reader.telegrams(wait_s=3.0):
            got.append(to_readings(telegram, received_at=received_at))
            if len(got) == 3:
                break
        c = reader.counters
        assert (c.telegrams, c.crc_errors, c.truncated, c.malformed) == (3, 2, 2, 0)
        # The junk before a cut-off telegram's successor is dropped with the cut-off one.
        assert c.garbage_bytes == 5 * len(faults.garbage)
        assert [values(r)["1.8.1"] + values(r)["1.8.2"] for r in got] == expected_sums
    finally:
        reader.close()
        server.stop()


def test_the_bad_crc_fault_changes_content_after_signing_so_dsmr_parser_refuses_it_too(clock):
    from dsmr_parser import telegram_specifications as specs
    from dsmr_parser.exceptions import InvalidChecksumError
    from dsmr_parser.parsers import TelegramParser
    from meterlink.sim.dsmr import apply_faults
    good = format_telegram(make_meter("5", clock).snapshot(), "5")
    TelegramParser(specs.V5).parse(good.decode())
    bad = apply_faults(good, 2, P1Faults(bad_crc_every=2))
    assert bad != good and bad[-6:] == good[-6:]          # same CRC, different content
    with pytest.raises(InvalidChecksumError):
        TelegramParser(specs.V5).parse(bad.decode())


@pytest.mark.parametrize("version", ["2.2", "4", "5"])
def test_sim_telegrams_agree_with_dsmr_parser(version, clock, compare_with_peer):
    raw = format_telegram(make_meter(version, clock).snapshot(), version)
    assert compare_with_peer(raw, version) == {"2.2": 7, "4": 16, "5": 19}[version]


def test_a_port_with_only_bad_telegrams_reports_what_it_saw(clock):
    server = make_server("5", clock, P1Faults(bad_crc_every=1))
    reader = P1Reader(server.client_path, "5", clock=clock)
    try:
        server.emit_once()
        server.emit_once()
        with pytest.raises(DeviceError, match=r"no valid telegram in 0.5 s .*2 CRC errors"):
            reader.read_one(0.5)
    finally:
        reader.close()
        server.stop()


def test_running_sim_thread_streams_rising_registers_at_one_second_steps(clock):
    server = make_server("4", clock, interval_s=1.0).start()
    reader = P1Reader(server.client_path, "4", clock=clock)
    try:
        seen = []
        for _, telegram in reader.telegrams(wait_s=5.0):
            seen.append(telegram)
            if len(seen) == 5:
                break
        assert len(seen) == 5
        stamps = [t.timestamp for t in seen]
        assert stamps == sorted(stamps) and len(set(stamps)) == 5
        totals = [t.values["1.8.1"].value + t.values["1.8.2"].value for t in seen]
        assert totals == sorted(totals)
    finally:
        reader.close()
        server.stop()


# ---------------------------------------------------------------- the command lines

def start_sim(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "meterlink.sim.cli", "dsmr", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    assert path.startswith("/dev/"), (path, proc.stderr.read() if proc.poll() is not None else "")
    return proc, path


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=5)


def test_cli_end_to_end_sim_dsmr_to_gateway_read_json():
    proc, path = start_sim("--version", "4", "--interval-s", "0.2", "--garbage-bytes", "12", "--bad-crc-every", "3")
    try:
        out = subprocess.run([sys.executable, "-m", "meterlink.gateway.cli", "read", "--dsmr", "--dsmr-version", "4",
                              "--port", path, "--wait", "5", "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["dsmr"] == "4" and doc["equipment_id"] == "MLS0000010000001" and len(doc["crc"]) == 4
        by = {v["obis"]: v for v in doc["values"]}
        assert by["1.8.1"]["value"] + by["1.8.2"]["value"] >= 1_000_000
        assert by["1.8.1"]["unit"] == "Wh" and by["24.2.1"]["unit"] == "dm3"
        assert by["24.2.1"]["meter"] == "MLG0000010000001"
        assert all(isinstance(v["value"], int) for v in doc["values"])
    finally:
        stop(proc)


def test_cli_read_dsmr_prints_the_table(capsys):
    proc, path = start_sim("--version", "5", "--interval-s", "0.2", "--bad-crc-every", "1")
    try:    # every telegram bad: the read fails naming what it saw
        assert gateway_main(["read", "--dsmr", "--port", path, "--wait", "1"]) == 2
    finally:
        stop(proc)
    assert "no valid telegram in 1 s" in capsys.readouterr().err
    proc, path = start_sim("--version", "5", "--interval-s", "0.2", "--garbage-bytes", "9")
    try:
        assert gateway_main(["read", "--dsmr", "--port", path, "--wait", "5", "--meter-id", "HOUSE-7"]) == 0
    finally:
        stop(proc)
    out = capsys.readouterr().out
    assert out.startswith(f"DSMR 5 P1 on {path}: MLS5\\2MeterlinkSim-5, meter HOUSE-7")
    assert "1.8.1    import tariff 1" in out and "gas, meter MLG0000010000001" in out
    seen = re.search(r"refused before it: 0 CRC errors, \d+ truncated, 0 malformed; (\d+) garbage bytes", out)
    assert seen and int(seen.group(1)) >= 9     # the junk before the telegram (plus the tail of one cut by opening)


def test_cli_read_without_profile_or_dsmr_is_refused(capsys):
    assert gateway_main(["read", "--port", "/dev/null"]) == 2
    assert "--profile is required" in capsys.readouterr().err


def test_cli_sim_refuses_a_bad_clock(capsys):
    from meterlink.sim.cli import main as sim_main
    assert sim_main(["dsmr", "--clock", "bogus:1"]) == 2
    assert "unknown clock spec" in capsys.readouterr().err


def test_help_texts_end_with_an_example():
    for cmd, example in ((["meterlink.sim.cli", "dsmr"], "example: meterlink-sim dsmr --version 5 --interval-s 1 "
                                                         "--bad-crc-every 10 --garbage-bytes 16"),
                         (["meterlink.gateway.cli", "read"], "meterlink-gateway read --dsmr --port /dev/ttyUSB0 "
                                                             "--dsmr-version 5")):
        out = subprocess.run([sys.executable, "-m", *cmd, "--help"], capture_output=True, text=True, timeout=30)
        assert " ".join(out.stdout.split()).endswith(example)


@settings(max_examples=100, deadline=None)
@given(wh=st.tuples(*[st.integers(0, 999_999_999)] * 4), w=st.integers(0, 99_999), gas=st.integers(0, 99_999_999),
       dv=st.tuples(*[st.integers(0, 3000)] * 3), a=st.tuples(*[st.integers(0, 999)] * 3),
       at=st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2098, 12, 31), timezones=st.just(UTC)))
def test_any_dsmr5_snapshot_survives_format_and_parse_exactly(wh, w, gas, dv, a, at):
    at = at.replace(microsecond=0)
    s = Snapshot(at=at, equipment_id="MLS0000000000042", tariff=1, import_wh=wh[:2], export_wh=wh[2:], power_w=w,
                 export_power_w=0, voltage_mv=tuple(v * 100 for v in dv), current_ma=tuple(x * 1000 for x in a),
                 gas_id="MLG0000000000042", gas_dm3=gas, gas_at=at)
    t = parse_telegram(format_telegram(s, "5"), version="5")
    got = {(r.meter_id, r.obis): r.value for r in to_readings(t, received_at=START)}
    assert t.timestamp == at and t.serial == "MLS0000000000042"
    assert [got["MLS0000000000042", o] for o in ("1.8.1", "1.8.2", "2.8.1", "2.8.2")] == list(wh)
    assert got["MLS0000000000042", "1.7.0"] == w and got["MLG0000000000042", "24.2.1"] == gas
    assert [got["MLS0000000000042", o] for o in ("32.7.0", "52.7.0", "72.7.0")] == [v * 100 for v in dv]
    assert [got["MLS0000000000042", o] for o in ("31.7.0", "51.7.0", "71.7.0")] == [x * 1000 for x in a]
