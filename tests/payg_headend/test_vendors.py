"""Vendor sales: card-authenticated authorisation, blacklist to the millisecond, velocity, reversal, settlement."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings, strategies as st

from meterlink.errors import ValidationError
from meterlink.headend import ledger as L
from meterlink.headend import vendors as V

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)
VAT = L.PrepaidVat(Decimal("0.05"), "consumption")
CONTRACT = V.VendorContract("SHOP1", "GBP", commission_percent=Decimal("2.5"), commission_fixed_minor=5,
                            vat_rate_on_commission=Decimal("0.20"), contract_id="K-2026")
KEY = Ed25519PrivateKey.generate()


def pub(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


CARDS = {"CARD1": V.Card("CARD1", "ACC1", pub(KEY)), "CARD2": V.Card("CARD2", "ACC2", pub(KEY)),
         "OLD": V.Card("OLD", "ACC1", pub(KEY), active=False)}


def account(balance=0, active=True, max_balance=100_000, account_id="ACC1") -> V.AccountState:
    return V.AccountState(account_id, "GBP", active, balance, max_balance)


def request(sale_id="S1", amount=2000, card="CARD1", acc="ACC1", key=KEY, vendor="SHOP1",
            challenge=b"c" * 16, currency="GBP") -> V.SaleRequest:
    msg = V.sale_challenge_message(challenge, sale_id, vendor, card, acc, amount, currency)
    return V.SaleRequest(sale_id, vendor, card, acc, amount, currency, challenge, key.sign(msg))


def authorise(req=None, *, blacklist=(), history=(), acc=None, now=T0, limits=V.DEFAULT_VELOCITY):
    return V.authorise_sale(req or request(), CARDS, blacklist, history, acc or account(), now,
                            contract=CONTRACT, vat=VAT, velocity_limits=limits)


def test_an_authorised_sale_books_top_up_and_commission_that_balance():
    a = authorise()
    assert a.authorised and a.sale.commission_minor == 55 and a.sale.vat_on_commission_minor == 11
    ledger = L.InMemoryLedger(a.transactions)
    assert L.customer_credit(ledger.transactions(), "ACC1", "GBP") == 2000
    assert ledger.balance(L.vendor_receivable("SHOP1"), "GBP") == 2000 - 55 - 11
    assert L.totals_by_currency(ledger.transactions()) == {"GBP": 0}


def test_blacklisted_card_is_refused_one_millisecond_after_blacklisting_before_any_credit_moves():
    entry = V.BlacklistEntry("CARD1", datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC), reason="reported stolen")
    before = authorise(blacklist=[entry], now=datetime(2026, 3, 2, 11, 59, 59, 999_000, tzinfo=UTC))
    at = authorise(blacklist=[entry], now=datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC))
    after = authorise(blacklist=[entry], now=datetime(2026, 3, 2, 12, 0, 0, 1000, tzinfo=UTC))
    assert before.authorised
    for r in (at, after):
        assert not r.authorised and r.reason is V.RefusalReason.CARD_BLACKLISTED
        assert "reported stolen" in r.detail and not hasattr(r, "transactions")


def test_a_lifted_blacklist_entry_no_longer_applies():
    entry = V.BlacklistEntry("CARD1", T0 - timedelta(days=2), lifted_at=T0 - timedelta(days=1))
    assert authorise(blacklist=[entry]).authorised


def test_blacklist_instants_finer_than_a_millisecond_are_refused():
    with pytest.raises(ValidationError, match="CARD1.*sub-millisecond"):
        V.BlacklistEntry("CARD1", T0 + timedelta(microseconds=5))


@pytest.mark.parametrize("req, acc, reason", [
    (request(amount=0), account(), V.RefusalReason.BAD_REQUEST),
    (request(currency="EUR"), account(), V.RefusalReason.BAD_REQUEST),
    (request(vendor="SHOP2"), account(), V.RefusalReason.BAD_REQUEST),
    (request(challenge=b"short"), account(), V.RefusalReason.BAD_REQUEST),
    (request(card="NOPE"), account(), V.RefusalReason.CARD_UNKNOWN),
    (request(card="OLD"), account(), V.RefusalReason.CARD_INACTIVE),
    (request(card="CARD2"), account(), V.RefusalReason.CARD_ACCOUNT_MISMATCH),
    (request(key=Ed25519PrivateKey.generate()), account(), V.RefusalReason.CARD_NOT_AUTHENTICATED),
    (request(), account(active=False), V.RefusalReason.ACCOUNT_INACTIVE),
    (request(amount=5000), account(balance=96_000), V.RefusalReason.MAX_BALANCE),
])
def test_each_failed_check_refuses_with_its_reason_and_moves_no_money(req, acc, reason):
    r = authorise(req, acc=acc)
    assert not r.authorised and r.reason is reason and r.sale_id == req.sale_id


def test_a_signature_over_another_sale_does_not_authenticate_the_card():
    good = request(sale_id="S1", amount=2000)
    replayed = V.SaleRequest("S1", "SHOP1", "CARD1", "ACC1", 9000, "GBP", good.challenge, good.signature)
    assert authorise(replayed).reason is V.RefusalReason.CARD_NOT_AUTHENTICATED


def test_velocity_limits_count_and_amount_in_a_rolling_window():
    limits = (V.VelocityLimit(timedelta(hours=1), max_count=2),
              V.VelocityLimit(timedelta(days=1), max_amount_minor=5000, per="account"))
    history = []
    for i in range(2):
        a = authorise(request(f"S{i}", 1000), history=history, now=T0 + timedelta(minutes=i), limits=limits)
        history.append(a.sale)
    third = authorise(request("S2", 1000), history=history, now=T0 + timedelta(minutes=2), limits=limits)
    assert third.reason is V.RefusalReason.VELOCITY_COUNT
    later = authorise(request("S3", 1000), history=history, now=T0 + timedelta(minutes=61), limits=limits)
    assert later.authorised
    history.append(later.sale)
    big = authorise(request("S4", 2500), history=history, now=T0 + timedelta(hours=3), limits=limits)
    assert big.reason is V.RefusalReason.VELOCITY_AMOUNT


def test_a_reversal_negates_the_sale_exactly_unless_the_credit_was_spent():
    a = authorise()
    rv = V.reverse_sale(a.sale, "R1", T0 + timedelta(hours=1), "token never delivered", account(2000), VAT)
    ledger = L.InMemoryLedger(a.transactions + rv.transactions)
    assert L.trial_balance(ledger.transactions()) == {k: 0 for k in L.trial_balance(ledger.transactions())}
    spent = V.reverse_sale(a.sale, "R2", T0, "late", account(1500), VAT)
    assert spent.reason is V.RefusalReason.INSUFFICIENT_CREDIT_FOR_REVERSAL


def test_statement_uses_the_commission_booked_at_sale_time_even_if_the_contract_changes():
    a = authorise()
    period = V.Period(T0 - timedelta(days=1), T0 + timedelta(days=1), "2026-03")
    new_terms = V.VendorContract("SHOP1", "GBP", commission_percent=Decimal(10), contract_id="K-2027")
    st_ = V.settlement_statement("SHOP1", period, [a.sale], [], [], new_terms)
    assert st_.commission_minor == 55
    assert V.reconcile_statement_to_ledger(st_, a.transactions).ok


# --------------------------------------------------------------------------- property: a vendor's month

month = st.lists(st.tuples(st.integers(1, 20_000), st.booleans(), st.booleans(), st.integers(0, 29 * 24)),
                 min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(month, st.sampled_from([Decimal(0), Decimal("2.5"), Decimal("3.33")]), st.integers(0, 30),
       st.sampled_from([L.PrepaidVat(Decimal("0.05"), "consumption"), L.PrepaidVat(Decimal("0.2"), "top_up")]))
def test_a_vendors_month_settles_to_the_cent_and_the_ledger_sums_to_zero(sales, percent, fixed, vat):
    contract = V.VendorContract("SHOP1", "GBP", commission_percent=percent, commission_fixed_minor=fixed,
                                vat_rate_on_commission=Decimal("0.2"))
    start = datetime(2026, 3, 1, tzinfo=UTC)
    period = V.Period(start, datetime(2026, 4, 1, tzinfo=UTC), "2026-03")
    ledger = L.InMemoryLedger()
    booked, refusals, reversals = [], [], []
    for i, (amount, refuse, reverse, hour) in enumerate(sales):
        now = start + timedelta(hours=hour, seconds=i)
        req = request(f"S{i}", amount, key=Ed25519PrivateKey.generate() if refuse else KEY)
        r = V.authorise_sale(req, CARDS, [], [], account(), now, contract=contract, vat=vat, velocity_limits=())
        if not r.authorised:
            refusals.append(r)
            continue
        ledger.append(r.transactions)
        booked.append(r.sale)
        if reverse:
            rv = V.reverse_sale(r.sale, f"R{i}", now + timedelta(hours=1), "test", account(amount), vat)
            ledger.append(rv.transactions)
            reversals.append(rv)
    ledger.append([L.vendor_remittance("rem-1", start + timedelta(days=5), "SHOP1", 1, "GBP")])
    stmt = V.settlement_statement("SHOP1", period, booked, refusals, reversals, contract)
    rec = V.reconcile_statement_to_ledger(stmt, ledger.transactions())
    assert rec.ok, rec.differences
    assert L.totals_by_currency(ledger.transactions()) == {"GBP": 0}
    assert stmt.refused_count == sum(1 for s in sales if s[1])
    assert stmt.net_payable_minor == (stmt.gross_sales_minor - stmt.reversed_minor - stmt.commission_minor
                                      - stmt.vat_on_commission_minor)
    # net payable is what the customer credit sold (and kept) minus the vendor's commission and its VAT
    kept = sum(s.amount_minor for s in booked) - sum(rv.sale.amount_minor for rv in reversals)
    assert L.customer_credit(ledger.transactions(), "ACC1", "GBP") == kept
