"""scan / provision / diagnose against the real pty simulator and real configuration files."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace

import pytest

from meterlink.clock import SystemClock
from meterlink.errors import ConfigError, ValidationError
from meterlink.gateway import commissioning as c
from meterlink.gateway.config import load_config
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master

from .conftest import BIN, sim_meters


def test_unit_ranges_parse_and_refuse_out_of_range_units():
    assert c.parse_units("1-3,7, 10-11") == [1, 2, 3, 7, 10, 11]
    assert len(c.parse_units("1-247")) == 247
    for bad in ("0-3", "240-248", "x", "5-2"):
        with pytest.raises(ValidationError):
            c.parse_units(bad)


def test_scan_finds_each_meter_on_the_bus_and_names_its_model(clock, pty_bus):
    bus = pty_bus(sim_meters(clock, {1: "eastron_sdm630", 2: "eastron_sdm120", 4: "eastron_sdm630"}))
    started = time.monotonic()
    out = subprocess.run([str(BIN / "meterlink-gateway"), "scan", "--port", bus.client_path, "--units", "1-6",
                          "--timeout", "0.1", "--json", "--clock", "sim:2026-11-24T00:00:00Z"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 20
    found = {m["unit"]: m for m in json.loads(out.stdout)["meters"]}
    assert sorted(found) == [1, 2, 4]
    assert found[1]["profile"] == "eastron_sdm630" and found[4]["profile"] == "eastron_sdm630"
    assert found[2]["profile"] == "eastron_sdm120"
    assert found[1]["values"]["1.8.0"] == 100_000 and found[4]["values"]["1.8.0"] == 400_000
    assert found[1]["serial"] == bus.meters[1].serial_number


def test_scan_prints_what_it_found_with_a_progress_bar(clock, pty_bus):
    bus = pty_bus(sim_meters(clock, {3: "eastron_sdm630"}))
    out = subprocess.run([str(BIN / "meterlink-gateway"), "scan", "--port", bus.client_path, "--units", "1-4",
                          "--timeout", "0.1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "unit   3  eastron_sdm630" in out.stdout
    assert "4/4" in out.stderr                        # the progress bar counted every probe


def test_scan_with_auto_baud_stops_at_the_first_setting_where_meters_answer(clock, pty_bus):
    bus = pty_bus(sim_meters(clock, {2: "eastron_sdm630"}))
    tried = []

    def open_bus(baud, parity):
        tried.append((baud, parity))
        return open_master(bus.client_path, baud=baud, parity=parity, timeout=0.1)

    found = c.scan(open_bus, [1, 2], c.settings_to_try("auto", "auto"), c.all_profiles(), SystemClock())
    assert [f.unit for f in found] == [2] and found[0].profile == "eastron_sdm630"
    assert tried == [(9600, "N")]                    # a pty answers at any speed: the first one wins
    assert len(c.settings_to_try("auto", "auto")) == len(c.BAUD_RATES) * 3


def test_scan_over_modbus_tcp_finds_the_unit_behind_the_gateway(clock):
    from meterlink.sim.server import TcpServer

    server = TcpServer(sim_meters(clock, {3: "eastron_sdm120"})).start()
    try:
        found = c.scan(lambda b, p: open_master(f"tcp://{server.address}", timeout=0.1), [1, 2, 3],
                       [(9600, "N")], c.all_profiles(), clock)
    finally:
        server.stop()
    assert [(f.unit, f.profile, f.baud) for f in found] == [(3, "eastron_sdm120", None)]


def test_a_silent_bus_is_scanned_quickly_and_reports_nothing(pty_bus, clock):
    bus = pty_bus({})
    started = time.monotonic()
    found = c.scan(lambda b, p: open_master(bus.client_path, baud=b, parity=p, timeout=0.02), list(range(1, 21)),
                   [(9600, "N"), (19200, "N"), (9600, "E")], c.all_profiles(), clock)
    assert found == []
    assert time.monotonic() - started < 10


def test_a_whole_1_to_247_scan_on_a_pty_takes_seconds_and_finds_the_last_unit(pty_bus, clock):
    bus = pty_bus(sim_meters(clock, {247: "eastron_sdm630"}))
    started = time.monotonic()
    found = c.scan(lambda b, p: open_master(bus.client_path, baud=b, parity=p, timeout=0.015),
                   c.parse_units("1-247"), [(9600, "N")], c.all_profiles(), clock)
    assert [(f.unit, f.profile) for f in found] == [(247, "eastron_sdm630")]
    assert time.monotonic() - started < 15


def test_identification_rejects_profiles_whose_values_are_implausible():
    sdm = load_profile("eastron_sdm630")
    ok = c.fit_profile(sdm, {"1.8.0": 1000, "2.8.0": 0, "14.7.0": 50_000, "32.7.0": 230_000}, 0)
    assert ok.ok and ok.nonzero == 3 and ok.zeros == 1
    assert not c.fit_profile(sdm, {"1.8.0": 1000, "2.8.0": 0, "14.7.0": 0}, 0).ok          # 0 Hz
    assert not c.fit_profile(sdm, {"1.8.0": -5, "2.8.0": 0}, 0).ok                         # negative register
    assert not c.fit_profile(sdm, {"14.7.0": 50_000}, 0).ok                               # no billing register
    best = c.rank_profiles([ok, replace(ok, profile="other", nonzero=1)])
    assert best[0] is ok


CONFIG = """\
# gateway for block 7 — keep this comment
[gateway]
id = "gw-7"
database = "{db}"
poll_interval_s = 900

