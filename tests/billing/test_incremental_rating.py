"""Incremental rating on a real database: `process` rates new/changed intervals into stored pending day-band
aggregates, the bill run sums them, and that equals rating from scratch; processing twice adds nothing;
`process` derives only what arrived; chain gaps come from the chain store (events are not gaps)."""

import random
import shutil
import tempfile
from dataclasses import replace
from datetime import date, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meterlink.chain import Event, hash_of, link, prune_run
from meterlink.headend.billing import bill_run, bind_intervals, charged_after, merge_rows, pending_contributions, rebind
from meterlink.headend.billing_store import BillingStore, process_readings, reconcile_period, run_billing
from meterlink.headend.chainstore import open_chain_store
from meterlink.headend.store import StoredRecord, open_repository
from meterlink.headend.vee import MeterExchange, VeeConfig, derive_intervals
from meterlink.readings import Reading

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc

NOW = utc(2026, 12, 2, 6)
GB = ZoneInfo("Europe/London")
CFG = VeeConfig(interval=timedelta(minutes=30))          # the GB market's grid


def ingest(repo, readings, gateway="GW1", first_seq=1):
    repo.ingest(gateway, [StoredRecord(gateway, first_seq + i, b"\0" * 32, r) for i, r in enumerate(readings)], 0)
    return first_seq + len(readings)


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


def snapshot(store):
    rows = {k: (r.wh, r.estimated, r.flags, r.account_id, r.billed_wh, r.billed_account)
            for k, r in store.rows().items()}
    return store.pending_aggregates(), store.pending_usage(), rows


def scratch_aggregates(store, tariff, account):
    """Rating the account's unbilled rows from scratch (what the stored aggregates must equal)."""
    rows = store.rows(account=account, unbilled=True).values()
    aggs, usage = pending_contributions(((None, r) for r in rows), tariff, GB)
    return aggs, usage


def test_stored_aggregates_equal_rating_the_rows_from_scratch_and_the_bill_equals_the_from_rows_bill(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    readings = hourly_readings("M1", utc(2026, 10, 31, 20), 24 * 31, wh_per_hour=417, skip=set(range(30, 90)))
    seq = ingest(repo, readings)
    first = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert first.accounts_rerated == 0                   # a new account: its deltas are rating from scratch
    assert store.pending_aggregates()["A1"] == scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")[0]
    # late readings replace the estimates over the gap: only the delta is rated
    late = hourly_readings("M1", utc(2026, 10, 31, 20), 24 * 31, wh_per_hour=417)[30:90]
    late = [replace(r, value=r.value + (i * 37) % 400) for i, r in enumerate(late)]   # not the straight line
    ingest(repo, late, first_seq=seq)
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.rows_changed > 0 and res.accounts_rerated == 0                           # a delta, not a re-rate
    aggs, usage = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")
    assert store.pending_aggregates()["A1"] == aggs and store.pending_usage()["A1"] == usage
    # the bill run from stored aggregates == billing.bill_run rating the rows from scratch
    reference = bill_run("2026-11", bindings=store.bindings(), markets=MARKETS, tariffs=TARIFFS, vat=VAT,
                         rows=store.rows().values())
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2),
                      now=NOW)
    assert [i.to_dict() for i in run.items] == [i.to_dict() for i in reference.items]
    assert {u.usage_period for u in run.items[0].usage} == {"2026-10", "2026-11"}     # catch-up of October's end
    # billed: pending before December is gone, the rows say billed, and it reconciles
    assert store.pending_aggregates(before=date(2026, 12, 1)) == {}
    assert all(r.billed_wh == r.wh for r in store.rows(end=utc(2026, 12, 1)).values())
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
    assert rep.ok, rep.format()


