"""Fixtures for enrolment and mutual TLS: a real head-end (mTLS sync + config, server-TLS enrolment) on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from meterlink import pki
from meterlink.clock import SimClock
from meterlink.headend.enrolment import SecureHeadend, make_secure_servers
from meterlink.headend.registry import GatewayRegistry, open_registry
from meterlink.headend.store import open_repository


@dataclass
class Headend:
    servers: SecureHeadend
    registry: GatewayRegistry
    repo: object
    keys: pki.HeadendPki
    clock: SimClock
    db_url: str
    pki_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.servers.port}"

    @property
    def enrol_address(self) -> str:
        return f"127.0.0.1:{self.servers.enrol_port}"


@pytest.fixture
def clock():
    # TLS stacks check certificate validity against the real clock, so the simulated clock starts
    # at the real instant (whole seconds); tests then move it only for head-end decisions (code expiry).
    return SimClock(datetime.now(timezone.utc).replace(microsecond=0))


@pytest.fixture
def headend(tmp_path, clock):
    db_url = f"sqlite:///{tmp_path / 'headend.db'}"
    repo = open_repository(db_url)
    registry = open_registry(db_url)
    keys = pki.ensure_headend_pki(tmp_path / "headend-pki", ["localhost", "127.0.0.1"], clock.now())
    servers = make_secure_servers(repo, clock, keys, registry, "127.0.0.1:0", "127.0.0.1:0").start()
    yield Headend(servers, registry, repo, keys, clock, db_url, tmp_path / "headend-pki")
    servers.stop(None)
    registry.close()
    repo.close()
