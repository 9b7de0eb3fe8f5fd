"""Independent peers: mbpoll reads our simulator; our gateway reads pymodbus' own server."""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import subprocess
import threading
import time
from decimal import Decimal

import pytest
from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from meterlink.gateway.poller import read_meter
from meterlink.gateway.transport import RtuMaster, TcpMaster

MBPOLL = shutil.which("mbpoll")
needs_mbpoll = pytest.mark.skipif(MBPOLL is None, reason="mbpoll not installed (scripts/bootstrap.sh installs it)")


def mbpoll_floats(args: list[str]) -> dict[int, float]:
    """Run mbpoll once and parse its '[ref]: value' lines (references are 1-based)."""
    out = subprocess.run([MBPOLL, *args], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    return {int(a): float(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(\S+)", out.stdout, re.M)}


def f32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


@needs_mbpoll
def test_mbpoll_reads_the_same_floats_from_our_rtu_simulator_over_a_pty(rtu_bus):
    meter = rtu_bus.meters[2]
    vals = mbpoll_floats(["-m", "rtu", "-b", "9600", "-P", "none", "-a", "2", "-t", "3:float", "-B",
                          "-r", "71", "-c", "3", "-1", rtu_bus.client_path])
    expected = meter.values()
    assert vals[71] == pytest.approx(f32(expected["14.7.0"] / 1000), rel=1e-6)     # 0x0046 frequency, Hz
    assert vals[73] == pytest.approx(f32(expected["1.8.0"] / 1000), rel=1e-6)      # 0x0048 import, kWh
    assert vals[75] == pytest.approx(f32(expected["2.8.0"] / 1000), abs=1e-6)      # 0x004A export, kWh


@needs_mbpoll
def test_mbpoll_reads_the_same_floats_from_our_tcp_simulator(tcp_bus):
    host, port = tcp_bus.address.split(":")
    vals = mbpoll_floats(["-m", "tcp", "-p", port, "-a", "1", "-t", "3:float", "-B", "-r", "1", "-c", "3",
                          "-1", host])
    assert [vals[1], vals[3], vals[5]] == [pytest.approx(f32(v)) for v in (230.1, 229.8, 231.2)]
    energy = mbpoll_floats(["-m", "tcp", "-p", port, "-a", "1", "-t", "3:float", "-B", "-r", "73", "-c", "1",
                            "-1", host])
    assert energy[73] == pytest.approx(f32(tcp_bus.meters[1].values()["1.8.0"] / 1000), rel=1e-6)


def sdm630_registers() -> list[int]:
    """An SDM630 register image built by hand with struct (not with our profile encoder)."""
    regs = [0] * 0x50
    for addr, value in {0x0000: 229.9, 0x0002: 230.4, 0x0004: 231.0, 0x0006: 4.5, 0x0008: 0.25, 0x000A: 7.0,
                        0x0034: 2500.0, 0x0046: 49.98, 0x0048: 31415.92, 0x004A: 12.34}.items():
        hi, lo = struct.unpack(">HH", struct.pack(">f", value))
        regs[addr], regs[addr + 1] = hi, lo
    return regs


EXPECTED = {"32.7.0": 229900, "52.7.0": 230400, "72.7.0": 231000, "31.7.0": 4500, "51.7.0": 250,
            "71.7.0": 7000, "1.7.0": 2500, "14.7.0": 49980, "1.8.0": 31415920, "2.8.0": 12340}


def pymodbus_context() -> ModbusServerContext:
    # pymodbus' sequential block is 1-based internally: block address 1 is protocol address 0.
    device = ModbusDeviceContext(ir=ModbusSequentialDataBlock(1, sdm630_registers()))
    return ModbusServerContext(devices={7: device}, single=False)


def run_in_thread(make_server) -> None:
    ready = threading.Event()

    async def main():
        server = make_server()
        ready.set()
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    assert ready.wait(5)


def wait_for(fn, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_our_gateway_decodes_pymodbus_own_tcp_server(clock, sdm630, unused_tcp_port):
    run_in_thread(lambda: ModbusTcpServer(pymodbus_context(), address=("127.0.0.1", unused_tcp_port)))
    master = TcpMaster("127.0.0.1", unused_tcp_port, timeout=1.0)
    result = wait_for(lambda: read_meter(master, 7, sdm630, "indep", clock))
    master.close()
    assert {r.obis: r.value for r in result.readings} == EXPECTED
    assert result.requests == 2  # merged: one read for 0x0000.., one for 0x0034..0x004B


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_our_gateway_decodes_pymodbus_own_rtu_server_through_a_socat_pty_pair(tmp_path, clock, sdm630):
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"])
    try:
        wait_for(lambda: a.resolve(strict=True) and b.resolve(strict=True))
        run_in_thread(lambda: ModbusSerialServer(pymodbus_context(), port=str(a), baudrate=9600))
        time.sleep(0.3)
        master = RtuMaster(str(b), 9600, timeout=1.0)
        result = wait_for(lambda: read_meter(master, 7, sdm630, "indep", clock))
        master.close()
        assert {r.obis: r.value for r in result.readings} == EXPECTED
    finally:
        socat.terminate()
        socat.wait(5)


@pytest.fixture
def unused_tcp_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_float_registers_become_wh_rounded_to_the_profiles_resolution(sdm630):
    from meterlink.gateway.profiles import decode
    q = sdm630.quantity("1.8.0")
    hi, lo = struct.unpack(">HH", struct.pack(">f", 31415.92))
    exact = Decimal(struct.unpack(">f", struct.pack(">f", 31415.92))[0]) * 1000
    assert decode(q, [hi, lo]) == 31415920 and abs(exact - 31415920) < 10
