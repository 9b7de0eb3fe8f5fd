"""Enrolment latency and push throughput over mutual TLS vs plaintext, on loopback, in one process.

Run: .venv/bin/python bench/bench_mtls.py [--records 50000] [--batch 5000]
Prints: time to enrol one gateway (keys, CSR, CA pinning handshake, Enroll), and records/s for
draining a journal to the head-end over plaintext gRPC and over mutual TLS with the registry's
per-call authorisation (the ratio is the cost of TLS + authorisation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meterlink import pki
from meterlink.clock import SimClock
from meterlink.gateway.enrol import channel_credentials, enroll
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import Pusher
from meterlink.headend.enrolment import make_secure_servers
from meterlink.headend.registry import open_registry
from meterlink.headend.service import make_server
from meterlink.headend.store import open_repository
from meterlink.readings import Reading


def journal_with(path: Path, n: int, meters: list[str], start: datetime) -> Journal:
    journal = Journal(path)
    per = n // len(meters)
    journal.append([Reading(m, "1.8.0", start + timedelta(minutes=15 * i), 1000 + i, "Wh", 0)
                    for i in range(per) for m in meters])
    return journal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args(argv)
    clock = SimClock(datetime.now(timezone.utc).replace(microsecond=0))
    meters = [f"MTR-{i:04d}" for i in range(50)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # plaintext baseline
        repo = open_repository(f"sqlite:///{tmp / 'plain.db'}")
        server, port = make_server(repo, clock, "127.0.0.1:0")
        server.start()
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        key = Ed25519PrivateKey.generate()
        server.sync_service.chain.trust("gw-plain", pki.raw_public_key(key), 0)
        journal = journal_with(tmp / "gw-plain.db", args.records, meters, clock.now())
        pusher = Pusher("gw-plain", f"127.0.0.1:{port}", journal, batch=args.batch, key=key)
        t0 = time.perf_counter()
        sent = pusher.drain()
        plain_s = time.perf_counter() - t0
        pusher.close()
        server.stop(None)
        repo.close()

        # mutual TLS with enrolment and per-call authorisation
        url = f"sqlite:///{tmp / 'tls.db'}"
        repo, registry = open_repository(url), open_registry(url)
        keys = pki.ensure_headend_pki(tmp / "pki", ["127.0.0.1"], clock.now())
        servers = make_secure_servers(repo, clock, keys, registry, "127.0.0.1:0", "127.0.0.1:0").start()
        code = registry.add("gw-tls", clock.now())
        registry.provision("gw-tls", meters, [], clock.now())
        t0 = time.perf_counter()
        identity = enroll(f"127.0.0.1:{servers.enrol_port}", code, tmp / "gw-pki", ca_fingerprint=keys.ca_fingerprint)
        enrol_s = time.perf_counter() - t0
        journal = journal_with(tmp / "gw-tls.db", args.records, meters, clock.now())
        pusher = Pusher("gw-tls", f"127.0.0.1:{servers.port}", journal, batch=args.batch, key=identity.signing_key,
                        credentials=channel_credentials(identity))
        t0 = time.perf_counter()
        sent_tls = pusher.drain()
        tls_s = time.perf_counter() - t0
        pusher.close()
        servers.stop(None)
        registry.close()
        repo.close()
    print(f"enrolment (keys, CSR, pinned CA handshake, Enroll): {enrol_s * 1000:.0f} ms")
    print(f"plaintext push: {sent} records in {plain_s:.2f} s = {sent / plain_s:,.0f} records/s (batch {args.batch})")
    print(f"mutual TLS push + authorisation: {sent_tls} records in {tls_s:.2f} s = {sent_tls / tls_s:,.0f} records/s")
    print(f"mTLS / plaintext throughput: {(sent_tls / tls_s) / (sent / plain_s):.2f}")
    return 0 if sent == sent_tls == args.records // len(meters) * len(meters) else 1


if __name__ == "__main__":
    sys.exit(main())
