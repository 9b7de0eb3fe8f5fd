"""The SQLite writers' queue (headend/writerqueue.py): ingest and billing-store transactions take turns on an flock
before BEGIN IMMEDIATE; a writer never waits for the queue longer than its busy timeout, after which SQLite's own
lock decides as before (a stuck holder fails a push, never hangs it)."""

import sqlite3
import threading
import time
from datetime import datetime, timezone

import pytest

from meterlink.headend.billing_store import BillingStore
from meterlink.headend.repo_sqlite import SqliteReadingRepository
from meterlink.headend.store import StoredRecord
from meterlink.headend.writerqueue import WriterQueue, writer_queue
from meterlink.readings import Reading

AT = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _batch(gateway, first, n):
    return [StoredRecord(gateway, s, b"\0" * 32, Reading("M1", "1.8.0", AT.replace(minute=s % 60, hour=s // 60),
                                                            1000 + s, "Wh")) for s in range(first, first + n)]


def test_in_memory_databases_have_no_queue():
    assert writer_queue(":memory:") is None


def test_a_push_commits_after_a_rating_transaction_that_held_its_turn(tmp_path):
    path = tmp_path / "h.db"
    repo = SqliteReadingRepository(path)
    store = BillingStore(f"sqlite:///{path}")
    started, held = threading.Event(), threading.Event()
    order = []

    def rating() -> None:
        with store.db.tx():
            started.set()
            held.wait(5)
            order.append("rating")
    t = threading.Thread(target=rating)
    t.start()
    try:
        assert started.wait(5)
        threading.Timer(0.2, held.set).start()
        assert repo.ingest("GW1", _batch("GW1", 1, 3), 0).acked_seq == 3     # waits for its turn, then commits
        order.append("push")
    finally:
        held.set()
        t.join(5)
        store.close()
        repo.close()
    assert order == ["rating", "push"]


def test_a_turn_held_past_the_busy_timeout_is_skipped_and_sqlites_lock_decides(tmp_path):
    path = tmp_path / "h.db"
    repo = SqliteReadingRepository(path, busy_timeout_s=0.3)
    stuck = WriterQueue(str(path))                    # holds the turn, not SQLite's lock (e.g. a stopped process)
    try:
        with stuck.turn():
            t0 = time.monotonic()
            assert repo.ingest("GW1", _batch("GW1", 1, 3), 0).acked_seq == 3
            assert 0.3 <= time.monotonic() - t0 < 5
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")          # ... and with SQLite's lock held too: an error, as before
            try:
                t0 = time.monotonic()
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    repo.ingest("GW1", _batch("GW1", 4, 3), 0)
                assert time.monotonic() - t0 < 5
            finally:
                other.execute("ROLLBACK")
                other.close()
        assert repo.ingest("GW1", _batch("GW1", 4, 3), 0).acked_seq == 6
    finally:
        stuck.close()
        repo.close()
