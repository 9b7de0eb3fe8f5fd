"""Billable items: one per account per period, every band, standing, parked and back-dated usage, deltas."""

from dataclasses import replace
from datetime import date
from decimal import Decimal

import pytest

from meterlink.errors import ValidationError
from meterlink.headend.billing import (Adjustment, bill_account, bill_run, bind_intervals, check_rebinding,
                                       merge_rows, rebind)
from meterlink.headend.vee import derive_intervals, VeeConfig

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc

GB = MARKETS["GB"]
E7 = TARIFFS["gb-economy7"]
CFG = VeeConfig()


def rows_for(readings, bindings):
    return bind_intervals(derive_intervals(readings, CFG).intervals, bindings)


def test_one_item_combines_all_bands_and_standing_and_bills_every_wh_once():
    b = gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1))
    rows = rows_for(hourly_readings("M1", utc(2026, 11, 1), 24 * 30), b)
    bill = bill_account("A1", "2026-11", bindings=b, market=GB, tariff=E7, vat=VAT, rows=rows)
    kinds = {(il.line.kind, il.line.band) for il in bill.item.lines}
    assert kinds == {("energy", "night"), ("energy", "day"), ("standing", "standing")}
    assert sum(u.wh for u in bill.item.usage) == 24 * 30 * 500
    standing = next(il.line for il in bill.item.lines if il.line.kind == "standing")
    assert standing.quantity_kwh == 30 and standing.unit_code == "DAY"
    assert bill.item.net_minor == sum(il.line.net_minor for il in bill.item.lines)
    assert bill.item.vat_minor == bill.item.vat.breakdown[0].vat_minor
    assert all(r.billed_wh == r.wh and r.billed_account == "A1" for r in bill.billed_rows)
    # billing the same rows again bills nothing but the standing charge
    again = bill_account("A1", "2026-12", bindings=b, market=GB, tariff=E7, vat=VAT,
                         rows=[*bill.billed_rows])
    assert not again.item.usage and {il.line.kind for il in again.item.lines} == {"standing"}


def test_usage_without_binding_is_parked_then_billed_when_a_binding_is_back_dated():
    b = gb_bindings().move_in("SP1", "A1", utc(2026, 11, 10))
    rows = rows_for(hourly_readings("M1", utc(2026, 11, 1), 24 * 30), b)
    parked = [r for r in rows if r.account_id is None]
    assert sum(r.wh for r in parked) == 9 * 24 * 500
    first = bill_account("A1", "2026-11", bindings=b, market=GB, tariff=E7, vat=VAT, rows=rows)
    assert sum(u.wh for u in first.item.usage) == 21 * 24 * 500
    # the move-in really was on the 1st: back-date it, the parked usage binds and bills in the next run
    b2 = b.move_out("SP1", utc(2027, 1, 1)).move_in("SP1", "A1", utc(2026, 11, 1), utc(2026, 11, 10))
    stored = {r.key: r for r in rows}
    stored.update({r.key: r for r in first.billed_rows})
    changed = rebind(stored.values(), b2)
    assert len(changed) == len(parked)
    stored.update(changed)
    second = bill_account("A1", "2026-12", bindings=b2, market=GB, tariff=E7, vat=VAT, rows=stored.values())
    assert [(u.usage_period, u.wh) for u in second.item.usage] == [("2026-11", 9 * 24 * 500)]
    catch_up = [il.line for il in second.item.lines if il.line.kind == "energy"]
    assert {(line.period_start, line.period_end) for line in catch_up} == {(date(2026, 11, 1), date(2026, 12, 1))}


def test_binding_edit_that_moves_billed_usage_is_refused():
    b = gb_bindings(accounts=("A1", "A2")).move_in("SP1", "A1", utc(2026, 11, 1))
    rows = rows_for(hourly_readings("M1", utc(2026, 11, 1), 48), b)
    bill = bill_account("A1", "2026-11", bindings=b, market=GB, tariff=E7, vat=VAT, rows=rows)
    moved = b.move_out("SP1", utc(2026, 11, 2)).move_in("SP1", "A2", utc(2026, 11, 2))
    with pytest.raises(ValidationError, match="was billed to A1, would belong to A2"):
        check_rebinding(bill.billed_rows, moved)