def test_processing_the_same_readings_twice_changes_no_aggregate(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 20, skip={5, 6, 7, 100})
    ingest(repo, readings)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    before = snapshot(store)
    assert before[0]["A1"]
    again = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)        # nothing new arrived
    assert (again.meters, again.readings, again.rows_changed) == (0, 0, 0)
    assert snapshot(store) == before
    ingest(repo, readings, first_seq=1)                                          # the same batch re-sent
    ingest(repo, readings, gateway="GW2")                                        # ... and via another gateway
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert snapshot(store) == before
    full = process_readings(repo, store, MARKETS, NOW, ["M1"], tariffs=TARIFFS)  # whole history derived again
    assert full.readings == 2 * len(readings) and full.rows_changed == 0        # both gateways hold them
    assert snapshot(store) == before


def test_process_derives_only_the_readings_around_what_arrived_and_agrees_with_a_full_derivation(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    all_readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 30, wh_per_hour=250)
    all_readings[201] = replace(all_readings[201], value=all_readings[201].value + 100)   # not the estimate
    first = [r for i, r in enumerate(all_readings) if i <= 24 * 20 and i not in (200, 201, 202)]
    seq = ingest(repo, first)
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.readings == len(first)
    # a day later: one more day, and the three hours lost in the gap arrive late
    seq = ingest(repo, all_readings[24 * 20 + 1:24 * 21 + 1], first_seq=seq)
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.readings == 24 + 2                       # the day + the two readings before it
    seq = ingest(repo, [all_readings[i] for i in (200, 201, 202)], first_seq=seq)
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.readings == 24 * 21 + 1 - 198            # from the second reading before the late ones onwards
    assert res.rows_changed == 4 and res.accounts_rerated == 0
    # same rows as deriving everything from scratch, and the aggregates of rating those rows
    b = store.bindings()
    scratch = bind_intervals(derive_intervals([r for r in all_readings[:24 * 21 + 1]], CFG).intervals, b)
    assert {r.key: (r.wh, r.estimated, r.flags) for r in scratch} == \
        {k: (r.wh, r.estimated, r.flags) for k, r in store.rows().items()}
    aggs, _ = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")
    assert store.pending_aggregates()["A1"] == aggs


class _PushesDuringRun:
    """The repository, except that `process` asking it for a gateway's gaps (it does so after taking its
    snapshot of the gateway's seq) lets more readings arrive first, as pushes do while the rating worker runs."""

    def __init__(self, repo, arriving, first_seq):
        self.repo, self.arriving, self.first_seq = repo, arriving, first_seq

    def gaps(self, gateway):
        if self.arriving:
            ingest(self.repo, self.arriving, gateway, self.first_seq)
            self.arriving = None
        return self.repo.gaps(gateway)

    def __getattr__(self, name):
        return getattr(self.repo, name)


def test_readings_arriving_during_a_run_are_left_to_the_next_run_which_derives_them_once(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    all_readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 10, wh_per_hour=250)
    all_readings[55] = replace(all_readings[55], value=all_readings[55].value + 90)      # not the estimate
    snap = [r for i, r in enumerate(all_readings) if i < 120 and not 50 <= i < 60]
    during = [r for i, r in enumerate(all_readings) if 50 <= i < 60 or i >= 120]      # a gap filled, and more
    seq = ingest(repo, snap)
    res = process_readings(_PushesDuringRun(repo, during, seq), store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.readings == len(snap)                    # the run's snapshot only, not what arrived meanwhile
    assert max(k[2] for k in store.rows()) == snap[-1].taken_at - CFG.interval      # its last interval
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.readings == len(all_readings) - 48       # from the second reading before the late ones onwards
    assert process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS).readings == 0
    b = store.bindings()
    scratch = bind_intervals(derive_intervals(all_readings, CFG).intervals, b)
    assert {r.key: (r.wh, r.estimated, r.flags) for r in scratch} == \
        {k: (r.wh, r.estimated, r.flags) for k, r in store.rows().items()}
    aggs, usage = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")        # rated once, nothing skipped
    assert store.pending_aggregates()["A1"] == aggs and store.pending_usage()["A1"] == usage


