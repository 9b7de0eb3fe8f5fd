"""Credit control after RFC 4006: grants sized from balance and burn rate, idempotent requests, over-usage as debt."""

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.errors import ValidationError
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L

UTC = timezone.utc
T0 = datetime(2026, 3, 6, 20, tzinfo=UTC)
VAT = L.PrepaidVat(Decimal("0.05"), "consumption")
POLICY = CC.GrantPolicy(validity=timedelta(hours=4), min_grant_minor=100, max_grant_minor=2000,
                        headroom=Decimal("1.25"), initial_burn_rate_minor_per_h=Decimal(40),
                        price_minor_per_kwh=Decimal(25))


def service(credit: int = 10_000, policy: CC.GrantPolicy = POLICY, account: str = "A1"):
    ledger = L.InMemoryLedger()
    if credit:
        ledger.append([L.top_up(f"seed:{account}", T0 - timedelta(days=1), account, "V1", credit, "GBP", VAT)])
    return CC.CreditControl(ledger, CC.InMemorySessionStore(), policy, VAT), ledger


def upd(session: str, n: int, used: int, wh: int = 0, account: str = "A1", terminate: bool = False):
    kind = CC.RequestType.TERMINATION_REQUEST if terminate else CC.RequestType.UPDATE_REQUEST
    return CC.CreditControlRequest(session, kind, n, account, "M1", "GBP", used, wh)


def credit(ledger, account="A1"):
    return L.customer_credit(ledger.transactions(), account, "GBP")


# --------------------------------------------------------------------------- sizing


def test_first_grant_covers_validity_of_expected_usage_with_headroom():
    cc, _ = service()
    out = cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    assert out.answer.result_code == CC.ResultCode.SUCCESS
    g = out.answer.grant
    assert g.amount_minor == 200                       # 40/h * 4 h * 1.25
    assert g.wh == 8000                                # 200 / 25 per kWh
    assert (g.validity_time, g.expires_at) == (4 * 3600, T0 + timedelta(hours=4))
    assert g.final_unit_action is None


@pytest.mark.parametrize("burn, expected", [(Decimal("0.1"), 100), (Decimal(1000), 2000), (Decimal(100), 500)])
def test_grant_is_bounded_by_min_and_max(burn, expected):
    assert CC.size_grant(1_000_000, burn, POLICY, T0).amount_minor == expected


def test_grant_never_exceeds_available_credit_and_is_then_final():
    g = CC.size_grant(150, Decimal(100), POLICY, T0)
    assert g.amount_minor == 150 and g.final_unit_action == CC.FinalUnitAction.TERMINATE
    g = CC.size_grant(50, Decimal("0.1"), replace(POLICY, final_unit_action=CC.FinalUnitAction.RESTRICT_ACCESS), T0)
    assert g.amount_minor == 50 and g.final_unit_action == CC.FinalUnitAction.RESTRICT_ACCESS


def test_no_credit_means_credit_limit_reached_and_no_session():
    cc, _ = service(credit=0)
    out = cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    assert out.answer.result_code == CC.ResultCode.CREDIT_LIMIT_REACHED == 4012
    assert out.answer.grant is None and out.answer.final_unit_action == CC.FinalUnitAction.TERMINATE
    assert cc.sessions.get("S1") is None


def test_burn_rate_follows_recent_usage_and_sizes_the_next_grant():
    cc, ledger = service()
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    out = cc.update(upd("S1", 1, 180, 7200), T0 + timedelta(hours=2))     # 90/h over 2 h
    assert out.answer.grant.amount_minor == 450                            # 90 * 4 * 1.25
    assert credit(ledger) == 10_000 - 180
    usage = cc.sessions.get("S1").usage
    assert CC.burn_rate(usage, T0 + timedelta(hours=2), POLICY.burn_rate_window, Decimal(0)) == 90
    # reports older than the window no longer count
    assert CC.burn_rate(usage, T0 + timedelta(days=2), POLICY.burn_rate_window, Decimal(7)) == 7


