"""A meter's consumption is booked once, whatever session or gateway reports it (issue #6): a
gateway whose state file was restored from an old backup charges and reports again the kWh since
the backup; its reports carry the 1.8.0 register range, and the head-end books only the part above
the highest register value it booked for the meter (pro rata, rounded once); the answer's balance
is the ledger's. Reports without a range (older gateways) are booked as before; a register below
the booked value (meter reset) is booked as reported with a warning. SQLite and PostgreSQL (`payg_url`)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
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
from meterlink.v1 import payg_pb2

T0 = datetime(2026, 3, 9, 10, tzinfo=timezone.utc)
POLICY = CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                        initial_burn_rate_minor_per_h=Decimal(40))
PREPAID = L.prepaid("ACC1")
PRICE = Decimal(25)                     # minor units per kWh at the gateway: 4 kWh = 100, exactly


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


ENERGY_KINDS = ("consumption", "consumption-refund", "emergency-consumption", "over-usage-debt")


def energy_booked(store) -> int:
    """Consumption booked (gross, whatever it was paid from), refunds taken off."""
    return sum(p.amount_minor for t in store.transactions() if t.kind in ENERGY_KINDS
               for p in t.postings if p.account.startswith("customer:"))


def not_booked_events(store, kind="consumption_not_booked") -> list[S.CrmEvent]:
    return [e for e in store.events() if e.kind == kind]


class Gateway(ServicedGateway):
    """`ServicedGateway` reading a 1.8.0 register: each reading charged with its register range."""

    def __init__(self, service: payg_service.CreditControlService, clock: SimClock, session: str,
                 import_wh: int) -> None:
        super().__init__(service, clock, session)
        self.register = import_wh                     # last_import_wh as its state file holds it

    def read(self, import_wh: int) -> None:
        self.state, _ = C.charge(self.state, import_wh - self.register, PRICE, self.clock.now(),
                                 register=(self.register, import_wh))
        self.register = import_wh


@pytest.fixture
def service(store):
    clock = SimClock(T0)
    return payg_service.CreditControlService(store, clock, POLICY), clock


def booked_before_the_restore(store, svc, clock) -> Gateway:
    """GW-A reads 10 000 -> 14 000 Wh (100 from its window) and reports it: booked."""
    old = Gateway(svc, clock, "GW-A", 10_000)
    old.exchange()
    clock.advance(timedelta(hours=1))
    old.read(14_000)
    old.exchange()
    assert -store.balance(PREPAID, "GBP") == 5_000 - 100 and energy_booked(store) == 100
    assert store.import_booked_wh("M1") == 14_000
    return old


def test_a_gateway_restored_from_a_backup_reports_the_same_kwh_again_and_they_are_booked_once(store, service,
                                                                                               caplog):
    svc, clock = service
    booked_before_the_restore(store, svc, clock)
    # the state file restored from a backup taken at 10 000 Wh: a new session charges 10 000 -> 14 000 again
    clock.advance(timedelta(hours=1))
    new = Gateway(svc, clock, "GW-B", 10_000)
    new.exchange()
    new.read(14_000)
    assert (new.state.unreported.import_wh_from, new.state.unreported.import_wh_to) == (10_000, 14_000)
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.payg"):
        answer = new.exchange()

    assert energy_booked(store) == 100                                 # the kWh booked once
    assert not [t for t in store.transactions() if t.business_key.startswith("cc:GW-B:")]
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000 - 100
    assert answer.balance_minor == L.customer_credit(list(store.transactions()), "ACC1", "GBP")
    assert new.state.balance_remaining == 5_000 - 100                  # the gateway's view follows the answer
    check_ledger(store)
    [event] = not_booked_events(store)
    assert event.account_id == "ACC1" and event.payload["meter"] == "M1"
    assert (event.payload["import_wh_from"], event.payload["import_wh_to"], event.payload["booked_wh"],
            event.payload["wh_not_booked"], event.payload["amount_minor"], event.payload["refunded_minor"]) \
        == (10_000, 14_000, 14_000, 4_000, 100, 0)
    assert any(r.levelno == logging.WARNING and "M1" in r.getMessage() and "4000 of 4000 Wh" in r.getMessage()
               and "100 of 100 not booked" in r.getMessage() for r in caplog.records)
    assert store.import_booked_wh("M1") == 14_000


def test_a_partial_overlap_books_only_the_new_wh(store, service):
    svc, clock = service
    booked_before_the_restore(store, svc, clock)
    clock.advance(timedelta(hours=1))
    new = Gateway(svc, clock, "GW-B", 10_000)
    new.exchange()
    new.read(15_000)                                    # 5 000 Wh = 125 from the window, 4 000 of them booked
    answer = new.exchange()
    usage = store.get("cc:GW-B:1:usage")
    assert usage.amount(PREPAID) == 25                  # 125 x 1 000 / 5 000, exactly
    assert "4000 Wh already booked" in usage.memo and "100 not booked" in usage.memo
    assert energy_booked(store) == 125                  # 10 000 -> 15 000 Wh at 25/kWh, once
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000 - 125 == new.state.balance_remaining
    assert store.import_booked_wh("M1") == 15_000
    check_ledger(store)
    [event] = not_booked_events(store)
    assert (event.payload["wh_not_booked"], event.payload["used_wh"], event.payload["amount_minor"]) \
        == (4_000, 5_000, 100)
    # the old gateway (the meter's real history) goes on from 14 000: 15 000 -> 16 000 is new
    clock.advance(timedelta(hours=1))
    new.read(16_000)
    new.exchange()
    assert energy_booked(store) == 150 and store.import_booked_wh("M1") == 16_000
    check_ledger(store)


def test_kwh_charged_again_to_debt_are_booked_as_the_gateway_holds_them_and_credited_back(store, service):
    svc, clock = service
    booked_before_the_restore(store, svc, clock)
    # the restored gateway charges 10 000 -> 16 000 Wh (150) before its first answer: no window, to debt
    clock.advance(timedelta(hours=1))
    new = Gateway(svc, clock, "GW-B", 10_000)
    new.read(16_000)
    assert new.state.accumulated_debt == 150
    answer = new.exchange()                             # CCR-Initial reporting it
    booked = {t.business_key: t for t in store.transactions()}
    assert booked["cc:GW-B:0:over-usage"].amount(L.debt("ACC1")) == 150              # the gateway's debt
    refund = booked["cc:GW-B:0:usage-refund"]
    assert refund.kind == "consumption-refund" and refund.amount(PREPAID) == -100     # 4 000 of 6 000 Wh
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000
    check_ledger(store)
    # the grant repays the debt at the gateway; the next report books that repayment
    assert new.state.accumulated_debt == 0
    clock.advance(timedelta(minutes=5))
    answer = new.exchange()
    assert store.balance(L.debt("ACC1"), "GBP") == new.state.accumulated_debt == 0
    # the customer paid 10 000 -> 16 000 Wh once: 150
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000 - 150 == new.state.balance_remaining
    check_ledger(store)
    [event] = not_booked_events(store)
    assert (event.payload["amount_minor"], event.payload["refunded_minor"], event.payload["business_key"]) \
        == (100, 100, "cc:GW-B:0:usage-refund")


def test_a_report_without_a_register_range_is_booked_as_before(store, service):
    svc, clock = service
    booked_before_the_restore(store, svc, clock)
    clock.advance(timedelta(hours=1))
    # an older gateway: the same 4 000 Wh without the range fields
    pb = payg_pb2.CreditControlRequest(session_id="OLD", request_number=0, account_id="ACC1", meter_id="M1",
                                       currency="GBP", used=payg_pb2.UsedUnits(used_minor=100, used_wh=4_000,
                                                                               to_debt_minor=100))
    assert not pb.used.HasField("import_wh_from")
    answer = svc._handle(pb, None, CC.RequestType.INITIAL_REQUEST)
    assert answer.result_code == CC.ResultCode.SUCCESS
    assert store.get("cc:OLD:0:over-usage").amount(L.debt("ACC1")) == 100
    assert energy_booked(store) == 200 and not not_booked_events(store)
    assert store.import_booked_wh("M1") == 14_000                      # unchanged
    check_ledger(store)


def test_a_register_below_the_booked_value_is_booked_as_reported_with_a_warning(store, service, caplog):
    svc, clock = service
    booked_before_the_restore(store, svc, clock)
    clock.advance(timedelta(hours=1))
    reset = Gateway(svc, clock, "GW-R", 0)             # the meter was reset (or exchanged) under id M1
    reset.exchange()
    reset.read(2_000)
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.payg"):
        answer = reset.exchange()
    assert store.get("cc:GW-R:1:usage").amount(PREPAID) == 50          # not under-billed
    assert energy_booked(store) == 150
    assert answer.balance_minor == -store.balance(PREPAID, "GBP") == 5_000 - 150
    [event] = not_booked_events(store, "import_register_below_booked")
    assert (event.payload["import_wh_to"], event.payload["booked_wh"]) == (2_000, 14_000)
    assert any(r.levelno == logging.WARNING and "M1" in r.getMessage() and "below the 14000 Wh" in r.getMessage()
               for r in caplog.records)
    assert not not_booked_events(store)
    assert store.import_booked_wh("M1") == 2_000                       # the new register from now on
    clock.advance(timedelta(hours=1))
    reset.read(3_000)
    reset.exchange()
    assert energy_booked(store) == 175 and len(not_booked_events(store, "import_register_below_booked")) == 1
    check_ledger(store)


# --------------------------------------------------------------------------- the core


def report(session, n, **kw) -> CC.CreditControlRequest:
    return CC.CreditControlRequest(session, CC.RequestType.UPDATE_REQUEST, n, "ACC1", "M1", "GBP", **kw)


@pytest.mark.parametrize("rounding, not_booked", [("half_up", 51), ("half_even", 50)])
def test_the_part_not_booked_is_pro_rata_in_the_markets_rounding(rounding, not_booked):
    req = report("S1", 1, used_minor=101, used_wh=3_000, import_wh_from=10_000, import_wh_to=13_000)
    assert CC.consumption_already_booked(req, 11_500, rounding) == (1_500, not_booked, False)     # 50.5
    assert CC.consumption_already_booked(req, 11_000, rounding) == (1_000, 34, False)             # 33.67
    assert CC.consumption_already_booked(req, 10_000, rounding) == (0, 0, False)
    assert CC.consumption_already_booked(req, 9_000, rounding) == (0, 0, False)
    assert CC.consumption_already_booked(req, None, rounding) == (0, 0, False)
    assert CC.consumption_already_booked(req, 13_000, rounding) == (3_000, 101, False)
    assert CC.consumption_already_booked(req, 13_001, rounding) == (0, 0, True)                   # reset
    old = report("S1", 1, used_minor=101, used_wh=3_000)
    assert CC.consumption_already_booked(old, 11_500, rounding) == (0, 0, False)


def test_the_burn_rate_counts_only_the_consumption_booked():
    grant = CC.Grant(500, None, 21_600, T0, T0 + timedelta(hours=6))
    session = CC.Session("S1", "ACC1", "M1", "GBP", T0, 0, False, grant)
    # a restored gateway's catch-up: 60 000 Wh (1 500) in 6 hours, of which 57 000 were booked before
    req = report("S1", 1, used_minor=1_500, used_wh=60_000, to_debt_minor=1_000, import_wh_from=0,
                 import_wh_to=60_000)
    out = CC.decide(session, req, credit_minor=5_000, reserved_by_others_minor=0, policy=POLICY,
                    vat=L.PrepaidVat(Decimal("0.05")), now=T0 + timedelta(hours=6), import_booked_wh=57_000)
    assert out.session.usage[-1].used_minor == 75 and out.session.usage[-1].used_wh == 3_000
    assert (out.session.used_minor_total, out.session.used_wh_total) == (75, 3_000)
    assert out.import_booked_wh == 60_000
    # the gateway's debt (1 000) booked as it holds it, 925 of the part not booked credited back: 75 net
    customer = {}
    for t in out.transactions:
        for p in t.postings:
            if p.account.startswith("customer:"):
                customer[p.account] = customer.get(p.account, 0) + p.amount_minor
    assert customer == {L.debt("ACC1"): 1_000, PREPAID: -925}
    [event] = [e for e in out.events if isinstance(e, CC.ConsumptionNotBooked)]
    assert (event.wh_not_booked, event.amount_minor, event.refunded_minor) == (57_000, 1_425, 925)


def test_an_inconsistent_register_range_is_refused_and_a_retransmission_must_carry_the_same_range(store):
    cc = CC.CreditControl(store, S.SqlSessionStore(store), POLICY, store.vat)
    with store.transaction():
        assert cc.handle(CC.initial("S1", "ACC1", "M1", "GBP"), T0).answer.ok
    for bad in (dict(import_wh_from=10_000), dict(import_wh_from=10_000, import_wh_to=13_999),
                dict(import_wh_from=-4_000, import_wh_to=0)):
        with store.transaction():
            out = cc.handle(report("S1", 1, used_minor=100, used_wh=4_000, **bad), T0 + timedelta(hours=1))
        assert out.answer.result_code == CC.ResultCode.INVALID_AVP_VALUE, bad
    good = report("S1", 1, used_minor=100, used_wh=4_000, import_wh_from=10_000, import_wh_to=14_000)
    with store.transaction():
        assert cc.handle(good, T0 + timedelta(hours=1)).answer.ok
    with store.transaction():
        assert cc.handle(good, T0 + timedelta(hours=1)).replayed
        moved = report("S1", 1, used_minor=100, used_wh=4_000, import_wh_from=0, import_wh_to=4_000)
        assert cc.handle(moved, T0 + timedelta(hours=1)).answer.result_code == CC.ResultCode.INVALID_AVP_VALUE
    assert store.import_booked_wh("M1") == 14_000
    check_ledger(store)


# --------------------------------------------------------------------------- property: any interleaving


WH_PER_MINOR = 40                      # 25 minor units per kWh: every 40 Wh is one minor unit, exactly
reports = st.lists(st.tuples(st.sampled_from("AB"), st.integers(0, 30), st.integers(0, 30), st.integers(0, 3),
                             st.integers(0, 3)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(reports)
def test_any_interleaving_of_two_sessions_reporting_register_ranges_books_each_wh_at_most_once(steps):
    """Two sessions (a gateway and its restored twin) of one meter report register ranges that end
    at the present reading and start anywhere before it, paid partly from emergency credit and
    debt: the customer pays exactly the Wh above what was booked, EC and debt are booked as the
    gateways hold them, the duplicates are given back to prepaid, and the ledger sums to zero."""
    vat = L.PrepaidVat(Decimal("0.05"))
    ledger = L.InMemoryLedger([L.top_up("seed", T0, "ACC1", "SHOP1", 1_000_000, "GBP", vat)])
    policy = CC.GrantPolicy(min_grant_minor=10_000, max_grant_minor=10_000)
    cc = CC.CreditControl(ledger, CC.InMemorySessionStore(), policy, vat, imports=CC.InMemoryImportBook())
    now, numbers = T0, {s: 0 for s in "AB"}
    for s in "AB":
        assert cc.handle(CC.initial(s, "ACC1", "M1", "GBP"), now).answer.ok
    reading, booked, paid, ec, debt = 0, None, 0, 0, 0
    for session, advance, back, ec_parts, debt_parts in steps:
        reading += advance * WH_PER_MINOR                         # the meter's register now
        start = max(0, reading - (advance + back) * WH_PER_MINOR)  # from a state file up to `back` behind
        used = (reading - start) // WH_PER_MINOR
        from_ec, to_debt = min(ec_parts, used), min(debt_parts, used - min(ec_parts, used))
        numbers[session] += 1
        now += timedelta(minutes=10)
        out = cc.handle(report(session, numbers[session], used_minor=used, used_wh=reading - start,
                               from_emergency_minor=from_ec, to_debt_minor=to_debt, import_wh_from=start,
                               import_wh_to=reading), now)
        assert out.answer.ok, out.answer.detail
        new = reading - start if booked is None else reading - max(start, booked)
        assert sum(e.wh_not_booked for e in out.events if isinstance(e, CC.ConsumptionNotBooked)) \
            == reading - start - new
        paid += new // WH_PER_MINOR
        booked = reading
        ec, debt = ec + from_ec, debt + to_debt
    txns = list(ledger.transactions())
    assert L.totals_by_currency(txns) == {"GBP": 0}
    customer = sum(p.amount_minor for t in txns if t.kind in ENERGY_KINDS for p in t.postings
                   if p.account.startswith("customer:"))
    assert customer == paid                                       # each Wh once
    assert ledger.balance(L.emergency_credit_account("ACC1"), "GBP") == ec
    assert ledger.balance(L.debt("ACC1"), "GBP") == debt
    assert -ledger.balance(PREPAID, "GBP") == 1_000_000 - paid + ec + debt
    assert cc.imports.import_booked_wh("M1") == booked
