"""Group commit in the PAYG store: concurrent transactions share one durable COMMIT, each in its own
savepoint; every caller returns only after that COMMIT; a failing block or a failed COMMIT is handled
per caller; reads outside a transaction never see an uncommitted group. SQLite and PostgreSQL (a
schema per test: tests/payg_headend/conftest.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timezone

import pytest
from paygholds import failing_commit

from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S

T0 = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
N = 6


def committed_kinds(store) -> list[str]:
    """The CRM event kinds another connection sees (committed state only)."""
    if store._db.postgres:
        import psycopg
        with psycopg.connect(store.path, autocommit=True) as con:
            return [r[0] for r in con.execute("SELECT kind FROM payg_event ORDER BY seq").fetchall()]
    con = sqlite3.connect(store.path)
    try:
        return [r[0] for r in con.execute("SELECT kind FROM payg_event ORDER BY seq").fetchall()]
    finally:
        con.close()


def queued_together(store, bodies):
    """Run each body in its own thread inside `store.transaction()`, all queued behind the store's
    lock first so that they form one group; returns per body what it returned or raised, and what
    another connection saw right after that body's call returned."""
    results: list = [None] * len(bodies)
    seen: list = [None] * len(bodies)

    def run(k):
        try:
            with store.transaction() as db:
                results[k] = bodies[k](db)
        except BaseException as exc:             # noqa: BLE001 - the test inspects it
            results[k] = exc
        seen[k] = committed_kinds(store)

    store.GROUP_COMMIT_WINDOW_S = 60             # the group closes by its size here, not by age (slow CI)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(bodies))]
    with store._lock:                            # hold the connection until every thread is queued
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while store._waiting < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert store._waiting == len(bodies)
    for t in threads:
        t.join(10)
    return results, seen


def event(kind):
    def body(db):
        db.execute("INSERT INTO payg_event (at_ms, kind, account_id, payload) VALUES (?, ?, ?, ?)",
                   (0, kind, "ACC1", "{}"))
        return kind
    return body


def test_concurrent_transactions_share_one_commit_and_each_is_durable_when_its_call_returns(store):
    before = store.commits
    results, seen = queued_together(store, [event(f"e{k}") for k in range(N)])
    assert results == [f"e{k}" for k in range(N)]
    assert store.commits - before == 1                       # one durable COMMIT for the group
    assert store.committed_transactions >= N
    for k in range(N):
        assert f"e{k}" in seen[k]                            # committed before the call returned
    assert sorted(committed_kinds(store)) == sorted(f"e{k}" for k in range(N))


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_failing_block_in_a_group_rolls_back_only_its_own_writes(store, position):
    def failing(db):
        event("bad")(db)
        raise RuntimeError("refused by the block")

    bodies = [event("a"), event("b")]
    bodies.insert(position, failing)
    results, _ = queued_together(store, bodies)
    assert [r for r in results if isinstance(r, str)] == ["a", "b"]
    assert isinstance(results[position], RuntimeError) and str(results[position]) == "refused by the block"
    assert sorted(committed_kinds(store)) == ["a", "b"]


def test_a_failed_commit_fails_every_caller_of_the_group_and_stores_nothing(store):
    with failing_commit(store):
        results, _ = queued_together(store, [event(f"e{k}") for k in range(3)])
    for r in results:
        assert isinstance(r, S.StoreCommitError) and "disk is full" in str(r)
    assert committed_kinds(store) == []
    store.record_event(T0, "after", "ACC1", {})              # the store goes on working
    assert committed_kinds(store) == ["after"]


def test_a_read_outside_a_transaction_commits_an_open_group_before_reading(store):
    store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 700, "GBP", store.vat)])
    with store._lock:                                # a group whose members wait for their COMMIT
        store._begin()
        store._db.execute("INSERT INTO payg_event (at_ms, kind, account_id, payload) VALUES (0, 'open', 'ACC1', '{}')")
        store._batch.size = 1
        batch = store._batch
    assert committed_kinds(store) == []
    assert store.balance(L.prepaid("ACC1"), "GBP") == -700     # a read from outside the group ...
    assert batch.done.is_set() and batch.error is None         # ... committed the group first
    assert committed_kinds(store) == ["open"]


def test_nested_transactions_join_the_enclosing_one(store):
    with store.transaction() as db:
        event("outer")(db)
        with store.transaction() as inner:
            event("inner")(inner)
        assert store.events()[-1].kind == "inner"        # a read inside sees its own writes
        assert committed_kinds(store) == []
    assert committed_kinds(store) == ["outer", "inner"]


def test_sqlite_commits_are_durable_with_a_wal_fsync_each(tmp_path):
    st = S.PaygStore(f"sqlite:///{tmp_path}/headend.db")
    try:
        assert st._db.raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st._db.raw.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    finally:
        st.close()


def test_a_lone_failing_transaction_is_rolled_back_whole_and_the_store_goes_on(store):
    before = store.commits
    with pytest.raises(RuntimeError, match="refused"):
        with store.transaction() as db:
            event("bad")(db)
            raise RuntimeError("refused")
    assert store.commits == before and committed_kinds(store) == []
    with store.transaction() as db:
        event("good")(db)
    assert committed_kinds(store) == ["good"]
