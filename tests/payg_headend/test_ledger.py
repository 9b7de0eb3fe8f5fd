"""Ledger: balanced transactions, idempotent business keys, one builder per money movement, sums to zero."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from meterlink.errors import ValidationError
from meterlink.headend import ledger as L

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
VAT_CONS = L.PrepaidVat(Decimal("0.05"), "consumption")
VAT_TOPUP = L.PrepaidVat(Decimal("0.05"), "top_up")


def test_unbalanced_transaction_is_refused_naming_its_key():
    with pytest.raises(L.UnbalancedTransaction, match=r"'bad-key'.*GBP \+1"):
        L.Transaction("bad-key", T0, (L.Posting("a", 10, "GBP"), L.Posting("b", -9, "GBP")))


def test_balance_is_checked_per_currency():
    with pytest.raises(L.UnbalancedTransaction, match="EUR -5.*GBP \\+5"):
        L.Transaction("fx", T0, (L.Posting("a", 5, "GBP"), L.Posting("b", -5, "EUR")))


def test_float_amounts_are_refused():
    with pytest.raises(TypeError, match="cash"):
        L.Posting("cash", 1.5, "GBP")


def test_same_key_and_content_is_a_no_op():
    ledger = L.InMemoryLedger()
    t = L.top_up("sale:1", T0, "C1", "V1", 1000, "GBP", VAT_CONS)
    assert ledger.append([t]) == (t,)
    again = L.top_up("sale:1", T0, "C1", "V1", 1000, "GBP", VAT_CONS)
    assert ledger.append([again]) == ()
    assert len(ledger) == 1
    assert ledger.balance(L.prepaid("C1"), "GBP") == -1000


def test_same_key_with_other_content_is_an_error_naming_the_key():
    ledger = L.InMemoryLedger([L.top_up("sale:1", T0, "C1", "V1", 1000, "GBP", VAT_CONS)])
    with pytest.raises(L.BusinessKeyConflict, match="'sale:1'"):
        ledger.append([L.top_up("sale:1", T0, "C1", "V1", 1001, "GBP", VAT_CONS)])
    with pytest.raises(L.BusinessKeyConflict, match="'sale:1'"):
        ledger.append([L.top_up("sale:1", T0 + timedelta(milliseconds=1), "C1", "V1", 1000, "GBP", VAT_CONS)])
    assert ledger.balance(L.prepaid("C1"), "GBP") == -1000


def test_a_batch_with_a_conflict_stores_nothing():
    ledger = L.InMemoryLedger([L.top_up("sale:1", T0, "C1", "V1", 1000, "GBP", VAT_CONS)])
    batch = [L.top_up("sale:2", T0, "C1", "V1", 500, "GBP", VAT_CONS),
             L.top_up("sale:1", T0, "C1", "V1", 999, "GBP", VAT_CONS)]
    with pytest.raises(L.BusinessKeyConflict):
        ledger.append(batch)
    assert not ledger.exists("sale:2")


def test_memo_is_not_part_of_the_content():
    a = L.adjustment("adj:1", T0, "C1", 250, "GBP", reason="goodwill")
    b = L.adjustment("adj:1", T0, "C1", 250, "GBP", reason="goodwill, typo fixed")
    assert L.InMemoryLedger([a]).append([b]) == ()


def test_top_up_taxed_at_consumption_is_a_plain_payment():
    t = L.top_up("k", T0, "C1", "V1", 1050, "GBP", VAT_CONS)
    assert t.amount(L.vendor_receivable("V1")) == 1050
    assert t.amount(L.prepaid("C1")) == -1050
    assert t.amount(L.VAT_OUTPUT) == 0


def test_top_up_taxed_at_top_up_owes_vat_at_once_and_consumption_does_not_tax_twice():
    entries = [L.top_up("k1", T0, "C1", "V1", 1050, "GBP", VAT_TOPUP)]
    assert L.balance(entries, L.VAT_OUTPUT) == -50          # 1050 * 0.05 / 1.05
    assert L.customer_credit(entries, "C1", "GBP") == 1050  # the customer sees the gross amount
    entries.append(L.consumption_charge("k2", T0, "C1", "GBP", VAT_TOPUP, gross_minor=630))
    entries.append(L.consumption_charge("k3", T0, "C1", "GBP", VAT_TOPUP, gross_minor=420))
    assert L.balance(entries, L.VAT_OUTPUT) == -50          # unchanged by consumption
    assert L.balance(entries, L.VAT_PREPAID_CLEARING) == 0  # all prepaid VAT matched by supply
    assert L.balance(entries, L.REVENUE_ENERGY) == -1000
    assert L.customer_credit(entries, "C1", "GBP") == 0


def test_consumption_charge_from_net_rounds_net_then_vat():
    t = L.consumption_charge("k", T0, "C1", "GBP", VAT_CONS, net=Decimal("123.456"))
    assert t.amount(L.REVENUE_ENERGY) == -123
    assert t.amount(L.VAT_OUTPUT) == -6                     # 123 * 0.05 = 6.15
    assert t.amount(L.prepaid("C1")) == 129


def test_exactly_one_of_net_or_gross_is_required():
    with pytest.raises(L.LedgerError, match="'k'"):
        L.consumption_charge("k", T0, "C1", "GBP", VAT_CONS, net=Decimal(1), gross_minor=1)


def test_standing_charge_goes_to_standing_revenue():
    t = L.standing_charge("k", T0, "C1", "GBP", VAT_CONS, net=Decimal("45.5"))
    assert t.amount(L.REVENUE_STANDING) == -46
    assert t.amount(L.VAT_OUTPUT) == -2


def test_over_usage_is_charged_to_debt_not_credit():
    t = L.over_usage_debt("k", T0, "C1", 210, "GBP", VAT_CONS)
    assert t.amount(L.debt("C1")) == 210
    assert t.amount(L.prepaid("C1")) == 0
    assert t.amount(L.REVENUE_ENERGY) + t.amount(L.VAT_OUTPUT) == -210


def test_emergency_credit_then_top_up_repays_it_and_recovers_debt():
    e = [L.emergency_credit("ec", T0, "C1", 500, "GBP"),
         L.over_usage_debt("ou", T0, "C1", 200, "GBP", VAT_CONS),
         L.top_up("tu", T0, "C1", "V1", 2000, "GBP", VAT_CONS),
         L.debt_recovery("dr", T0, "C1", 200, "GBP"),
         L.emergency_credit_repayment("ecr", T0, "C1", 500, "GBP")]
    assert L.balance(e, L.debt("C1")) == 0
    assert L.balance(e, L.emergency_credit_account("C1")) == 0
    assert L.customer_credit(e, "C1", "GBP") == 500 + 2000 - 200 - 500


def test_vendor_commission_reduces_what_the_vendor_owes_and_books_input_vat():
    t = L.vendor_commission("k", T0, "V1", 30, 6, "GBP")
    assert t.amount(L.commission_expense("V1")) == 30
    assert t.amount(L.VAT_INPUT) == 6
    assert t.amount(L.vendor_receivable("V1")) == -36


def test_rounding_residue_is_booked_not_lost():
    pieces = [Decimal("33.333"), Decimal("33.333"), Decimal("33.334")]
    booked = sum(L.vat_on_net(p, Decimal(0))[0] for p in pieces)
    residue = L.residue_to_book(sum(pieces), booked)
    assert (booked, residue) == (99, -1)
    t = L.rounding_residue("r", T0, residue, "GBP")
    assert t.amount(L.ROUNDING_RESIDUE) == 1 and t.amount(L.REVENUE_ENERGY) == -1


def test_reverse_undoes_a_transaction_exactly():
    t = L.top_up("k", T0, "C1", "V1", 777, "GBP", VAT_TOPUP)
    r = L.reverse(t, "k:rev", T0)
    assert r.kind == "top-up-reversal"
    assert L.trial_balance([t, r]) == {k: 0 for k in L.trial_balance([t])}


def test_bad_ids_are_refused():
    with pytest.raises(ValidationError, match="customer id 'a:b'"):
        L.prepaid("a:b")


# --------------------------------------------------------------------------- property

customers = st.sampled_from(["C1", "C2", "C3"])
vendors = st.sampled_from(["V1", "V2"])
amounts = st.integers(min_value=1, max_value=100_000)
currencies = st.sampled_from(["GBP", "EUR"])
vats = st.sampled_from([VAT_CONS, VAT_TOPUP, L.PrepaidVat(Decimal("0.2"), "top_up", "half_even"),
                        L.PrepaidVat(Decimal("0.135"), "consumption", "down")])
nets = st.decimals(min_value=Decimal("1"), max_value=Decimal(10_000), places=4)


@st.composite
def transactions(draw, key):
    kind = draw(st.integers(0, 11))
    c, v, a, cur, vat = draw(customers), draw(vendors), draw(amounts), draw(currencies), draw(vats)
    at = T0 + timedelta(minutes=draw(st.integers(0, 10_000)))
    if kind == 0:
        return L.top_up(key, at, c, v, a, cur, vat)
    if kind == 1:
        return L.consumption_charge(key, at, c, cur, vat, net=draw(nets))
    if kind == 2:
        return L.consumption_charge(key, at, c, cur, vat, gross_minor=a)
    if kind == 3:
        return L.standing_charge(key, at, c, cur, vat, net=draw(nets))
    if kind == 4:
        return L.debt_recovery(key, at, c, a, cur)
    if kind == 5:
        return L.emergency_credit(key, at, c, a, cur)
    if kind == 6:
        return L.emergency_credit_repayment(key, at, c, a, cur)
    if kind == 7:
        return L.vendor_commission(key, at, v, a, a // 5, cur)
    if kind == 8:
        return L.adjustment(key, at, c, draw(st.integers(-5000, 5000).filter(bool)), cur, "test")
    if kind == 9:
        return L.rounding_residue(key, at, draw(st.integers(-3, 3).filter(bool)), cur)
    if kind == 10:
        return L.over_usage_debt(key, at, c, a, cur, vat)
    return L.vendor_remittance(key, at, v, a, cur)


@st.composite
def ledgers(draw):
    n = draw(st.integers(0, 40))
    return [draw(transactions(f"k{i}")) for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(ledgers(), st.randoms(use_true_random=False))
def test_any_valid_sequence_sums_to_zero_and_replay_changes_nothing(txns, rnd):
    ledger = L.InMemoryLedger()
    for t in txns:
        ledger.append([t])
    entries = list(ledger.transactions())
    assert all(v == 0 for v in L.totals_by_currency(entries).values())
    trial = L.trial_balance(entries)
    for (account, cur), value in trial.items():
        assert ledger.balance(account, cur) == value == L.balance(txns, account, cur)
    replay = txns * 2
    rnd.shuffle(replay)
    assert ledger.append(replay) == ()
    assert L.trial_balance(ledger.transactions()) == trial
    assert len(ledger) == len(txns)
