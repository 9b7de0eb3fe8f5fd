"""An account's daily standing charge is booked once per local day, whatever session or gateway
reports it (issue #6): a gateway that lost its state file (new SD card, old backup) or a second
session reporting the same days books only the new days; the answer's balance is the ledger's.
Also: a multi-day standing catch-up does not inflate the burn rate grants are sized from.
SQLite and PostgreSQL (`payg_url`)."""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serviced_gateway import ServicedGateway      # tests/ (on sys.path: conftest.py)

from meterlink.clock import SimClock
from meterlink.gateway import credit as C
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_service
from meterlink.headend import payg_store as S

T0 = datetime(2026, 3, 9, 10, tzinfo=timezone.utc)        # Europe/London = UTC that day
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))
PREPAID = L.prepaid("ACC1")


class Standing:
    """45.67 net + 5 % VAT per local day in Europe/London: 47.9535 gross, 48 at the gateway."""

    standing_zone = "Europe/London"

    def standing_gross(self, day) -> Decimal:
        return Decimal("45.67") * Decimal("1.05")


@pytest.fixture
def store(payg_url):
    st = S.PaygStore(payg_url, vat=L.PrepaidVat(Decimal("0.05"), "consumption"))
    st.put_account("ACC1", "GBP", max_balance_minor=100_000)
    st.bind_meter("M1", "ACC1", T0)
    st.append([L.top_up("seed", T0, "ACC1", "SHOP1", 5_000, "GBP", st.vat)])
    yield st
    st.close()


def check_ledger(store) -> None:
    assert L.totals_by_currency(store.transactions()) == {"GBP": 0}
    assert store.verify_balances() == []


def standing_revenue(store) -> int:
    return -store.balance(L.REVENUE_STANDING, "GBP")


def standing_events(store) -> list[S.CrmEvent]:
    return [e for e in store.events() if e.kind == "standing_charge_not_booked"]


# --------------------------------------------------------------------------- a gateway over the real service


class Gateway(ServicedGateway):
    """`ServicedGateway` charging the daily standing charge (`credit.charge_standing`)."""

    def charge_standing(self) -> None:
        self.state, _ = C.charge_standing(self.state, Standing(), self.clock.now())


@pytest.fixture
def service(store):
    clock = SimClock(T0)
    return payg_service.CreditControlService(store, clock, POLICY), clock


