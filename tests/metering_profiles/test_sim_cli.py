"""`meterlink-sim modbus-rtu --profile P` serves every shipped profile, with faults from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meterlink import modbus
from meterlink.clock import SimClock
from meterlink.gateway.poller import read_meter
from meterlink.gateway.profiles import known_profiles, load_profile
from meterlink.gateway.transport import RtuMaster

from .conftest import START


def start_sim(*args):
    proc = subprocess.Popen([sys.executable, "-m", "meterlink.sim.cli", "modbus-rtu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    if not path:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc, path


def stop(proc):
    proc.terminate()
    proc.wait(5)


@pytest.mark.parametrize("name", known_profiles())
def test_the_simulator_cli_serves_every_profile_to_the_gateway(name):
    proc, path = start_sim("--profile", name, "--unit", "3", "--clock", "sim:2026-11-24T12:00:00Z")
    try:
        master = RtuMaster(path, 9600, timeout=1.0)
        profile = load_profile(name)
        result = read_meter(master, 3, profile, "m", SimClock(START), with_serial=True)
        master.close()
        assert {r.obis for r in result.readings} == {q.obis for q in profile.quantities}
        assert (result.serial is not None) == (profile.serial is not None)
    finally:
        stop(proc)


def test_the_simulator_cli_injects_a_variant_and_faults_per_unit():
    proc, path = start_sim("--profile", "carlo_gavazzi_em24", "--unit", "1", "--unit", "2",
                           "--variant", "import-only", "--fault-unit", "2", "--fault-exception", "4")
    try:
        master = RtuMaster(path, 9600, timeout=1.0)
        result = read_meter(master, 1, load_profile("carlo_gavazzi_em24"), "m", SimClock(START))
        assert "2.8.0" not in {r.obis for r in result.readings} and 0x5C in result.refused
        with pytest.raises(modbus.ModbusException) as err:
            master.execute(modbus.read_request(2, 4, 0x3E, 2))
        assert err.value.code == 4
        master.close()
    finally:
        stop(proc)