def test_file_imported_readings_which_no_cursor_tracks_are_derived_whole_beside_a_gateway_snapshot(db):
    from meterlink.headend.importer import ingest_readings
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    readings = hourly_readings("M1", utc(2026, 11, 1), 24 * 3, wh_per_hour=300)
    ingest_readings(repo, readings, 0)               # source "import:M1:1.8.0", seq = instant: no gateway cursor
    ingest(repo, hourly_readings("M2", utc(2026, 11, 1), 4), gateway="GW1")            # a gateway: a snapshot
    res = process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert res.readings == len(readings) + 5
    scratch = bind_intervals(derive_intervals(readings, CFG).intervals, store.bindings())
    assert {r.key: r.wh for r in scratch} == {k: r.wh for k, r in store.rows(meter_id="M1").items()}


def test_a_tariff_corrected_after_processing_is_billed_at_the_corrected_price(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    ingest(repo, hourly_readings("M1", utc(2026, 11, 1), 24 * 30))
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    e7 = TARIFFS["gb-economy7"]
    fixed = replace(e7, versions=tuple(replace(v, bands=tuple(replace(b, rate=b.rate + 1) for b in v.bands))
                                       for v in e7.versions))
    tariffs = {**TARIFFS, fixed.id: fixed}
    reference = bill_run("2026-11", bindings=store.bindings(), markets=MARKETS, tariffs=tariffs, vat=VAT,
                         rows=store.rows().values())
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=tariffs, vat=VAT, issue_date=date(2026, 12, 2),
                      now=NOW)
    assert [i.to_dict() for i in run.items] == [i.to_dict() for i in reference.items]


