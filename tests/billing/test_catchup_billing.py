"""Catch-up billing is priced as if everything had arrived on time: blocks (tiers) of a period count the
period's whole consumption, whatever arrived when, and the standing charges of days a back-dated supply
covers in months already billed appear as adjustment lines on the next bill. Issued items are never edited.

Hand-computed in minor units (EUR cents), Ireland (Europe/Dublin, 9 % VAT, 30-minute grid); October 2026
has 745 local hours (the clocks go back on the 25th)."""

import tomllib
from datetime import date, timedelta
from decimal import Decimal

import pytest

from meterlink.headend.billing import bill_run, bind_intervals, charged_after, merge_rows, rebind
from meterlink.headend.billing_store import BillingStore, process_readings, run_billing
from meterlink.headend.migrations import latest_version
from meterlink.headend.store import StoredRecord, open_repository
from meterlink.headend.tariff import tariff_from_toml
from meterlink.headend.vee import VeeConfig, derive_intervals

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc

TIERED_TOML = """
[tariff]
id = "ie-tiered"
currency = "EUR"
timezone = "Europe/Dublin"
country = "IE"
[[version]]
valid_from = "2026-01-01"
standing_charge = "10.00"
[[version.band]]
name = "all"
rate = "20.00"
windows = [{ days = ["all"], from = "00:00", to = "24:00" }]
[[version.tier]]
up_to_kwh = 100
adder = "0"
[[version.tier]]
name = "above100"
adder = "5.00"
"""
TIERED = tariff_from_toml(tomllib.loads(TIERED_TOML), TIERED_TOML, "ie-tiered.toml")
TARIFFS_T = {**TARIFFS, TIERED.id: TIERED}
CFG = VeeConfig(interval=timedelta(minutes=30))
OCT_START = utc(2026, 9, 30, 23)              # local midnight 1 October (IST, UTC+1)
OCT_HOURS = 745                                # to local midnight 1 November (GMT): 31 days + 1 h


def lines(item, kind=None):
    return [(il.line.kind, il.line.band, il.line.quantity_kwh, il.line.net_minor, il.line.period_start,
             il.line.period_end) for il in item.lines if kind is None or il.line.kind == kind]


class PurePath:
    """billing.bill_run over rows kept in a dict (the from-scratch reference pipeline)."""

    def __init__(self, bindings):
        self.bindings, self.readings, self.rows = bindings, [], {}
        self.standing: dict = {}

    def arrive(self, readings):
        self.readings = sorted({r.taken_at: r for r in [*self.readings, *readings]}.values(), key=lambda r: r.taken_at)

    def rebind(self, bindings):
        self.bindings = bindings

    def bill(self, period):
        fresh = bind_intervals(derive_intervals(self.readings, CFG).intervals, self.bindings)
        self.rows.update(merge_rows(self.rows, fresh))
        self.rows.update(rebind(self.rows.values(), self.bindings))
        run = bill_run(period, bindings=self.bindings, markets=MARKETS, tariffs=TARIFFS_T, vat=VAT,
                       rows=self.rows.values(), standing_charged=self.standing)
        for b in run.bills:
            self.rows.update({r.key: r for r in b.billed_rows})
            self.standing[b.item.account_id] = charged_after(self.standing.get(b.item.account_id, ()), b.item)
        return run

    def close(self):
        pass


class StorePath:
    """process_readings + run_billing on a real database, SQLite or PostgreSQL (the production path)."""

    def __init__(self, bindings, tmp_path, url=None):
        url = url or f"sqlite:///{tmp_path}/headend.db"
        self.repo, self.store, self.seq = open_repository(url, migrate=True), BillingStore(url), 1
        self.store.import_bindings(bindings, MARKETS, VAT)

    def arrive(self, readings):
        self.repo.ingest("GW1", [StoredRecord("GW1", self.seq + i, b"\0" * 32, r) for i, r in enumerate(readings)], 0)
        self.seq += len(readings)

    def rebind(self, bindings):
        self.store.apply_bindings(bindings)

    def bill(self, period):
        process_readings(self.repo, self.store, MARKETS, utc(2026, 12, 2), tariffs=TARIFFS_T)
        y, m = map(int, period.split("-"))
        return run_billing(self.store, period, markets=MARKETS, tariffs=TARIFFS_T, vat=VAT,
                           issue_date=date(y + (m == 12), m % 12 + 1, 2), now=utc(2026, 12, 2))

    def close(self):
        self.store.close()
        self.repo.close()


