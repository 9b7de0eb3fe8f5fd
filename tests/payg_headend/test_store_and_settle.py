"""PAYG persistence in the head-end SQLite DB and the `settle` / `cards` / `vendors` commands."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.errors import ValidationError
from meterlink.headend import ledger as L
from meterlink.headend import settlement as S
from meterlink.headend import vendors as V
from meterlink.headend.cli import main
from meterlink.headend.payg_store import PaygStore

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 9, tzinfo=UTC)
VAT = L.PrepaidVat(Decimal("0.05"), "consumption")


@pytest.fixture
def db(payg_url) -> str:
    """The same store contract on SQLite and on PostgreSQL (tests/payg_headend/conftest.py)."""
    return payg_url


@pytest.fixture
def sqlite_db(tmp_path):
    return f"sqlite:///{tmp_path}/headend.db"


def cli(db, *argv) -> int:
    return main([*argv, "--database", db])


def setup_shop(db) -> None:
    assert cli(db, "vendors", "add", "--vendor", "SHOP1", "--currency", "GBP", "--commission-percent", "2",
               "--commission-fixed", "10", "--vat-on-commission", "0.20", "--contract", "K-1") == 0
    assert cli(db, "vendors", "account", "--account", "ACC1", "--currency", "GBP") == 0


def issue_card(db, tmp_path, card="CARD1") -> Ed25519PrivateKey:
    keyfile = tmp_path / f"{card}.pem"
    assert cli(db, "cards", "issue", "--card", card, "--account", "ACC1", "--key-out", str(keyfile)) == 0
    assert oct(os.stat(keyfile).st_mode & 0o777) == "0o600"
    return serialization.load_pem_private_key(keyfile.read_bytes(), None)


def sell(store: PaygStore, key, sale_id: str, amount: int, now: datetime, card="CARD1"):
    challenge = store.issue_challenge(now)
    msg = V.sale_challenge_message(challenge, sale_id, "SHOP1", card, "ACC1", amount, "GBP")
    return store.authorise(V.SaleRequest(sale_id, "SHOP1", card, "ACC1", amount, "GBP", challenge, key.sign(msg)),
                           now)


# --------------------------------------------------------------------------- ledger store

def test_sqlite_ledger_is_idempotent_atomic_and_sums_to_zero(db):
    store = PaygStore(db)
    t1 = L.top_up("k1", T0, "ACC1", "SHOP1", 1000, "GBP", VAT)
    assert store.append([t1]) == (t1,)
    assert store.append([L.top_up("k1", T0, "ACC1", "SHOP1", 1000, "GBP", VAT)]) == ()
    t2 = L.top_up("k2", T0, "ACC1", "SHOP1", 500, "GBP", VAT)
    with pytest.raises(L.BusinessKeyConflict, match="'k1'"):
        store.append([t2, L.top_up("k1", T0, "ACC1", "SHOP1", 999, "GBP", VAT)])
    assert not store.exists("k2")                                 # nothing of the failed batch was stored
    assert store.get("k1") == t1
    assert store.balance(L.prepaid("ACC1"), "GBP") == -1000
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0}
    store.close()
    again = PaygStore(db)                                         # durable
    assert [t.business_key for t in again.transactions()] == ["k1"]


def test_sub_millisecond_instants_are_refused_by_the_store(db):
    store = PaygStore(db)
    with pytest.raises(L.LedgerError, match="'k'.*millisecond"):
        store.append([L.top_up("k", T0 + timedelta(microseconds=3), "ACC1", "SHOP1", 1, "GBP", VAT)])


# --------------------------------------------------------------------------- authorisation in the store

def test_cards_issued_by_the_cli_authenticate_sales_and_challenges_are_single_use(db, tmp_path):
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db)
    a = sell(store, key, "S1", 2000, T0)
    assert a.authorised and store.account("ACC1").balance_minor == 2000
    # the same signed request again (same challenge, new sale id) is refused: the challenge is used
    challenge = store.issue_challenge(T0)
    msg = V.sale_challenge_message(challenge, "S2", "SHOP1", "CARD1", "ACC1", 100, "GBP")
    req = V.SaleRequest("S2", "SHOP1", "CARD1", "ACC1", 100, "GBP", challenge, key.sign(msg))
    assert store.authorise(req, T0).authorised
    req3 = V.SaleRequest("S3", "SHOP1", "CARD1", "ACC1", 100, "GBP", challenge, key.sign(msg))
    refused = store.authorise(req3, T0)
    assert refused.reason is V.RefusalReason.BAD_REQUEST and "already used" in refused.detail
    # a retransmission of an authorised sale returns it without booking twice
    assert store.authorise(req, T0).sale == store.sales("SHOP1", T0, T0 + timedelta(seconds=1))[1]
    assert store.account("ACC1").balance_minor == 2100


def test_card_blacklisted_by_the_cli_at_noon_is_refused_a_millisecond_later_with_no_posting(db, tmp_path):
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db)
    noon = datetime(2026, 3, 9, 12, tzinfo=UTC)
    assert sell(store, key, "S-before", 1000, noon - timedelta(milliseconds=1)).authorised
    assert cli(db, "cards", "blacklist", "--card", "CARD1", "--reason", "stolen",
               "--at", "2026-03-09T12:00:00.000Z") == 0
    postings = len(list(store.transactions()))
    refused = sell(store, key, "S-after", 1000, noon + timedelta(milliseconds=1))
    assert refused.reason is V.RefusalReason.CARD_BLACKLISTED
    assert len(list(store.transactions())) == postings
    assert store.account("ACC1").balance_minor == 1000
    [event] = store.events()
    assert event.kind == "blacklisted_card_attempt" and event.payload["card_id"] == "CARD1"
    assert store.events(after_seq=event.seq) == []


def test_velocity_limits_are_read_from_the_stored_sales(db, tmp_path):
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db, velocity_limits=(V.VelocityLimit(timedelta(hours=1), max_count=2),))
    assert sell(store, key, "S1", 100, T0).authorised
    assert sell(store, key, "S2", 100, T0 + timedelta(minutes=1)).authorised
    assert sell(store, key, "S3", 100, T0 + timedelta(minutes=2)).reason is V.RefusalReason.VELOCITY_COUNT


def test_a_sale_is_reversed_once(db, tmp_path):
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db)
    sell(store, key, "S1", 1000, T0)
    rv = store.reverse("SHOP1", "S1", "R1", T0 + timedelta(hours=1), "not delivered")
    assert isinstance(rv, V.Reversal) and store.account("ACC1").balance_minor == 0
    with pytest.raises(ValidationError, match="already reversed"):
        store.reverse("SHOP1", "S1", "R2", T0 + timedelta(hours=2), "again")


def test_unknown_card_and_bad_public_key_are_refused_by_the_cli(db, capsys):
    setup_shop(db)
    assert cli(db, "cards", "register", "--card", "C9", "--account", "ACC1", "--public-key", "abcd") == 2
    assert "32 bytes" in capsys.readouterr().err
    assert cli(db, "cards", "blacklist", "--card", "NOPE") == 2
    assert cli(db, "cards", "register", "--card", "C9", "--account", "NOACC", "--public-key", "00" * 32) == 2


# --------------------------------------------------------------------------- settle

def test_settle_command_produces_a_statement_that_reconciles_to_the_ledger_to_the_cent(db, tmp_path, capsys):
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db)
    sell(store, key, "S1", 2000, datetime(2026, 3, 1, 9, tzinfo=UTC))
    sell(store, key, "S2", 5000, datetime(2026, 3, 4, 9, tzinfo=UTC))
    sell(store, key, "S3", 1000, datetime(2026, 3, 6, 9, tzinfo=UTC))
    assert isinstance(store.reverse("SHOP1", "S3", "R1", datetime(2026, 3, 6, 11, tzinfo=UTC), "no token"),
                      V.Reversal)
    store.blacklist_card("CARD1", datetime(2026, 3, 20, 12, tzinfo=UTC), "lost")
    assert not sell(store, key, "S4", 3000, datetime(2026, 3, 21, 9, tzinfo=UTC)).authorised
    store.blacklist()  # noqa: B018 (read path)
    store.append([L.vendor_remittance("rem-feb", datetime(2026, 3, 2, tzinfo=UTC), "SHOP1", 777, "GBP")])
    capsys.readouterr()
    assert cli(db, "settle", "--period", "2026-03", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    [s] = out["statements"]
    assert (s["gross_sales_minor"], s["refused_count"], s["refused_minor"]) == (8000, 1, 3000)
    assert (s["reversed_minor"], s["commission_minor"], s["vat_on_commission_minor"]) == (1000, 160, 32)
    assert s["net_payable_minor"] == 6808 and s["reconciled"] and out["ok"]
    assert s["ledger"]["net_payable"] == 6808
    assert cli(db, "settle", "--period", "2026-03") == 0
    text = capsys.readouterr().out
    assert "GBP 68.08" in text and "yes, to the cent" in text
    assert cli(db, "settle", "--period", "2026-04", "--json") == 0
    assert json.loads(capsys.readouterr().out)["statements"][0]["gross_sales_minor"] == 0


def test_settle_exits_non_zero_when_the_ledger_disagrees(sqlite_db, tmp_path, capsys):
    db = sqlite_db
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db)
    sell(store, key, "S1", 2000, datetime(2026, 3, 1, 9, tzinfo=UTC))
    # tamper with the ledger behind the store's back: the statement no longer reconciles
    con = sqlite3.connect(store.path)
    con.execute("UPDATE payg_posting SET amount_minor = amount_minor + 1 WHERE account = 'vendor:SHOP1:receivable' "
                "AND business_key = 'sale:SHOP1:S1:top-up'")
    con.execute("UPDATE payg_posting SET amount_minor = amount_minor - 1 WHERE account = 'customer:ACC1:prepaid'")
    con.commit()
    con.close()
    assert cli(db, "settle", "--period", "2026-03") == 1
    assert "NO: gross_sales statement 2000 ledger 2001" in capsys.readouterr().out


@pytest.mark.parametrize("text, start, end", [
    ("2026-03", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
    ("2026-12", datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("2026-03-05", datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 3, 6, tzinfo=UTC)),
    ("2026-03-01T00:00Z/2026-03-15T00:00Z", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 15, tzinfo=UTC)),
])
def test_periods_parse_to_half_open_utc_intervals(text, start, end):
    p = S.parse_period(text)
    assert (p.start, p.end) == (start, end)


def test_a_local_month_period_follows_the_market_zone():
    p = S.parse_period("2026-07", "Europe/London")
    assert p.start == datetime(2026, 6, 30, 23, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["2026-13", "March", "2026-02-30", "2026-03-02T00:00Z/2026-03-01T00:00Z"])
def test_bad_periods_are_refused_naming_the_text(bad):
    with pytest.raises(ValidationError, match="period"):
        S.parse_period(bad)


# --------------------------------------------------------------------------- tokens for sales

def test_a_sale_is_delivered_as_a_signed_token_the_gateway_applies_once(db, tmp_path, capsys):
    from meterlink.gateway import credit as C
    from meterlink.gateway import tokens as T
    from meterlink.headend import payg_store as PS
    setup_shop(db)
    key = issue_card(db, tmp_path)
    store = PaygStore(db)
    sell(store, key, "S1", 2500, T0)
    sell(store, key, "S2", 1000, T0 + timedelta(minutes=1))
    head_end = Ed25519PrivateKey.generate()
    keyfile = tmp_path / "headend.pem"
    keyfile.write_bytes(head_end.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    capsys.readouterr()
    assert cli(db, "tokens", "issue", "--sale", "SHOP1/S1", "--meter", "M1", "--key", str(keyfile),
               "--at", "2026-03-02T09:05:00Z") == 0
    text = capsys.readouterr().out.strip()
    assert cli(db, "tokens", "issue", "--sale", "SHOP1/S1", "--meter", "M1", "--key", str(keyfile),
               "--at", "2026-03-02T09:30:00Z") == 0
    assert capsys.readouterr().out.strip() == text                 # the same token again: retry-safe
    second = PS.token_for_sale(store, "SHOP1", "S2", "M1", head_end, T0 + timedelta(minutes=6))
    assert (T.TopUpToken.decode(text).counter, second.counter) == (1, 2)
    state, window = C.AccountState(account="M1"), T.ReplayWindow()
    at = T0 + timedelta(minutes=10)
    for t in (text, text, second.encode()):
        state, window, _ = T.apply_token(state, window, T.TopUpToken.decode(t), T.public_bytes(head_end), at)
    assert state.credit_balance == 3500
    assert [r[0] for r in PS.unapplied_tokens(store, "M1")] == ["M1-00000001", "M1-00000002"]
    assert PS.mark_tokens_applied(store, ["M1-00000001", "M1-00000001"], at) == 1
    assert [r[0] for r in PS.unapplied_tokens(store, "M1")] == ["M1-00000002"]
    with pytest.raises(ValidationError, match="M1-00000001.*applied"):
        store.reverse("SHOP1", "S1", "R1", at, "too late")
    store.reverse("SHOP1", "S2", "R2", at, "customer changed mind")
    with pytest.raises(ValidationError, match="reversed"):
        PS.token_for_sale(store, "SHOP1", "S2", "M1", head_end, at)
    assert cli(db, "tokens", "issue", "--sale", "SHOP1/NOPE", "--meter", "M1", "--key", str(keyfile)) == 2


def test_concurrent_sales_from_two_connections_never_exceed_the_maximum_balance(db, tmp_path):
    import threading
    setup_shop(db)
    key = issue_card(db, tmp_path)
    assert cli(db, "vendors", "account", "--account", "ACC1", "--currency", "GBP", "--max-balance", "10000") == 0
    stores = [PaygStore(db, velocity_limits=()), PaygStore(db, velocity_limits=())]
    results = []

    def worker(k: int) -> None:
        store = stores[k % 2]
        for i in range(6):
            r = sell(store, key, f"S{k}-{i}", 1000, T0 + timedelta(seconds=i))
            results.append(r.authorised or r.reason)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 10
    assert results.count(V.RefusalReason.MAX_BALANCE) == 14
    assert stores[0].account("ACC1").balance_minor == 10_000
    assert L.totals_by_currency(stores[1].transactions()) == {"GBP": 0}
