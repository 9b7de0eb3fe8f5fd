"""Accepted PAYG top-up bonuses become ledger credit exactly once, and follow a reversed sale."""

from __future__ import annotations

from datetime import date, datetime, timezone

from meterlink.headend import ledger as L
from meterlink.headend import promotions as P
from meterlink.headend.payg_store import PaygStore
from meterlink.headend.vendors import Sale

UTC = timezone.utc


def sale(sid: str, account: str, amount: int, day: int) -> Sale:
    return Sale(sid, "SHOP-1", "CARD-1", account, amount, "GBP", datetime(2026, 12, day, 10, tzinfo=UTC), 0, 0)


def test_bonus_is_a_percentage_of_each_sale_in_effect_and_reverses_with_its_sale(tmp_path):
    promos = P.load_promotions()                                   # gb-payg-bonus-5: 5 %, from 2026-12-01
    accepted = {("gb-payg-bonus-5", "A-2"): date(2026, 12, 10)}
    sales = [sale("s1", "A-2", 2000, 5),      # before the acceptance took effect: no bonus
             sale("s2", "A-2", 2000, 12),     # 5 % = 100
             sale("s3", "A-2", 1010, 20),     # 5 % = 50.5 -> 51 (half up)
             sale("s4", "A-9", 5000, 20)]     # another account
    txns = P.topup_bonuses(sales, {"s3": datetime(2026, 12, 21, tzinfo=UTC)}, accepted, promos)
    assert [(t.business_key, t.amount(L.prepaid("A-2"))) for t in txns] == [
        ("bonus:gb-payg-bonus-5:s2", -100), ("bonus:gb-payg-bonus-5:s3", -51),
        ("bonus-reversal:gb-payg-bonus-5:s3", 51)]
    store = PaygStore(f"sqlite:///{tmp_path / 'h.db'}")
    try:
        assert len(store.append(txns)) == 3
        assert store.append(txns) == ()                            # booked once
        assert store.balance(L.prepaid("A-2"), "GBP") == -100      # credit of 1.00 GBP to the customer
        assert store.balance(P.PROMOTION_EXPENSE, "GBP") == 100
        assert L.totals_by_currency(list(store.transactions())) == {"GBP": 0}
    finally:
        store.close()
