"""VEE: intervals from cumulative registers, exact apportioning, estimate replacement, anomaly flags."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.headend.vee import (
    DECREASE, ESTIMATED, EXCHANGE_WITHOUT_READS, IMPLAUSIBLE_JUMP, METER_EXCHANGE, ROLLOVER,
    MeterExchange, VeeConfig, apportion, derive_intervals, diff_intervals)
from meterlink.readings import Quality, Reading

UTC = timezone.utc
T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
Q = timedelta(minutes=15)


def rd(minutes: float, value: int, quality: int = 0, meter: str = "M1", obis: str = "1.8.0") -> Reading:
    return Reading(meter, obis, T0 + timedelta(minutes=minutes), value, "Wh", quality)


def whs(result):
    return [i.wh for i in result.intervals]


def test_boundaries_with_real_readings_give_exact_unestimated_intervals():
    res = derive_intervals([rd(0, 1000), rd(15, 1010), rd(30, 1030)])
    assert whs(res) == [10, 20]
    assert [i.estimated for i in res.intervals] == [False, False]
    assert res.intervals[0].start == T0 and res.intervals[0].end == T0 + Q
    assert res.exceptions == ()


def test_readings_inside_an_interval_do_not_make_it_estimated():
    res = derive_intervals([rd(0, 0), rd(5, 3), rd(11, 7), rd(15, 10)])
    assert whs(res) == [10]
    assert not res.intervals[0].estimated


def test_missing_boundary_is_apportioned_by_largest_remainder_and_flagged_estimated():
    # gap 00:00 -> 00:40 of 101 Wh cut at 00:15 and 00:30: quotas 37.875, 37.875, 25.25
    # floors 37+37+25 = 99; the 2 Wh left go to the two largest remainders (.875, .875)
    res = derive_intervals([rd(0, 1000), rd(40, 1101)])
    assert whs(res) == [38, 38]          # the partial 00:30-00:40 piece is not a whole interval
    assert all(i.estimated and ESTIMATED in i.flags for i in res.intervals)


def test_apportion_ties_go_to_the_earliest_piece_and_negative_totals_mirror():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(-10, [1, 1, 1]) == [-4, -3, -3]
    assert apportion(0, [5, 7]) == [0, 0]
    with pytest.raises(TypeError):
        apportion(1.5, [1])  # type: ignore[arg-type]


def test_reading_flagged_estimated_by_the_gateway_makes_its_boundary_estimated():
    res = derive_intervals([rd(0, 0), rd(15, 10, Quality.ESTIMATED), rd(30, 20)])
    assert [i.estimated for i in res.intervals] == [True, True]


def test_interval_length_is_configurable_per_market_and_must_divide_a_day():
    res = derive_intervals([rd(0, 0), rd(60, 600)], VeeConfig(interval=timedelta(minutes=30)))
    assert whs(res) == [300, 300]
    assert res.intervals[0].end - res.intervals[0].start == timedelta(minutes=30)
    with pytest.raises(ValueError):
        VeeConfig(interval=timedelta(minutes=7))


def test_grid_is_aligned_in_utc_whatever_the_first_reading_time():
    res = derive_intervals([rd(7, 0), rd(52, 450)])
    assert [i.start for i in res.intervals] == [T0 + Q, T0 + 2 * Q]
    assert whs(res) == [150, 150]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 7200), st.integers(0, 50_000)), min_size=1, max_size=30),
       st.integers(0, 10**9), st.integers(1, 40))
def test_interval_sum_equals_register_difference_exactly_for_random_gaps(steps, first_value, tail_slots):
    # readings at random seconds; the first and last on the grid so the whole span is covered
    t, v = T0, first_value
    readings = [Reading("M1", "1.8.0", t, v, "Wh")]
    for dt, dv in steps:
        t, v = t + timedelta(seconds=dt), v + dv
        readings.append(Reading("M1", "1.8.0", t, v, "Wh"))
    end = T0 + Q * ((t - T0) // Q + tail_slots)
    v += tail_slots * 17
    readings.append(Reading("M1", "1.8.0", end, v, "Wh"))
    res = derive_intervals(reversed(readings))          # order of arrival does not matter
    ivs = res.intervals
    assert sum(i.wh for i in ivs) == v - first_value
    assert all(isinstance(i.wh, int) and i.wh >= 0 for i in ivs)
    assert [i.start for i in ivs] == [T0 + k * Q for k in range(len(ivs))]
    assert ivs[-1].end == end
    real = {r.taken_at for r in readings}
    assert all(i.estimated == (i.start not in real or i.end not in real) for i in ivs)
    assert res.exceptions == ()


def test_real_reading_replacing_an_estimate_yields_the_exact_diff():
    before = derive_intervals([rd(0, 0), rd(60, 1000)])
    assert whs(before) == [250, 250, 250, 250]
    after = derive_intervals([rd(0, 0), rd(30, 700), rd(60, 1000)])
    assert whs(after) == [350, 350, 150, 150]
    changes = diff_intervals(before.intervals, after.intervals)
    assert [c.delta_wh for c in changes] == [100, 100, -100, -100]
    assert sum(c.delta_wh for c in changes) == 0
    assert all(c.old.estimated and c.new.estimated for c in changes)  # 00:00-00:30 still lacks 00:15


def test_reading_on_the_boundary_releases_the_estimate_flag_and_later_data_adds_intervals():
    before = derive_intervals([rd(0, 0), rd(30, 100)])
    after = derive_intervals([rd(0, 0), rd(15, 60), rd(30, 100), rd(45, 130)])
    changes = diff_intervals(before.intervals, after.intervals)
    assert [(c.start, c.delta_wh, c.new.estimated) for c in changes] == [
        (T0, 10, False), (T0 + Q, -10, False), (T0 + 2 * Q, 30, False)]
    assert changes[-1].old is None
    assert sum(c.delta_wh for c in changes) == sum(whs(after)) - sum(whs(before))


def test_register_decrease_is_flagged_held_and_reported_never_billed_silently():
    res = derive_intervals([rd(0, 1000), rd(15, 900), rd(30, 950)])
    assert whs(res) == [-100, 50]
    bad, good = res.intervals
    assert DECREASE in bad.flags and bad.held and not good.held
    [exc] = res.exceptions
    assert (exc.kind, exc.meter_id, exc.obis, exc.at) == ("decrease", "M1", "1.8.0", T0 + Q)
    assert "decreased by 100 Wh" in exc.detail


def test_rollover_at_register_max_is_counted_flagged_and_billable():
    cfg = VeeConfig(register_max=99_999)
    res = derive_intervals([rd(0, 99_990), rd(30, 20)], cfg)
    assert whs(res) == [15, 15]
    assert all(ROLLOVER in i.flags and not i.held for i in res.intervals)
    assert [e.kind for e in res.exceptions] == ["rollover"]


def test_backwards_step_too_large_for_a_plausible_rollover_is_a_decrease():
    cfg = VeeConfig(register_max=99_999, max_power_w=10_000)   # at most 2500 Wh per 15 min
    res = derive_intervals([rd(0, 90_000), rd(15, 10)], cfg)   # a wrap would mean 10 010 Wh
    assert res.intervals[0].held and DECREASE in res.intervals[0].flags
    assert [e.kind for e in res.exceptions] == ["decrease"]


def test_meter_exchange_with_final_and_initial_reads_bills_both_meters_exactly():
    ex = MeterExchange("M1", "1.8.0", T0 + timedelta(minutes=20), final_read=5040, initial_read=0,
                       old_serial="A1", new_serial="B2")
    res = derive_intervals([rd(0, 5000), rd(30, 30, Quality.METER_EXCHANGE), rd(45, 60)], exchanges=[ex])
    assert whs(res) == [30, 40, 30]          # 40 Wh old meter over 20 min; 30 Wh new meter
    assert sum(whs(res)) == (5040 - 5000) + (60 - 0)
    assert [METER_EXCHANGE in i.flags for i in res.intervals] == [True, True, False]
    assert not any(i.held for i in res.intervals) and res.exceptions == ()


def test_serial_change_without_exchange_reads_is_held_and_reported():
    res = derive_intervals([rd(0, 5000), rd(15, 30, Quality.METER_EXCHANGE), rd(30, 60)])
    assert res.intervals[0].held and EXCHANGE_WITHOUT_READS in res.intervals[0].flags
    assert not res.intervals[1].held
    [exc] = res.exceptions
    assert exc.kind == "meter_exchange" and "final read" in exc.detail


def test_jump_above_max_power_times_time_is_flagged_and_held():
    cfg = VeeConfig(max_power_w=10_000)                          # 2500 Wh per 15 min at most
    res = derive_intervals([rd(0, 0), rd(15, 2500), rd(30, 5501)], cfg)
    ok, jump = res.intervals
    assert not ok.held and IMPLAUSIBLE_JUMP not in ok.flags
    assert jump.held and IMPLAUSIBLE_JUMP in jump.flags
    [exc] = res.exceptions
    assert exc.kind == "implausible_jump" and exc.at == T0 + 2 * Q and "10000 W" in exc.detail


def test_two_different_values_at_one_instant_are_reported_and_the_first_kept():
    res = derive_intervals([rd(0, 0), rd(15, 10), rd(15, 12), rd(30, 20)])
    assert whs(res) == [10, 10]
    assert [e.kind for e in res.exceptions] == ["conflicting_readings"]


def test_registers_are_derived_separately_per_meter_and_obis():
    res = derive_intervals([rd(0, 0), rd(15, 5), rd(0, 100, obis="2.8.0"), rd(15, 103, obis="2.8.0"),
                            rd(0, 7, meter="M2"), rd(15, 9, meter="M2")])
    assert sorted((i.meter_id, i.obis, i.wh) for i in res.intervals) == [
        ("M1", "1.8.0", 5), ("M1", "2.8.0", 3), ("M2", "1.8.0", 2)]


@settings(max_examples=100, deadline=None)
@given(st.integers(1_000, 10**6), st.data())
def test_rolling_registers_still_sum_to_the_true_consumption(register_max, data):
    modulus = register_max + 1
    steps = data.draw(st.lists(st.integers(0, modulus // 2 - 1), min_size=1, max_size=20))
    true_total = 0
    start_value = data.draw(st.integers(0, register_max))
    readings = [Reading("M1", "1.8.0", T0, start_value, "Wh")]
    for k, step in enumerate(steps, 1):
        true_total += step
        readings.append(Reading("M1", "1.8.0", T0 + k * Q, (start_value + true_total) % modulus, "Wh"))
    res = derive_intervals(readings, VeeConfig(register_max=register_max))
    assert [i.wh for i in res.intervals] == steps
    assert all(not i.held for i in res.intervals)
    assert sum(1 for e in res.exceptions if e.kind == "rollover") == (start_value + true_total) // modulus
