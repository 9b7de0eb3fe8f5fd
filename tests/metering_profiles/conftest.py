"""Fixtures for metering: simulated meters of every profile on a real pty, a SimClock, a master."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone

import pytest

from meterlink.clock import SimClock
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import RtuMaster
from meterlink.sim.meter import Faults, MeterModel
from meterlink.sim.server import RtuPtyServer

START = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)


@pytest.fixture
def clock():
    return SimClock(START)


@contextmanager
def pty_bus(clock, profile_name: str, units=(1,), *, faults: dict[int, Faults] | None = None,
            variant: str | None = None, timeout: float = 0.3):
    """One simulated bus on a real pty and an RtuMaster on its other end."""
    profile = load_profile(profile_name)
    meters = {}
    for i, u in enumerate(units):
        m = MeterModel.starting_at(profile, clock, unit=u, seed=10 + i, import_wh=1_234_567 + 1000 * i)
        if variant:
            m.variant = profile.variant(variant)
        if faults and u in faults:
            m.faults = faults[u]
        meters[u] = m
    server = RtuPtyServer(meters).start()
    master = RtuMaster(server.client_path, 9600, timeout=timeout)
    try:
        yield server, master, profile
    finally:
        master.close()
        server.stop()
