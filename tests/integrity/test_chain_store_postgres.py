"""The chain store on PostgreSQL (the production database): the same push, re-send and refusal behaviour over
real gRPC as on SQLite, with the PostgreSQL reading repository beside it."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest

from meterlink.chain import public_bytes
from meterlink.clock import SimClock
from meterlink.gateway.journal import Journal
from meterlink.gateway.sync import to_proto
from meterlink.headend.chainstore import open_chain_store
from meterlink.headend.chainstore_postgres import PostgresChainStore
from meterlink.headend.service import make_server
from meterlink.headend.store import open_repository
from meterlink.v1 import sync_pb2, sync_pb2_grpc

from .conftest import GW, START, readings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: pgserver
from pgserver import PG_UNAVAILABLE, fresh_schema_url  # noqa: E402

pytestmark = pytest.mark.skipif(PG_UNAVAILABLE is not None, reason=str(PG_UNAVAILABLE))


def test_pushes_re_sends_and_replays_behave_the_same_on_postgresql(tmp_path, key):
    url = fresh_schema_url()
    repo = open_repository(url, migrate=True)
    chain = open_chain_store(url)
    assert isinstance(chain, PostgresChainStore)
    chain.trust(GW, public_bytes(key), 0)
    server, port = make_server(repo, SimClock(START), "127.0.0.1:0", chain=chain)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = sync_pb2_grpc.GatewaySyncStub(channel)
    try:
        journal = Journal(tmp_path / "gw.db")
        records = journal.append(readings(12))
        first = stub.Push(to_proto(GW, records[:8], key), timeout=10)
        again = stub.Push(to_proto(GW, records, key), timeout=10)
        assert (first.accepted, first.acked_seq) == (8, 8)
        assert (again.refused, again.accepted, again.duplicates, again.acked_seq) == (0, 4, 8, 12)
        other = Journal(tmp_path / "other.db").append(readings(5, first_value=1))
        replay = stub.Push(to_proto(GW, other, key), timeout=10)
        assert sync_pb2.Refusal.Name(replay.refused) == "REFUSAL_REPLAY" and replay.acked_seq == 12
        assert chain.head(GW)[0] == 12 and len(repo.readings("M1")) == 12
    finally:
        channel.close()
        server.stop(grace=None)
        chain.close()
        repo.close()