@pytest.fixture(params=["pure", "sqlite", "postgres"])
def path(request, tmp_path):
    url = None
    if request.param == "postgres":
        from pgserver import PG_UNAVAILABLE, fresh_schema_url
        if PG_UNAVAILABLE:
            pytest.skip(PG_UNAVAILABLE)
        url = fresh_schema_url()

    def make(bindings):
        p = PurePath(bindings) if request.param == "pure" else StorePath(bindings, tmp_path, url)
        made.append(p)
        return p
    made = []
    yield make
    for p in made:
        p.close()


def test_late_readings_are_billed_at_the_tier_of_the_whole_period_not_of_the_late_delta(path):
    b = gb_bindings(utc(2026, 9, 1), market="IE", tariff="ie-tiered").move_in("SP1", "A1", utc(2026, 9, 1))
    p = path(b)
    readings = hourly_readings("M1", OCT_START, OCT_HOURS, wh_per_hour=200)     # 149 kWh in October
    p.arrive(readings[:401])                     # the first 400 hours (80 kWh) arrive on time
    oct_item, = p.bill("2026-10").items
    assert lines(oct_item) == [
        ("energy", "all", Decimal("80"), 1600, date(2026, 10, 1), date(2026, 11, 1)),     # 80 kWh x 20.00 c
        ("standing", "standing", Decimal("31"), 310, date(2026, 10, 1), date(2026, 11, 1))]
    p.arrive(readings[401:])                     # the other 345 hours (69 kWh) arrive after the October bill
    nov_item, = p.bill("2026-11").items
    # (catch-up lines are dated from the first day they cover: the late hours start on 17 October)
    # October is now 149 kWh: 100 kWh in the first block, 49 kWh above it at 20.00 + 5.00 c. The October bill
    # charged 80 kWh in the first block, so the catch-up owes 69 kWh x 20.00 c and 49 kWh x 5.00 c.
    assert lines(nov_item) == [
        ("energy", "all", Decimal("69"), 1380, date(2026, 10, 17), date(2026, 11, 1)),
        ("tier", "above100", Decimal("49"), 245, date(2026, 10, 17), date(2026, 11, 1)),
        ("standing", "standing", Decimal("30"), 300, date(2026, 11, 1), date(2026, 12, 1))]
    assert (nov_item.net_minor, nov_item.vat_minor, nov_item.gross_minor) == (1925, 173, 2098)   # 9 % of 1925 = 173.25
    # whatever the order of arrival, October costs what it costs billed at once: 149 x 20 + 49 x 5 + 31 x 10
    october = sum(il.line.net_minor for i in (oct_item, nov_item) for il in i.lines
                  if il.line.period_end == date(2026, 11, 1))
    assert october == 2980 + 245 + 310


