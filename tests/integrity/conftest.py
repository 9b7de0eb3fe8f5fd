"""Fixtures for the integrity tests: a real gRPC head-end (in-process) that trusts one gateway key, and
an end-to-end chain check over what the head-end's database holds."""

from __future__ import annotations

import socket
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import ChainRecord, Event, Tombstone, first_break, hash_of, public_bytes
from meterlink.clock import SimClock, from_ms
from meterlink.gateway.sync import load_or_create_key
from meterlink.headend.chainstore import SqliteChainStore
from meterlink.headend.service import make_server
from meterlink.headend.store import SqliteReadingRepository
from meterlink.readings import Reading

START = datetime(2026, 11, 24, tzinfo=timezone.utc)
GW = "gw-int-1"


def readings(n: int, start: datetime = START, meter: str = "M1", first_value: int = 1000) -> list[Reading]:
    """n readings alternating a billing register (1.8.0) and an instantaneous voltage (32.7.0)."""
    out = []
    for i in range(n):
        at = start + timedelta(minutes=15 * (i // 2))
        out.append(Reading(meter, "1.8.0", at, first_value + i, "Wh") if i % 2 == 0
                   else Reading(meter, "32.7.0", at, 230_000 + i, "mV"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Headend:
    """A head-end on real gRPC with its SQLite repository and chain store; can be stopped and restarted."""

    def __init__(self, path: Path, clock, port: int | None = None) -> None:
        self.path, self.clock = path, clock
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> "Headend":
        self.repo = SqliteReadingRepository(self.path)
        self.chain = SqliteChainStore(self.path)
        from meterlink.metrics import HeadendMetrics
        self.metrics = HeadendMetrics.create()
        self.server, port = make_server(self.repo, self.clock, self.addr, chain=self.chain, metrics=self.metrics)
        assert port == self.port
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.repo.close()
            self.chain.close()
            self.server = None

    def trust(self, gateway_id: str, key: Ed25519PrivateKey) -> None:
        self.chain.trust(gateway_id, public_bytes(key), 0)

    def refusals(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("meterlink_headend_refused_batches_total",
                                                      {"reason": reason}) or 0.0


@pytest.fixture
def clock():
    return SimClock(START)


@pytest.fixture
def key(tmp_path):
    return load_or_create_key(tmp_path / "signing.key")


@pytest.fixture
def headend(tmp_path, clock, key):
    he = Headend(tmp_path / "headend.db", clock).start()
    he.trust(GW, key)
    yield he
    he.stop()


def held_chain(db: Path, gateway_id: str) -> list[ChainRecord]:
    """Every record the head-end database holds for a gateway, in seq order, as chain records."""
    con = sqlite3.connect(db)
    try:
        recs = {s: ChainRecord(s, bytes(p), Reading(m, o, from_ms(t), v, u, q)) for s, p, m, o, t, v, u, q in
                con.execute("SELECT seq, prev_hash, meter_id, obis, taken_at_ms, value, unit, quality "
                            "FROM gateway_record WHERE gateway_id=?", (gateway_id,))}
        hashes = dict(con.execute("SELECT seq, hash FROM gateway_chain_hash WHERE gateway_id=?", (gateway_id,)))
        for s, ph, k, m, a, p, h in con.execute("SELECT seq, prev_hash, kind, meter_id, at_ms, payload, "
                                                "record_hash FROM gateway_event WHERE gateway_id=?", (gateway_id,)):
            body = Tombstone(a, bytes(h)) if k == "tombstone" else Event(k, m, from_ms(a), bytes(p))
            recs[s] = ChainRecord(s, bytes(ph), body)
        out = [recs[s] for s in sorted(recs)]
        for r in out:       # readings stored with the chain have no hash row: their hash is the next prev_hash
            assert r.seq in hashes or isinstance(r.body, Reading), f"no stored hash for seq {r.seq}"
            assert bytes(hashes.get(r.seq, hash_of(r))) == hash_of(r), f"stored hash of seq {r.seq} differs"
        return out
    finally:
        con.close()


def assert_chain_verifies(db: Path, gateway_id: str) -> list[ChainRecord]:
    recs = held_chain(db, gateway_id)
    assert first_break(recs) is None, first_break(recs)
    con = sqlite3.connect(db)
    head = con.execute("SELECT head_seq, head_hash FROM gateway_chain_head WHERE gateway_id=?",
                       (gateway_id,)).fetchone()
    con.close()
    if recs:
        assert head[0] == recs[-1].seq and bytes(head[1]) == hash_of(recs[-1])
    return recs
