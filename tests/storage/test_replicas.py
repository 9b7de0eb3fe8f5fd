"""Two head-end replicas (two gRPC servers, each with its own repository and chain store) sharing one database:
a gateway's signed batches, sent to both at the same moment, are stored exactly once and the chain stays whole."""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import pytest
from storage_records import T0

from meterlink.chain import Event
from meterlink.clock import SimClock
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import load_or_create_key, to_proto
from meterlink.headend.service import make_server
from meterlink.headend.store import open_repository
from meterlink.readings import Reading
from meterlink.chain import public_bytes
from meterlink.v1 import sync_pb2_grpc

GW = "gw-replicas"


def _chain_store(backend: str, url: str):
    if backend == "sqlite":
        from meterlink.headend.chainstore import SqliteChainStore
        return SqliteChainStore(url[len("sqlite:///"):])
    from meterlink.headend.chainstore_postgres import PostgresChainStore
    return PostgresChainStore(url)


@pytest.fixture
def replicas(backend, db_url):
    clock = SimClock(T0)
    opened, servers = [], []
    for _ in range(2):
        repo, chain = open_repository(db_url), _chain_store(backend, db_url)
        server, port = make_server(repo, clock, "127.0.0.1:0", chain=chain)
        server.start()
        opened += [repo, chain]
        servers.append((server, f"127.0.0.1:{port}", repo, chain))
    yield servers
    for server, *_ in servers:
        server.stop(grace=None).wait()
    for o in opened:
        o.close()


def _bodies(n: int, start: int):
    out = []
    for i in range(start, start + n):
        at = T0 + timedelta(minutes=15 * i)
        out.append(Event("relay.closed", "MTR-R", at, b"") if i % 50 == 49
                   else Reading("MTR-R", "1.8.0", at, 10_000 + 100 * i, "Wh"))
    return out


def test_same_signed_batches_sent_to_two_replicas_at_once_are_stored_once(replicas, tmp_path):
    key = load_or_create_key(tmp_path / "gw.key")
    replicas[0][3].trust(GW, public_bytes(key), 0)
    journal = Journal(tmp_path / "gw.db")
    stubs = [sync_pb2_grpc.GatewaySyncStub(grpc.insecure_channel(addr)) for _, addr, *_ in replicas]
    total = 0
    for round_ in range(6):
        recs = journal.append(_bodies(200, total))
        total += 200
        request = to_proto(GW, recs, key)
        acks, barrier = [None, None], threading.Barrier(2)

        def send(i):
            barrier.wait()
            acks[i] = stubs[i].Push(request, timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [a.refused for a in acks] == [0, 0], [a.detail for a in acks]
        assert [a.acked_seq for a in acks] == [total, total]
        assert sum(a.accepted for a in acks) == 200 and sum(a.duplicates for a in acks) == 200
    repo, chain = replicas[1][2], replicas[1][3]
    readings = repo.readings("MTR-R")
    assert len(readings) == total - total // 50                 # every reading once; events are the chain's
    assert len({r.taken_at for r in readings}) == len(readings)
    assert chain.head(GW)[0] == total
    assert [s for s, *_ in chain.events(GW)] == list(range(50, total + 1, 50))
    assert all(chain.record_hash(GW, s) is not None for s in (1, total // 2, total))
