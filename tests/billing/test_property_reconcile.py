"""Property: random months with gaps, late data, meter exchanges, tariff changes and back-dated bindings
reconcile to 0 Wh and 0 minor units, and every invoice's totals are the sums of its lines."""

import random
from dataclasses import replace
from datetime import date, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meterlink.headend.billing import bill_run, bind_intervals, charged_after, merge_rows, period_instants, rebind
from meterlink.headend.invoice import check_json_totals, invoice_to_dict, make_invoice
from meterlink.headend.rating import rate_intervals
from meterlink.headend.reconcile import check_item, reconcile
from meterlink.headend.ubl import check_en16931, to_ubl
from meterlink.headend.vee import MeterExchange, VeeConfig, derive_intervals
from meterlink.readings import Reading

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, utc
from zoneinfo import ZoneInfo

HOURS = 24 * 30 + 6                    # November 2026 and a few hours of December
START = utc(2026, 11, 1)
CFG = VeeConfig(interval=timedelta(minutes=30))


@st.composite
def months(draw):
    rnd = random.Random(draw(st.integers(0, 2**32)))                          # hourly usage: big, so seeded
    usage = [rnd.choice((0, rnd.randint(0, 3000))) for _ in range(HOURS)]
    n_lost, n_late = draw(st.integers(0, 200)), draw(st.integers(0, 200))
    lost = set(rnd.sample(range(1, HOURS), n_lost))                          # never received
    late = set(rnd.sample(range(1, HOURS), n_late))                          # received after the first bill run
    exchange_hour = draw(st.one_of(st.none(), st.integers(2, HOURS - 2)))
    initial = draw(st.integers(0, 50_000))
    change_day = draw(st.integers(2, 29))                                    # tariff version change
    new_price = draw(st.decimals(min_value=Decimal("5"), max_value=Decimal("60"), places=3))
    move_in_day = draw(st.integers(1, 28))                                   # first binding, maybe late
    back_date = draw(st.booleans())                                          # then back-dated over the parked days
    return usage, lost, late - lost, exchange_hour, initial, change_day, new_price, move_in_day, back_date


def readings_of(usage, exchange_hour, initial):
    base, out, cum = 10_000_000, [], 0
    before = sum(usage[:exchange_hour]) if exchange_hour is not None else 0
    for h in range(HOURS + 1):
        if h:
            cum += usage[h - 1]
        value = base + cum if exchange_hour is None or h < exchange_hour else initial + cum - before
        out.append(Reading("M1", "1.8.0", START + timedelta(hours=h), value, "Wh"))
    exchanges = []
    if exchange_hour is not None:
        at = START + timedelta(hours=exchange_hour)
        exchanges.append(MeterExchange("M1", "1.8.0", at, base + sum(usage[:exchange_hour]), initial, "S1", "S2"))
    return out, exchanges


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=6, **SETTINGS)
@given(months())
def test_random_months_reconcile_exactly_and_invoices_add_up(month):
    check_month(month)


@pytest.mark.slow
@settings(max_examples=150, **SETTINGS)
@given(months())
def test_many_random_months_reconcile_exactly(month):
    check_month(month)


def check_month(month):
    usage, lost, late, exchange_hour, initial, change_day, new_price, move_in_day, back_date = month
    tariff = TARIFFS["gb-economy7"]
    v = tariff.versions[-1]
    changed = replace(v, valid_from=date(2026, 11, change_day),
                      bands=tuple(replace(b, rate=new_price) if b.name == "day" else b for b in v.bands))
    tariff = replace(tariff, versions=(*tariff.versions, changed))
    tariffs = {**TARIFFS, tariff.id: tariff}
    readings, exchanges = readings_of(usage, exchange_hour, initial)
    first = [r for i, r in enumerate(readings) if i not in lost and i not in late]
    final = [r for i, r in enumerate(readings) if i not in lost]

    bindings = gb_bindings(accounts=("A1", "A2")).move_in("SP1", "A1", utc(2026, 11, move_in_day))
    stored = {}
    items = []
    charged: dict = {}                     # standing days items carried: a back-dated supply catches up the rest

    def step(readings_now, b, period):
        fresh = bind_intervals(derive_intervals(readings_now, CFG, exchanges).intervals, b)
        stored.update(merge_rows(stored, fresh))
        stored.update(rebind(stored.values(), b))
        run = bill_run(period, bindings=b, markets=MARKETS, tariffs=tariffs, vat=VAT, rows=stored.values(),
                       standing_charged=charged)
        for bill in run.bills:
            stored.update({r.key: r for r in bill.billed_rows})
            items.append(bill.item)
            charged[bill.item.account_id] = charged_after(charged.get(bill.item.account_id, ()), bill.item)

    step(first, bindings, "2026-11")
    if back_date and move_in_day > 1:
        bindings = bindings.move_in("SP1", "A2", utc(2026, 11, 1), utc(2026, 11, move_in_day))
    step(final, bindings, "2026-12")

    # Wh: register difference == billed + parked + pending, exactly, for November
    fresh = derive_intervals(final, CFG, exchanges).intervals
    t0, t1 = period_instants("2026-11", ZoneInfo("Europe/London"))
    billed = sum(u.wh for i in items for u in i.usage if u.usage_period == "2026-11")
    rep = reconcile("2026-11", t0, t1, fresh={("M1", "1.8.0"): fresh},
                    rows={("M1", "1.8.0"): list(stored.values())}, billed={("M1", "1.8.0"): billed},
                    items=[i.to_dict() for i in items])
    assert rep.ok, rep.format()
    (line,) = rep.lines
    assert line.pending_wh == line.estimated_pending_wh == line.held_wh == 0
    expected_parked = sum(iv.wh for iv in fresh if t0 <= iv.start < t1 and
                          iv.start < utc(2026, 11, move_in_day)) if not back_date else 0
    assert line.parked_wh == expected_parked

    # money: the exact amounts billed for energy, summed over every item, equal rating the final usage from scratch
    zone = ZoneInfo("Europe/London")
    billed_exact = sum((il.line.amount_dec for i in items for il in i.lines if il.line.kind == "energy"), Decimal(0))
    final_rows = [r for r in stored.values() if r.account_id is not None]     # both runs: all bound usage
    scratch = Decimal(0)
    for acct in ("A1", "A2"):
        aggs = rate_intervals({}, [r.as_interval(r.wh) for r in final_rows if r.account_id == acct], tariff, acct, zone)
        scratch += sum((a.amount_dec for a in aggs.values()), Decimal(0))
    assert billed_exact == scratch
    # standing: every supply day of November and December is charged exactly once over both bills, the days
    # of a supply back-dated over the billed November on the December bill
    days: dict = {}
    for item in items:
        for il in item.lines:
            if il.line.kind == "standing":
                days[item.account_id] = days.get(item.account_id, 0) + il.line.quantity_kwh
    expected_days = {"A1": 30 - move_in_day + 1 + 31}
    if back_date and move_in_day > 1:
        expected_days["A2"] = move_in_day - 1
    assert days == expected_days
    for item in items:
        assert item.net_minor == sum(il.line.net_minor for il in item.lines)
        assert Decimal(item.net_minor) - item.exact_total == item.residue
        inv = make_invoice(item, bindings.customers["C1"], MARKETS["GB"], date(2026, 12, 2))
        assert check_json_totals(invoice_to_dict(inv)) == []
        assert check_item(item.to_dict()).problems == ()
        assert check_en16931(to_ubl(inv)) == []
