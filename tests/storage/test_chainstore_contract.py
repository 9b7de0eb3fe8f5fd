"""The per-gateway chain store (head, hashes, events, keys) behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from storage_records import T0

from meterlink.chain import GENESIS, Event, hash_of, link, prune_run
from meterlink.errors import ConfigError
from meterlink.headend.chainstore import HeadMoved, SqliteChainStore
from meterlink.readings import Reading


@pytest.fixture
def open_chain(backend, repo_url, tmp_path):
    opened = []

    def make():
        if backend == "sqlite":
            store = SqliteChainStore(tmp_path / "headend.db")
        else:
            from meterlink.headend.chainstore_postgres import PostgresChainStore
            store = PostgresChainStore(repo_url)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def bodies(n: int, start: int = 0):
    out = []
    for i in range(start, start + n):
        at = T0 + timedelta(minutes=15 * i)
        out.append(Event("relay_open", "MTR-0001", at, b"\x01") if i % 5 == 4
                   else Reading("MTR-0001", "1.8.0", at, 1000 * i, "Wh"))
    return out


def test_unknown_gateway_has_the_genesis_head(open_chain):
    assert open_chain().head("gw-1") == (0, GENESIS)


def test_commit_advances_the_head_and_keeps_hashes_and_events(open_chain):
    store = open_chain()
    recs = link(bodies(10))
    assert store.commit("gw-1", 0, recs, 7) == 10
    assert store.head("gw-1") == (10, hash_of(recs[-1]))
    assert store.record_hash("gw-1", 3) == hash_of(recs[2]) and store.record_hash("gw-1", 11) is None
    assert [(s, k) for s, k, *_ in store.events("gw-1")] == [(5, "relay_open"), (10, "relay_open")]
    more = link(bodies(5, 10), after_seq=10, after_hash=hash_of(recs[-1]))
    assert store.commit("gw-1", 10, more, 8) == 15


def test_every_record_hash_is_kept_for_a_gap_free_run_and_for_a_batch_with_a_tombstone_jump(open_chain):
    # SQLite stores a gap-free run of hashes in one statement over the joined blob, else row by row
    store = open_chain()
    power = [Reading("MTR-0001", "1.7.0", T0 + timedelta(minutes=i), 100 + i, "W") for i in range(40)]
    recs = link(power)                                                 # instantaneous: prunable
    assert store.commit("gw-1", 0, recs[:20], 7) == 20
    stored = [store.record_hash("gw-1", s) for s in range(1, 21)]
    assert stored == [hash_of(r) for r in recs[:20]] and all(type(h) is bytes for h in stored)
    jumped = recs[20:23] + [prune_run(recs[23:30])] + recs[30:]       # seqs 21, 22, 23, 30, 31, ..., 40
    assert store.commit("gw-1", 20, jumped, 8) == 40
    assert [store.record_hash("gw-1", s) for s in (21, 23, 24, 29, 30, 31, 40)] == \
        [hash_of(recs[20]), hash_of(recs[22]), None, None, hash_of(jumped[3]), hash_of(recs[30]), hash_of(recs[39])]
    assert store.head("gw-1") == (40, hash_of(recs[39]))
    far = link(power[:5], after_seq=3_000_000_000, after_hash=hash_of(recs[39]))   # seqs past int4
    assert store.commit("gw-2", 0, far, 9) == 3_000_000_005
    assert [store.record_hash("gw-2", 3_000_000_000 + i) for i in range(1, 6)] == [hash_of(r) for r in far]


def test_commit_against_a_stale_head_is_refused_and_writes_nothing(open_chain):
    store = open_chain()
    store.commit("gw-1", 0, link(bodies(3)), 1)
    with pytest.raises(HeadMoved, match="gw-1: head moved from 0 to 3"):
        store.commit("gw-1", 0, link(bodies(4)), 2)
    assert store.head("gw-1")[0] == 3 and store.record_hash("gw-1", 4) is None


def test_two_replicas_committing_on_the_same_head_one_wins(open_chain):
    stores, outcomes = [open_chain(), open_chain()], []
    barrier = threading.Barrier(2)

    def commit(store, n):
        barrier.wait()
        try:
            outcomes.append(store.commit("gw-1", 0, link(bodies(n)), 1))
        except HeadMoved:
            outcomes.append("moved")

    threads = [threading.Thread(target=commit, args=(s, n)) for s, n in zip(stores, (6, 9))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes, key=str) == sorted([stores[0].head("gw-1")[0], "moved"], key=str)


def test_trusted_key_is_stored_replaced_and_checked_for_length(open_chain):
    store = open_chain()
    assert store.public_key("gw-1") is None
    store.trust("gw-1", b"\x01" * 32, 1)
    store.trust("gw-1", b"\x02" * 32, 2)
    assert store.public_key("gw-1") == b"\x02" * 32
    with pytest.raises(ConfigError, match="gw-1: an Ed25519 public key is 32 bytes, got 3"):
        store.trust("gw-1", b"abc", 3)


def test_both_chain_stores_offer_the_same_methods_with_the_same_signatures():
    import inspect

    from meterlink.headend.chainstore_postgres import PostgresChainStore

    def api(cls):
        return {n: str(inspect.signature(f)) for n, f in vars(cls).items()
                if callable(f) and not n.startswith("_")}

    assert api(PostgresChainStore) == api(SqliteChainStore)
