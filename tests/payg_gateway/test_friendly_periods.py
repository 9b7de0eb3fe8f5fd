"""Friendly-credit periods: local weekly windows, public holidays, merged spans, DST days."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.errors import ConfigError
from meterlink.gateway.friendly import (
    friendly_config_from_mapping, friendly_minutes, friendly_period_end, in_friendly_period)

UTC = timezone.utc


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize("instant, friendly", [
    ("2026-11-25 12:00", False),   # Wednesday midday
    ("2026-11-25 09:59", True),    # Wednesday morning before 10:00
    ("2026-11-25 10:00", False),   # the window's end is exclusive
    ("2026-11-25 17:59", False),
    ("2026-11-25 18:00", True),
    ("2026-11-28 13:00", True),    # Saturday
    ("2026-11-29 23:59", True),    # Sunday night
    ("2026-12-25 13:00", True),    # Christmas Day (a Friday) is a public holiday
    ("2026-12-28 13:00", True),    # Boxing Day (observed), Monday
    ("2026-12-29 13:00", False),
])
def test_weekday_nights_weekends_and_holidays_are_friendly(gb_friendly, instant, friendly):
    assert in_friendly_period(gb_friendly, t(instant)) is friendly


def test_friday_night_span_runs_to_monday_ten_local(gb_friendly):
    assert friendly_period_end(gb_friendly, t("2026-11-27 23:00")) == t("2026-11-30 10:00")
    assert friendly_period_end(gb_friendly, t("2026-11-27 18:00")) == t("2026-11-30 10:00")
    assert friendly_period_end(gb_friendly, t("2026-11-25 12:00")) is None


def test_a_monday_holiday_extends_the_weekend_span_to_tuesday(gb_friendly):
    # Early May bank holiday: Monday 4 May 2026 (BST, UTC+1)
    assert friendly_period_end(gb_friendly, t("2026-05-01 22:00")) == t("2026-05-05 09:00")
    # Easter 2026: Good Friday 3 April and Easter Monday 6 April join Thursday night to Tuesday 10:00 BST
    assert friendly_period_end(gb_friendly, t("2026-04-02 19:00")) == t("2026-04-07 09:00")


def test_weekend_span_over_the_spring_forward_night_is_one_hour_shorter(gb_friendly):
    start, end = t("2026-03-27 18:00"), friendly_period_end(gb_friendly, t("2026-03-27 18:00"))
    assert end == t("2026-03-30 09:00")            # Monday 10:00 BST
    assert end - start == timedelta(hours=63)      # 64 wall-clock hours minus the skipped one
    assert in_friendly_period(gb_friendly, t("2026-03-29 01:30"))   # 02:30 BST Sunday


def test_weekend_span_over_the_fall_back_night_is_one_hour_longer(gb_friendly):
    start = t("2026-10-23 17:00")                  # Friday 18:00 BST
    end = friendly_period_end(gb_friendly, start)
    assert end == t("2026-10-26 10:00")            # Monday 10:00 GMT
    assert end - start == timedelta(hours=65)


def test_a_window_edge_in_the_skipped_hour_ends_at_the_transition_instant():
    cfg = friendly_config_from_mapping({"timezone": "Europe/London",
                                        "windows": [{"days": ["all"], "start": "22:00", "end": "01:30"}]})
    # Sunday 29 March 2026: 01:00 GMT jumps to 02:00 BST at 01:00 UTC; 01:30 local never exists
    assert friendly_period_end(cfg, t("2026-03-29 00:10")) == t("2026-03-29 01:00")
    assert not in_friendly_period(cfg, t("2026-03-29 01:00"))


def test_excluded_holiday_names_are_not_friendly():
    cfg = friendly_config_from_mapping({"timezone": "Europe/London", "country": "GB", "subdivision": "ENG",
                                        "exclude_holidays": ["May Day"], "windows": []})
    assert not in_friendly_period(cfg, t("2026-05-04 12:00"))
    assert in_friendly_period(cfg, t("2026-05-25 12:00"))    # Spring Bank Holiday still counts


@pytest.mark.parametrize("bad, key", [
    ({"timezone": "Mars/Olympus"}, "friendly_credit.timezone"),
    ({"timezone": "UTC", "windows": [{"days": ["funday"], "start": "00:00", "end": "01:00"}]},
     "friendly_credit.windows[0].days"),
    ({"timezone": "UTC", "windows": [{"days": ["all"], "start": "25:00", "end": "01:00"}]},
     "friendly_credit.windows[0].start"),
    ({"timezone": "UTC", "country": "XX"}, "friendly_credit.country"),
    ({"timezone": "UTC", "weekdays": []}, "friendly_credit"),
])
def test_bad_configuration_names_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        friendly_config_from_mapping(bad)
    assert err.value.key == key


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31)),)
def test_span_end_is_the_first_instant_outside_the_period(gb_friendly, naive):
    instant = naive.replace(tzinfo=UTC, second=0, microsecond=0)
    end = friendly_period_end(gb_friendly, instant)
    if not in_friendly_period(gb_friendly, instant):
        assert end is None
        return
    assert end is not None and end > instant
    assert not in_friendly_period(gb_friendly, end)
    # every minute between the instant and the end is friendly (checked on a 1-hour grid + the last minute)
    probe = instant
    while probe < end:
        assert in_friendly_period(gb_friendly, probe)
        probe += timedelta(hours=1)
    assert in_friendly_period(gb_friendly, end - timedelta(minutes=1))


def test_per_date_minutes_are_merged_and_sorted(gb_friendly):
    from datetime import date
    assert friendly_minutes(gb_friendly, date(2026, 11, 25)) == ((0, 600), (1080, 1440))
    assert friendly_minutes(gb_friendly, date(2026, 11, 28)) == ((0, 1440),)
