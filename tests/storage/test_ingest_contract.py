"""The repository contract, run against SQLite and the real PostgreSQL: exactly-once ingest, the ack, queries."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from storage_records import T0, batch, record

from meterlink.errors import ValidationError
from meterlink.headend.store import StoredRecord, open_repository


def test_batch_is_stored_once_and_re_push_is_acknowledged_as_duplicates(repo):
    first = repo.ingest("gw-1", batch("gw-1", 1, 50), received_at_ms=1)
    again = repo.ingest("gw-1", batch("gw-1", 1, 50), received_at_ms=2)
    assert (first.accepted, first.duplicates, first.acked_seq) == (50, 0, 50)
    assert (again.accepted, again.duplicates, again.acked_seq) == (0, 50, 50)
    assert len(repo.readings("MTR-0001")) == 50


def test_partly_overlapping_re_push_stores_only_the_new_records(repo):
    repo.ingest("gw-1", batch("gw-1", 1, 30), 1)
    res = repo.ingest("gw-1", batch("gw-1", 21, 60), 2)
    assert (res.accepted, res.duplicates, res.acked_seq) == (30, 10, 60)
    assert [r.value for r in repo.readings("MTR-0001")] == [1_000 * s for s in range(1, 61)]


def test_a_record_repeated_inside_one_batch_is_stored_once(repo):
    res = repo.ingest("gw-1", batch("gw-1", 1, 3) + [record("gw-1", 2)], 1)
    assert (res.accepted, res.duplicates, res.acked_seq) == (3, 1, 3)


def test_ack_stops_at_the_first_gap_and_jumps_when_the_gap_is_filled(repo):
    assert repo.acked_seq("gw-1") == 0
    assert repo.ingest("gw-1", batch("gw-1", 1, 10), 1).acked_seq == 10
    assert repo.ingest("gw-1", batch("gw-1", 15, 20) + batch("gw-1", 25, 30), 2).acked_seq == 10
    assert repo.gaps("gw-1") == [(11, 14), (21, 24)]
    assert repo.ingest("gw-1", batch("gw-1", 11, 14), 3).acked_seq == 20
    assert repo.gaps("gw-1") == [(21, 24)]
    assert repo.ingest("gw-1", batch("gw-1", 21, 24), 4).acked_seq == 30
    assert repo.gaps("gw-1") == []
    assert repo.acked_seq("gw-1") == 30


def test_ack_is_zero_while_the_first_record_is_missing(repo):
    res = repo.ingest("gw-1", batch("gw-1", 2, 9), 1)
    assert (res.accepted, res.acked_seq) == (8, 0)
    assert repo.gaps("gw-1") == [(1, 1)]


def test_gateways_are_acknowledged_independently(repo):
    repo.ingest("gw-a", batch("gw-a", 1, 5, meter="A"), 1)
    repo.ingest("gw-b", batch("gw-b", 1, 3, meter="B") + batch("gw-b", 5, 6, meter="B"), 1)
    assert (repo.acked_seq("gw-a"), repo.acked_seq("gw-b"), repo.acked_seq("gw-unknown")) == (5, 3, 0)


def test_empty_batch_is_a_no_op_that_reports_the_ack(repo):
    repo.ingest("gw-1", batch("gw-1", 1, 4), 1)
    assert repo.ingest("gw-1", [], 2).acked_seq == 4


def test_batch_with_a_record_of_another_gateway_is_refused_and_nothing_is_stored(repo):
    with pytest.raises(ValidationError, match="seq 2 belongs to gateway 'gw-2'"):
        repo.ingest("gw-1", [record("gw-1", 1), record("gw-2", 2)], 1)
    with pytest.raises(ValidationError, match="seq 0"):
        repo.ingest("gw-1", [record("gw-1", 0)], 1)
    assert repo.meters() == [] and repo.acked_seq("gw-1") == 0


def test_readings_are_ordered_and_filtered_by_register_and_half_open_window(repo):
    recs = [record("gw-1", 1, obis="2.8.0", value=7, minutes=30), record("gw-1", 2, obis="1.8.0", value=100, minutes=30),
            record("gw-1", 3, obis="1.8.0", value=90, minutes=15), record("gw-1", 4, obis="1.8.0", value=120, minutes=45),
            record("gw-1", 5, meter="MTR-0002", value=5, minutes=15)]
    repo.ingest("gw-1", recs, 1)
    got = repo.readings("MTR-0001")
    assert [(r.taken_at - T0, r.obis, r.value) for r in got] == [
        (timedelta(minutes=15), "1.8.0", 90), (timedelta(minutes=30), "1.8.0", 100),
        (timedelta(minutes=30), "2.8.0", 7), (timedelta(minutes=45), "1.8.0", 120)]
    assert [r.value for r in repo.readings("MTR-0001", "1.8.0")] == [90, 100, 120]
    window = repo.readings("MTR-0001", "1.8.0", start=T0 + timedelta(minutes=15), end=T0 + timedelta(minutes=45))
    assert [r.value for r in window] == [90, 100]
    assert got[0].unit == "Wh" and got[0].taken_at.tzinfo is not None
    assert repo.readings("MTR-9999") == []


def test_meters_lists_each_meter_once_in_byte_order(repo):
    repo.ingest("gw-1", [record("gw-1", 1, meter="mtr-b"), record("gw-1", 2, meter="MTR-B"),
                         record("gw-1", 3, meter="MTR-a"), record("gw-1", 4, meter="MTR-a", obis="2.8.0")], 1)
    assert repo.meters() == ["MTR-B", "MTR-a", "mtr-b"]


def test_values_and_quality_survive_the_round_trip_exactly(repo):
    big = 2**62 + 12345
    repo.ingest("gw-1", [record("gw-1", 1, value=big), record("gw-1", 2, value=-5)], 1)
    assert [r.value for r in repo.readings("MTR-0001")] == [big, -5]


def _hammer(url: str, plan: list[list], barrier: threading.Barrier, results: list) -> None:
    r = open_repository(url, migrate=False)
    try:
        barrier.wait()
        for gateway, recs in plan:
            results.append(r.ingest(gateway, recs, 1))
    finally:
        r.close()


def test_same_batches_ingested_concurrently_by_two_replicas_are_stored_once(repo, db_url):
    """Two repositories (two connections, like two head-end replicas) push the same 40 batches at once."""
    batches = [("gw-1", batch("gw-1", 1 + 100 * i, 100 * (i + 1))) for i in range(40)]
    barrier, results = threading.Barrier(2), []
    workers = [threading.Thread(target=_hammer, args=(db_url, plan, barrier, results))
               for plan in (batches, list(batches))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert len(results) == 80
    assert sum(r.accepted for r in results) == 4000
    assert sum(r.duplicates for r in results) == 4000
    assert len(repo.readings("MTR-0001")) == 4000
    assert repo.acked_seq("gw-1") == 4000 and repo.gaps("gw-1") == []


def test_interleaved_batches_from_two_replicas_advance_the_ack_to_the_end(repo, db_url):
    """Replica A gets the odd batches, B the even ones, concurrently: the ack must not be left behind a gap
    that the other replica filled (the per-gateway lock serialises the ack computation)."""
    batches = [("gw-1", batch("gw-1", 1 + 50 * i, 50 * (i + 1))) for i in range(60)]
    barrier, results = threading.Barrier(2), []
    workers = [threading.Thread(target=_hammer, args=(db_url, plan, barrier, results))
               for plan in (batches[0::2], batches[1::2])]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert sum(r.accepted for r in results) == 3000
    assert repo.acked_seq("gw-1") == 3000
    assert max(r.acked_seq for r in results) == 3000


CHILD = """
import sys
from meterlink.headend.store import StoredRecord, open_repository
sys.path.insert(0, {tests!r})
from storage_records import batch
repo = open_repository({url!r}, migrate=False)
print("ready", flush=True)
sys.stdin.readline()
acc = sum(repo.ingest("gw-9", batch("gw-9", 1 + 200 * i, 200 * (i + 1)), 1).accepted for i in range(15))
print(acc, repo.acked_seq("gw-9"), flush=True)
repo.close()
"""


def test_same_batches_from_two_processes_are_stored_once(repo, db_url):
    code = CHILD.format(tests=str(Path(__file__).parent), url=db_url)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:                      # release both at once
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(int(o[0]) for o in outs) == 3000
    assert max(int(o[1]) for o in outs) == 3000
    assert len(repo.readings("MTR-0001")) == 3000


def _waiting_on_locks(url: str) -> int:
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'").fetchone()[0]


def _wait_for(cond, what: str) -> None:
    import time
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_replica_that_waited_for_the_gateway_lock_sees_the_other_replicas_records(backend, repo, db_url):
    """Replica A (seqs 51-100) then replica B (seqs 2-50) queue behind a held gateway lock. A naive design
    (insert, then compute the ack) computes both acks from snapshots that miss the other's rows and leaves
    the ack at 50; locking the gateway first makes every later statement see the previous holder's commit."""
    if backend != "postgres":
        pytest.skip("SQLite serialises whole write transactions with BEGIN IMMEDIATE; there is no interleaving")
    import psycopg
    repo.ingest("gw-1", [record("gw-1", 1)], 1)
    blocker = psycopg.connect(db_url)
    blocker.execute("SELECT 1 FROM gateway_sync WHERE gateway_id = 'gw-1' FOR UPDATE")
    results: list = []
    try:
        a = threading.Thread(target=_hammer, args=(db_url, [("gw-1", batch("gw-1", 51, 100))],
                                                   threading.Barrier(1), results))
        a.start()
        _wait_for(lambda: _waiting_on_locks(db_url) >= 1, "replica A to queue on the gateway lock")
        b = threading.Thread(target=_hammer, args=(db_url, [("gw-1", batch("gw-1", 2, 50))],
                                                   threading.Barrier(1), results))
        b.start()
        _wait_for(lambda: _waiting_on_locks(db_url) >= 2, "replica B to queue on the gateway lock")
    finally:
        blocker.rollback()
        blocker.close()
    a.join(30)
    b.join(30)
    assert sum(r.accepted for r in results) == 99
    assert repo.acked_seq("gw-1") == 100


