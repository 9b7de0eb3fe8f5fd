"""Fixtures: a real head-end (mutual-TLS server with sync, config and the PAYG services; server-TLS
enrolment) on loopback, a PAYG store in the same SQLite file, and enrolled gateways."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink import pki
from meterlink.clock import SimClock
from meterlink.gateway.enrol import enroll
from meterlink.headend import creditcontrol as CC
from meterlink.headend import payg_service
from meterlink.headend import vendors as V
from meterlink.headend.enrolment import SecureHeadend, make_secure_servers
from meterlink.headend.payg_store import PaygStore
from meterlink.headend.registry import GatewayRegistry, open_registry
from meterlink.headend.store import open_repository


@dataclass
class PaygHeadend:
    servers: SecureHeadend
    registry: GatewayRegistry
    store: PaygStore
    keys: pki.HeadendPki
    clock: SimClock
    token_key: Ed25519PrivateKey
    services: payg_service.PaygServices
    tmp_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.servers.port}"

    def vendor_identity(self, vendor_id: str = "SHOP1") -> Path:
        """Vendor `vendor_id`'s key and certificate from the head-end CA (issued once per test)."""
        d = self.tmp_path / f"vendor-{vendor_id}"
        if not (d / "vendor.crt").exists():
            # certificates are checked against the real clock by TLS, whatever the simulated clock says
            payg_service.write_vendor_identity(self.store, self.keys, vendor_id, d, datetime.now(timezone.utc))
        return d

    def vendor_channel(self, vendor_id: str = "SHOP1") -> grpc.Channel:
        """A mutual-TLS channel presenting vendor `vendor_id`'s client certificate (Vending needs one)."""
        return grpc.secure_channel(self.address,
                                   payg_service.vendor_channel_credentials(self.vendor_identity(vendor_id)))

    def enrolled(self, tmp_path: Path, name: str, meters=(), signing_key_path: Path | None = None):
        code = self.registry.add(name, self.clock.now())
        if meters:
            self.registry.provision(name, list(meters), [], self.clock.now())
        return enroll(f"127.0.0.1:{self.servers.enrol_port}", code, tmp_path / name,
                      ca_fingerprint=self.keys.ca_fingerprint, signing_key_path=signing_key_path)


POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))


@pytest.fixture
def payg_headend(tmp_path):
    # TLS checks certificate validity against the real clock: the simulated clock starts now
    clock = SimClock(datetime.now(timezone.utc).replace(microsecond=0))
    db_url = f"sqlite:///{tmp_path / 'headend.db'}"
    repo = open_repository(db_url)
    registry = open_registry(db_url)
    store = PaygStore(db_url)
    store.put_account("ACC1", "GBP", max_balance_minor=100_000)
    store.put_vendor(V.VendorContract("SHOP1", "GBP", Decimal(2), 10, Decimal("0.20"), contract_id="K-1"))
    keys = pki.ensure_headend_pki(tmp_path / "headend-pki", ["localhost", "127.0.0.1"], clock.now())
    servers = make_secure_servers(repo, clock, keys, registry, "127.0.0.1:0", "127.0.0.1:0")
    token_key = Ed25519PrivateKey.generate()
    services = payg_service.add_to_server(servers.server, store, clock, POLICY, token_key=token_key,
                                          registry=registry, auth=servers.auth)
    servers.start()
    yield PaygHeadend(servers, registry, store, keys, clock, token_key, services, tmp_path)
    servers.stop(None)
    store.close()
    registry.close()
    repo.close()
