"""Acceptance scenarios 1, 2, 3 and 5 (issue 6) on the gateway's pure PAYG core, driven by a simulated clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.clock import SimClock
from meterlink.gateway import credit as C
from meterlink.gateway import tokens as T

UTC = timezone.utc
HEAD_END = Ed25519PrivateKey.generate()


def test_scenario_1_credit_out_on_friday_night_keeps_supply_until_the_friendly_period_ends(gb_friendly, run):
    clock = SimClock(datetime(2026, 3, 6, 22, tzinfo=UTC))          # Friday 22:00 GMT
    # 1 kWh per 15 minutes at 30p/kWh = 30p a step: 120p lasts until 23:00
    r = run(C.AccountState(account="M1", credit_balance=120), gb_friendly, clock.now())
    r.step_until(datetime(2026, 3, 9, 12, tzinfo=UTC), wh_per_step=1000)
    monday_10 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    warnings = r.of(C.FriendlyPeriodWarning)
    assert len(warnings) == 1
    assert warnings[0].at == datetime(2026, 3, 6, 23, tzinfo=UTC) and warnings[0].period_end == monday_10
    assert all(d.relay == "closed" for t, d in r.decisions if t < monday_10)
    assert r.first_open() == monday_10
    [off] = r.of(C.Disconnected)
    assert off.reason == "friendly_period_ended"
    # debt accrued for every step from 23:00 Friday to 10:00 Monday (59 h = 236 steps of 30p)
    assert r.state.accumulated_debt == 236 * 30
    assert r.state.emergency_credit_used == 0                       # offered, never accepted, never used


def test_scenario_1_top_up_inside_the_friendly_period_clears_the_debt_and_avoids_disconnection(gb_friendly, run):
    r = run(C.AccountState(account="M1", credit_balance=120), gb_friendly, datetime(2026, 3, 6, 22, tzinfo=UTC))
    r.step_until(datetime(2026, 3, 8, 12, tzinfo=UTC), wh_per_step=1000)
    debt = r.state.accumulated_debt
    r.apply(C.apply_topup, debt + 10_000, "tok-sunday")
    r.step_until(datetime(2026, 3, 9, 12, tzinfo=UTC), wh_per_step=1000)
    assert r.first_open() is None and r.of(C.Disconnected) == []
    assert r.of(C.TopUpApplied)[0].to_accumulated_debt == debt


def test_scenario_2_emergency_credit_is_used_only_after_acceptance(gb_friendly, run):
    monday_10 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    # 3 kWh per 15 minutes at 30p/kWh = 90p a step
    r = run(C.AccountState(account="M1", credit_balance=200), gb_friendly, monday_10)
    r.step_until(monday_10 + timedelta(hours=3), wh_per_step=3000)
    assert r.of(C.EmergencyCreditOffered) and not r.of(C.EmergencyCreditTaken)
    assert r.state.emergency_credit_used == 0
    assert r.first_open() == monday_10 + timedelta(minutes=45)      # 200p lasts two steps and a bit
    assert r.of(C.Disconnected)[0].reason == "credit_exhausted"


def test_scenario_2_accepted_emergency_credit_runs_out_outside_friendly_hours_and_opens_the_relay(gb_friendly, run):
    monday_10 = datetime(2026, 3, 9, 10, tzinfo=UTC)
    r = run(C.AccountState(account="M1", credit_balance=200), gb_friendly, monday_10)

    def accept_when_offered(rr):
        if rr.state.emergency_credit_offered and not rr.state.emergency_credit_accepted:
            rr.apply(C.accept_emergency_credit)

    r.step_until(monday_10 + timedelta(hours=6), wh_per_step=3000, on_step=accept_when_offered)
    [taken] = r.of(C.EmergencyCreditTaken)
    assert taken.amount_minor == 1000 and taken.at == monday_10 + timedelta(minutes=30)   # offered below 100p
    # 200p credit + 1000p emergency credit = 13 steps and a third: the 14th step exhausts it at 13:30
    assert r.first_open() == monday_10 + timedelta(hours=3, minutes=30)
    assert r.state.emergency_credit_used == 1000
    [off] = r.of(C.Disconnected)
    assert off.reason == "emergency_credit_exhausted" and off.at == r.first_open()
    [exhausted] = r.of(C.EmergencyCreditExhausted)
    assert exhausted.at == off.at
    assert r.state.accumulated_debt == 14 * 90 - 1200          # the part of the last step beyond it


# --------------------------------------------------------------------------- scenario 3 and 5: top-ups


def token(counter: int, amount: int, issued: datetime) -> T.TopUpToken:
    return T.TopUpToken(f"tok-{counter}", "M1", counter, amount, "GBP", issued,
                        issued + timedelta(days=30)).signed(HEAD_END)


def test_scenario_3_topup_with_debt_outstanding_is_split_in_order_and_one_over_the_maximum_is_refused_whole():
    clock = SimClock(datetime(2026, 3, 9, 12, tzinfo=UTC))
    cfg = C.PrepaymentConfig(payment_recovery_percent=Decimal(20), payment_recovery_cap=500,
                             max_credit_balance=20_000)
    s = C.AccountState(account="M1", cfg=cfg, arrears=3000, accumulated_debt=700, emergency_credit_used=400,
                       emergency_credit_offered=True, emergency_credit_accepted=True)
    w = T.ReplayWindow()
    pub = T.public_bytes(HEAD_END)
    # token 1 (5000): 20 % = 1000 capped to 500 recovery, 700 debt, 400 emergency credit, 3400 balance
    s, w, ev = T.apply_token(s, w, token(1, 5000, clock.now()), pub, clock.now())
    [applied] = [e for e in ev if isinstance(e, C.TopUpApplied)]
    assert (applied.to_debt_recovery, applied.to_accumulated_debt, applied.to_emergency_credit,
            applied.to_credit) == (500, 700, 400, 3400)
    assert (s.arrears, s.accumulated_debt, s.emergency_credit_used, s.credit_balance) == (2500, 0, 0, 3400)
    # token 2 would take the balance to 3400 + 20000 - 0 (cap spent this week) > 20000: refused whole
    clock.advance(timedelta(hours=1))
    before = s
    s, w, ev = T.apply_token(s, w, token(2, 20_000, clock.now()), pub, clock.now())
    assert [(type(e).__name__, e.reason) for e in ev] == [("TopUpRefused", "over_maximum_credit")]
    assert s == before and not w.is_spent(2)


def test_scenario_5_the_same_token_applied_twice_changes_the_balance_once():
    clock = SimClock(datetime(2026, 3, 9, 12, tzinfo=UTC))
    pub = T.public_bytes(HEAD_END)
    text = token(1, 2500, clock.now()).encode()          # as typed in / received twice
    s, w = C.AccountState(account="M1"), T.ReplayWindow()
    s, w, first = T.apply_token(s, w, T.TopUpToken.decode(text), pub, clock.now())
    clock.advance(timedelta(minutes=3))
    s, w, second = T.apply_token(s, w, T.TopUpToken.decode(text), pub, clock.now())
    assert s.credit_balance == 2500
    assert isinstance(first[0], C.TopUpApplied)
    assert second[0].reason == "replay" and second[0].reference == "tok-1"