def test_a_failing_batch_stores_nothing_and_does_not_disturb_concurrent_batches(repo):
    """Eight pushes at once (the gRPC pool), one of them with a record the database refuses (prev_hash NULL):
    that one fails whole, the seven others are stored (SQLite commits them as one group, each in a savepoint)."""
    from storage_records import record as rec

    bad = [rec("gw-bad", 1), StoredRecord("gw-bad", 2, None, rec("gw-bad", 2).reading)]
    plans = [("gw-bad", bad)] + [(f"gw-{i}", batch(f"gw-{i}", 1, 300, meter=f"M{i}")) for i in range(7)]
    barrier, results, errors = threading.Barrier(8), {}, {}

    def push(gateway, recs):
        barrier.wait()
        try:
            results[gateway] = repo.ingest(gateway, recs, 1)
        except Exception as exc:          # noqa: BLE001 - asserted below
            errors[gateway] = exc

    threads = [threading.Thread(target=push, args=p) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert list(errors) == ["gw-bad"] and "null" in str(errors["gw-bad"]).lower()
    assert all(results[f"gw-{i}"].accepted == 300 and results[f"gw-{i}"].acked_seq == 300 for i in range(7))
    assert repo.acked_seq("gw-bad") == 0 and "MTR-0001" not in repo.meters()
    assert len(repo.meters()) == 7


def test_fast_epoch_ms_agrees_with_the_clock_module():
    from datetime import datetime, timezone

    from meterlink.clock import to_ms
    from meterlink.headend.store import epoch_ms

    cet = timezone(timedelta(hours=1))
    for dt in (datetime(2026, 3, 29, 1, 59, 59, 999_999, tzinfo=timezone.utc), datetime(1969, 12, 31, 23, 59, 59, 999_500,
               tzinfo=timezone.utc), datetime(2026, 11, 1, 0, 0, 0, 1_000, tzinfo=cet), T0):
        assert epoch_ms(dt) == to_ms(dt)


def test_filling_a_gap_moves_the_ack_over_more_rows_than_one_ack_step(repo):
    from meterlink.headend.store import ACK_WINDOW

    last = 2 * ACK_WINDOW + 10
    assert repo.ingest("gw-1", batch("gw-1", 2, last), 1).acked_seq == 0
    assert repo.ingest("gw-1", [record("gw-1", 1)], 2).acked_seq == last
