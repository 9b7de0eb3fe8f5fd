"""Low-balance warnings and the emergency-credit offer follow the customer's balance as the
head-end last reported it (lowered locally by window spending), not the gateway's small window."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from meterlink.gateway import credit as C
from meterlink.gateway import payg as P

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)
CFG = C.PrepaymentConfig(low_credit_threshold=500, emergency_credit_threshold=100, emergency_credit_limit=1000)


def kinds(events) -> list[str]:
    return [e.kind for e in events]


def grant(n: int, amount: int, balance: int | None, at: datetime = T0) -> C.Grant:
    return C.Grant("S1", n, at + timedelta(hours=6), amount_minor=amount, balance_minor=balance)


def granted(amount: int, balance: int | None) -> tuple[C.AccountState, list]:
    s = C.AccountState(account="M1", cfg=CFG)
    s, _ = C.begin_report(s)
    return C.apply_grant(s, grant(0, amount, balance), T0)


def test_small_grants_out_of_a_large_balance_raise_no_low_balance_warning_and_no_emergency_offer():
    s, ev = granted(50, 20_000)                      # window 50 < both thresholds, balance 20 000
    assert s.credit_balance == 50 and s.balance_remaining == 20_000
    assert "LowBalance" not in kinds(ev) and "EmergencyCreditOffered" not in kinds(ev)
    s, ev = C.charge(s, 1_000, "30", T0 + timedelta(minutes=30))          # 30 from the window: 20 left
    assert s.credit_balance == 20 and s.balance_remaining == 19_970
    assert "LowBalance" not in kinds(ev) and "EmergencyCreditOffered" not in kinds(ev)
    assert not s.emergency_credit_offered and not s.low_balance_warned


def test_emergency_credit_cannot_be_accepted_while_the_balance_is_above_the_threshold():
    s, _ = granted(50, 20_000)
    s, ev = C.charge(s, 1_600, "30", T0 + timedelta(minutes=30))          # window used up (48 of 50)
    s, ev = C.accept_emergency_credit(s, T0 + timedelta(minutes=31))
    assert kinds(ev) == ["EmergencyCreditRefused"] and ev[0].reason == "not_offered"


def test_a_balance_that_really_runs_low_raises_the_warning_then_the_offer():
    s, ev = granted(300, 700)                        # balance 700: above both thresholds
    assert "LowBalance" not in kinds(ev)
    s, ev = C.charge(s, 6_000, "30", T0 + timedelta(hours=1))             # 180 -> balance 520
    assert "LowBalance" not in kinds(ev) and s.balance_remaining == 520
    s, ev = C.charge(s, 1_000, "30", T0 + timedelta(hours=2))             # 30 -> 490 < 500
    (low,) = [e for e in ev if isinstance(e, C.LowBalance)]
    assert low.balance_minor == 490 and low.credit_balance == 90 and low.threshold == 500
    assert "EmergencyCreditOffered" not in kinds(ev)
    s2, _ = C.begin_report(s)                        # report 210 spent; head-end: 700 - 210 = 490
    s2, ev = C.apply_grant(s2, grant(1, 90, 90), T0 + timedelta(hours=2, minutes=1))
    assert "LowBalance" not in kinds(ev) and s2.balance_remaining == 90   # already warned: once per crossing
    (offer,) = [e for e in ev if isinstance(e, C.EmergencyCreditOffered)]
    assert offer.balance_minor == 90
    s2, ev = C.accept_emergency_credit(s2, T0 + timedelta(hours=2, minutes=2))
    assert kinds(ev) == ["EmergencyCreditTaken"]


def test_offline_the_local_decrement_raises_the_warning_at_the_reading_that_crosses_the_threshold():
    s, _ = granted(300, 650)                         # then the head-end is unreachable
    seen = []
    for i in range(1, 9):                            # 1 kWh x 30 per reading, nothing reported
        s, ev = C.charge(s, 1_000, "30", T0 + timedelta(minutes=10 * i))
        seen.append((s.balance_remaining, s.credit_balance, "LowBalance" in kinds(ev)))
    assert [b for b, _, _ in seen] == [620, 590, 560, 530, 500, 470, 440, 410]
    assert [w for _, w, warned in seen if warned] == [120]            # the 6th reading, window not yet used up
    assert not s.emergency_credit_offered


def test_offline_emergency_credit_is_offered_when_the_decremented_balance_drops_below_its_threshold():
    s, _ = granted(600, 650)
    offered_at = None
    for i in range(1, 21):
        s, ev = C.charge(s, 1_000, "30", T0 + timedelta(minutes=10 * i))
        if "EmergencyCreditOffered" in kinds(ev):
            offered_at = (i, s.balance_remaining, s.credit_balance)
    assert offered_at == (19, 80, 30)                # 650 - 19 x 30 < 100 while the window still holds 30


def test_spending_before_the_answer_arrives_counts_against_the_reported_balance():
    s = C.AccountState(account="M1", cfg=CFG)
    s, _ = C.begin_report(s)                         # report point; 400 spent before the answer
    s = C.AccountState(account="M1", cfg=CFG, credit_balance=1_000, in_flight=s.in_flight)
    s, _ = C.charge(s, 13_334, "30", T0)             # 400 from the old window after the report point
    s, ev = C.apply_grant(s, grant(0, 600, 850), T0 + timedelta(minutes=1))
    # head-end: 850 after booking the report; the 400 after it are not booked there yet
    assert s.credit_balance == 200 and s.balance_remaining == 450
    assert "LowBalance" in kinds(ev)


def test_an_unreported_offline_card_top_up_raises_the_remaining_balance():
    s, _ = granted(100, 450)
    assert s.low_balance_warned
    s, ev = C.apply_topup(s, 2_000, "card:CARD1:n1", T0 + timedelta(minutes=5))
    assert s.balance_remaining == 2_450 and not s.low_balance_warned
    s, ev = C.apply_topup(s, 2_000, "tok-1", T0 + timedelta(minutes=6))   # a sold token: already in the balance
    assert s.balance_remaining == 4_100 == s.credit_balance               # never less than the window


def test_without_a_reported_balance_the_window_is_compared_as_before():
    s, ev = granted(300, None)
    assert s.balance_remaining == 300 and "LowBalance" in kinds(ev)


def test_an_answer_without_a_grant_updates_the_balance_the_flags_compare():
    s, _ = granted(300, 5_000)
    s, _ = C.charge(s, 1_000, "30", T0 + timedelta(minutes=1))
    s, _ = C.begin_report(s)
    s, ev = C.acknowledge(s, T0 + timedelta(minutes=2), balance_minor=80)     # credit limit reached
    assert s.credit_balance == 0 and s.balance_remaining == 80
    assert "LowBalance" in kinds(ev) and "EmergencyCreditOffered" in kinds(ev)


def test_the_reported_balance_survives_a_restart_in_the_state_file():
    s, _ = granted(300, 5_000)
    s, _ = C.charge(s, 1_000, "30", T0 + timedelta(minutes=1))
    back = P.state_from_json(P.state_to_json(s), CFG)
    assert back.reported_balance == 5_000 and back.balance_remaining == 4_970
