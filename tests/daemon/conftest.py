"""Fixtures for the daemon tests: simulated meters on real ptys, a unix datagram NOTIFY_SOCKET, a real
`meterlink-gateway run` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from meterlink.clock import SystemClock
from meterlink.gateway.profiles import load_profile
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import RtuPtyServer

BIN = Path(sys.executable).parent


@pytest.fixture
def pty_bus():
    """Factory: unit -> Faults|None  =>  a started RTU pty server of SDM630s on the real clock."""
    servers = []

    def start(units: dict, profile: str = "eastron_sdm630") -> RtuPtyServer:
        clock = SystemClock()
        meters = {}
        for u, faults in units.items():
            m = MeterModel.starting_at(load_profile(profile), clock, unit=u, seed=20 + u, import_wh=50_000 * u)
            if faults is not None:
                m.faults = faults
            meters[u] = m
        server = RtuPtyServer(meters).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; collects what the daemon sends."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ml-notify-")      # short path: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []          # (monotonic arrival, datagram)

    def wait_for(self, predicate, timeout: float) -> str | None:
        """Read datagrams until one satisfies `predicate` (returned) or `timeout` seconds pass (None)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                return None
            self.messages.append((time.monotonic(), msg))
            if predicate(msg):
                return msg

    def collect(self, seconds: float) -> list[str]:
        """Every datagram that arrives during the next `seconds`."""
        got: list[str] = []
        self.wait_for(lambda m: got.append(m) and False, seconds)
        return got

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


def bus_toml(port: str, units: list[int], *, timeout_s: float = 0.5, first_id: str = "M") -> str:
    out = f'\n[[bus]]\nport = "{port}"\ntimeout_s = {timeout_s}\n'
    for u in units:
        out += f'\n[[bus.meter]]\nid = "{first_id}-{u}"\nunit = {u}\nprofile = "eastron_sdm630"\n'
    return out


def write_config(tmp: Path, buses: str, *, interval_s: int = 1, extra: str = "", gateway_id: str = "GW-D") -> Path:
    cfg = tmp / "gateway.toml"
    cfg.write_text(f'[gateway]\nid = "{gateway_id}"\ndatabase = "{tmp / "gw.db"}"\npoll_interval_s = {interval_s}\n'
                   f'push_batch = 500\n{extra}{buses}')
    return cfg


def start_gateway(cfg: Path, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`meterlink-gateway run` on the real clock, first poll half a second from now."""
    first = (datetime.now(timezone.utc) + timedelta(milliseconds=500)).isoformat()
    return subprocess.Popen([str(BIN / "meterlink-gateway"), "-v", "run", "--config", str(cfg), "--first-poll", first,
                             *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def stop(proc: subprocess.Popen, kill: bool = False) -> int:
    if proc.poll() is None:
        (proc.kill if kill else proc.terminate)()
    return proc.wait(timeout=20)
