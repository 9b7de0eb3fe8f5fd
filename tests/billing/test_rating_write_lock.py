"""`process` reads and computes without the database's write lock and writes in one short transaction at the end
of each chunk (headend/billing_store.py `flush`): pushes commit while a run computes and are rated by the next run,
once; a bill run landing between a run's computing and its write is kept (the run merges and rates again under
the lock from the rows as billed), never overwritten with what the run read before it."""

import threading
from dataclasses import replace
from datetime import date

import meterlink.headend.billing_store as billing_store
from meterlink.headend.billing import bind_intervals
from meterlink.headend.billing_store import BillingStore, process_readings, reconcile_period, run_billing
from meterlink.headend.repo_sqlite import SqliteReadingRepository
from meterlink.headend.store import open_repository, sqlite_path
from meterlink.headend.vee import derive_intervals

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc
import test_incremental_rating
from test_incremental_rating import CFG, NOW, ingest, scratch_aggregates

db = test_incremental_rating.db                  # the fixture: a repository and a store, SQLite and PostgreSQL


def _second_repository(url):
    """Another connection storing pushes, as serve's ingest does beside the rating process; on SQLite with a
    short busy timeout, so a write lock held across a run's computing fails the push instead of delaying it."""
    if url.startswith("postgres"):
        return open_repository(url, migrate=False)
    return SqliteReadingRepository(sqlite_path(url), migrate=False, busy_timeout_s=0.5)


def _during_first_merge(monkeypatch, action):
    """Run `action()` once, while `process` merges its first chunk's derived rows with the stored ones (after
    reading them, before storing anything)."""
    merge_rows, done = billing_store.merge_rows, []

    def merging(*args, **kwargs):
        if not done:
            done.append(True)
            action()
        return merge_rows(*args, **kwargs)
    monkeypatch.setattr(billing_store, "merge_rows", merging)
    return done


def test_pushes_commit_while_a_run_computes_and_the_next_run_rates_them_once(db, monkeypatch):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 10, wh_per_hour=250)
    seq = ingest(repo, readings[:120])
    other = _second_repository(store.url)
    pushed = []
    try:
        _during_first_merge(monkeypatch, lambda: pushed.append(ingest(other, readings[120:], first_seq=seq)))
        first = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    finally:
        other.close()
    assert pushed, "the push did not commit while the run computed"
    assert first.readings == 120                        # the run's snapshot only, not what was pushed meanwhile
    monkeypatch.undo()
    second = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert second.readings == len(readings) - 120 + 2   # the pushed ones, from the second reading before them
    assert process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS).readings == 0
    scratch = bind_intervals(derive_intervals(readings, CFG).intervals, store.bindings())
    assert {r.key: (r.wh, r.estimated) for r in scratch} == {k: (r.wh, r.estimated) for k, r in store.rows().items()}
    aggs, usage = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")      # each interval rated once
    assert store.pending_aggregates()["A1"] == aggs and store.pending_usage()["A1"] == usage


def test_a_bill_run_between_a_runs_computing_and_its_write_stays_billed_and_the_run_rates_the_difference(
        db, monkeypatch):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    whole = hourly_readings("M1", utc(2026, 10, 31, 20), 24 * 31, wh_per_hour=417)
    seq = ingest(repo, [r for i, r in enumerate(whole) if not 30 <= i < 90])    # a gap: estimated intervals
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    late = [replace(r, value=r.value + (i * 37) % 400) for i, r in enumerate(whole[30:90])]   # not the estimate
    ingest(repo, late, first_seq=seq)
    billed = {}

    def bill() -> None:                                # `meterlink-headend bill` does not wait for serve's rating
        other = BillingStore(store.url)
        try:
            run_billing(other, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2),
                        now=NOW)
            billed.update({k: r.billed_wh for k, r in other.rows(end=utc(2026, 12, 1)).items()})
        finally:
            other.close()

    def bill_meanwhile() -> None:                      # in a thread: a run holding the write lock would block it
        t = threading.Thread(target=bill)
        t.start()
        t.join(10)
        assert not t.is_alive(), "the bill run waited for the rating run's lock"
    _during_first_merge(monkeypatch, bill_meanwhile)
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.rows_changed > 0 and billed
    rows = store.rows()
    assert {k: rows[k].billed_wh for k in billed} == billed          # the bill's marks were not written over
    changed = [k for k in billed if rows[k].wh != rows[k].billed_wh]
    assert changed                                     # late readings changed billed intervals: differences pending
    aggs, usage = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")
    assert store.pending_aggregates()["A1"] == aggs and store.pending_usage()["A1"] == usage
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    assert rep.ok, rep.format()
