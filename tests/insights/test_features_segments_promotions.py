"""Behaviour features, segments and tailored promotions against hand-computed values."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterlink.errors import ConfigError, ValidationError
from meterlink.headend import insights, promotions, segments
from meterlink.headend.tariff import bundled_tariffs, load_tariff
from meterlink.headend.vee import Interval

UTC = timezone.utc
Q = timedelta(minutes=15)


def day_profile(meter: str, day: date, wh_at) -> list[Interval]:
    """96 quarter-hour import intervals of one UTC day; wh_at(hour, minute) gives each interval's Wh."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return [Interval(meter, "1.8.0", start + i * Q, start + (i + 1) * Q,
                     wh_at((start + i * Q).hour, (start + i * Q).minute)) for i in range(96)]


def night_heavy(hour: int, minute: int) -> int:
    if hour < 7:
        return 100          # 400 W overnight (storage heater)
    if hour == 17:
        return 250          # 1000 W at tea time
    return 50               # 200 W otherwise


def week(meter: str, first: date, wh_at) -> list[Interval]:
    return [iv for d in range(7) for iv in day_profile(meter, first + timedelta(days=d), wh_at)]


MON = date(2026, 11, 2)      # a Monday in GMT (London = UTC in November)
LONDON = "Europe/London"


def test_features_of_a_known_week_match_hand_computed_values():
    f = insights.compute_features("A", week("M1", MON, night_heavy), MON, MON + timedelta(days=7), LONDON)
    # per day: 7 h x 400 Wh + 1 h x 1000 Wh + 16 h x 200 Wh = 7000 Wh
    assert f.total_wh == 49_000 and f.avg_daily_wh == 7_000 and f.days_with_data == 7
    assert f.intervals == 7 * 96
    assert f.night_share == Decimal("0.4000")               # 2800 / 7000
    assert f.peak_share == Decimal("0.2000")                # 16-19 h: 200 + 1000 + 200
    assert f.weekend_share == Decimal("0.2857")             # 2 of 7 days, half-even at 4 places
    assert f.base_load_w == 200 and f.peak_demand_w == 1000
    assert f.peak_demand_at == datetime(2026, 11, 2, 17, 0, tzinfo=UTC)
    assert f.weekday_profile_wh[0] == 400 and f.weekday_profile_wh[17] == 1000 and f.weekday_profile_wh[12] == 200
    assert f.weekend_profile_wh == f.weekday_profile_wh
    assert sum(f.weekday_profile_wh) == 7000


def test_dst_autumn_day_counts_its_25_hours_in_local_time():
    # 2026-10-25: London clocks go back; the local day runs 23:00Z (24th) .. 00:00Z (26th) = 25 h
    start = datetime(2026, 10, 24, 23, 0, tzinfo=UTC)
    ivs = [Interval("M1", "1.8.0", start + i * Q, start + (i + 1) * Q, 100) for i in range(100)]
    f = insights.compute_features("A", ivs, date(2026, 10, 25), date(2026, 10, 26), LONDON)
    assert f.total_wh == 10_000 and f.days_with_data == 1 and f.intervals == 100
    assert f.weekend_profile_wh[1] == 800        # 01:00-02:00 local happened twice
    assert f.weekend_profile_wh[0] == 400 and f.weekend_share == Decimal("1.0000")


def test_intervals_outside_the_local_period_or_of_export_are_ignored():
    ivs = week("M1", MON, night_heavy)
    ivs.append(Interval("M1", "2.8.0", ivs[0].start, ivs[0].end, 99_999))
    f = insights.compute_features("A", ivs, MON + timedelta(days=1), MON + timedelta(days=2), LONDON)
    assert f.total_wh == 7_000 and f.days == 1


def test_trends_and_peer_comparison():
    cur = insights.compute_features("A", week("M1", MON, night_heavy), MON, MON + timedelta(days=7), LONDON)
    half = insights.compute_features("A", week("M1", MON - timedelta(days=7), lambda h, m: 50),
                                     MON - timedelta(days=7), MON, LONDON)   # 4800 Wh/day
    f = insights.with_trends(cur, half, None)
    assert f.trend_prev == Decimal("0.4583")      # (7000 - 4800) / 4800 = 0.458333...
    assert f.trend_last_year is None
    low = insights.compute_features("B", week("M2", MON, lambda h, m: 25), MON, MON + timedelta(days=7), LONDON)
    mid = insights.compute_features("C", week("M3", MON, lambda h, m: 50), MON, MON + timedelta(days=7), LONDON)
    out = insights.compare_with_peers({"A": cur, "B": low, "C": mid}, {"A": "GB", "B": "GB", "C": "GB"})
    # avg days 7000, 2400, 4800 -> median 4800
    assert out["A"].peer_ratio == Decimal("1.4583") and out["A"].peer_percentile == 100
    assert out["B"].peer_ratio == Decimal("0.5000") and out["B"].peer_percentile == 0
    assert out["C"].peer_percentile == 50