def test_a_gateway_that_lost_its_state_file_reports_a_day_again_and_it_is_booked_once(store, service, caplog):
    svc, clock = service
    old = Gateway(svc, clock, "GW-A")
    old.exchange()                                      # grant 300
    clock.advance(timedelta(hours=1))
    old.charge_standing()                               # 2026-03-09: 48 from the window
    old.exchange()
    assert standing_revenue(store) == 48 - 2 and -store.balance(PREPAID, "GBP") == 5_000 - 48

    # new SD card: a fresh state file, a new session; the same day is charged again at the gateway
    clock.advance(timedelta(hours=1))
    new = Gateway(svc, clock, "GW-B")
    new.exchange()
    new.charge_standing()
    assert new.state.unreported.standing_minor == 48 and new.state.unreported.standing_first_day == "2026-03-09"
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.payg"):
        answer = new.exchange()

    assert standing_revenue(store) == 48 - 2                      # the day's revenue once
    assert not [t for t in store.transactions() if t.business_key.startswith("cc:GW-B:")
                and t.kind.startswith("standing-charge")]          # nothing of it booked (it left the window)
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000 - 48
    assert answer.balance_minor == L.customer_credit(list(store.transactions()), "ACC1", "GBP")
    assert new.state.balance_remaining == 5_000 - 48              # the gateway's view follows the answer
    check_ledger(store)
    [event] = standing_events(store)
    assert event.account_id == "ACC1" and event.payload["first_day"] == event.payload["last_day"] == "2026-03-09"
    assert (event.payload["days_not_booked"], event.payload["amount_minor"], event.payload["refunded_minor"]) \
        == (1, 48, 0)
    assert any("ACC1" in r.getMessage() and "2026-03-09" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert store.standing_booked_through("ACC1") == date(2026, 3, 9)


def test_a_day_charged_again_to_debt_is_booked_as_the_gateway_holds_it_and_credited_back(store, service):
    svc, clock = service
    old = Gateway(svc, clock, "GW-A")
    old.exchange()
    clock.advance(timedelta(hours=1))
    old.charge_standing()
    old.exchange()
    # the replaced gateway charges the day before its first answer: no window, so to debt
    clock.advance(timedelta(hours=1))
    new = Gateway(svc, clock, "GW-B")
    new.charge_standing()
    assert new.state.accumulated_debt == 48
    answer = new.exchange()                             # CCR-Initial reporting the day
    booked = {t.business_key: t for t in store.transactions()}
    assert booked["cc:GW-B:0:standing-debt"].amount(L.debt("ACC1")) == 48             # the gateway's debt
    refund = booked["cc:GW-B:0:standing-refund"]
    assert refund.kind == "standing-charge-refund" and refund.amount(PREPAID) == -48  # credited back
    assert standing_revenue(store) == 48 - 2
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000
    check_ledger(store)
    # the grant repays the debt at the gateway; the next report books that repayment
    assert new.state.accumulated_debt == 0
    clock.advance(timedelta(minutes=5))
    answer = new.exchange()
    assert store.balance(L.debt("ACC1"), "GBP") == new.state.accumulated_debt == 0
    assert store.balance(L.emergency_credit_account("ACC1"), "GBP") == new.state.emergency_credit_used == 0
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000 - 48 == new.state.balance_remaining
    assert standing_revenue(store) == 48 - 2
    check_ledger(store)
    [event] = standing_events(store)
    assert (event.payload["amount_minor"], event.payload["refunded_minor"], event.payload["business_key"]) \
        == (48, 48, "cc:GW-B:0:standing-refund")


# --------------------------------------------------------------------------- overlapping ranges


def control(store) -> CC.CreditControl:
    return CC.CreditControl(store, S.SqlSessionStore(store), POLICY, store.vat, tokens=S.StoreTokenReservations(store))


def handle(cc, store, req, now) -> CC.Outcome:
    with store.transaction():
        out = cc.handle(req, now)
    assert out.answer.ok, out.answer.detail
    return out


def report(session, n, **kw) -> CC.CreditControlRequest:
    return CC.CreditControlRequest(session, CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", **kw)


def test_an_overlapping_range_books_only_the_new_days(store):
    cc = control(store)
    handle(cc, store, CC.initial("S1", "ACC1", "M1", "GBP"), T0)
    handle(cc, store, report("S1", 1, standing_minor=164, standing_days=3, standing_first_day="2026-03-09",
                             standing_last_day="2026-03-11"), T0 + timedelta(hours=1))
    assert store.standing_booked_through("ACC1") == date(2026, 3, 11)
    handle(cc, store, CC.initial("S2", "ACC1", "M1", "GBP"), T0 + timedelta(hours=2))
    # 4 days 10th..13th, of which the 10th and 11th are booked: 219 x 2/4 = 109.5 -> 110 (half_up) not
    # booked: the 59 from the window first, the EC (60) and debt (100) parts booked as the gateway holds
    # them, the other 51 credited back
    out = handle(cc, store, report("S2", 1, standing_minor=219, standing_days=4, standing_from_emergency_minor=60,
                                   standing_to_debt_minor=100, standing_first_day="2026-03-10",
                                   standing_last_day="2026-03-13"), T0 + timedelta(hours=3))
    keys = {t.business_key: t for t in store.transactions() if t.business_key.startswith("cc:S2:1:")}
    assert set(keys) == {"cc:S2:1:standing-emergency", "cc:S2:1:standing-debt", "cc:S2:1:standing-refund"}
    assert keys["cc:S2:1:standing-refund"].amount(PREPAID) == -51
    assert "2 already booked through 2026-03-11: 110 not booked" in keys["cc:S2:1:standing-debt"].memo
    gross = {t.business_key: sum(p.amount_minor for p in t.postings if p.account.startswith("customer:"))
             for t in store.transactions() if t.kind.startswith("standing-charge")}
    assert sum(gross.values()) == 164 + 219 - 110                   # 3 days + the 2 new ones
    assert -store.balance(PREPAID, "GBP") == 5_000 - 164 + 51
    assert cc.balances_after("ACC1", "GBP")[0] == -store.balance(PREPAID, "GBP")     # what the answer says
    assert store.balance(L.emergency_credit_account("ACC1"), "GBP") == 60
    assert store.balance(L.debt("ACC1"), "GBP") == 100
    [event] = out.events
    assert isinstance(event, CC.StandingNotBooked)
    assert (event.days, event.days_not_booked, event.booked_through, event.amount_minor, event.refunded_minor) \
        == (4, 2, "2026-03-11", 110, 51)
    assert store.standing_booked_through("ACC1") == date(2026, 3, 13)
    check_ledger(store)

    # a wholly booked range books nothing (and leaves the prepaid credit alone); a new day books in full
    before = -store.balance(PREPAID, "GBP")
    out = handle(cc, store, report("S1", 2, standing_minor=90, standing_days=2, standing_first_day="2026-03-12",
                                   standing_last_day="2026-03-13"), T0 + timedelta(hours=4))   # S1's window: 100
    assert not [t for t in store.transactions() if t.business_key.startswith("cc:S1:2:")]
    assert -store.balance(PREPAID, "GBP") == before and out.events[0].days_not_booked == 2
    out = handle(cc, store, report("S2", 2, standing_minor=55, standing_days=1, standing_first_day="2026-03-14",
                                   standing_last_day="2026-03-14"), T0 + timedelta(hours=5))
    assert store.get("cc:S2:2:standing").amount(PREPAID) == 55 and not out.events
    assert store.standing_booked_through("ACC1") == date(2026, 3, 14)
    check_ledger(store)


@pytest.mark.parametrize("rounding, not_booked", [("half_up", 109), ("half_even", 108)])
def test_the_part_not_booked_is_pro_rata_in_the_markets_rounding(rounding, not_booked):
    req = report("S1", 1, standing_minor=217, standing_days=4, standing_first_day="2026-03-10",
                 standing_last_day="2026-03-13")
    assert CC.standing_already_booked(req, date(2026, 3, 11), rounding) == (2, not_booked)     # 108.5
    assert CC.standing_already_booked(req, date(2026, 3, 9), rounding) == (0, 0)
    assert CC.standing_already_booked(req, None, rounding) == (0, 0)
    assert CC.standing_already_booked(req, date(2026, 3, 20), rounding) == (4, 217)
    # a span of 4 days holding 2 (the gateway skipped two): the days up to the 11th may be those two
    gap = report("S1", 1, standing_minor=110, standing_days=2, standing_first_day="2026-03-10",
                 standing_last_day="2026-03-13")
    assert CC.standing_already_booked(gap, date(2026, 3, 11), rounding) == (2, 110)
    assert CC.standing_already_booked(gap, date(2026, 3, 10), rounding) == (1, 55)


# --------------------------------------------------------------------------- burn rate


def test_a_multi_day_standing_catch_up_counts_one_days_standing_per_day_in_the_burn_rate():
    grant = CC.Grant(500, None, 21_600, T0, T0 + timedelta(hours=6))
    session = CC.Session("S1", "ACC1", "M1", "GBP", T0, 0, False, grant)
    # 6 hours: 120 of consumption and 5 days of standing charges (48 a day) caught up at once
    req = report("S1", 1, used_minor=120, standing_minor=240, standing_days=5, standing_first_day="2026-03-05",
                 standing_last_day="2026-03-09")
    out = CC.decide(session, req, credit_minor=5_000, reserved_by_others_minor=0, policy=POLICY,
                    vat=L.PrepaidVat(Decimal("0.05")), now=T0 + timedelta(hours=6))
    # burn = 120/6 + 48/24 = 22 per hour -> ceil(22 x 6 h x 1.25) = 165 (not (120 + 240)/6 = 60 -> 450)
    assert CC.burn_rate(out.session.usage, T0 + timedelta(hours=6), POLICY.burn_rate_window, Decimal(0)) == 22
    assert out.answer.grant.amount_minor == 165
    # the reports keep their standing charges across a restart (session JSON), reports without stay as they were
    assert CC.session_from_json(CC.session_to_json(out.session)) == out.session
    text, _ = CC.session_json_text(out.session)
    assert text == json.dumps(CC.session_to_json(out.session), separators=(",", ":"))
    assert CC.session_to_json(out.session)["usage"][0][4:] == [240, 5]
    plain = CC.UsageReport(T0, T0 + timedelta(hours=1), 10, 30)
    assert CC.session_from_json(CC.session_to_json(CC.Session("S9", "A", "M", "GBP", T0, usage=(plain,)))).usage \
        == (plain,)
    # a day a day: a 24 h report carrying one day's standing charge counts it as before
    day = CC.UsageReport(T0, T0 + timedelta(hours=24), 480, 0, 48, 1)
    assert CC.burn_rate([day], T0 + timedelta(hours=24), timedelta(hours=24), Decimal(0)) == 22


# --------------------------------------------------------------------------- property: any interleaving


DAY_MINOR = 48
DAY0 = date(2026, 3, 1)
ranges = st.lists(st.tuples(st.sampled_from("AB"), st.integers(0, 12), st.integers(1, 5), st.integers(0, 2),
                            st.integers(0, 2)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(ranges)
def test_any_interleaving_of_two_sessions_reporting_days_books_each_day_at_most_once(reports):
    """Two sessions (gateways) of one account report day ranges in any order, paid partly from
    emergency credit and debt: the customer pays exactly the days the head-end had not booked (a
    day at a time, in order: each day once), EC and debt are booked as the gateways hold them, the
    duplicates are given back to prepaid, and the ledger sums to zero."""
    ledger = L.InMemoryLedger([L.top_up("seed", T0, "ACC1", "SHOP1", 1_000_000, "GBP", L.PrepaidVat(Decimal("0.05")))])
    policy = CC.GrantPolicy(min_grant_minor=10_000, max_grant_minor=10_000)
    cc = CC.CreditControl(ledger, CC.InMemorySessionStore(), policy, L.PrepaidVat(Decimal("0.05")),
                          standing=CC.InMemoryStandingBook())
    now = T0
    numbers = {s: 0 for s in "AB"}
    for s in "AB":
        assert cc.handle(CC.initial(s, "ACC1", "M1", "GBP"), now).answer.ok
    through, new_days, ec, debt = None, 0, 0, 0
    for session, start, days, ec_days, debt_days in reports:
        first, last = DAY0 + timedelta(days=start), DAY0 + timedelta(days=start + days - 1)
        ec_days = min(ec_days, days)
        debt_days = min(debt_days, days - ec_days)
        numbers[session] += 1
        now += timedelta(minutes=10)
        out = cc.handle(report(session, numbers[session], standing_minor=DAY_MINOR * days, standing_days=days,
                               standing_from_emergency_minor=DAY_MINOR * ec_days,
                               standing_to_debt_minor=DAY_MINOR * debt_days, standing_first_day=first.isoformat(),
                               standing_last_day=last.isoformat()), now)
        assert out.answer.ok, out.answer.detail
        new = days if through is None else max(0, min(days, (last - through).days))
        assert sum(e.days_not_booked for e in out.events) == days - new
        new_days += new
        through = last if through is None else max(through, last)
        ec, debt = ec + DAY_MINOR * ec_days, debt + DAY_MINOR * debt_days
    txns = list(ledger.transactions())
    assert L.totals_by_currency(txns) == {"GBP": 0}
    customer = sum(p.amount_minor for t in txns if t.kind.startswith("standing-charge") for p in t.postings
                   if p.account.startswith("customer:"))
    assert customer == DAY_MINOR * new_days                      # each day once
    assert ledger.balance(L.emergency_credit_account("ACC1"), "GBP") == ec
    assert ledger.balance(L.debt("ACC1"), "GBP") == debt
    assert -ledger.balance(PREPAID, "GBP") == 1_000_000 - DAY_MINOR * new_days + ec + debt
    assert cc.standing.standing_booked_through("ACC1") == through
