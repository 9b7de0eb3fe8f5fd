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


def _hash_row_seqs(repo, gateway_id: str) -> list[int]:
    sql = f"SELECT seq FROM gateway_chain_hash WHERE gateway_id = '{gateway_id}' ORDER BY seq"
    if hasattr(repo, "_pool"):
        with repo._pool.connection() as conn:
            return [s for (s,) in conn.execute(sql)]
    return [s for (s,) in repo._db.execute(sql)]


def test_readings_stored_with_the_chain_need_no_hash_row_and_every_held_hash_is_still_answered(stores):
    """Readings committed with the chain keep their hash only as the next record's prev_hash (or the head):
    `record_hash` answers every held seq all the same, across events, a tombstone run and batch boundaries,
    for records and for column batches; hash rows are written for events and tombstones only."""
    from meterlink.chain import ChainRecord, Tombstone, decode_wire_columns, wire_bytes
    repo, chain = stores
    recs = link(_bodies(40))                          # events at seqs 5, 10, 15, ...
    pruned = ChainRecord(24, recs[20].prev_hash, Tombstone(21, hash_of(recs[23])))   # 21..24 pruned unsent
    sent = recs[:20] + [pruned] + recs[24:30]
    hashes = [hash_of(r) for r in sent]
    assert chain.commit_with_readings(repo, "gw-h", 0, sent[:12], 5, hashes[:12]) == 12
    assert chain.commit_with_readings(repo, "gw-h", 12, sent[12:], 6, hashes[12:]) == 30
    cols = decode_wire_columns([wire_bytes(r) for r in recs[30:34]])                # seqs 31..34, readings
    assert cols is not None
    assert chain.commit_with_readings(repo, "gw-h", 30, cols, 7, cols.hashes) == 34
    for seq in range(1, 35):
        assert chain.record_hash("gw-h", seq) == (None if 21 <= seq <= 23 else hash_of(recs[seq - 1])), seq
    assert chain.record_hash("gw-h", 35) is None and chain.record_hash("gw-h", 0) is None
    assert chain.record_hash("gw-none", 1) is None
    assert _hash_row_seqs(repo, "gw-h") == [5, 10, 15, 20, 24, 25, 30]          # events and the tombstone
    assert len(repo.readings("MTR-W")) == 16 + 4 + 4


def test_postgres_copy_stream_from_columns_is_the_one_from_records():
    """`copy_columns` (a column batch, several layouts, optionally only some rows) encodes exactly the bytes
    `copy_data` encodes for the same verified records; a prev_hash that is not 32 bytes is left to the
    row-by-row path."""
    from meterlink.chain import decode_wire_columns, wire_bytes
    from meterlink.headend.repo_postgres import copy_columns, copy_data
    regs = [("1.8.0", "Wh"), ("32.7.0", "mV"), ("1.7.0", "W")]
    recs = link(Reading(f"MTR-{i % 2:02d}", regs[i % 3][0], T0 + timedelta(minutes=15 * (i // 6)),
                        7 * i - 2, regs[i % 3][1], i % 5) for i in range(30))
    cols = decode_wire_columns([wire_bytes(r) for r in recs])
    assert cols is not None
    assert copy_columns("gw-c", cols, 99) == copy_data("gw-c", recs, 99, "body")
    keep = {0, 3, 4, 17, 29}
    assert copy_columns("gw-c", cols, 99, keep) == copy_data("gw-c", [recs[i] for i in sorted(keep)], 99, "body")
    cols.prevs[5] = b"short"
    assert copy_columns("gw-c", cols, 99) is None
