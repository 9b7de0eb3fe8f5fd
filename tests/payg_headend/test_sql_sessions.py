"""Credit-control sessions, token reservations and meter binding in the PAYG store, on SQLite and
PostgreSQL (a schema per test: tests/payg_headend/conftest.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.errors import ValidationError
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S

T0 = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))


def control(store) -> CC.CreditControl:
    return CC.CreditControl(store, S.SqlSessionStore(store), POLICY, store.vat,
                            tokens=S.StoreTokenReservations(store))


def handle(cc, store, req, now):
    with store.transaction():
        return cc.handle(req, now)


def test_sessions_survive_a_restart_and_a_retransmission_is_booked_once(store):
    store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", store.vat)])
    cc = control(store)
    assert handle(cc, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0).answer.grant.amount_minor == 300
    upd = CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, 1, "ACC1", "M1", "GBP", 120, 4000,
                                  from_emergency_minor=20, tokens=())
    first = handle(cc, store, upd, T0 + timedelta(hours=1))
    restarted = control(store)                        # a new process over the same database
    again = handle(restarted, store, upd, T0 + timedelta(hours=1, minutes=1))
    assert again.replayed and again.answer == first.answer and again.transactions == ()
    ledger = list(store.transactions())
    assert L.customer_credit(ledger, "ACC1", "GBP") == 5_000 - 100
    assert L.balance(ledger, L.emergency_credit_account("ACC1"), "GBP") == 20
    assert [s.session_id for s in restarted.sessions.open_sessions("ACC1")] == ["S1"]


def test_an_issued_token_reserves_its_money_until_a_report_says_it_was_applied(store):
    key = Ed25519PrivateKey.generate()
    store.append([L.top_up("sale:SHOP1:1", T0, "ACC1", "SHOP1", 250, "GBP", store.vat)])
    token = S.issue_token(store, "sale:SHOP1:1", "M1", "ACC1", 250, "GBP", key, T0)
    cc = control(store)
    refused = handle(cc, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0)
    assert refused.answer.result_code == CC.ResultCode.CREDIT_LIMIT_REACHED      # not granted twice
    reported = CC.CreditControlRequest("S2", CC.RequestType.INITIAL_REQUEST, 0, "ACC1", "M1", "GBP",
                                       tokens=((token.token_id, 250),))
    ok = handle(cc, store, reported, T0)
    assert ok.answer.grant.amount_minor == 250
    assert S.StoreTokenReservations(store).confirmed_minor("M1", ((token.token_id, 250),)) == 250
    assert S.StoreTokenReservations(store).confirmed_minor("M2", ((token.token_id, 250),)) == 0
    assert S.StoreTokenReservations(store).confirmed_minor("M1", ((token.token_id, 999),)) == 0


def test_an_expired_unapplied_token_frees_its_reservation(store):
    key = Ed25519PrivateKey.generate()
    store.append([L.top_up("sale:SHOP1:1", T0, "ACC1", "SHOP1", 250, "GBP", store.vat)])
    token = S.issue_token(store, "sale:SHOP1:1", "M1", "ACC1", 250, "GBP", key, T0, ttl=timedelta(days=1))
    res = S.StoreTokenReservations(store)
    assert res.outstanding_minor("ACC1", now=token.expires_at - timedelta(milliseconds=1)) == 250
    assert res.outstanding_minor("ACC1", now=token.expires_at) == 0
    late = handle(control(store), store, CC.initial("S1", "ACC1", "M1", "GBP"), token.expires_at)
    assert late.answer.grant.amount_minor == 250


def test_a_meter_is_bound_to_one_account(store):
    store.bind_meter("M1", "ACC1", T0)
    store.bind_meter("M1", "ACC1", T0)                    # idempotent
    with pytest.raises(ValidationError, match="meter M1 is bound to account ACC1"):
        store.bind_meter("M1", "ACC2", T0)
    assert store.meter_account("M1") == "ACC1" and store.meter_account("M9") is None


def test_the_stored_session_text_is_the_json_of_the_session_also_when_encoded_from_the_memo(store):
    """`SqlSessionStore.put` encodes only what is new in a session (`session_json_text` with the
    previous call's memo): the text must be what `session_to_json` gives, whatever the memo holds."""
    import json
    store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 10**6, "GBP", store.vat)])
    cc = control(store)
    memo = None
    handle(cc, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0)
    for n in range(1, 40):                # past answers_kept and usage_kept: old entries leave the memo
        req = CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", 30 + n, 1000)
        session = handle(cc, store, req, T0 + timedelta(minutes=10 * n)).session
        reference = json.dumps(CC.session_to_json(session), separators=(",", ":"))
        text, memo = CC.session_json_text(session, memo)
        assert text == reference
        assert CC.session_json_text(session)[0] == reference            # without a memo
        assert len(memo) == len(session.usage) + len(session.answers)
        stored = store._db.execute("SELECT data FROM payg_cc_session WHERE session_id = 'S1'").fetchone()[0]
        assert stored == reference
        assert CC.session_from_json(json.loads(stored)) == session
    other = CC.decide(None, CC.initial("S2", "ACC1", "M1", "GBP"), credit_minor=10**6, reserved_by_others_minor=0,
                      policy=POLICY, vat=store.vat, now=T0).session
    assert CC.session_json_text(other, memo)[0] == json.dumps(CC.session_to_json(other), separators=(",", ":"))