def test_empty_period_is_refused():
    with pytest.raises(ValidationError, match="empty"):
        insights.compute_features("A", [], MON, MON, LONDON)


def test_bundled_segments_place_accounts_by_their_rules():
    segs = segments.load_segments()
    night = insights.compute_features("A", week("M1", MON, night_heavy), MON, MON + timedelta(days=7), LONDON)
    flat = insights.compute_features("C", week("M3", MON, lambda h, m: 25), MON, MON + timedelta(days=7), LONDON)
    got = segments.evaluate(segs, {"A": night, "C": flat})
    assert "night_user" in got["A"] and "low_user" not in got["A"]
    assert got["C"] == ("low_user",)              # 2400 Wh/day over 7 days, flat


def test_segment_file_errors_name_file_line_and_key(tmp_path: Path):
    bad = tmp_path / "segments.toml"
    bad.write_text('[[segment]]\nid = "x"\nrule = [{ feature = "nite_share", op = ">=", value = "0.3" }]\n')
    with pytest.raises(ConfigError) as exc:
        segments.load_segments(bad)
    msg = str(exc.value)
    assert "segments.toml" in msg and "nite_share" in msg and "segments.toml:3 " in msg
    bad.write_text('[[segment]]\nid = "x"\nrule = [{ feature = "night_share", op = "~", value = "0.3" }]\n')
    with pytest.raises(ConfigError, match="operator"):
        segments.load_segments(bad)


def _tariffs():
    return {t.id: t for t in (load_tariff(p) for p in bundled_tariffs())}


def _account(acc_id: str, tariff_id: str, prepaid: bool = False) -> promotions.Account:
    return promotions.Account(acc_id, "GB", prepaid, _tariffs()[tariff_id])


def test_tariff_switch_is_offered_with_the_shadow_rated_saving():
    tariffs = _tariffs()
    promos = [p for p in promotions.load_promotions(known_tariffs=tariffs) if p.id == "gb-e7-night-switch"]
    ivs = {"A": week("M1", MON, night_heavy)}
    offers, skipped = promotions.make_offers(promos, {"A": _account("A", "gb-standard")}, {"A": ("night_user",)},
                                             ivs, tariffs, (MON, MON + timedelta(days=7)))
    assert skipped == []
    (offer,) = offers
    # standard: 49 kWh x 24.86p = 1218.14 -> 1218; 7 days x 50.46p = 353.22 -> 353; total 1571p
    # E7: night (23:30-06:30) 18.9 kWh x 13.88p = 262.332 -> 262; day 30.1 kWh x 30.67p = 923.167 -> 923;
    #     7 days x 52.14p = 364.98 -> 365; total 1550p
    assert offer.current_total_minor == 1571 and offer.shadow_total_minor == 1550
    assert offer.saving_minor == 21 and "0.21 GBP less" in offer.message


def test_a_switch_that_would_cost_the_customer_more_is_never_offered():
    tariffs = _tariffs()
    promos = [p for p in promotions.load_promotions(known_tariffs=tariffs) if p.id == "gb-e7-night-switch"]
    flat = {"C": week("M3", MON, lambda h, m: 50)}     # 4.8 kWh a day, mostly by day: E7 costs more
    offers, skipped = promotions.make_offers(promos, {"C": _account("C", "gb-standard")}, {"C": ("night_user",)},
                                             flat, tariffs, (MON, MON + timedelta(days=7)))
    assert offers == [] and [s.reason for s in skipped] == ["no_saving"]


def test_cost_cap_gives_the_budget_to_the_largest_savings_first():
    tariffs = _tariffs()
    (promo,) = [p for p in promotions.load_promotions(known_tariffs=tariffs) if p.id == "gb-winter-day-10"]
    from dataclasses import replace
    accounts = {"A": _account("A", "gb-standard"), "B": _account("B", "gb-standard")}
    ivs = {"A": week("M1", MON, night_heavy), "B": week("M2", MON, lambda h, m: 25)}
    segs = {"A": ("rising_use",), "B": ("high_base_load",)}
    uncapped, _ = promotions.make_offers([replace(promo, cost_cap_minor=None)], accounts, segs, ivs, tariffs,
                                         (MON, MON + timedelta(days=7)))
    # 10 % of the energy line: A 1218.14p -> 121.814p; B 16.8 kWh x 24.86 = 417.648p -> 41.7648p
    assert {o.account_id: o.saving_minor for o in uncapped} == {"A": 122, "B": 42}
    capped, skipped = promotions.make_offers([replace(promo, cost_cap_minor=150)], accounts, segs, ivs, tariffs,
                                             (MON, MON + timedelta(days=7)))
    assert [o.account_id for o in capped] == ["A"]
    assert [(s.account_id, s.reason) for s in skipped] == [("B", "cap_reached")]


