"""Offline pricing with the pulled tariff (gateway/pricing.py): the same Wh in the same band as the
head-end's VEE + rating, local time, weekday/weekend/holiday, VAT-inclusive; which price is in force."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterlink.errors import ValidationError
from meterlink.gateway import credit as C
from meterlink.gateway.configpull import ConfigState, Delta, apply_delta
from meterlink.gateway.pricing import TariffPrice, price_for_account, tariff_from_text
from meterlink.headend.rating import rate_intervals
from meterlink.headend.tariff import bundled_tariffs
from meterlink.headend.vee import VeeConfig, derive_intervals
from meterlink.readings import Reading

UTC = timezone.utc


def text(fragment: str) -> str:
    return next(p for p in bundled_tariffs() if fragment in p.name).read_text()


E7 = tariff_from_text("gb-economy7", text("economy7"))
ES = tariff_from_text("es-20td", text("es_20td"))


def e7(vat="0.05", minutes=30) -> TariffPrice:
    return TariffPrice(E7, "gb-economy7", Decimal(vat), timedelta(minutes=minutes))


def test_a_reading_across_a_band_boundary_is_split_over_the_grid_by_time():
    # 2026-03-09 (GMT): night until 06:30 local; 06:00 -> 07:00 is half night, half day
    p = e7(vat="0")
    start = datetime(2026, 3, 9, 6, 0, tzinfo=UTC)
    assert p.pieces(1000, start, start + timedelta(hours=1)) == [(start, 500), (start + timedelta(minutes=30), 500)]
    night, day = E7.versions[-1].band("night").rate, E7.versions[-1].band("day").rate
    assert p.net(1000, start, start + timedelta(hours=1)) == (500 * night + 500 * day) / 1000


def test_bands_are_local_time_so_summer_shifts_the_boundary_by_an_hour_in_utc():
    p = e7(vat="0")
    night = E7.versions[-1].band("night").rate
    winter = datetime(2026, 1, 14, 23, 30, tzinfo=UTC)        # 23:30 GMT = 23:30 local: night
    summer = datetime(2026, 7, 14, 22, 30, tzinfo=UTC)        # 22:30 UTC = 23:30 BST: night
    assert p.net(1000, winter, winter + timedelta(minutes=30)) == night
    assert p.net(1000, summer, summer + timedelta(minutes=30)) == night
    assert p.net(1000, winter - timedelta(hours=1), winter - timedelta(minutes=30)) != night


def test_weekends_and_public_holidays_are_priced_as_the_tariff_defines_them():
    # ES 2.0TD: weekday 10:00-14:00 is punta; Saturdays, Sundays and national holidays are valle all day
    p = TariffPrice(ES, "es-20td", Decimal(0), timedelta(minutes=15))
    rates = {b.name: b.rate for b in ES.versions[-1].bands}
    noon = lambda d: datetime(2026, *d, 11, 0, tzinfo=UTC)   # noqa: E731 - 12:00 CET
    weekday, saturday, holiday = noon((12, 9)), noon((12, 12)), noon((12, 8))   # Wed, Sat, Tue 8 Dec (Inmaculada)
    end = lambda t: t + timedelta(minutes=15)                 # noqa: E731
    valle = min(rates.values())
    assert p.net(1000, weekday, end(weekday)) > valle
    assert p.net(1000, saturday, end(saturday)) == valle == p.net(1000, holiday, end(holiday))


def test_the_price_includes_vat_as_the_ledger_splits_it():
    t = datetime(2026, 3, 9, 12, tzinfo=UTC)
    net = e7(vat="0").amount(1000, t, t + timedelta(minutes=30))
    assert e7(vat="0.05").amount(1000, t, t + timedelta(minutes=30)) == net * Decimal("1.05")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6 * 3600), st.integers(0, 3_000)), min_size=1, max_size=40),
       st.sampled_from([15, 30, 60]), st.integers(0, 365 * 24))
def test_gateway_charges_equal_the_headend_rating_of_the_same_readings_exactly(steps, minutes, start_hour):
    """Readings at arbitrary instants: the sum of the gateway's exact charges equals the head-end's
    exact rating of the VEE intervals derived from the same readings (grid-aligned ends)."""
    p = TariffPrice(ES, "es-20td", Decimal("0.21"), timedelta(minutes=minutes))
    grid = timedelta(minutes=minutes)
    t = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=start_hour)
    value = 1_000
    readings = [Reading("M1", "1.8.0", t, value, "Wh")]
    gateway = Decimal(0)
    for seconds, wh in steps:
        nxt = t + timedelta(seconds=seconds)
        gateway += p.amount(wh, t, nxt)
        t, value = nxt, value + wh
        readings.append(Reading("M1", "1.8.0", t, value, "Wh"))
    end = datetime(2026, 1, 1, tzinfo=UTC) + (t - datetime(2026, 1, 1, tzinfo=UTC) + grid - timedelta(microseconds=1)) // grid * grid
    if end > t:
        gateway += p.amount(7, t, end)
        readings.append(Reading("M1", "1.8.0", end, value + 7, "Wh"))
    intervals = derive_intervals(readings, VeeConfig(interval=grid)).intervals
    headend = sum(a.amount_dec for a in rate_intervals({}, intervals, ES, "ACC1").values())
    assert gateway == headend * Decimal("1.21")


def test_charge_carries_the_sub_minor_residue_so_the_sum_is_the_exact_total_rounded_once():
    p = e7()
    s = C.AccountState(account="M1", credit_balance=100_000, cfg=C.PrepaymentConfig(max_credit_balance=1_000_000))
    t = datetime(2026, 3, 9, 5, 0, tzinfo=UTC)
    exact, charged = Decimal(0), 0
    for i in range(50):
        nxt = t + timedelta(minutes=13)
        s, events = C.charge(s, 37 + i, p, nxt, since=t)
        exact += p.amount(37 + i, t, nxt)
        charged += sum(e.amount_minor for e in events if isinstance(e, C.Charged))
        t = nxt
    from meterlink.money import round_minor
    assert charged == round_minor(exact, "half_up")


# --------------------------------------------------------------------------- which tariff, from the pulled state

def state_with(*changes) -> ConfigState:
    versions = range(1, len(changes) + 1)
    return apply_delta(ConfigState(), Delta("gw", 0, len(changes), 0, tuple(
        {"version": v, "kind": k, "body": b} for v, (k, b) in zip(versions, changes))))


ASSIGN = ("payg.tariff", {"account": "ACC1", "tariff": "gb-economy7", "vat_rate": "0.05", "interval_minutes": 30})


def test_the_pulled_assignment_names_the_tariff_vat_and_grid_of_an_account():
    state = state_with(("tariff.set", {"name": "gb-economy7", "toml": text("economy7")}), ASSIGN)
    p = price_for_account(state, "ACC1", "GBP")
    assert p.tariff.id == "gb-economy7" and p.vat_rate == Decimal("0.05") and p.interval == timedelta(minutes=30)
    assert p.config_version == 2
    assert price_for_account(state, "ACC2", "GBP") is None                      # not assigned: fallback
    withdrawn = apply_delta(state, Delta("gw", 2, 3, 0, ({"version": 3, "kind": "payg.tariff",
                                                          "body": {"account": "ACC1", "tariff": None}},)))
    assert price_for_account(withdrawn, "ACC1", "GBP") is None
    assert ConfigState.from_json(state.to_json()) == state


@pytest.mark.parametrize("changes,currency,match", [
    ((ASSIGN,), "GBP", "assigned but was not pulled"),
    ((("tariff.set", {"name": "gb-economy7", "toml": "[tariff]\nid = 1\n"}), ASSIGN), "GBP", "not usable"),
    ((("tariff.set", {"name": "gb-economy7", "toml": text("economy7")}), ASSIGN), "EUR", "is in GBP"),
])
def test_an_unusable_assignment_is_refused_with_the_reason(changes, currency, match):
    with pytest.raises(ValidationError, match=match):
        price_for_account(state_with(*changes), "ACC1", currency)


def test_the_daemon_hook_prices_with_the_pulled_tariff_and_logs_the_fallback(tmp_path, caplog, payg_gateway):
    import json

    from meterlink.gateway.configpull import save_state

    caplog.set_level(logging.INFO, logger="meterlink.gateway.payg")
    gw, hook, clock, _ = payg_gateway()
    pm = hook.meters["H-1"]
    assert pm.price == Decimal("100") and hook.price_in_force["H-1"] == "flat"
    assert "FALLBACK flat price_minor_per_kwh 100" in caplog.text
    assert "no standing charge deducted" in caplog.text
    hook.config_state_path = tmp_path / "config-state.json"
    save_state(hook.config_state_path, state_with(("tariff.set", {"name": "gb-economy7", "toml": text("economy7")}),
                                                  ASSIGN))
    hook.refresh_prices()
    assert isinstance(pm.price, TariffPrice) and hook.price_in_force["H-1"].startswith("tariff gb-economy7@2#")
    assert "pricing with the pulled tariff 'gb-economy7'" in caplog.text
    caplog.clear()
    hook.refresh_prices()                                  # unchanged file: nothing re-read, nothing logged
    assert caplog.text == ""
    broken = json.loads(hook.config_state_path.read_text())
    broken["tariffs"]["gb-economy7"] = "not toml ["
    hook.config_state_path.write_text(json.dumps(broken))
    hook.refresh_prices()                                  # unusable now: the tariff in force is kept
    assert isinstance(pm.price, TariffPrice) and "keeping tariff gb-economy7@2#" in caplog.text
    save_state(hook.config_state_path, state_with(("tariff.set", {"name": "x", "toml": text("economy7")})))
    hook.refresh_prices()                                  # assignment gone: back to the flat fallback
    assert pm.price == Decimal("100") and hook.price_in_force["H-1"] == "flat"