def test_balances_reads_several_accounts_at_once_like_balance(store):
    store.put_account("ACC1", "GBP")
    store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", store.vat)])
    store.register_arrears("ACC1", "old-debt", 70, T0, "previous supplier")
    accounts = (L.prepaid("ACC1"), L.arrears_account("ACC1"), L.prepaid("ACC2"))
    got = store.balances(accounts, "GBP")
    assert got == {a: store.balance(a, "GBP") for a in accounts}
    assert got == {L.prepaid("ACC1"): -5_000, L.arrears_account("ACC1"): 70, L.prepaid("ACC2"): 0}
    mixed = accounts + (L.vendor_receivable("SHOP1"),)                  # not a running balance: summed
    assert store.balances(mixed, "GBP") == {a: store.balance(a, "GBP") for a in mixed}
    assert store.balances(accounts[:2], "EUR") == {accounts[0]: 0, accounts[1]: 0}


def test_credit_inputs_in_one_read_equal_the_four_reads_and_the_balances_after_equal_a_fresh_read(store):
    """`PaygStore.credit_inputs` (what the gRPC servicer's credit control reads) gives what the ledger,
    the sessions and the token reservations give one by one; `CreditControl.balances_after` (read
    before + booked) equals reading the balances again after the request, over usage, debt repaid,
    arrears recovered and tokens reported."""
    key = Ed25519PrivateKey.generate()
    store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", store.vat)])
    store.put_account("ACC1", "GBP")
    store.register_arrears("ACC1", "old", 700, T0, "previous supply")
    tokens = [S.issue_token(store, f"sale:SHOP1:{i}", "M1", "ACC1", 100 * (i + 1), "GBP", key, T0) for i in range(3)]
    sessions, res = S.SqlSessionStore(store), S.StoreTokenReservations(store)
    one = CC.CreditControl(store, sessions, POLICY, store.vat, tokens=res, inputs=store.credit_inputs)
    handle(one, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0)
    handle(one, store, CC.initial("S2", "ACC1", "M2", "GBP"), T0)
    later = T0 + timedelta(hours=1)
    for exclude, now in (((), later), ((tokens[0].token_id,), later), ((tokens[1].token_id, tokens[2].token_id), later),
                         ((), tokens[0].expires_at)):
        prepaid = -store.balance(L.prepaid("ACC1"), "GBP")
        assert store.credit_inputs("ACC1", "GBP", "S1", exclude, now) == (
            prepaid, store.balance(L.arrears_account("ACC1"), "GBP"), sessions.reserved_by_others("ACC1", "S1"),
            res.outstanding_minor("ACC1", exclude=exclude, now=now))
    assert store.credit_inputs("NOBODY", "GBP", "S9") == (0, 0, 0, 0)
    upd = CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, 1, "ACC1", "M1", "GBP", 900, 3000,
                                  to_debt_minor=150, repaid_debt_minor=0, recovered_arrears_minor=60,
                                  tokens=((tokens[0].token_id, 100),))
    for cc, req in ((one, upd), (one, upd),                                     # the second: a retransmission
                    (one, CC.CreditControlRequest("S2", CC.RequestType.TERMINATION_REQUEST, 1, "ACC1", "M2", "GBP",
                                                  50, 100, repaid_debt_minor=20))):
        with store.transaction():
            out = cc.handle(req, later)
            after = cc.balances_after("ACC1", "GBP")
            both = store.balances((L.prepaid("ACC1"), L.arrears_account("ACC1")), "GBP")
        assert out.answer.ok and after == (-both[L.prepaid("ACC1")], both[L.arrears_account("ACC1")])
    assert cc.balances_after("ACC1", "EUR") is None and cc.balances_after("ACC2", "GBP") is None
    assert store.verify_balances() == []
