"""A binding edit (move-out, move-in, back-dated) committed while a `process` run computes does not wait for the
run, and the run does not write rows bound with the bindings it read before the edit: its chunk's write transaction
sees the bindings' generation changed, rolls back and the run derives that chunk again with the new bindings
(headend/billing_store.py `process_readings`). The rows, the pending aggregates and the pending usage end as rating
everything from scratch with the final bindings gives, exactly, and the month reconciles."""

import threading
from dataclasses import replace
from datetime import date

import pytest

import meterlink.headend.billing_store as billing_store
from meterlink.headend.billing import bind_intervals
from meterlink.headend.binding import ServicePoint
from meterlink.headend.billing_store import BillingStore, process_readings, reconcile_period, run_billing
from meterlink.headend.vee import derive_intervals

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc
import test_incremental_rating
from test_incremental_rating import CFG, NOW, ingest, scratch_aggregates

db = test_incremental_rating.db                  # the fixture: a repository and a store, SQLite and PostgreSQL


def _two_meters():
    """M1 at SP1 supplied to A1, M2 at SP2 supplied to A3, both since October."""
    b = gb_bindings(accounts=("A1", "A2", "A3"))
    b = replace(b, service_points={**b.service_points, "SP2": ServicePoint("SP2", "GB")})
    return b.install("M2", "SP2", utc(2026, 10, 1)).move_in("SP1", "A1", utc(2026, 10, 1)) \
        .move_in("SP2", "A3", utc(2026, 10, 1))


def _during_merge(monkeypatch, nth, action):
    """Run `action()` once, while `process` merges the `nth` chunk's derived rows with the stored ones (after it
    read them, before its write transaction)."""
    merge_rows, calls = billing_store.merge_rows, []

    def merging(*args, **kwargs):
        calls.append(True)
        if len(calls) == nth:
            action()
        return merge_rows(*args, **kwargs)
    monkeypatch.setattr(billing_store, "merge_rows", merging)


M1 = hourly_readings("M1", utc(2026, 11, 1), 24 * 10, wh_per_hour=250)
M2 = hourly_readings("M2", utc(2026, 11, 1), 24 * 10, wh_per_hour=333, base=2_000_000)


def _days_1_to_5_rated_and_6_to_10_arrived(repo, store) -> None:
    store.import_bindings(_two_meters(), MARKETS, VAT)
    seq = ingest(repo, M1[:120] + M2[:120])
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)          # days 1-5 rated to A1 and A3
    ingest(repo, M1[120:] + M2[120:], first_seq=seq)


def _edit(other: BillingStore) -> int:
    """The CLI's `bindings end` + `bindings add supply`: A1 moved out of SP1 on Nov 3 and A2 in (back-dated over
    rated and new readings), A3 out of SP2 on Nov 4 12:00 (M2's usage parked from then on)."""
    b = other.bindings()
    b = b.move_out("SP1", utc(2026, 11, 3)).move_in("SP1", "A2", utc(2026, 11, 3))
    return other.apply_bindings(b.move_out("SP2", utc(2026, 11, 4, 12)))


def _as_from_scratch_with_the_final_bindings(repo, store, *, a2_rated_by_the_run: bool) -> None:
    assert process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS).rows_changed == 0
    bindings = store.bindings()
    scratch = {r.key: r.account_id for r in bind_intervals(derive_intervals(M1 + M2, CFG).intervals, bindings)}
    rows = store.rows()
    assert {k: r.account_id for k, r in rows.items()} == scratch
    assert {r.account_id for r in rows.values()} == {"A1", "A2", "A3", None}
    # the edit marked A1, A2 and A3 stale (re-rated from their rows before any bill); an account the run rated after
    # the edit (A2, when the edit came before M1's chunk was written) holds each of its rows once
    states = store.rating_states()
    assert states["A2"][2] != a2_rated_by_the_run
    pending, usage = store.pending_aggregates(), store.pending_usage()
    for account in ("A1", "A2", "A3"):
        if not states[account][2]:
            aggs, use = scratch_aggregates(store, TARIFFS["gb-economy7"], account)
            assert pending[account] == aggs and usage[account] == use, account
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2),
                      now=NOW)
    billed = {b.item.account_id: {u.meter_id: u.wh for u in b.item.usage if u.obis == "1.8.0"} for b in run.bills}
    assert billed == {"A1": {"M1": 250 * 48}, "A2": {"M1": 250 * 192}, "A3": {"M2": 333 * 84}}
    assert sum(r.wh for r in rows.values() if r.account_id is None) == 333 * (240 - 84)     # parked, not lost
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    assert rep.ok, rep.format()


@pytest.mark.parametrize("nth", [1, 2], ids=["first-chunk", "last-chunk"])
def test_a_binding_edit_while_a_run_computes_ends_as_rating_from_scratch_with_the_new_bindings(db, monkeypatch, nth):
    repo, store = db
    _days_1_to_5_rated_and_6_to_10_arrived(repo, store)
    other, edited = BillingStore(store.url), []

    def edit_meanwhile() -> None:                      # in a thread: an edit waiting for the run would hang here
        t = threading.Thread(target=lambda: edited.append(_edit(other)))
        t.start()
        t.join(10)
        assert not t.is_alive(), "the binding edit waited for the rating run"
    monkeypatch.setattr(billing_store, "PROCESS_CHUNK_METERS", 1)       # M1 and M2: one chunk each
    _during_merge(monkeypatch, nth, edit_meanwhile)
    try:
        res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    finally:
        other.close()
    assert edited and edited[0] > 0                    # the edit re-bound the rows stored before it
    assert res.meters == 2 and res.readings > 0
    monkeypatch.undo()
    _as_from_scratch_with_the_final_bindings(repo, store, a2_rated_by_the_run=nth == 1)


def test_a_binding_edit_during_a_chunks_write_waits_for_that_commit_and_re_binds_what_it_wrote(db, monkeypatch):
    """The edit takes the chunk's write lock (PostgreSQL: the rating advisory lock; without it the edit would
    commit beside the chunk, re-binding the rows stored before it but not the chunk's), so it commits after the
    chunk and re-binds its rows; the next chunk, computed before the edit, is derived again."""
    repo, store = db
    _days_1_to_5_rated_and_6_to_10_arrived(repo, store)
    other, edited, waited = BillingStore(store.url), [], []
    insert_new_rows = store.insert_new_rows

    def inserting(rows):                               # inside the first chunk's write transaction
        insert_new_rows(rows)
        if not waited:
            t = threading.Thread(target=lambda: edited.append(_edit(other)))
            t.start()
            t.join(0.3)
            waited.append(t)
            assert t.is_alive(), "the binding edit committed inside a chunk's write transaction"
    monkeypatch.setattr(billing_store, "PROCESS_CHUNK_METERS", 1)
    monkeypatch.setattr(store, "insert_new_rows", inserting)
    try:
        res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
        waited[0].join(10)
    finally:
        other.close()
    assert edited and edited[0] > 0 and res.meters == 2
    monkeypatch.undo()
    _as_from_scratch_with_the_final_bindings(repo, store, a2_rated_by_the_run=False)