[[bus]]
port = "/dev/ttyUSB0"   # the RS-485 line in the basement
baud = 9600

[[bus.meter]]
id = "MTR-1"
unit = 1
profile = "eastron_sdm630"

[[bus]]
port = "tcp://10.0.0.5:502"

[[bus.meter]]
id = "MTR-TCP"
unit = 1
profile = "eastron_sdm630"
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(db=tmp_path / "gw.db"))
    return path


def test_provision_adds_the_meter_to_its_bus_and_keeps_the_file_as_written(config_file):
    before = config_file.read_text()
    out = subprocess.run([str(BIN / "meterlink-gateway"), "provision", "--config", str(config_file),
                          "--port", "/dev/ttyUSB0", "--unit", "3", "--profile", "eastron_sdm120",
                          "--meter-id", "MTR-3", "--binding-code", "4F7K-22QX"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    after = config_file.read_text()
    assert after.startswith(before.split("[[bus]]\nport = \"tcp")[0])   # everything up to the new meter kept
    assert "# gateway for block 7 — keep this comment" in after and "# the RS-485 line in the basement" in after
    config = load_config(str(config_file))
    rtu = config.buses[0]
    assert [(m.id, m.unit, m.profile.name, m.binding_code) for m in rtu.meters] == [
        ("MTR-1", 1, "eastron_sdm630", None), ("MTR-3", 3, "eastron_sdm120", "4F7K-22QX")]
    assert [m.id for m in config.buses[1].meters] == ["MTR-TCP"]


def test_provision_on_an_unknown_port_adds_a_new_bus(config_file):
    c.provision(str(config_file), port="/dev/ttyUSB1", unit=5, profile="eastron_sdm630", meter_id="MTR-5",
                baud=19200, parity="E")
    config = load_config(str(config_file))
    assert [(b.port, b.baud, b.parity, [m.id for m in b.meters]) for b in config.buses][-1] == \
        ("/dev/ttyUSB1", 19200, "E", ["MTR-5"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(port="/dev/ttyUSB0", unit=2, profile="eastron_sdm630", meter_id="MTR-1"), "already configured"),
    (dict(port="/dev/ttyUSB0", unit=1, profile="eastron_sdm630", meter_id="MTR-9"), "already meter 'MTR-1'"),
    (dict(port="/dev/ttyUSB0", unit=300, profile="eastron_sdm630", meter_id="MTR-9"), "outside 1..247"),
    (dict(port="/dev/ttyUSB0", unit=9, profile="no_such_meter", meter_id="MTR-9"), "unknown meter profile"),
])
def test_provision_refuses_bad_meters_and_leaves_the_file_untouched(config_file, kwargs, message):
    before = config_file.read_text()
    with pytest.raises((ConfigError, ValidationError), match=message):
        c.provision(str(config_file), **kwargs)
    assert config_file.read_text() == before
    assert not list(config_file.parent.glob(".provision-*"))


def test_diagnose_counts_timeouts_crc_errors_and_exceptions_per_meter(clock, pty_bus):
    meters = sim_meters(clock, {1: "eastron_sdm630", 2: "eastron_sdm630", 3: "eastron_sdm630"})
    meters[2].faults.corrupt_crc = True
    meters[3].faults.exception_code = 4
    bus = pty_bus(meters)
    out = subprocess.run([str(BIN / "meterlink-gateway"), "diagnose", "--port", bus.client_path, "--units", "1-4",
                          "--count", "2", "--timeout", "0.3", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    units = {u["unit"]: u for u in json.loads(out.stdout)["units"]}
    n = units[1]["requests"]
    assert n >= 3
    assert (units[1]["ok"], units[1]["error_rate"]) == (n, 0)
    assert units[1]["latency_ms"]["max"] is not None and units[1]["latency_ms"]["min"] >= 0
    assert units[2]["crc_errors"] == n and units[2]["ok"] == 0
    assert units[3]["exceptions"] == n and "exception 4" in units[3]["last_error"]
    assert units[4]["timeouts"] == n and units[4]["error_rate"] == 1 and units[4]["latency_ms"]["max"] is None


def test_diagnose_prints_a_table(clock, pty_bus):
    bus = pty_bus(sim_meters(clock, {1: "eastron_sdm630"}))
    out = subprocess.run([str(BIN / "meterlink-gateway"), "diagnose", "--port", bus.client_path, "--units", "1",
                          "--count", "2", "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "timeouts" in out.stdout and "0.0%" in out.stdout
