"""Arrears registered at the head-end: booked once, carried to the gateway in every credit-control
answer (`arrears_minor`), recoveries reported by the gateway booked once and never beyond what is
outstanding (PaygStore + CreditControl + the gRPC servicer's answer form, SQLite)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_service
from meterlink.headend import payg_store as S

T0 = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))


@pytest.fixture
def store(tmp_path):
    st = S.PaygStore(f"sqlite:///{tmp_path}/headend.db")
    st.put_account("ACC1", "GBP", max_balance_minor=100_000)
    st.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", st.vat)])
    yield st
    st.close()


def control(store) -> CC.CreditControl:
    return CC.CreditControl(store, S.SqlSessionStore(store), POLICY, store.vat,
                            tokens=S.StoreTokenReservations(store))


def handle(cc, store, req, now):
    with store.transaction():
        return cc.handle(req, now)


def prepaid(store) -> int:
    return -store.balance(L.prepaid("ACC1"), "GBP")


def update(n: int, used: int = 0, recovered: int = 0) -> CC.CreditControlRequest:
    return CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", used, used * 10,
                                   recovered_arrears_minor=recovered)


def test_registered_arrears_are_booked_once_and_a_conflicting_reference_is_refused(store):
    txn = store.register_arrears("ACC1", "prev-supply-2025", 1_000, T0, "debt from the previous supplier")
    assert txn.amount(L.arrears_account("ACC1")) == 1_000 and txn.amount(L.ADJUSTMENTS) == -1_000
    store.register_arrears("ACC1", "prev-supply-2025", 1_000, T0, "debt from the previous supplier")   # replay
    assert store.arrears("ACC1", "GBP") == 1_000
    with pytest.raises(L.BusinessKeyConflict):
        store.register_arrears("ACC1", "prev-supply-2025", 1_200, T0, "debt from the previous supplier")
    assert store.arrears("ACC1", "GBP") == 1_000
    assert [e.kind for e in store.events()] == ["arrears_registered"]
    with pytest.raises(L.LedgerError):
        store.register_arrears("ACC1", "zero", 0, T0, "nothing")
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0}


def test_reported_recoveries_are_booked_once_against_arrears_never_beyond_what_is_outstanding(store):
    store.register_arrears("ACC1", "R1", 1_000, T0, "over-usage booked centrally")
    cc = control(store)
    assert handle(cc, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0).answer.ok
    before = prepaid(store)
    out = handle(cc, store, update(1, used=50, recovered=200), T0 + timedelta(minutes=15))   # within the grant
    assert out.answer.ok
    assert store.arrears("ACC1", "GBP") == 800
    assert prepaid(store) == before - 50 - 200                       # usage and recovery, to the minor unit
    rec = store.get("cc:S1:1:arrears-recovered")
    assert rec.kind == "arrears-recovery" and rec.amount(L.prepaid("ACC1")) == 200
    assert store.get("cc:S1:1:debt-repaid") is None                  # arrears are not the gateway's debt
    assert store.balance(L.debt("ACC1"), "GBP") == 0
    # the same report again (answer lost): the stored answer, nothing booked twice
    keys = [t.business_key for t in store.transactions()]
    again = handle(cc, store, update(1, used=50, recovered=200), T0 + timedelta(minutes=16))
    assert again.replayed and again.answer == out.answer
    assert [t.business_key for t in store.transactions()] == keys and store.arrears("ACC1", "GBP") == 800
    # the head-end lowered the arrears meanwhile (a write-off of 750): a gateway recovering the whole
    # new grant gets only the 50 outstanding booked; the rest stays in the prepaid balance
    grant = out.answer.grant.amount_minor
    assert grant > 50
    store.append([L.Transaction("arrears:ACC1:write-off", T0 + timedelta(minutes=20),
                                (L.Posting(L.arrears_account("ACC1"), -750, "GBP"),
                                 L.Posting(L.ADJUSTMENTS, 750, "GBP")), "adjustment", "goodwill")])
    before = prepaid(store)
    assert handle(cc, store, update(2, recovered=grant), T0 + timedelta(minutes=30)).answer.ok
    assert store.get("cc:S1:2:arrears-recovered").amount(L.arrears_account("ACC1")) == -50
    assert prepaid(store) == before - 50
    assert store.arrears("ACC1", "GBP") == 0
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0}


def test_the_answer_carries_the_outstanding_arrears(store):
    ans = CC.CreditControlAnswer("S1", CC.RequestType.UPDATE_REQUEST, 1, CC.ResultCode.SUCCESS)
    pb = payg_service.answer_to_proto(ans, [], 4_000, 700)
    assert pb.HasField("arrears_minor") and pb.arrears_minor == 700
    assert not payg_service.answer_to_proto(ans, [], 4_000).HasField("arrears_minor")   # an older head-end