def test_policy_bounds_are_validated():
    with pytest.raises(ValidationError, match="min_grant_minor"):
        CC.GrantPolicy(min_grant_minor=500, max_grant_minor=100)


# --------------------------------------------------------------------------- idempotency and order


def test_repeated_update_returns_the_identical_answer_and_books_once():
    cc, ledger = service()
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    first = cc.update(upd("S1", 1, 150), T0 + timedelta(hours=1))
    before = L.trial_balance(ledger.transactions())
    again = cc.update(upd("S1", 1, 150), T0 + timedelta(hours=1, minutes=5))
    assert again.replayed and again.answer == first.answer
    assert again.transactions == () and again.events == ()
    assert L.trial_balance(ledger.transactions()) == before


def test_repeated_initial_returns_the_identical_grant():
    cc, _ = service()
    a = cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    b = cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0 + timedelta(seconds=3))
    assert b.answer == a.answer and b.replayed


def test_out_of_order_request_number_is_refused_and_changes_nothing():
    cc, ledger = service()
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    session = cc.sessions.get("S1")
    out = cc.update(upd("S1", 2, 50), T0 + timedelta(hours=1))
    assert out.answer.result_code == CC.ResultCode.UNABLE_TO_COMPLY
    assert "expected 1" in out.answer.detail
    assert cc.sessions.get("S1") == session and credit(ledger) == 10_000


def test_same_request_number_with_other_content_is_refused():
    cc, ledger = service()
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    cc.update(upd("S1", 1, 150), T0 + timedelta(hours=1))
    out = cc.update(upd("S1", 1, 151), T0 + timedelta(hours=1))
    assert out.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE
    assert credit(ledger) == 10_000 - 150


def test_unknown_and_terminated_sessions_are_refused():
    cc, _ = service()
    assert cc.update(upd("nope", 1, 0), T0).answer.result_code == CC.ResultCode.UNKNOWN_SESSION_ID
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    end = cc.terminate(upd("S1", 1, 10, terminate=True), T0 + timedelta(hours=1))
    assert end.answer.ok and cc.sessions.get("S1").reserved_minor == 0
    assert cc.update(upd("S1", 2, 0), T0 + timedelta(hours=2)).answer.result_code == CC.ResultCode.UNKNOWN_SESSION_ID
    # the terminate itself is still answered identically on retransmission
    assert cc.terminate(upd("S1", 1, 10, terminate=True), T0 + timedelta(hours=3)).answer == end.answer


def test_request_of_the_wrong_type_is_a_programming_error():
    cc, _ = service()
    with pytest.raises(ValidationError, match="UPDATE_REQUEST expected"):
        cc.update(CC.initial("S1", "A1", "M1", "GBP"), T0)


def test_session_cannot_be_hijacked_by_another_account():
    cc, _ = service()
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    out = cc.update(upd("S1", 1, 10, account="A2"), T0)
    assert out.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE and "belongs to account A1" in out.answer.detail


def test_inactive_account_is_denied_service():
    ledger = L.InMemoryLedger([L.top_up("seed", T0, "A1", "V1", 1000, "GBP", VAT)])
    cc = CC.CreditControl(ledger, CC.InMemorySessionStore(), POLICY, VAT, account_active=lambda a: False)
    assert cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0).answer.result_code == \
        CC.ResultCode.END_USER_SERVICE_DENIED


# --------------------------------------------------------------------------- over-usage (scenario 7, pure half)


def test_over_usage_beyond_a_grant_is_detected_and_booked_as_debt():
    cc, ledger = service(credit=1000)
    grant = cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0).answer.grant
    assert grant.amount_minor == 200 and grant.wh == 8000
    out = cc.update(upd("S1", 1, 290, 11_600), T0 + timedelta(hours=4))
    [event] = out.events
    assert (event.granted_minor, event.used_minor, event.over_minor) == (200, 290, 90)
    assert (event.granted_wh, event.used_wh, event.over_wh) == (8000, 11_600, 3600)
    assert ledger.exists(event.business_key) and event.business_key == "cc:S1:1:over-usage"
    assert L.balance(ledger.transactions(), L.debt("A1"), "GBP") == 90
    assert credit(ledger) == 1000 - 200                    # only the granted part came from credit
    assert all(v == 0 for v in L.totals_by_currency(ledger.transactions()).values())
    report = CC.over_usage_report(out.events, T0, T0 + timedelta(days=1), lambda a: "GBP")
    assert report == [CC.OverUsageRow("A1", "M1", "GBP", 1, 90, 3600)]


