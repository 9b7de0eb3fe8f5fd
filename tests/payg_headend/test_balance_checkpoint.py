"""Running balances of the customer accounts (`payg_balance`): moved in the same transaction as the
postings, always equal to the sum of the postings (`verify_balances`), adopted from the postings on
an older database, and a long history changes no credit-control answer. SQLite and PostgreSQL (a
schema per test: tests/payg_headend/conftest.py)."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S

T0 = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))


@pytest.fixture
def url(payg_url) -> str:
    return payg_url


@pytest.fixture
def store(url):
    st = S.PaygStore(url)
    yield st
    st.close()


def random_txn(rng: random.Random, i: int, vat: L.PrepaidVat) -> L.Transaction:
    c = f"C{rng.randrange(4)}"
    at = T0 + timedelta(seconds=i)
    kind = rng.randrange(5)
    amount = rng.randrange(1, 5_000)
    if kind == 0:
        return L.top_up(f"t{i}", at, c, "SHOP1", amount, "GBP", vat)
    if kind == 1:
        return L.consumption_charge(f"t{i}", at, c, "GBP", vat, gross_minor=amount)
    if kind == 2:
        return L.over_usage_debt(f"t{i}", at, c, amount, "GBP", vat)
    if kind == 3:
        return L.arrears_registered(f"t{i}", at, c, amount, "EUR" if rng.random() < 0.2 else "GBP", "prior")
    return L.adjustment(f"t{i}", at, c, rng.choice([-1, 1]) * amount, "GBP", "goodwill")


def test_running_balances_equal_the_sum_of_postings_through_replays_and_rolled_back_blocks(store):
    rng = random.Random(6)
    booked: list[L.Transaction] = []
    for i in range(300):
        t = random_txn(rng, i, store.vat)
        batch = [t] + ([booked[rng.randrange(len(booked))]] if booked and rng.random() < 0.3 else [])  # replays
        if rng.random() < 0.1:                        # a block that fails after appending: nothing stays
            with pytest.raises(RuntimeError):
                with store.transaction():
                    store.append(batch)
                    raise RuntimeError("refused after booking")
            continue
        store.append(batch)
        booked.append(t)
    accounts = {(p.account, p.currency) for t in booked for p in t.postings}
    for account, currency in accounts:
        assert store.balance(account, currency) == L.balance(booked, account, currency), account
    for c in ("C0", "C1", "C2", "C3"):
        for account in (L.prepaid(c), L.debt(c), L.arrears_account(c)):
            assert store.balance(account) == L.balance(booked, account)      # all currencies
    assert store.verify_balances() == []
    assert store.balance(L.prepaid("NOBODY"), "GBP") == 0


def test_verify_finds_a_running_balance_that_disagrees_and_rebuild_derives_it_again(store, url):
    store.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", store.vat)])
    with store.transaction() as db:
        db.execute("UPDATE payg_balance SET balance_minor = balance_minor + 1 WHERE account = ?",
                   (L.prepaid("ACC1"),))
    [bad] = store.verify_balances()
    assert (bad.account, bad.currency, bad.checkpoint_minor, bad.postings_minor) == \
        (L.prepaid("ACC1"), "GBP", -4_999, -5_000)
    cmd = [sys.executable, "-m", "meterlink.headend.payg_store"]
    out = subprocess.run(cmd + ["verify-balances", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "MISMATCH customer:ACC1:prepaid GBP" in out.stdout
    assert store.rebuild_balances() == 1
    assert store.verify_balances() == [] and store.balance(L.prepaid("ACC1"), "GBP") == -5_000
    out = subprocess.run(cmd + ["verify-balances", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "1 running balances, all equal" in out.stdout


def test_a_database_from_before_running_balances_adopts_them_from_its_postings(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    st = S.PaygStore(url)
    st.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", st.vat),
               L.consumption_charge("use", T0, "ACC1", "GBP", st.vat, gross_minor=1_234)])
    st.close()
    with sqlite3.connect(tmp_path / "old.db") as c:      # what an earlier build left behind
        c.execute("DROP TABLE payg_balance")
        c.execute("DROP TABLE payg_meta")
    st = S.PaygStore(url)
    try:
        assert st.balance(L.prepaid("ACC1"), "GBP") == -(5_000 - 1_234)
        assert st.verify_balances() == []
    finally:
        st.close()


def run_credit_control(store) -> list:
    """One meter's session: reserve, updates with usage, recoveries and debt; the answers."""
    cc = CC.CreditControl(store, S.SqlSessionStore(store), POLICY, store.vat, tokens=S.StoreTokenReservations(store))
    out = []

    def handle(req, now):
        with store.transaction():
            o = cc.handle(req, now)
        out.append((o.answer, store.balance(L.prepaid("ACC1"), "GBP"), store.arrears("ACC1", "GBP")))

    handle(CC.initial("S1", "ACC1", "M1", "GBP"), T0)
    for n in range(1, 25):
        grant = out[-1][0].grant.amount_minor if out[-1][0].grant else 0
        used = (n * 37) % (grant + 50)                 # now and then beyond the grant: over-usage
        handle(CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", used, used * 4,
                                       recovered_arrears_minor=min(10, max(0, grant - used))),
               T0 + timedelta(minutes=15 * n))
    return out


def test_a_long_history_changes_no_credit_control_answer(url, tmp_path):
    short = S.PaygStore(f"sqlite:///{tmp_path}/short.db")
    long_ = S.PaygStore(url)
    try:
        for st in (short, long_):
            st.put_account("ACC1", "GBP")
            st.append([L.top_up("seed", T0, "ACC1", "SHOP1", 8_000, "GBP", st.vat)])
            st.register_arrears("ACC1", "R1", 500, T0, "previous supply")
        # 4000 more transactions on the same accounts that net to nothing: a long history
        rng = random.Random(4)
        history = []
        for i in range(2_000):
            amount = rng.randrange(1, 3_000)
            history += [L.adjustment(f"h{i}+", T0 - timedelta(days=400, seconds=-i), "ACC1", amount, "GBP", "old"),
                        L.adjustment(f"h{i}-", T0 - timedelta(days=400, seconds=-i), "ACC1", -amount, "GBP", "old")]
        for k in range(0, len(history), 500):
            long_.append(history[k:k + 500])
        assert len(list(long_.transactions())) == len(list(short.transactions())) + 4_000
        assert run_credit_control(long_) == run_credit_control(short)
        assert long_.verify_balances() == [] and short.verify_balances() == []
    finally:
        short.close()
        long_.close()
