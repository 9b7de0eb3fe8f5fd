"""The billing shell on a real SQLite database: ingest -> process -> bill -> reconcile, exceptions, binding edits."""

from dataclasses import replace
from datetime import date

import pytest

from meterlink.errors import ValidationError
from meterlink.headend.billing_store import BillingStore, process_readings, reconcile_period, run_billing
from meterlink.headend.store import StoredRecord, open_repository
from meterlink.headend.ubl import check_en16931

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc

NOW = utc(2026, 12, 2, 6)


def ingest(repo, readings, gateway="GW1", first_seq=1):
    recs = [StoredRecord(gateway, first_seq + i, b"\0" * 32, r) for i, r in enumerate(readings)]
    repo.ingest(gateway, recs, 0)
    return first_seq + len(recs)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/headend.db"
    else:
        from pgserver import PG_UNAVAILABLE, fresh_schema_url
        if PG_UNAVAILABLE:
            pytest.skip(PG_UNAVAILABLE)
        url = fresh_schema_url()
    repo = open_repository(url, migrate=True)
    store = BillingStore(url)
    yield repo, store
    store.close()
    repo.close()


def test_month_is_billed_once_and_reconciles_to_the_wh(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    ingest(repo, hourly_readings("M1", utc(2026, 10, 31, 22), 24 * 31, wh_per_hour=333))
    res = process_readings(repo, store, MARKETS, NOW)
    assert res.rows_changed > 0 and res.exceptions_queued == 0
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    assert [i.account_id for i in run.items] == ["A1"]
    # GB is on UTC in November: 30 days x 24 h x 333 Wh in the period
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    (line,) = rep.lines
    assert rep.ok, rep.format()
    assert line.register_wh == line.billed_wh == 30 * 24 * 333
    # a second bill run for the same period bills nothing twice
    again = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    assert again.items == () and again.skipped == ("A1",)
    (seq, inv_id, doc, xml), = store.invoices()
    assert inv_id == "INV-2026-11-A1" and check_en16931(xml) == []


def test_unprocessed_readings_make_reconcile_fail_until_processed(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    seq = ingest(repo, hourly_readings("M1", utc(2026, 11, 1), 24 * 10))
    process_readings(repo, store, MARKETS, NOW)
    ingest(repo, hourly_readings("M1", utc(2026, 11, 11), 24, base=1_000_000 + 240 * 500)[1:], first_seq=seq)
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    assert not rep.ok and "not processed" in rep.format()
    process_readings(repo, store, MARKETS, NOW)
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    assert rep.ok and rep.lines[0].pending_wh + rep.lines[0].estimated_pending_wh == 11 * 24 * 500


def test_parked_usage_is_reported_then_billed_after_a_back_dated_move_in(db):
    repo, store = db
    b = gb_bindings().move_in("SP1", "A1", utc(2026, 11, 15))
    store.import_bindings(b, MARKETS, VAT)
    ingest(repo, hourly_readings("M1", utc(2026, 11, 1), 24 * 30))
    process_readings(repo, store, MARKETS, NOW)
    run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
    assert rep.parked == (("M1", "1.8.0", 14 * 24 * 500),) and not rep.ok      # strict: parked usage fails
    assert reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB").ok
    # back-date: the customer really moved in on the 1st
    b2 = store.bindings()
    b2 = b2.move_in("SP1", "A1", utc(2026, 11, 1), utc(2026, 11, 15))
    assert store.apply_bindings(b2) == 14 * 48         # GB grid: 30 min
    run_billing(store, "2026-12", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2027, 1, 2), now=NOW)
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
    assert rep.ok, rep.format()
    assert rep.lines[0].billed_wh == 30 * 24 * 500


def test_binding_edit_over_billed_usage_is_refused(db):
    repo, store = db
    b = gb_bindings(accounts=("A1", "A2")).move_in("SP1", "A1", utc(2026, 11, 1))
    store.import_bindings(b, MARKETS, VAT)
    ingest(repo, hourly_readings("M1", utc(2026, 11, 1), 24 * 3))
    process_readings(repo, store, MARKETS, NOW)
    run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    moved = store.bindings().move_out("SP1", utc(2026, 11, 2)).move_in("SP1", "A2", utc(2026, 11, 2))
    with pytest.raises(ValidationError, match="billed to A1"):
        store.apply_bindings(moved)
    assert store.bindings().account_at("M1", utc(2026, 11, 2, 5)) == "A1"     # nothing changed


def test_register_decrease_is_queued_held_and_released_by_the_operator(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    readings = hourly_readings("M1", utc(2026, 11, 1), 24)
    readings[10] = replace(readings[10], value=readings[10].value - 2_000)
    ingest(repo, readings)
    res = process_readings(repo, store, MARKETS, NOW)
    assert res.exceptions_queued == 1
    assert [e.kind for e in store.exceptions(status="open")] == ["decrease"]
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    assert rep.ok and rep.lines[0].held_wh != 0 and rep.open_exceptions
    assert not reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True).ok
    for e in store.exceptions(status="open"):
        store.resolve_exception(e.id, "release", "meter tested, reads accepted", NOW)
    with pytest.raises(ValidationError, match="already resolved"):
        store.resolve_exception(e.id, "release", "again", NOW)
    process_readings(repo, store, MARKETS, NOW)
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
    assert rep.ok and rep.lines[0].held_wh == 0, rep.format()


def test_a_second_bill_run_that_lost_the_race_stores_nothing_and_says_so(db):
    from meterlink.headend.billing import bill_run
    repo, store = db
    b = gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1))
    store.import_bindings(b, MARKETS, VAT)
    ingest(repo, hourly_readings("M1", utc(2026, 11, 1), 24))
    process_readings(repo, store, MARKETS, NOW)
    # two replicas compute the same run from the same state; the first stores it
    runs = [bill_run("2026-11", bindings=store.bindings(), markets=MARKETS, tariffs=TARIFFS, vat=VAT,
                     rows=store.rows().values()) for _ in range(2)]
    store.store_bill_run(runs[0], store.bindings(), MARKETS, date(2026, 12, 2), NOW)
    with pytest.raises(ValidationError, match="another bill run stored an item"):
        store.store_bill_run(runs[1], store.bindings(), MARKETS, date(2026, 12, 2), NOW)
    assert len(store.items()) == 1 and len(store.invoices()) == 1
