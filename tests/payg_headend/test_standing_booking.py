"""Daily standing charges reported by the gateway (used.standing_*) booked by credit control:
revenue:standing + VAT split like consumption's gross, paid from prepaid / emergency credit / debt,
once per (session, request number), ledger and running balances agreeing (PaygStore, SQLite)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterlink.gateway import credit as C
from meterlink.gateway.payg_sync import usage_to_proto
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_service
from meterlink.headend import payg_store as S
from meterlink.v1 import payg_pb2

T0 = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))


def make_store(tmp_path, charged_at="consumption"):
    st = S.PaygStore(f"sqlite:///{tmp_path}/headend-{charged_at}.db", vat=L.PrepaidVat(Decimal("0.05"), charged_at))
    st.put_account("ACC1", "GBP", max_balance_minor=100_000)
    st.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", st.vat)])
    return st


@pytest.fixture
def store(tmp_path):
    st = make_store(tmp_path)
    yield st
    st.close()


def control(store) -> CC.CreditControl:
    return CC.CreditControl(store, S.SqlSessionStore(store), POLICY, store.vat, tokens=S.StoreTokenReservations(store))


def handle(cc, store, req, now):
    with store.transaction():
        return cc.handle(req, now)


def reserve(cc, store):
    out = handle(cc, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0)
    assert out.answer.ok and out.answer.grant.amount_minor == 300        # 40/h x 6 h x 1.25
    return out


def report(n=1, **kw) -> CC.CreditControlRequest:
    return CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", **kw)


def standing_txns(store):
    return {t.business_key: t for t in store.transactions() if t.kind.startswith("standing-charge")}


def test_a_report_with_standing_charges_books_revenue_standing_and_vat_from_each_source(store):
    cc = control(store)
    reserve(cc, store)
    # 3 days of 54.747 gross (52.14 net + 5 %): 55 + 54 + 55 = 164, of which 60 from emergency credit
    # and 49 to debt, 55 from the window; plus 200 of consumption from the window
    req = report(used_minor=200, used_wh=700, standing_minor=164, standing_days=3, standing_from_emergency_minor=60,
                 standing_to_debt_minor=49, standing_first_day="2026-03-09", standing_last_day="2026-03-11")
    out = handle(cc, store, req, T0 + timedelta(hours=5))
    assert out.answer.ok
    booked = standing_txns(store)
    assert set(booked) == {"cc:S1:1:standing", "cc:S1:1:standing-emergency", "cc:S1:1:standing-debt"}
    window, ec, debt = (booked[f"cc:S1:1:{k}"] for k in ("standing", "standing-emergency", "standing-debt"))
    # each gross split as consumption's is: VAT = round(gross x 0.05 / 1.05), the rest revenue:standing
    for t, account, gross in ((window, L.prepaid("ACC1"), 55), (ec, L.emergency_credit_account("ACC1"), 60),
                              (debt, L.debt("ACC1"), 49)):
        vat = L.vat_in_gross(gross, Decimal("0.05"))[1]
        assert t.amount(account) == gross
        assert t.amount(L.REVENUE_STANDING) == -(gross - vat) and t.amount(L.VAT_OUTPUT) == -vat
        assert t.memo == "3 day(s) 2026-03-09..2026-03-11"
    assert (window.kind, ec.kind, debt.kind) == ("standing-charge", "standing-charge-emergency", "standing-charge-debt")
    assert -store.balance(L.REVENUE_STANDING, "GBP") == (55 - 3) + (60 - 3) + (49 - 2)
    # prepaid fell by the window part of both (consumption 200 + standing 55); debt and EC hold the rest
    assert -store.balance(L.prepaid("ACC1"), "GBP") == 5_000 - 255
    assert store.balance(L.debt("ACC1"), "GBP") == 49
    assert store.balance(L.emergency_credit_account("ACC1"), "GBP") == 60
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0}
    assert store.verify_balances() == []


def test_a_retransmitted_report_books_its_standing_charges_once_and_other_content_is_refused(store):
    cc = control(store)
    reserve(cc, store)
    req = report(standing_minor=109, standing_days=2, standing_first_day="2026-03-09", standing_last_day="2026-03-10")
    first = handle(cc, store, req, T0 + timedelta(hours=1))
    again = handle(cc, store, req, T0 + timedelta(hours=2))
    assert again.replayed and again.answer == first.answer and again.transactions == ()
    assert list(standing_txns(store)) == ["cc:S1:1:standing"]
    assert -store.balance(L.prepaid("ACC1"), "GBP") == 5_000 - 109
    other = handle(cc, store, report(standing_minor=110, standing_days=2, standing_first_day="2026-03-09",
                                     standing_last_day="2026-03-10"), T0 + timedelta(hours=2))
    assert other.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE
    assert -store.balance(L.prepaid("ACC1"), "GBP") == 5_000 - 109
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0} and store.verify_balances() == []


def test_with_vat_charged_at_top_up_standing_releases_vat_from_the_clearing_account(tmp_path):
    store = make_store(tmp_path, "top_up")
    try:
        cc = control(store)
        reserve(cc, store)
        handle(cc, store, report(standing_minor=55, standing_days=1, standing_first_day="2026-03-09",
                                 standing_last_day="2026-03-09"), T0 + timedelta(hours=1))
        t = standing_txns(store)["cc:S1:1:standing"]
        assert t.amount(L.VAT_PREPAID_CLEARING) == -3 and t.amount(L.VAT_OUTPUT) == 0
        assert t.amount(L.REVENUE_STANDING) == -52
        assert L.totals_by_currency(store.transactions()) == {"GBP": 0}
    finally:
        store.close()


def test_a_window_overspend_is_taken_from_consumption_first_then_from_standing_as_standing_debt(store):
    cc = control(store)
    reserve(cc, store)                                    # window 300
    out = handle(cc, store, report(used_minor=280, used_wh=900, standing_minor=55, standing_days=1,
                                   standing_first_day="2026-03-09", standing_last_day="2026-03-09"),
                 T0 + timedelta(hours=1))
    assert out.answer.ok
    booked = {t.business_key: t for t in store.transactions()}
    # spent 335 from a window of 300: the 35 beyond it are consumption booked as over-usage debt
    assert booked["cc:S1:1:usage"].amount(L.prepaid("ACC1")) == 245
    assert booked["cc:S1:1:over-usage"].amount(L.debt("ACC1")) == 35
    assert booked["cc:S1:1:standing"].amount(L.prepaid("ACC1")) == 55
    # a next report spending more standing than the new window held (a gateway that overspent):
    # what the window held is paid from prepaid, the rest booked as standing charge to debt
    grant = out.answer.grant.amount_minor
    assert grant == 600
    second = handle(cc, store, report(2, standing_minor=711, standing_days=13, standing_first_day="2026-03-10",
                                      standing_last_day="2026-03-22"), T0 + timedelta(hours=2))
    assert second.answer.ok
    booked = {t.business_key: t for t in store.transactions()}
    assert booked["cc:S1:2:standing"].amount(L.prepaid("ACC1")) == 600
    assert not second.events                              # standing debt is not energy over-usage
    assert booked["cc:S1:2:standing-debt"].amount(L.debt("ACC1")) == 711 - 600
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0} and store.verify_balances() == []


def test_negative_or_inconsistent_standing_parts_are_refused_and_book_nothing(store):
    cc = control(store)
    reserve(cc, store)
    out = handle(cc, store, report(standing_minor=50, standing_days=1, standing_to_debt_minor=60), T0)
    assert out.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE and standing_txns(store) == {}
    assert "standing charge from the window (standing_minor 50 - standing_from_emergency_minor 0 - " \
           "standing_to_debt_minor 60)" in out.answer.detail
    out = handle(cc, store, report(standing_minor=10, standing_days=-1, used_wh=-5), T0)
    assert out.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE and standing_txns(store) == {}
    assert out.answer.detail.endswith("negative used_wh, standing_days")


def test_the_gateway_report_carries_the_standing_fields_over_the_wire_unchanged():
    usage = C.Usage(used_minor=10, used_wh=30, from_credit=8, from_emergency=2, standing_minor=164, standing_days=3,
                    standing_from_emergency=60, standing_to_debt=49, standing_first_day="2026-03-09",
                    standing_last_day="2026-03-11")
    pb = payg_pb2.CreditControlRequest(session_id="S1", request_number=1, account_id="ACC1", meter_id="M1",
                                       currency="GBP", used=usage_to_proto(usage))
    wire = payg_pb2.CreditControlRequest.FromString(pb.SerializeToString())
    req = payg_service.request_from_proto(wire, CC.RequestType.UPDATE_REQUEST)
    assert (req.standing_minor, req.standing_days, req.standing_from_emergency_minor, req.standing_to_debt_minor,
            req.standing_first_day, req.standing_last_day) == (164, 3, 60, 49, "2026-03-09", "2026-03-11")
    assert req.standing_from_window_minor == usage.standing_from_credit == 55
    assert req.window_spend_minor == usage.window_spend == 8 + 55
    # a report without standing charges keeps the fingerprint requests had before the fields existed
    plain = payg_service.request_from_proto(payg_pb2.CreditControlRequest(
        session_id="S1", request_number=1, account_id="ACC1", meter_id="M1", currency="GBP",
        used=usage_to_proto(C.Usage(used_minor=10, used_wh=30))), CC.RequestType.UPDATE_REQUEST)
    assert len(plain.fingerprint()) == 12 and len(req.fingerprint()) == 18


@pytest.mark.parametrize("parts, says", [
    (dict(standing_minor=55, standing_days=0, standing_first_day="2026-03-09", standing_last_day="2026-03-09"),
     "standing charge 55 for 0 day(s): at least one day is needed"),
    (dict(standing_minor=55, standing_days=1), "standing charge days '' .. '' are not ISO dates".replace(" .. ", "..")),
    (dict(standing_minor=55, standing_days=1, standing_first_day="09/03/2026", standing_last_day="2026-03-09"),
     "standing charge days '09/03/2026'..'2026-03-09' are not ISO dates"),
    (dict(standing_minor=110, standing_days=2, standing_first_day="2026-03-10", standing_last_day="2026-03-10"),
     "standing charge of 2 day(s) does not fit between its first day 2026-03-10 and last day 2026-03-10"),
    (dict(standing_minor=55, standing_days=1, standing_first_day="2026-03-10", standing_last_day="2026-03-09"),
     "does not fit between its first day 2026-03-10 and last day 2026-03-09"),
])
def test_standing_days_that_do_not_add_up_are_refused_with_the_reason_and_book_nothing(store, parts, says):
    cc = control(store)
    reserve(cc, store)
    before = len(list(store.transactions()))
    out = handle(cc, store, report(**parts), T0)
    assert out.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE and says in out.answer.detail
    assert standing_txns(store) == {} and len(list(store.transactions())) == before