def test_usage_after_a_credit_limit_answer_is_all_over_usage():
    cc, ledger = service(credit=150)
    assert cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0).answer.grant.is_final
    second = cc.update(upd("S1", 1, 150), T0 + timedelta(hours=2))
    assert second.answer.result_code == CC.ResultCode.CREDIT_LIMIT_REACHED
    third = cc.terminate(upd("S1", 2, 40, terminate=True), T0 + timedelta(hours=3))
    assert [e.over_minor for e in third.events] == [40]
    assert credit(ledger) == 0 and L.balance(ledger.transactions(), L.debt("A1"), "GBP") == 40


def test_replayed_over_usage_is_booked_and_raised_once():
    cc, ledger = service(credit=1000)
    cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0)
    cc.update(upd("S1", 1, 500), T0 + timedelta(hours=1))
    again = cc.update(upd("S1", 1, 500), T0 + timedelta(hours=1))
    assert again.events == ()
    assert L.balance(ledger.transactions(), L.debt("A1"), "GBP") == 300


# --------------------------------------------------------------------------- reservations


def test_two_sessions_share_the_balance_without_over_reserving():
    cc, _ = service(credit=300)
    a = cc.reserve(CC.initial("S1", "A1", "M1", "GBP"), T0).answer.grant
    b = cc.reserve(CC.initial("S2", "A1", "M2", "GBP"), T0).answer.grant
    assert (a.amount_minor, b.amount_minor) == (200, 100) and b.is_final
    c = cc.reserve(CC.initial("S3", "A1", "M3", "GBP"), T0).answer
    assert c.result_code == CC.ResultCode.CREDIT_LIMIT_REACHED


ops = st.lists(st.tuples(st.sampled_from(["reserve", "update", "terminate", "topup", "retransmit"]),
                         st.integers(0, 2), st.integers(0, 600), st.integers(1, 180)), max_size=40)


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 3000), ops)
def test_open_grants_never_exceed_the_balance_and_the_ledger_stays_balanced(start_credit, steps):
    cc, ledger = service(credit=start_credit)
    now = T0
    numbers: dict[str, int] = {}
    last: dict[str, CC.CreditControlRequest] = {}
    for i, (op, s, used, minutes) in enumerate(steps):
        now += timedelta(minutes=minutes)
        sid = f"S{s}"
        if op == "topup":
            ledger.append([L.top_up(f"t{i}", now, "A1", "V1", used + 1, "GBP", VAT)])
        elif op == "reserve" and sid not in numbers:
            req = CC.initial(sid, "A1", f"M{s}", "GBP")
            if cc.reserve(req, now).session is not None:
                numbers[sid], last[sid] = 0, req
        elif op in ("update", "terminate") and sid in numbers:
            numbers[sid] += 1
            req = upd(sid, numbers[sid], used, terminate=op == "terminate")
            req = replace(req, meter_id=f"M{s}")
            out = cc.handle(req, now)
            assert out.answer.result_code != CC.ResultCode.UNABLE_TO_COMPLY
            last[sid] = req
            if op == "terminate":
                del numbers[sid]
        elif op == "retransmit" and sid in last:
            before = L.trial_balance(ledger.transactions())
            out = cc.handle(last[sid], now)
            assert out.replayed and not out.transactions
            assert L.trial_balance(ledger.transactions()) == before
        reserved = sum(x.reserved_minor for x in cc.sessions.open_sessions("A1"))
        assert 0 <= reserved <= max(credit(ledger), 0)
        assert credit(ledger) >= 0
    assert all(v == 0 for v in L.totals_by_currency(ledger.transactions()).values())
