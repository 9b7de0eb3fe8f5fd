"""Fixtures for gateway operations: simulated meters on a real pty, a real Mosquitto broker."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from meterlink.clock import SimClock
from meterlink.gateway.profiles import load_profile
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import RtuPtyServer

START = datetime(2026, 11, 24, tzinfo=timezone.utc)
BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


@pytest.fixture
def clock():
    return SimClock(START)


def sim_meters(clock, units: dict[int, str]) -> dict[int, MeterModel]:
    """unit -> profile name  =>  unit -> simulated meter (each a different household)."""
    return {u: MeterModel.starting_at(load_profile(p), clock, unit=u, seed=10 + u, import_wh=100_000 * u)
            for u, p in units.items()}


@pytest.fixture
def pty_bus():
    """Factory: start an RTU pty server for the given meters; stopped after the test."""
    servers = []

    def start(meters):
        server = RtuPtyServer(meters).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