def test_a_late_correction_that_moves_energy_out_of_a_period_credits_its_block(path):
    from meterlink.readings import Reading
    b = gb_bindings(utc(2026, 9, 1), market="IE", tariff="ie-tiered").move_in("SP1", "A1", utc(2026, 9, 1))
    p = path(b)
    base = 1_000_000

    def value(h):                # 200 Wh/h to hour 600 (120 kWh), nothing to the month's end, 72 kWh in November
        return base + min(h, 600) * 200 + (max(h, 745) - 745) * 72_000 // 215

    readings = [Reading("M1", "1.8.0", OCT_START + timedelta(hours=h), value(h), "Wh") for h in range(961)]
    # hours 601..959 are lost at first: VEE spreads the 72 kWh over the 720 half-hours of the gap, 100 Wh
    # each, 290 of them in October: October looks like 120 + 29 = 149 kWh
    p.arrive([r for h, r in enumerate(readings) if not 600 < h < 960])
    oct_item, = p.bill("2026-10").items
    assert lines(oct_item) == [
        ("energy", "all", Decimal("149"), 2980, date(2026, 10, 1), date(2026, 11, 1)),
        ("tier", "above100", Decimal("49"), 245, date(2026, 10, 1), date(2026, 11, 1)),
        ("standing", "standing", Decimal("31"), 310, date(2026, 10, 1), date(2026, 11, 1))]
    p.arrive(readings[601:960])  # the real readings: October was 120 kWh, 20 of them above the first block
    nov_item, = p.bill("2026-11").items
    assert lines(nov_item) == [
        ("energy", "all", Decimal("-29"), -580, date(2026, 10, 25), date(2026, 11, 1)),
        ("tier", "above100", Decimal("-29"), -145, date(2026, 10, 25), date(2026, 11, 1)),
        ("energy", "all", Decimal("72"), 1440, date(2026, 11, 1), date(2026, 12, 1)),
        ("standing", "standing", Decimal("30"), 300, date(2026, 11, 1), date(2026, 12, 1))]
    assert nov_item.net_minor == -580 - 145 + 1440 + 300
    october = sum(il.line.net_minor for i in (oct_item, nov_item) for il in i.lines
                  if il.line.period_end == date(2026, 11, 1))
    assert october == 120 * 20 + 20 * 5 + 31 * 10


def back_dated_case(path):
    """A1 moves in on 28 October (local midnight, after the clocks went back); October is billed; in November
    the previous occupant A2 is entered with a supply back-dated over 1..27 October (27 days, the 25-hour
    day among them). M1 used 100 Wh every hour of October (745 h)."""
    b = gb_bindings(utc(2026, 9, 1), accounts=("A1", "A2"), market="IE", tariff="ie-tiered") \
        .move_in("SP1", "A1", utc(2026, 10, 28))
    p = path(b)
    p.arrive(hourly_readings("M1", OCT_START, OCT_HOURS, wh_per_hour=100))
    return b, p


def test_standing_charges_of_a_supply_back_dated_over_a_billed_month_are_caught_up_on_the_next_bill(path):
    b, p = back_dated_case(path)
    oct_item, = p.bill("2026-10").items
    assert (oct_item.account_id, lines(oct_item)) == ("A1", [
        ("energy", "all", Decimal("9.6"), 192, date(2026, 10, 1), date(2026, 11, 1)),      # 96 h x 100 Wh x 20.00 c
        ("standing", "standing", Decimal("4"), 40, date(2026, 10, 1), date(2026, 11, 1))])      # 28..31 October
    p.rebind(b.move_in("SP1", "A2", OCT_START, utc(2026, 10, 28)))
    a1, a2 = sorted(p.bill("2026-11").items, key=lambda i: i.account_id)
    assert lines(a1) == [("standing", "standing", Decimal("30"), 300, date(2026, 11, 1), date(2026, 12, 1))]
    # A2: October's parked 649 h x 100 Wh = 64.9 kWh, and the 27 standing days nobody was charged for,
    # both dated in October on A2's November bill
    assert lines(a2) == [
        ("energy", "all", Decimal("64.9"), 1298, date(2026, 10, 1), date(2026, 11, 1)),
        ("standing", "standing", Decimal("27"), 270, date(2026, 10, 1), date(2026, 11, 1))]
    assert (a2.net_minor, a2.vat_minor, a2.gross_minor) == (1568, 141, 1709)           # 9 % of 1568 = 141.12
    assert a2.standing_charged == ((date(2026, 10, 1), date(2026, 10, 28)),)
    # charged once: December bills A1's December and nothing more for A2
    dec = p.bill("2026-12").items
    assert [(i.account_id, lines(i, "standing")) for i in dec] == [
        ("A1", [("standing", "standing", Decimal("31"), 310, date(2026, 12, 1), date(2027, 1, 1))])]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/headend.db"
    from pgserver import PG_UNAVAILABLE, fresh_schema_url
    if PG_UNAVAILABLE:
        pytest.skip(PG_UNAVAILABLE)
    return fresh_schema_url()


