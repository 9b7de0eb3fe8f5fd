"""Plausibility at the edge: implausible readings are kept and flagged, never dropped or changed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from meterlink.clock import SimClock, SystemClock, clock_trusted
from meterlink.gateway.plausibility import MeterMemo, check_readings, flag_names, max_rise_wh
from meterlink.readings import Quality, Reading

T0 = datetime(2026, 11, 24, tzinfo=timezone.utc)


def r(obis, minutes, value, unit="Wh", meter="M1"):
    return Reading(meter, obis, T0 + timedelta(minutes=minutes), value, unit)


def poll(memo, readings, **kw):
    kw.setdefault("max_power_w", 69_000)
    return check_readings(memo, readings, **kw)


def test_a_rising_register_within_the_meters_power_is_not_flagged():
    _, memo = poll(None, [r("1.8.0", 0, 1_000_000)])
    out, _ = poll(memo, [r("1.8.0", 15, 1_000_000 + 17_250)])   # exactly 69 kW for 15 minutes
    assert out[0].quality == 0


def test_a_decreasing_register_is_kept_with_its_value_and_flagged():
    _, memo = poll(None, [r("1.8.0", 0, 1_000_000)])
    out, memo = poll(memo, [r("1.8.0", 15, 999_990), r("32.7.0", 15, 230_000, "mV")])
    assert out[0].value == 999_990 and out[0].quality == Quality.DECREASE
    assert out[1].quality == 0                           # instantaneous values are not registers
    # the register as read is the new baseline: the next normal rise is not flagged again
    out, _ = poll(memo, [r("1.8.0", 30, 1_000_500)])
    assert out[0].quality == 0


def test_a_rise_faster_than_max_power_allows_is_flagged_as_a_jump():
    _, memo = poll(None, [r("1.8.0", 0, 1_000_000)])
    out, _ = poll(memo, [r("1.8.0", 15, 1_000_000 + 17_250 + 11)], resolution_wh={"1.8.0": 10})
    assert out[0].quality == Quality.IMPLAUSIBLE_JUMP and out[0].value == 1_017_261
    out, _ = poll(memo, [r("1.8.0", 15, 1_000_000 + 17_250 + 10)], resolution_wh={"1.8.0": 10})
    assert out[0].quality == 0                           # one register step of slack


def test_a_changed_serial_number_flags_a_meter_exchange_and_starts_a_new_baseline():
    _, memo = poll(None, [r("1.8.0", 0, 5_000_000)], serial=10_000_001)
    out, memo = poll(memo, [r("1.8.0", 15, 120), r("2.8.0", 15, 0)], serial=10_000_999)
    assert [x.quality for x in out] == [Quality.METER_EXCHANGE] * 2   # not DECREASE: another meter
    assert memo.serial == 10_000_999
    out, _ = poll(memo, [r("1.8.0", 30, 400)], serial=10_000_999)
    assert out[0].quality == 0


def test_readings_taken_on_an_untrusted_clock_are_flagged():
    out, _ = poll(None, [r("1.8.0", 0, 1), r("1.7.0", 0, 100, "W")], clock_trusted=False)
    assert all(x.quality == Quality.CLOCK_UNTRUSTED for x in out)
    assert flag_names(out[0].quality | Quality.DECREASE) == ["DECREASE", "CLOCK_UNTRUSTED"]


def test_clocks_say_whether_they_are_trusted():
    sim = SimClock(T0)
    assert clock_trusted(sim)
    sim.trusted = False
    assert not clock_trusted(sim)
    assert clock_trusted(SystemClock(trusted=True)) and not clock_trusted(SystemClock(trusted=False))
    assert isinstance(SystemClock().trusted, bool)       # asks the kernel (adjtimex)
    assert clock_trusted(object())                       # clocks without the attribute: trusted


@given(st.lists(st.integers(min_value=-50_000, max_value=50_000), min_size=1, max_size=30),
       st.lists(st.integers(min_value=0, max_value=3_600_000), min_size=30, max_size=30))
def test_no_reading_is_ever_dropped_or_changed_only_flagged(steps, gaps_ms):
    memo, value, at = None, 1_000_000, T0
    for step, gap in zip(steps, gaps_ms):
        value += step
        at += timedelta(milliseconds=gap)
        reading = Reading("M1", "1.8.0", at, value, "Wh")
        out, new_memo = check_readings(memo, [reading], max_power_w=10_000)
        assert len(out) == 1 and out[0].value == value and out[0].taken_at == at
        prev = memo.registers["1.8.0"].value if memo else None
        flagged_decrease = bool(out[0].quality & Quality.DECREASE)
        assert flagged_decrease == (prev is not None and value < prev)
        if prev is not None and value >= prev:
            elapsed = gap
            assert bool(out[0].quality & Quality.IMPLAUSIBLE_JUMP) == (value - prev > max_rise_wh(10_000, elapsed))
        memo = new_memo
    assert isinstance(memo, MeterMemo)
