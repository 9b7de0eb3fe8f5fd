"""Acceptance scenarios 7 and 8 and the blacklist instant (issue 6) on the pure cores, on a simulated clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meterlink.clock import SimClock
from meterlink.gateway import credit as C
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import vendors as V

UTC = timezone.utc
VAT = L.PrepaidVat(Decimal("0.05"), "consumption")
CARD_KEY = Ed25519PrivateKey.generate()
CARD_PUB = CARD_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
CARDS = {"CARD1": V.Card("CARD1", "ACC1", CARD_PUB)}
CONTRACT = V.VendorContract("SHOP1", "GBP", commission_percent=Decimal(2), commission_fixed_minor=10,
                            vat_rate_on_commission=Decimal("0.20"), contract_id="K-1")


def sale_request(sale_id: str, amount: int) -> V.SaleRequest:
    challenge = sale_id.encode().ljust(16, b"\0")
    msg = V.sale_challenge_message(challenge, sale_id, "SHOP1", "CARD1", "ACC1", amount, "GBP")
    return V.SaleRequest(sale_id, "SHOP1", "CARD1", "ACC1", amount, "GBP", challenge, CARD_KEY.sign(msg))


def account_of(ledger: L.InMemoryLedger) -> V.AccountState:
    return V.AccountState("ACC1", "GBP", True, L.customer_credit(ledger.transactions(), "ACC1", "GBP"), 100_000)


def test_scenario_7_over_usage_beyond_a_grant_is_detected_and_booked_as_debt_on_both_sides():
    clock = SimClock(datetime(2026, 3, 9, 12, tzinfo=UTC))
    ledger = L.InMemoryLedger([L.top_up("seed", clock.now(), "ACC1", "SHOP1", 1000, "GBP", VAT)])
    policy = CC.GrantPolicy(validity=timedelta(hours=4), min_grant_minor=100, max_grant_minor=300,
                            initial_burn_rate_minor_per_h=Decimal(40))
    cc = CC.CreditControl(ledger, CC.InMemorySessionStore(), policy, VAT)
    answer = cc.reserve(CC.initial("S1", "ACC1", "M1", "GBP"), clock.now()).answer
    assert answer.ok and answer.grant.amount_minor == 200
    # the gateway holds the grant and prices locally; the head-end cannot be reached for 4 hours
    g = answer.grant
    state, _ = C.apply_grant(C.AccountState(account="M1"),
                             C.Grant("S1", 0, g.expires_at, amount_minor=g.amount_minor), clock.now())
    used, over_events = 0, []
    for _ in range(16):                                  # 4 h of 15-minute steps, 600 Wh each at 30p/kWh
        clock.advance(timedelta(minutes=15))
        state, events = C.charge(state, 600, "30", clock.now())
        used += sum(e.amount_minor for e in events if isinstance(e, C.Charged))
        over_events += [e for e in events if isinstance(e, C.OverUsage)]
    assert used == 16 * 18 == 288 and over_events                 # the gateway saw it at once
    assert state.accumulated_debt == 88
    out = cc.update(CC.CreditControlRequest("S1", CC.RequestType.UPDATE_REQUEST, 1, "ACC1", "M1", "GBP",
                                            used, 16 * 600), clock.now())
    [event] = out.events
    assert (event.granted_minor, event.used_minor, event.over_minor) == (200, 288, 88)
    # head-end and gateway agree to the penny on the debt
    assert L.balance(ledger.transactions(), L.debt("ACC1"), "GBP") == state.accumulated_debt
    report = CC.over_usage_report(out.events, clock.now() - timedelta(days=1), clock.now() + timedelta(seconds=1))
    assert report[0].over_minor == 88 and report[0].meter_id == "M1"
    assert L.totals_by_currency(ledger.transactions()) == {"GBP": 0}


def test_scenario_8_a_vendors_month_with_sales_a_refused_sale_and_a_reversal_settles_to_the_cent():
    clock = SimClock(datetime(2026, 3, 1, 9, tzinfo=UTC))
    ledger = L.InMemoryLedger()
    sales, refusals, reversals = [], [], []
    blacklist = [V.BlacklistEntry("CARD1", datetime(2026, 3, 20, 12, tzinfo=UTC), reason="lost")]

    def sell(sale_id: str, amount: int):
        r = V.authorise_sale(sale_request(sale_id, amount), CARDS, blacklist, sales, account_of(ledger),
                             clock.now(), contract=CONTRACT, vat=VAT)
        if r.authorised:
            ledger.append(r.transactions)
            sales.append(r.sale)
        else:
            refusals.append(r)
        return r

    sell("S1", 2000)
    clock.advance(timedelta(days=3))
    sell("S2", 5000)
    clock.advance(timedelta(days=2))
    third = sell("S3", 1000)
    clock.advance(timedelta(hours=2))
    rv = V.reverse_sale(third.sale, "R1", clock.now(), "token never delivered", account_of(ledger), VAT)
    ledger.append(rv.transactions)
    reversals.append(rv)
    clock.set(datetime(2026, 3, 21, 9, tzinfo=UTC))
    refused = sell("S4", 3000)
    assert refused.reason is V.RefusalReason.CARD_BLACKLISTED
    clock.set(datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC))
    sell("S5-april", 1500)                                           # April: not in the March statement
    period = V.Period(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC), "2026-03")
    stmt = V.settlement_statement("SHOP1", period, sales, refusals, reversals, CONTRACT)
    # commission: 2000 -> 40+10, 5000 -> 100+10, 1000 -> 20+10 (reversed); VAT 20 % of each
    assert (stmt.sales_count, stmt.gross_sales_minor) == (3, 8000)
    assert (stmt.refused_count, stmt.refused_minor) == (1, 3000)
    assert (stmt.reversed_count, stmt.reversed_minor) == (1, 1000)
    assert (stmt.commission_minor, stmt.vat_on_commission_minor) == (160, 32)
    assert stmt.net_payable_minor == 8000 - 1000 - 160 - 32 == 6808
    rec = V.reconcile_statement_to_ledger(stmt, ledger.transactions())
    assert rec.ok, rec.differences
    assert L.totals_by_currency(ledger.transactions()) == {"GBP": 0}


def test_card_blacklisted_at_noon_is_refused_one_millisecond_later_with_no_ledger_posting():
    noon = datetime(2026, 3, 9, 12, 0, 0, tzinfo=UTC)
    clock = SimClock(noon - timedelta(milliseconds=1))
    ledger = L.InMemoryLedger()
    blacklist: list[V.BlacklistEntry] = []

    def sell(sale_id):
        return V.authorise_sale(sale_request(sale_id, 1000), CARDS, blacklist, [], account_of(ledger), clock.now(),
                                contract=CONTRACT, vat=VAT)

    ok = sell("S-before")
    ledger.append(ok.transactions)
    blacklist.append(V.BlacklistEntry("CARD1", noon, reason="stolen"))   # blacklisted at 12:00:00.000
    clock.set(noon + timedelta(milliseconds=1))                         # sale at 12:00:00.001
    postings_before = len(ledger)
    refused = sell("S-after")
    assert not refused.authorised and refused.reason is V.RefusalReason.CARD_BLACKLISTED
    assert len(ledger) == postings_before
    assert L.customer_credit(ledger.transactions(), "ACC1", "GBP") == 1000