def _back_to_version_4(p, *, keep_standing_table):
    """Make the database what an older build left: schema version 4, and `standing_charged` either absent
    (builds before it) or present and filled (builds that created it when a store opened)."""
    p.store.db.x("DROP TABLE standing_backfill")
    if not keep_standing_table:
        p.store.db.x("DROP TABLE standing_charged")
    p.store.db.x("DELETE FROM schema_migrations WHERE version=5")
    p.store.close()
    open_repository(p.store.url, migrate=True).close()           # `meterlink-headend migrate`: 0005 again
    p.store = BillingStore(p.store.url)


def test_a_database_billed_before_standing_was_recorded_is_not_charged_twice(tmp_path, db_url):
    """Migration 0005 on a database without `standing_charged` creates it and lists the billed accounts; the
    store then counts each one's supply days up to its last billed period as charged (the old bill runs
    charged their own period's days), once."""
    b = gb_bindings(utc(2026, 9, 1), accounts=("A1", "A2"), market="IE", tariff="ie-tiered") \
        .move_in("SP1", "A1", utc(2026, 10, 28))
    p = StorePath(b, tmp_path, db_url)
    try:
        p.arrive(hourly_readings("M1", OCT_START, OCT_HOURS, wh_per_hour=100))
        p.bill("2026-10")
        _back_to_version_4(p, keep_standing_table=False)
        assert p.store.standing_ranges() == {"A1": [(date(2026, 10, 28), date(2026, 11, 1))]}   # A1's supply days
        assert p.store.db.q("SELECT * FROM standing_backfill") == []                           # done, once
        p.rebind(b.move_in("SP1", "A2", OCT_START, utc(2026, 10, 28)))
        a1, a2 = sorted(p.bill("2026-11").items, key=lambda i: i.account_id)
        assert lines(a1, "standing") == [("standing", "standing", Decimal("30"), 300, date(2026, 11, 1), date(2026, 12, 1))]
        assert lines(a2, "standing") == [("standing", "standing", Decimal("27"), 270, date(2026, 10, 1), date(2026, 11, 1))]
        p.store.close()
        p.store = BillingStore(db_url)                                   # reopening back-fills nothing again
        assert p.store.standing_ranges() == {"A1": [(date(2026, 10, 28), date(2026, 12, 1))],
                                             "A2": [(date(2026, 10, 1), date(2026, 10, 28))]}
    finally:
        p.close()


def test_migration_0005_adopts_a_standing_table_an_earlier_build_created_and_back_fills_nothing(tmp_path, db_url):
    b = gb_bindings(utc(2026, 9, 1), market="IE", tariff="ie-tiered").move_in("SP1", "A1", utc(2026, 10, 28))
    p = StorePath(b, tmp_path, db_url)
    try:
        p.arrive(hourly_readings("M1", OCT_START, OCT_HOURS, wh_per_hour=100))
        p.bill("2026-10")
        p.store.db.x("UPDATE standing_charged SET from_date=? WHERE account_id='A1'", (p.store.db.day(date(2026, 10, 29)),))
        _back_to_version_4(p, keep_standing_table=True)
        assert p.repo.schema_version() == latest_version()             # 0005 applied again, the later ones kept
        assert p.store.standing_ranges() == {"A1": [(date(2026, 10, 29), date(2026, 11, 1))]}   # as it was
    finally:
        p.close()


