"""An exception resolved (released) while a `process` run is under way is not lost: the resolve raises the
meter's full-derivation flag, and the run, which read the flag and the resolutions before, clears only the flag
generation it read (headend/billing_store.py `process_readings`, `full_done`; migration 0007). The next run derives
the meter whole with the resolution, the released readings are rated, billed once and the month reconciles, and
the pending aggregates equal rating the rows from scratch. SQLite and PostgreSQL (the `db` fixture)."""

import threading
from dataclasses import replace
from datetime import date

import meterlink.headend.billing_store as billing_store
from meterlink.headend.billing_store import BillingStore, process_readings, reconcile_period, run_billing
from meterlink.headend.vee import derive_intervals

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc
import test_incremental_rating
from test_incremental_rating import CFG, NOW, ingest, scratch_aggregates

db = test_incremental_rating.db                  # the fixture: a repository and a store, SQLite and PostgreSQL


def _m1_with_decreases(at: tuple[int, ...]):
    """Three days of M1 (250 Wh an hour) whose register goes back 2 kWh at each hour index in `at`."""
    readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 3, wh_per_hour=250)
    for i in at:
        readings[i] = replace(readings[i], value=readings[i].value - 2_000)
    return readings


def _processed_with_exceptions(repo, store, readings, kinds: int) -> list:
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    ingest(repo, readings)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    opened = store.exceptions(status="open")
    assert len(opened) == kinds and all(e.meter_id == "M1" for e in opened)
    assert any(r.held for r in store.rows().values())
    return opened


def _resolve_in_another_session(store, exception_id: int) -> None:
    """`exceptions resolve ID --release` from another connection, in a thread (it must not wait for the run)."""
    other, done = BillingStore(store.url), []
    try:
        t = threading.Thread(target=lambda: done.append(
            other.resolve_exception(exception_id, "release", "meter tested, reads accepted", NOW)))
        t.start()
        t.join(10)
        assert not t.is_alive(), "resolving the exception waited for the rating run"
    finally:
        other.close()
    assert done and done[0].released


def _rated_billed_and_reconciled_as_from_scratch(repo, store, readings) -> None:
    """Nothing held; every interval (as deriving the readings from scratch gives them) pending on A1 and rated as
    rating the rows from scratch; the bill carries the whole register difference; the month reconciles."""
    total = readings[-1].value - readings[0].value
    rows = store.rows()
    assert not [k for k, r in rows.items() if r.held], "released readings still held"
    assert {k: r.wh for k, r in rows.items()} == \
        {(i.meter_id, i.obis, i.start): i.wh for i in derive_intervals(readings, CFG).intervals}
    assert sum(store.pending_usage()["A1"].values()) == total == 250 * 72
    aggs, _ = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")
    assert store.pending_aggregates()["A1"] == aggs
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2),
                      now=NOW)
    assert [sum(u.wh for u in item.usage) for item in run.items] == [total]
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
    assert rep.ok and rep.lines[0].held_wh == 0 and rep.lines[0].billed_wh == total, rep.format()


def test_an_exception_released_while_a_run_computes_is_rated_by_the_next_run(db, monkeypatch):
    """Two decreases on M1; the first released before the run (M1 flagged), the second released while the run
    merges M1's rows, after it read the flag and the resolutions: the run releases the first only and must leave
    the flag set (it used to delete it: the second's readings stayed held, never rated)."""
    repo, store = db
    readings = _m1_with_decreases((10, 40))
    first, second = _processed_with_exceptions(repo, store, readings, 2)
    store.resolve_exception(first.id, "release", "meter tested", NOW)
    assert set(store.full_meters()) == {"M1"}

    merge_rows, calls = billing_store.merge_rows, []

    def merging(*args, **kwargs):                      # the run computes M1's chunk, before its write transaction
        calls.append(True)
        if len(calls) == 1:
            _resolve_in_another_session(store, second.id)
        return merge_rows(*args, **kwargs)
    monkeypatch.setattr(billing_store, "merge_rows", merging)
    assert process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS).meters == 1
    monkeypatch.undo()
    assert calls, "the run did not derive M1"
    assert set(store.full_meters()) == {"M1"}, "the run cleared the flag the resolve raised after it read it"
    assert any(r.held for r in store.rows().values())  # the second's readings: not released by that run

    assert process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS).meters == 1     # derives M1 whole again
    assert store.full_meters() == {}
    _rated_billed_and_reconciled_as_from_scratch(repo, store, readings)


def test_an_exception_released_while_a_run_reads_its_work_is_rated_by_the_next_run(db, monkeypatch):
    """The resolve commits right after the run read the resolved exceptions (without it): the run must not clear
    the flag it raised (reading the flags after the resolutions, it derived M1 whole without releasing, then
    cleared the flag)."""
    repo, store = db
    readings = _m1_with_decreases((30,))
    (exc,) = _processed_with_exceptions(repo, store, readings, 1)
    exceptions, calls = store.exceptions, []

    def listing(*args, **kwargs):
        got = exceptions(*args, **kwargs)
        if kwargs.get("status") == "resolved" and not calls:
            calls.append(True)
            assert not [e for e in got if e.id == exc.id]
            _resolve_in_another_session(store, exc.id)
        return got
    monkeypatch.setattr(store, "exceptions", listing)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    monkeypatch.undo()
    assert calls
    assert set(store.full_meters()) == {"M1"}, "the run cleared the flag the resolve raised after it read it"

    assert process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS).meters == 1
    assert store.full_meters() == {}
    _rated_billed_and_reconciled_as_from_scratch(repo, store, readings)