def test_a_chain_with_events_reconciles_without_false_gaps_and_a_pruned_run_is_a_gap(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    bodies = []
    for i, r in enumerate(hourly_readings("M1", utc(2026, 11, 1), 48)):
        bodies.append(r)
        if i % 10 == 3:                                   # credit / relay events between the readings
            bodies.append(Event("credit", "M1", r.taken_at, b"topup:500"))
    records = link(bodies)
    chain = open_chain_store(store.url)
    try:
        # what the sync service does per accepted batch: readings to the repository, the chain to the chain store
        for lo in range(0, len(records), 16):
            batch = records[lo:lo + 16]
            repo.ingest("GW1", [StoredRecord("GW1", c.seq, c.prev_hash, c.body) for c in batch
                                if isinstance(c.body, Reading)], 0)
            chain.commit("GW1", chain.head("GW1")[0], batch, 0)
        assert repo.gaps("GW1") or repo.acked_seq("GW1") < len(records)   # the repository alone sees holes
        process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
        rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
        assert rep.chain_gaps == () and rep.ok, rep.format()
        # a run of instantaneous readings the gateway pruned before delivering it (a tombstone) is a real gap
        more = link([*(Reading("M1", "32.7.0", utc(2026, 11, 3, h), 230_000, "mV") for h in range(3)),
                     Event("relay", "M1", utc(2026, 11, 3, 4), b"open")], records[-1].seq, hash_of(records[-1]))
        chain.commit("GW1", chain.head("GW1")[0], [prune_run(more[:3]), more[3]], 0)
        rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
        assert rep.chain_gaps == (("GW1", more[0].seq, more[2].seq),) and not rep.ok
    finally:
        chain.close()


# --------------------------------------------------------------------------- property: store path == from scratch

HOURS = 24 * 30 + 6
START = utc(2026, 11, 1)


@st.composite
def months(draw):
    rnd = random.Random(draw(st.integers(0, 2**32)))
    usage = [rnd.choice((0, rnd.randint(0, 3000))) for _ in range(HOURS)]
    lost = set(rnd.sample(range(1, HOURS), draw(st.integers(0, 150))))
    late = set(rnd.sample(range(1, HOURS), draw(st.integers(0, 150)))) - lost
    exchange_hour = draw(st.one_of(st.none(), st.integers(2, HOURS - 2)))
    change_day = draw(st.integers(2, 29))
    new_price = draw(st.decimals(min_value=Decimal("5"), max_value=Decimal("60"), places=3))
    move_in_day = draw(st.integers(1, 28))
    back_date = draw(st.booleans())
    batches = draw(st.integers(1, 4))                                        # process runs before the first bill
    return usage, lost, late, exchange_hour, change_day, new_price, move_in_day, back_date, batches


def readings_of(usage, exchange_hour):
    base, initial, out, cum = 10_000_000, 1_000, [], 0
    before = sum(usage[:exchange_hour]) if exchange_hour is not None else 0
    for h in range(HOURS + 1):
        if h:
            cum += usage[h - 1]
        value = base + cum if exchange_hour is None or h < exchange_hour else initial + cum - before
        out.append(Reading("M1", "1.8.0", START + timedelta(hours=h), value, "Wh"))
    exchanges = []
    if exchange_hour is not None:
        exchanges.append(MeterExchange("M1", "1.8.0", START + timedelta(hours=exchange_hour),
                                       base + before, initial, "S1", "S2"))
    return out, exchanges


def check_store_month(month):
    usage, lost, late, exchange_hour, change_day, new_price, move_in_day, back_date, batches = month
    e7 = TARIFFS["gb-economy7"]
    v = e7.versions[-1]
    changed = replace(v, valid_from=date(2026, 11, change_day),
                      bands=tuple(replace(b, rate=new_price) if b.name == "day" else b for b in v.bands))
    tariffs = {**TARIFFS, e7.id: replace(e7, versions=(*e7.versions, changed))}
    readings, exchanges = readings_of(usage, exchange_hour)
    first = [r for i, r in enumerate(readings) if i not in lost and i not in late]
    latecomers = [r for i, r in enumerate(readings) if i in late]
    tmp = tempfile.mkdtemp()
    url = f"sqlite:///{tmp}/headend.db"
    repo, store = open_repository(url, migrate=True), BillingStore(url)
    try:
        bindings = gb_bindings(accounts=("A1", "A2")).move_in("SP1", "A1", utc(2026, 11, move_in_day))
        store.import_bindings(bindings, MARKETS, VAT)
        for e in exchanges:
            store.add_exchange_read(e)
        ref: dict = {}                                   # the pure from-scratch pipeline, side by side
        charged: dict = {}                               # its memory of the standing days items carried

        def ref_step(readings_now, b, period):
            fresh = bind_intervals(derive_intervals(readings_now, CFG, exchanges).intervals, b)
            ref.update(merge_rows(ref, fresh))
            ref.update(rebind(ref.values(), b))
            run = bill_run(period, bindings=b, markets=MARKETS, tariffs=tariffs, vat=VAT, rows=ref.values(),
                           standing_charged=charged)
            for bill in run.bills:
                ref.update({r.key: r for r in bill.billed_rows})
                charged[bill.item.account_id] = charged_after(charged.get(bill.item.account_id, ()), bill.item)
            return run

        seq, size = 1, -(-len(first) // batches)
        for lo in range(0, len(first), size):            # arriving in batches, processed as they come
            seq = ingest(repo, first[lo:lo + size], first_seq=seq)
            process_readings(repo, store, MARKETS, NOW, tariffs=tariffs)
        expected = ref_step(first, bindings, "2026-11")
        run = run_billing(store, "2026-11", markets=MARKETS, tariffs=tariffs, vat=VAT, issue_date=date(2026, 12, 2),
                          now=NOW)
        assert [i.to_dict() for i in run.items] == [i.to_dict() for i in expected.items]

        ingest(repo, latecomers, first_seq=seq)
        if back_date and move_in_day > 1:
            bindings = bindings.move_in("SP1", "A2", utc(2026, 11, 1), utc(2026, 11, move_in_day))
            store.apply_bindings(bindings)
        process_readings(repo, store, MARKETS, NOW, tariffs=tariffs)
        expected = ref_step(first + latecomers, bindings, "2026-12")
        run = run_billing(store, "2026-12", markets=MARKETS, tariffs=tariffs, vat=VAT, issue_date=date(2027, 1, 2),
                          now=NOW)
        assert [i.to_dict() for i in run.items] == [i.to_dict() for i in expected.items]
        assert {k: (r.wh, r.account_id, r.billed_wh, r.billed_account) for k, r in store.rows().items()} == \
            {k: (r.wh, r.account_id, r.billed_wh, r.billed_account) for k, r in ref.items()}
        rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB")
        assert rep.ok, rep.format()
    finally:
        store.close()
        repo.close()
        shutil.rmtree(tmp, ignore_errors=True)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=4, **SETTINGS)
@given(months())
def test_random_months_billed_from_stored_aggregates_equal_billing_from_scratch(month):
    check_store_month(month)


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(months())
def test_many_random_months_billed_from_stored_aggregates_equal_billing_from_scratch(month):
    check_store_month(month)


def test_a_bill_run_loading_aggregates_in_chunks_bills_each_account_its_own_usage(db, monkeypatch):
    import meterlink.headend.billing_store as billing_store
    monkeypatch.setattr(billing_store, "BILL_CHUNK", 2)
    repo, store = db
    accounts = ("A1", "A2", "A3", "A4", "A5")
    b = gb_bindings(accounts=accounts)
    for i, a in enumerate(accounts):
        b = replace(b, service_points={**b.service_points, f"SP{a}": replace(b.service_points["SP1"], id=f"SP{a}")},
                    meters={**b.meters, f"M{a}": replace(b.meters["M1"], id=f"M{a}")})
        b = b.install(f"M{a}", f"SP{a}", utc(2026, 10, 1)).move_in(f"SP{a}", a, utc(2026, 10, 1))
    store.import_bindings(b, MARKETS, VAT)
    seq = 1
    for i, a in enumerate(accounts):
        seq = ingest(repo, hourly_readings(f"M{a}", utc(2026, 11, 1), 24 * 3, wh_per_hour=100 * (i + 1)), first_seq=seq)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    assert {i.account_id: [(u.meter_id, u.wh) for u in i.usage] for i in run.items} == \
        {a: [(f"M{a}", 72 * 100 * (i + 1))] for i, a in enumerate(accounts)}


def test_held_usage_stays_out_of_the_aggregates_until_released_then_is_billed_once(db):
    repo, store = db
    store.import_bindings(gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1)), MARKETS, VAT)
    readings = hourly_readings("M1", utc(2026, 11, 1), 24)
    readings[10] = replace(readings[10], value=readings[10].value - 2_000)          # register decrease: held
    ingest(repo, readings)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    held = sum(r.wh for r in store.rows().values() if r.held)
    assert held != 0
    pending = sum(wh for wh in store.pending_usage()["A1"].values())
    assert pending == sum(r.wh for r in store.rows().values() if not r.held)
    for e in store.exceptions(status="open"):
        store.resolve_exception(e.id, "release", "meter tested, reads accepted", NOW)
    process_readings(repo, store, MARKETS, NOW, tariffs=TARIFFS)
    assert sum(store.pending_usage()["A1"].values()) == pending + held
    aggs, _ = scratch_aggregates(store, TARIFFS["gb-economy7"], "A1")
    assert store.pending_aggregates()["A1"] == aggs
    run = run_billing(store, "2026-11", markets=MARKETS, tariffs=TARIFFS, vat=VAT, issue_date=date(2026, 12, 2), now=NOW)
    assert sum(u.wh for u in run.items[0].usage) == pending + held
    rep = reconcile_period(repo, store, "2026-11", markets=MARKETS, default_market="GB", strict=True)
    assert rep.ok and rep.lines[0].billed_wh == pending + held, rep.format()