def test_a_move_out_back_dated_over_charged_days_credits_their_standing_charges_on_the_next_bill(path):
    """A1 is supplied from 1 September; October is billed with 31 standing days. In November the move-out is
    entered: A1 left on 20 October (local midnight, still IST). Nobody used energy after that (usage already
    billed could not move: the edit would be refused), so the 12 days 20..31 October are credited."""
    from meterlink.headend.invoice import check_json_totals, invoice_to_dict, make_invoice
    from meterlink.headend.ubl import check_en16931, to_ubl
    b = gb_bindings(utc(2026, 9, 1), market="IE", tariff="ie-tiered").move_in("SP1", "A1", utc(2026, 9, 1))
    p = path(b)
    p.arrive(hourly_readings("M1", OCT_START, 19 * 24, wh_per_hour=100))       # 1..19 October: 45.6 kWh
    oct_item, = p.bill("2026-10").items
    assert lines(oct_item) == [
        ("energy", "all", Decimal("45.6"), 912, date(2026, 10, 1), date(2026, 11, 1)),
        ("standing", "standing", Decimal("31"), 310, date(2026, 10, 1), date(2026, 11, 1))]
    p.rebind(b.move_out("SP1", utc(2026, 10, 19, 23)))
    nov_item, = p.bill("2026-11").items
    assert lines(nov_item) == [("standing", "standing", Decimal("-12"), -120, date(2026, 10, 20), date(2026, 11, 1))]
    assert (nov_item.net_minor, nov_item.vat_minor, nov_item.gross_minor) == (-120, -11, -131)  # 9 %: -10.80
    assert nov_item.standing_credited == ((date(2026, 10, 20), date(2026, 11, 1)),)
    inv = make_invoice(nov_item, b.customers["C1"], MARKETS["IE"], date(2026, 12, 2))
    assert check_json_totals(invoice_to_dict(inv)) == [] and check_en16931(to_ubl(inv)) == []
    # credited once: December has nothing for A1; October's standing net is the 19 days it was supplied
    assert p.bill("2026-12").items == ()
    assert sum(il.line.quantity_kwh for i in (oct_item, nov_item) for il in i.lines if il.line.kind == "standing") == 19


# --------------------------------------------------------------------------- the date-range arithmetic

from hypothesis import given, strategies as st                                      # noqa: E402
from zoneinfo import ZoneInfo                                                       # noqa: E402

from meterlink.headend.billing import merge_ranges, standing_dates, subtract_ranges, supply_ranges  # noqa: E402
from meterlink.headend.binding import Supply                                        # noqa: E402

D0 = date(2026, 10, 1)
ranges_st = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15)).map(
    lambda t: (D0 + timedelta(days=t[0]), D0 + timedelta(days=t[0] + t[1]))), max_size=6)


def days_of(ranges):
    return {a + timedelta(days=i) for a, b in ranges for i in range((b - a).days)}


@given(ranges_st, ranges_st)
def test_range_arithmetic_is_set_arithmetic_on_days(a, b):
    assert days_of(merge_ranges(a)) == days_of(a)
    assert days_of(subtract_ranges(a, b)) == days_of(a) - days_of(b)
    merged = merge_ranges(a)
    assert all(x[1] < y[0] for x, y in zip(merged, merged[1:]))           # disjoint, not even adjacent


def test_supply_days_follow_local_midnights_across_the_dst_change():
    dublin = ZoneInfo("Europe/Dublin")
    # 24 Oct 23:00 UTC is local midnight of the 25th (IST); 26 Oct 00:00 UTC is local midnight of the 26th (GMT)
    whole = Supply("SP1", "A1", utc(2026, 10, 24, 23), utc(2026, 10, 26, 0))
    assert supply_ranges([whole], dublin, D0, date(2026, 11, 1)) == [(date(2026, 10, 25), date(2026, 10, 26))]
    # a minute past local midnight reaches into the next day, which then owes its standing charge too
    late = Supply("SP1", "A1", utc(2026, 10, 24, 23), utc(2026, 10, 26, 0, 1))
    assert supply_ranges([late], dublin, D0, date(2026, 11, 1)) == [(date(2026, 10, 25), date(2026, 10, 27))]
    b = gb_bindings(utc(2026, 9, 1), market="IE").move_in("SP1", "A1", utc(2026, 10, 24, 23), utc(2026, 10, 26, 0, 1))
    assert days_of(supply_ranges(b.supplies_of_account("A1"), dublin, D0, date(2026, 11, 1))) == \
        set(standing_dates(b, "A1", D0, date(2026, 11, 1), dublin))