def test_a_late_reading_that_replaces_an_estimate_is_billed_as_a_delta_next_period():
    b = gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1))
    full = hourly_readings("M1", utc(2026, 11, 29), 72, wh_per_hour=400)
    gappy = [r for r in full if not (utc(2026, 11, 30, 10) <= r.taken_at <= utc(2026, 11, 30, 20))]
    # the hole is filled by a linear estimate that matches; make the late truth lumpier
    late = [r if r.taken_at != utc(2026, 11, 30, 15) else replace(r, value=r.value + 900) for r in full
            if not (utc(2026, 11, 30, 10) < r.taken_at < utc(2026, 11, 30, 20)) or r.taken_at == utc(2026, 11, 30, 15)]
    rows = rows_for(gappy, b)
    bill = bill_account("A1", "2026-11", bindings=b, market=GB, tariff=E7, vat=VAT, rows=rows)
    stored = {r.key: r for r in rows}
    stored.update({r.key: r for r in bill.billed_rows})
    changed = merge_rows(stored, rows_for(late, b))
    assert changed and sum(r.unbilled_wh for r in changed.values()) == 0   # energy moves between intervals
    stored.update(changed)
    nxt = bill_account("A1", "2026-12", bindings=b, market=GB, tariff=E7, vat=VAT, rows=stored.values())
    nov = [u for u in nxt.item.usage if u.usage_period == "2026-11"]
    assert sum(u.wh for u in nov) == 0 and all(r.billed_wh == r.wh for r in nxt.billed_rows)


def test_held_intervals_are_not_billed():
    b = gb_bindings().move_in("SP1", "A1", utc(2026, 10, 1))
    readings = hourly_readings("M1", utc(2026, 11, 1), 10)
    readings[5] = replace(readings[5], value=readings[5].value - 10_000)      # register decrease
    rows = rows_for(readings, b)
    assert any(r.held for r in rows)
    bill = bill_account("A1", "2026-11", bindings=b, market=GB, tariff=E7, vat=VAT, rows=rows, standing=False)
    assert sum(u.wh for u in bill.item.usage) == sum(r.wh for r in rows if not r.held)


def test_adjustments_and_bill_run_skip_accounts_already_billed():
    b = gb_bindings(accounts=("A1", "A2")).move_in("SP1", "A1", utc(2026, 10, 1))
    rows = rows_for(hourly_readings("M1", utc(2026, 11, 1), 24), b)
    run = bill_run("2026-11", bindings=b, markets=MARKETS, tariffs=TARIFFS, vat=VAT, rows=rows,
                   adjustments=[Adjustment("A1", "2026-11", "Goodwill credit", -500)], already_billed=["A2"])
    assert run.skipped == ("A2",) and [i.account_id for i in run.items] == ["A1"]
    adj = [il.line for il in run.items[0].lines if il.line.kind == "adjustment"]
    assert adj[0].net_minor == -500 and adj[0].unit_price == Decimal("5.00") and adj[0].quantity_kwh == -1


def test_french_item_across_the_abonnement_vat_change_has_two_standing_lines():
    from meterlink.headend.billing import item_from_aggregates
    from meterlink.headend.rating import standing_charges
    fr = TARIFFS["fr-hphc"]
    fr = replace(fr, versions=(replace(fr.versions[0], valid_from=date(2025, 1, 1)),))
    aggs = standing_charges(fr, "A1", date(2025, 7, 20), date(2025, 8, 1))
    item = item_from_aggregates("A1", "2025-08", market=MARKETS["FR"], tariff=fr, vat=VAT,
                                aggregates=[*aggs.values(), *standing_charges(fr, "A1", date(2025, 8, 1),
                                                                               date(2025, 9, 1)).values()],
                                window_start=date(2025, 7, 20))
    rates = sorted((il.line.period_start, il.vat_rate) for il in item.lines)
    assert rates == [(date(2025, 7, 20), Decimal("0.055")), (date(2025, 8, 1), Decimal("0.20"))]


def test_a_french_october_with_the_dst_change_bills_745_hours_between_local_midnights():
    from meterlink.headend.billing import period_instants
    from zoneinfo import ZoneInfo
    fr = TARIFFS["fr-hphc"]
    b = gb_bindings(utc(2026, 9, 1), market="FR", tariff="fr-hphc").move_in("SP1", "A1", utc(2026, 9, 1))
    rows = bind_intervals(derive_intervals(hourly_readings("M1", utc(2026, 9, 30), 24 * 33, wh_per_hour=60),
                                           CFG).intervals, b)
    t0, t1 = period_instants("2026-10", ZoneInfo("Europe/Paris"))
    assert (t0, t1) == (utc(2026, 9, 30, 22), utc(2026, 10, 31, 23))
    bill = bill_account("A1", "2026-10", bindings=b, market=MARKETS["FR"], tariff=fr, vat=VAT, rows=rows)
    by_month = {u.usage_period: u.wh for u in bill.item.usage}
    assert by_month == {"2026-10": 745 * 60, "2026-09": 22 * 60}      # + the unbilled end of September, catch-up
    standing = next(il.line for il in bill.item.lines if il.line.kind == "standing")
    assert standing.quantity_kwh == 31                   # the 25-hour day is one day