def test_topup_bonus_goes_to_prepaid_accounts_only():
    tariffs = _tariffs()
    (promo,) = [p for p in promotions.load_promotions(known_tariffs=tariffs) if p.id == "gb-payg-bonus-5"]
    accounts = {"P": _account("P", "gb-standard", prepaid=True), "Q": _account("Q", "gb-standard")}
    ivs = {"P": week("M1", MON, night_heavy), "Q": week("M2", MON, night_heavy)}
    offers, skipped = promotions.make_offers([promo], accounts, {"P": ("night_user",), "Q": ("night_user",)},
                                             ivs, tariffs, (MON, MON + timedelta(days=7)))
    assert [(o.account_id, o.est_cost_minor) for o in offers] == [("P", 79)]   # 5 % of 1571p = 78.55 -> 79
    assert [(s.account_id, s.reason) for s in skipped] == [("Q", "postpaid")]


def test_promotion_file_errors_are_named(tmp_path: Path):
    bad = tmp_path / "p.toml"
    bad.write_text('[[promotion]]\nid = "x"\nmarket = "GB"\nkind = "tariff_switch"\ntariff = "nope"\n')
    with pytest.raises(ConfigError, match="unknown tariff 'nope'"):
        promotions.load_promotions(bad, known_tariffs=_tariffs())
    bad.write_text('[[promotion]]\nid = "x"\nmarket = "GB"\nkind = "percent_discount"\npercent = "150"\n')
    with pytest.raises(ConfigError, match=r"\(0, 100\]"):
        promotions.load_promotions(bad)


def test_outcomes_count_offers_acceptances_cost_and_consumption_change():
    offers = [promotions.Offer("p1", a, "percent_discount", "", 10, 10, 100) for a in ("A", "B", "C", "D")]
    out = promotions.outcomes(offers, {("p1", "A"): 120, ("p1", "B"): 80},
                              before={"A": 8000, "B": 6000, "C": 5000}, after={"A": 7000, "B": 6000})
    (o,) = out
    assert (o.offered, o.accepted, o.cost_minor) == (4, 2, 200)
    assert o.acceptance_rate == Decimal("0.5000")
    assert (o.avg_daily_wh_before, o.avg_daily_wh_after) == (7000, 6500)
    assert o.consumption_change == Decimal("-0.0714")


def test_fixed_discount_takes_pence_off_every_kwh_of_its_band_and_never_more_than_the_band_costs():
    tariffs = _tariffs()
    (promo,) = [p for p in promotions.load_promotions(known_tariffs=tariffs) if p.id == "gb-night-3p"]
    ivs = {"A": week("M1", MON, night_heavy)}
    offers, _ = promotions.make_offers([promo], {"A": _account("A", "gb-economy7")}, {"A": ("night_user",)}, ivs,
                                       tariffs, (MON, MON + timedelta(days=7)))
    # E7 night (23:30-06:30): 18.9 kWh x 3p = 56.7p off
    (offer,) = offers
    assert offer.saving_minor == 57 and "3 GBP minor units off every kWh of night energy" in offer.message
    from dataclasses import replace
    from meterlink.headend.rating import quote
    huge = replace(promo, per_kwh_minor=Decimal(1000), valid_from=None, valid_to=None).as_rating_promotion()
    q = quote(tariffs["gb-economy7"], ivs["A"], "A", MON, MON + timedelta(days=7), promotions=(huge,))
    night = sum(l.amount_dec for l in q.lines if l.kind == "energy" and l.band == "night")
    (line,) = [l for l in q.lines if l.kind == "promotion"]
    assert line.amount_dec == -night          # capped at what the night energy cost


def test_fixed_discount_needs_a_positive_per_kwh_amount(tmp_path: Path):
    bad = tmp_path / "p.toml"
    bad.write_text('[[promotion]]\nid = "x"\nmarket = "GB"\nkind = "fixed_discount"\nper_kwh_minor = "-1"\n')
    with pytest.raises(ConfigError, match="per_kwh_minor"):
        promotions.load_promotions(bad)
