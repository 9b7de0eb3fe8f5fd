"""Fixtures for the walking skeleton: simulated meters on a real pty and TCP, a real gRPC head-end."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from meterlink.chain import public_bytes
from meterlink.clock import SimClock
from meterlink.gateway.sync import load_or_create_key
from meterlink.gateway.profiles import load_profile
from meterlink.headend.service import make_server
from meterlink.headend.store import SqliteReadingRepository
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import RtuPtyServer, TcpServer

START = datetime(2026, 11, 24, tzinfo=timezone.utc)


@pytest.fixture
def clock():
    return SimClock(START)


@pytest.fixture
def sdm630():
    return load_profile("eastron_sdm630")


@pytest.fixture
def rtu_bus(clock, sdm630):
    meters = {1: MeterModel.starting_at(sdm630, clock, unit=1, seed=5, import_wh=1_234_560),
              2: MeterModel.starting_at(sdm630, clock, unit=2, seed=6, import_wh=42_000, scale_pct=140)}
    server = RtuPtyServer(meters).start()
    yield server
    server.stop()


@pytest.fixture
def tcp_bus(clock, sdm630):
    meters = {1: MeterModel.starting_at(sdm630, clock, unit=1, seed=7, import_wh=500_000)}
    server = TcpServer(meters).start()
    yield server
    server.stop()


@pytest.fixture
def gateway_key(tmp_path):
    """The gateway's Ed25519 key where the daemon looks for it (signing.key beside gw.db)."""
    return load_or_create_key(tmp_path / "signing.key")


@pytest.fixture
def headend(tmp_path, clock, gateway_key):
    repo = SqliteReadingRepository(tmp_path / "headend.db")
    server, port = make_server(repo, clock, "127.0.0.1:0")
    for gw in ("gw-1", "gw-test"):  # the head-end knows these gateways' public keys
        server.sync_service.chain.trust(gw, public_bytes(gateway_key), 0)
    server.start()
    yield repo, f"127.0.0.1:{port}"
    server.stop(grace=None)
    repo.close()
