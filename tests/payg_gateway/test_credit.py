"""Offline prepayment account: draw order, emergency credit, top-up split, grants, supply decisions, conservation."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.errors import ValidationError
from meterlink.gateway import credit as C

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)          # a Monday, outside the GB friendly hours


def acct(**kw) -> C.AccountState:
    cfg = kw.pop("cfg", None) or C.PrepaymentConfig(**kw.pop("cfg_kw", {}))
    return C.AccountState(account="M1", cfg=cfg, **kw)


def kinds(events) -> list[str]:
    return [e.kind for e in events]


# --------------------------------------------------------------------------- charge

def test_consumption_is_drawn_from_the_wh_grant_before_any_credit():
    s = acct(credit_balance=1000, granted_wh=500)
    s, ev = C.charge(s, 700, "30", T0)
    (charged,) = [e for e in ev if isinstance(e, C.Charged)]
    assert charged.wh_from_grant == 500 and charged.amount_minor == 6     # 200 Wh at 30/kWh
    assert s.granted_wh == 0 and s.credit_balance == 994


def test_sub_minor_pricing_residue_is_carried_not_lost():
    s = acct(credit_balance=1000)
    total = 0
    for i in range(10):                                   # 10 x 10 Wh at 33/kWh = 3.3 minor units
        s, ev = C.charge(s, 10, "33", T0 + timedelta(minutes=i))
        total += ev[0].amount_minor
    assert total == 3 and s.charge_residue == Decimal("0.3")
    assert s.credit_balance == 997


def test_emergency_credit_is_not_drawn_until_the_customer_accepts_it():
    s = acct(credit_balance=50)
    s, ev = C.charge(s, 10_000, "30", T0)                 # 300 due, 50 credit
    assert s.emergency_credit_offered and not s.emergency_credit_accepted
    assert s.emergency_credit_used == 0 and s.accumulated_debt == 250
    assert "OverUsage" in kinds(ev) and "EmergencyCreditOffered" in kinds(ev)


def test_accepted_emergency_credit_is_drawn_after_credit_and_before_debt():
    s = acct(credit_balance=50)
    s, _ = C.charge(s, 0, "30", T0)                       # below the threshold: offered
    s, ev = C.accept_emergency_credit(s, T0)
    assert kinds(ev) == ["EmergencyCreditTaken"] and ev[0].amount_minor == 1000
    s, ev = C.charge(s, 10_000, "30", T0 + timedelta(hours=1))
    c = ev[0]
    assert (c.from_credit, c.from_emergency_credit, c.to_accumulated_debt) == (50, 250, 0)
    assert s.emergency_credit_available == 750


def test_exhausting_emergency_credit_is_reported_once():
    s = acct(credit_balance=0)
    s, _ = C.charge(s, 0, "30", T0)
    s, _ = C.accept_emergency_credit(s, T0)
    s, ev1 = C.charge(s, 40_000, "30", T0 + timedelta(hours=1))   # 1200 > 1000 EC
    s, ev2 = C.charge(s, 1000, "30", T0 + timedelta(hours=2))
    assert kinds(ev1).count("EmergencyCreditExhausted") == 1
    assert "EmergencyCreditExhausted" not in kinds(ev2)
    assert s.accumulated_debt == 200 + 30


def test_emergency_credit_cannot_be_accepted_before_it_is_offered_or_twice():
    s = acct(credit_balance=5000)
    s, ev = C.accept_emergency_credit(s, T0)
    assert ev[0].reason == "not_offered"
    s = replace(s, credit_balance=0)
    s, _ = C.charge(s, 0, "30", T0)
    s, _ = C.accept_emergency_credit(s, T0)
    s, ev = C.accept_emergency_credit(s, T0)
    assert ev[0].reason == "already_accepted"


def test_low_balance_is_raised_once_per_crossing():
    s = acct(credit_balance=600)
    s, ev1 = C.charge(s, 5000, "3", T0)                   # 600 -> 585: still above 500
    s, ev2 = C.charge(s, 50_000, "3", T0 + timedelta(hours=1))   # -> 435
    s, ev3 = C.charge(s, 1000, "3", T0 + timedelta(hours=2))
    assert "LowBalance" not in kinds(ev1)
    assert kinds(ev2).count("LowBalance") == 1 and "LowBalance" not in kinds(ev3)


def test_time_never_runs_backwards_for_an_account():
    s, _ = C.charge(acct(credit_balance=10), 0, "30", T0)
    with pytest.raises(ValidationError, match="M1.*before the last"):
        C.charge(s, 0, "30", T0 - timedelta(seconds=1))


def test_negative_consumption_and_float_amounts_are_refused():
    with pytest.raises(ValidationError, match="M1.*negative consumption"):
        C.charge(acct(), -1, "30", T0)
    with pytest.raises(TypeError):
        C.charge(acct(), 1.5, "30", T0)
    with pytest.raises(TypeError):
        C.apply_topup(acct(), 10.0, "t", T0)


def test_tariff_function_is_evaluated_at_the_instant_of_consumption():
    price = lambda at: Decimal("10") if at.hour < 7 else Decimal("40")   # noqa: E731
    s = acct(credit_balance=1000)
    s, ev = C.charge(s, 1000, price, datetime(2026, 3, 2, 3, tzinfo=UTC))
    assert ev[0].amount_minor == 10
    s, ev = C.charge(s, 1000, price, datetime(2026, 3, 2, 9, tzinfo=UTC))
    assert ev[0].amount_minor == 40


# --------------------------------------------------------------------------- top-ups

def test_topup_is_split_recovery_then_debt_then_emergency_credit_then_balance():
    cfg = C.PrepaymentConfig(payment_recovery_percent=Decimal(10), payment_recovery_cap=300)
    s = acct(cfg=cfg, arrears=5000, accumulated_debt=400, emergency_credit_used=700,
             emergency_credit_offered=True, emergency_credit_accepted=True)
    s, ev = C.apply_topup(s, 2000, "tok-1", T0)
    t = ev[0]
    assert (t.to_debt_recovery, t.to_accumulated_debt, t.to_emergency_credit, t.to_credit) == (200, 400, 700, 700)
    assert s.arrears == 4800 and s.credit_balance == 700
    s, ev = C.apply_topup(s, 2000, "tok-2", T0 + timedelta(hours=1))
    assert ev[0].to_debt_recovery == 100                  # capped at 300 per week
    s, ev = C.apply_topup(s, 2000, "tok-3", T0 + timedelta(days=7))
    assert ev[0].to_debt_recovery == 200                  # a new week, a new cap


def test_topup_over_the_maximum_balance_is_refused_whole():
    s = acct(cfg_kw={"max_credit_balance": 10_000}, credit_balance=9000, accumulated_debt=100)
    s2, ev = C.apply_topup(s, 1200, "tok-big", T0)
    assert kinds(ev) == ["TopUpRefused"] and ev[0].reason == "over_maximum_credit"
    assert s2 == s
    s3, ev = C.apply_topup(s, 1100, "tok-fits", T0)       # 100 repays debt, 1000 reaches exactly the max
    assert s3.credit_balance == 10_000 and s3.accumulated_debt == 0


def test_topup_in_another_currency_or_not_positive_is_refused():
    s = acct()
    assert C.apply_topup(s, 100, "t", T0, currency="EUR")[1][0].reason == "currency_mismatch"
    assert C.apply_topup(s, 0, "t", T0)[1][0].reason == "not_positive"


def test_time_based_debt_recovery_takes_a_daily_amount_from_credit():
    cfg = C.PrepaymentConfig(time_recovery_per_day=Decimal(100))
    s = acct(cfg=cfg, arrears=1000, credit_balance=5000)
    s, _ = C.charge(s, 0, "30", T0)
    s, ev = C.charge(s, 0, "30", T0 + timedelta(hours=36))
    rec = [e for e in ev if isinstance(e, C.DebtRecovered)]
    assert rec[0].amount_minor == 150 and rec[0].method == "time"
    assert s.arrears == 850 and s.credit_balance == 4850


def test_headend_arrears_from_an_answer_count_recoveries_made_since_the_report_point():
    cfg = C.PrepaymentConfig(payment_recovery_percent=Decimal(25), payment_recovery_cap=1_000)
    s = acct(cfg=cfg)
    s, _ = C.apply_topup(s, 400, "tok-1", T0)             # no arrears known yet: nothing recovered
    s, usage = C.begin_report(s)
    assert usage.recovered_arrears == 0
    s, _ = C.apply_grant(s, grant(0, amount=500, arrears_minor=800), T0 + timedelta(minutes=1))
    assert s.arrears == 800                               # the head-end's register reaches the gateway
    s, ev = C.apply_topup(s, 1_000, "tok-2", T0 + timedelta(minutes=2))
    assert ev[0].to_debt_recovery == 250 and s.arrears == 550
    s, usage = C.begin_report(s)                          # reports the 250
    assert usage.recovered_arrears == 250
    s, ev = C.apply_topup(s, 400, "tok-3", T0 + timedelta(minutes=3))    # after the report point
    assert ev[0].to_debt_recovery == 100 and s.arrears == 450
    # the answer says 550 outstanding (the 250 booked); the 100 since the report is not booked yet
    s, _ = C.apply_grant(s, grant(1, amount=500, arrears_minor=550), T0 + timedelta(minutes=4))
    assert s.arrears == 450 and s.unreported.recovered_arrears == 100
    # arrears raised at the head-end meanwhile; an answer without a grant carries them too
    s, _ = C.begin_report(s)
    s, _ = C.acknowledge(s, T0 + timedelta(minutes=5), balance_minor=0, arrears_minor=1_450)
    assert s.arrears == 1_450
    s, _ = C.begin_report(s)
    s, _ = C.acknowledge(s, T0 + timedelta(minutes=6), balance_minor=0)   # absent (older head-end): kept
    assert s.arrears == 1_450


# --------------------------------------------------------------------------- grants

def grant(n=0, amount=1000, wh=0, session="S1", valid=T0 + timedelta(hours=1), **kw) -> C.Grant:
    return C.Grant(session_id=session, request_number=n, valid_until=valid, amount_minor=amount, wh=wh, **kw)


def test_a_grant_is_applied_once_and_repays_debt_first():
    s = acct(accumulated_debt=300)
    s, ev = C.apply_grant(s, grant(0, 1000), T0)
    assert ev[-1].to_accumulated_debt == 300 and s.credit_balance == 700
    s2, ev = C.apply_grant(s, grant(0, 1000), T0)
    assert ev[-1].reason == "replay" and s2.credit_balance == 700


def test_a_new_grant_replaces_the_unused_rest_of_the_last_counted_from_the_report_point():
    s, _ = C.apply_grant(acct(), grant(0, 1000), T0)
    s, _ = C.charge(s, 10_000, "30", T0 + timedelta(minutes=1))           # 300 from the window
    s, report = C.begin_report(s)
    assert (report.used_minor, report.from_credit) == (300, 300)
    s, _ = C.charge(s, 2_000, "30", T0 + timedelta(minutes=2))            # 60 while the update is in flight
    s, _ = C.apply_topup(s, 500, "tok-1", T0 + timedelta(minutes=3))      # a token applied meanwhile
    s, ev = C.apply_grant(s, grant(1, 800), T0 + timedelta(minutes=4))
    # not 700 + 800: the grant replaces the rest; what came after the report point stays counted
    assert s.credit_balance == 800 - 60 + 500 and s.in_flight is None
    assert s.unreported.used_minor == 60 and s.unreported.tokens == (("tok-1", 500),)


def test_expired_bad_and_foreign_currency_grants_are_refused():
    s = acct()
    assert C.apply_grant(s, grant(valid=T0), T0)[1][-1].reason == "expired"
    assert C.apply_grant(s, grant(amount=-1), T0)[1][-1].reason == "bad_grant"
    assert C.apply_grant(s, grant(currency="EUR"), T0)[1][-1].reason == "currency_mismatch"
    assert C.apply_grant(s, grant(final_unit_action="explode"), T0)[1][-1].reason == "bad_grant"


def test_grant_validity_expiry_asks_for_an_update_once():
    s, _ = C.apply_grant(acct(), grant(valid=T0 + timedelta(minutes=30)), T0)
    s, ev1 = C.charge(s, 0, "30", T0 + timedelta(minutes=31))
    s, ev2 = C.charge(s, 0, "30", T0 + timedelta(minutes=32))
    assert kinds(ev1).count("GrantValidityExpired") == 1 and "GrantValidityExpired" not in kinds(ev2)


# --------------------------------------------------------------------------- supply decisions

def test_exhausted_credit_outside_friendly_hours_opens_the_relay(gb_friendly):
    d = C.decide_supply(acct(credit_balance=0), gb_friendly, T0)
    assert d.relay == "open" and d.switch and kinds(d.events) == ["Disconnected"]
    again = C.decide_supply(d.state, gb_friendly, T0 + timedelta(minutes=1))
    assert again.relay == "open" and not again.switch


def test_exhausted_credit_inside_a_friendly_period_keeps_supply_and_warns_once(gb_friendly):
    friday_night = datetime(2026, 3, 6, 23, tzinfo=UTC)
    d = C.decide_supply(acct(credit_balance=0), gb_friendly, friday_night)
    assert d.relay == "closed" and kinds(d.events) == ["FriendlyPeriodWarning"]
    assert d.events[0].period_end == datetime(2026, 3, 9, 10, tzinfo=UTC)
    d2 = C.decide_supply(d.state, gb_friendly, friday_night + timedelta(hours=5))
    assert d2.relay == "closed" and d2.events == ()


def test_restrict_access_final_unit_action_keeps_the_supply_on(gb_friendly):
    s = acct(final_unit_action="restrict_access")
    assert C.decide_supply(s, gb_friendly, T0).relay == "closed"


def test_topup_reconnects_automatically_by_default(gb_friendly):
    d = C.decide_supply(acct(credit_balance=0), gb_friendly, T0)
    s, _ = C.apply_topup(d.state, 1000, "t", T0 + timedelta(minutes=5))
    d = C.decide_supply(s, gb_friendly, T0 + timedelta(minutes=5))
    assert d.relay == "closed" and kinds(d.events) == ["Reconnected"] and d.switch


def test_customer_confirmed_reconnect_waits_for_the_confirmation(gb_friendly):
    s = acct(cfg_kw={"reconnect": "customer_confirms"}, credit_balance=0)
    d = C.decide_supply(s, gb_friendly, T0)
    s, _ = C.apply_topup(d.state, 1000, "t", T0 + timedelta(minutes=5))
    d = C.decide_supply(s, gb_friendly, T0 + timedelta(minutes=5))
    assert d.relay == "open" and kinds(d.events) == ["ReconnectArmed"] and not d.switch
    s, _ = C.confirm_reconnect(d.state, T0 + timedelta(minutes=6))
    d = C.decide_supply(s, gb_friendly, T0 + timedelta(minutes=6))
    assert d.relay == "closed" and kinds(d.events) == ["Reconnected"]


def test_boot_reevaluation_trusts_the_relay_read_back_before_switching(gb_friendly):
    s = acct(credit_balance=5000, relay="closed")
    d = C.reevaluate(s, gb_friendly, T0, relay_read_back="open")   # opened before the reboot
    assert d.relay == "closed" and d.switch and kinds(d.events) == ["Reconnected"]
    d = C.reevaluate(acct(credit_balance=5000), gb_friendly, T0, relay_read_back="closed")
    assert not d.switch
    with pytest.raises(ValidationError, match="M1.*read-back"):
        C.reevaluate(s, gb_friendly, T0, relay_read_back="ajar")


def test_bad_configuration_is_refused_naming_the_key():
    with pytest.raises(ValidationError, match="reconnect"):
        C.PrepaymentConfig(reconnect="sometimes")
    with pytest.raises(ValidationError, match="emergency_credit_limit"):
        C.PrepaymentConfig(emergency_credit_limit=-5)


# --------------------------------------------------------------------------- conservation

ops = st.lists(st.one_of(
    st.tuples(st.just("charge"), st.integers(0, 20_000), st.sampled_from(["0", "7.5", "30", "33.3"])),
    st.tuples(st.just("topup"), st.integers(-5, 30_000)),
    st.tuples(st.just("grant"), st.integers(0, 5_000), st.integers(0, 3_000)),
    st.tuples(st.just("report")),
    st.tuples(st.just("ack")),
    st.tuples(st.just("accept_ec")),
    st.tuples(st.just("arrears"), st.integers(0, 10_000)),
    st.tuples(st.just("decide")),
    st.tuples(st.just("standing"), st.sampled_from(["45.67", "54.747", "0"])),
), max_size=40)


class _Standing:
    standing_zone = "Europe/London"

    def __init__(self, gross: str) -> None:
        self.gross = Decimal(gross)

    def standing_gross(self, day) -> Decimal:
        return self.gross


def _total(acked: C.Usage, s: C.AccountState) -> C.Usage:
    return acked.plus(s.in_flight or C.Usage()).plus(s.unreported)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, 5000), st.sampled_from(["half_up", "half_even", "down"]))
def test_the_credit_window_and_the_reported_usage_account_for_every_minor_unit(seq, start_credit, rounding):
    """Grants replace the window: credit_balance == window set by the last grant + tokens since −
    window spending since; debt and emergency credit equal what the reports drew minus repaid;
    the reports' used units equal every charge."""
    cfg = C.PrepaymentConfig(rounding=rounding, payment_recovery_percent=Decimal(25), payment_recovery_cap=2000,
                             time_recovery_per_day=Decimal(50), max_credit_balance=50_000)
    s = C.AccountState(account="P1", cfg=cfg)
    s, _ = C.apply_topup(s, start_credit, "opening", T0) if start_credit else (s, [])
    at = T0
    acked = C.Usage()
    charged = standing = 0
    base_window, base_tokens, base_spend = 0, 0, 0
    for i, op in enumerate(seq):
        at += timedelta(hours=3)
        events: list = []
        in_flight = s.in_flight
        if op[0] == "charge":
            s, events = C.charge(s, op[1], op[2], at)
        elif op[0] == "topup":
            s, events = C.apply_topup(s, op[1], f"t{i}", at)
        elif op[0] in ("grant", "ack"):
            if op[0] == "grant":
                g = C.Grant("S", i, at + timedelta(hours=1), amount_minor=op[1], wh=op[2])
                s, events = C.apply_grant(s, g, at)
            else:
                s, events = C.acknowledge(s, at)
            acked = acked.plus(in_flight or C.Usage())
            assert s.in_flight is None
            t = _total(acked, s)
            base_window, base_tokens, base_spend = s.credit_balance, t.token_minor, t.window_spend
        elif op[0] == "report":
            s, report = C.begin_report(s)
            if in_flight is not None:
                assert report == in_flight            # a retransmission carries the same content
        elif op[0] == "accept_ec":
            s, events = C.accept_emergency_credit(s, at)
        elif op[0] == "arrears":
            s, events = C.set_arrears(s, op[1], at)
        elif op[0] == "standing":
            s, events = C.charge_standing(s, _Standing(op[1]), at)
        else:
            d = C.decide_supply(s, None, at)
            s, events = d.state, list(d.events)
        charged += sum(e.amount_minor for e in events if isinstance(e, C.Charged))
        standing += sum(e.amount_minor for e in events if isinstance(e, C.StandingCharged))
        t = _total(acked, s)
        assert min(s.credit_balance, s.accumulated_debt, s.emergency_credit_used, s.arrears) >= 0
        assert s.emergency_credit_used <= cfg.emergency_credit_limit
        assert s.credit_balance == base_window + (t.token_minor - base_tokens) - (t.window_spend - base_spend)
        assert t.used_minor == charged == t.from_credit + t.from_emergency + t.to_debt
        assert t.standing_minor == standing and min(t.standing_from_credit, t.standing_to_debt) >= 0
        assert s.accumulated_debt == t.to_debt + t.standing_to_debt - t.repaid_debt
        assert s.emergency_credit_used == t.from_emergency + t.standing_from_emergency - t.repaid_emergency


def test_a_grant_arriving_expired_still_acknowledges_the_report_it_answers():
    s, _ = C.apply_grant(acct(), grant(0, 1000), T0)
    s, _ = C.charge(s, 10_000, "30", T0 + timedelta(minutes=1))
    s, report = C.begin_report(s)
    s, ev = C.apply_grant(s, grant(1, 800, valid=T0 + timedelta(minutes=2)), T0 + timedelta(minutes=3))
    assert [e.reason for e in ev if isinstance(e, C.GrantRefused)] == ["expired"]
    assert s.in_flight is None and s.credit_balance == 0       # booked at the head-end: not reported twice
    s, again = C.begin_report(s)
    assert again.used_minor == 0
