"""A verified batch stored by `commit_with_readings` on the repository's own database (one transaction) keeps
readings, hashes, events and head together on both backends, also when PostgreSQL's pre-encoded COPY
streams fall back to row-by-row encoding; commit hooks see only commits that stored readings."""

from __future__ import annotations

from datetime import timedelta

import pytest
from storage_records import T0

from meterlink.chain import Event, hash_of, link
from meterlink.headend.chainstore import HeadMoved, open_chain_store
from meterlink.headend.store import open_repository
from meterlink.readings import Reading


def _bodies(n: int, start: int = 0):
    out = []
    for i in range(start, start + n):
        at = T0 + timedelta(minutes=15 * i)
        out.append(Event("relay_open", "MTR-W", at, b"\x01") if i % 5 == 4
                   else Reading("MTR-W", "1.8.0", at, 1000 * i, "Wh"))
    return out


@pytest.fixture
def stores(db_url):
    repo = open_repository(db_url, migrate=True)
    chain = open_chain_store(db_url)
    yield repo, chain
    chain.close()
    repo.close()


def test_readings_hashes_events_and_head_commit_together_and_hooks_fire_for_readings_only(stores):
    repo, chain = stores
    fired = []
    repo.commit_hooks.append(lambda gw, res: fired.append((gw, res.accepted)))
    recs = link(_bodies(10))
    assert chain.commit_with_readings(repo, "gw-w", 0, recs, 5, [hash_of(r) for r in recs]) == 10
    assert chain.head("gw-w") == (10, hash_of(recs[-1]))
    assert [r.value for r in repo.readings("MTR-W")] == [1000 * i for i in range(10) if i % 5 != 4]
    assert chain.record_hash("gw-w", 7) == hash_of(recs[6])
    assert [s for s, *_ in chain.events("gw-w")] == [5, 10]
    assert fired == [("gw-w", 8)]
    with pytest.raises(HeadMoved):                  # a stale head: nothing of the batch is stored
        more = link(_bodies(5, 10), after_seq=10, after_hash=hash_of(recs[-1]))
        chain.commit_with_readings(repo, "gw-w", 3, more, 6)
    assert len(repo.readings("MTR-W")) == 8 and chain.head("gw-w")[0] == 10 and fired == [("gw-w", 8)]


def test_postgres_copy_streams_fall_back_to_row_encoding_with_the_same_result(backend, stores):
    if backend != "postgres":
        pytest.skip("PostgreSQL's binary COPY encoders")
    from meterlink.headend.chainstore_postgres import hash_copy_data
    from meterlink.headend.repo_postgres import copy_data
    repo, chain = stores
    recs = link(_bodies(6))
    assert hash_copy_data("gw-x", [("gw-x", 1, memoryview(b"\0" * 32))]) is None      # not bytes: fallback
    assert copy_data("gw-x", [recs[0]], 0, "body") is not None                        # chain records directly
    hashes = [bytearray(hash_of(r)) for r in recs]                                     # not bytes: row-by-row hash COPY
    assert chain.commit_with_readings(repo, "gw-x", 0, recs, 5, hashes) == 6
    assert chain.record_hash("gw-x", 6) == hash_of(recs[-1]) and repo.acked_seq("gw-x") == 4
