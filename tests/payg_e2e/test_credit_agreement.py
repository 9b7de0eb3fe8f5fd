"""Gateway and head-end credit models agree to the cent (RFC 4006 replacement grants).

The gateway side is the real pure account (`gateway/credit.py`) with real signed tokens
(`gateway/tokens.py`); the head-end side is the real `CreditControl` over a real `PaygStore`
(SQLite) with token reservations. Exchanges can be lost (offline stretch, lost answers), the
customer takes emergency credit, tokens are sold and typed in at arbitrary moments; a daily
standing charge is charged at the gateway for every local day and booked once at the head-end."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meterlink.gateway import credit as C
from meterlink.gateway import tokens as T
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S

UTC = timezone.utc
T0 = datetime(2026, 3, 6, 8, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
PUB = T.public_bytes(KEY)
PRICE = Decimal("33.3")


def request_from_usage(session: str, n: int, rtype: CC.RequestType, usage: C.Usage) -> CC.CreditControlRequest:
    return CC.CreditControlRequest(
        session, rtype, n, "ACC1", "M1", "GBP", usage.used_minor, usage.used_wh,
        from_emergency_minor=usage.from_emergency, to_debt_minor=usage.to_debt,
        repaid_debt_minor=usage.repaid_debt, repaid_emergency_minor=usage.repaid_emergency,
        recovered_arrears_minor=usage.recovered_arrears, tokens=usage.tokens,
        standing_minor=usage.standing_minor, standing_days=usage.standing_days,
        standing_from_emergency_minor=usage.standing_from_emergency, standing_to_debt_minor=usage.standing_to_debt,
        standing_first_day=usage.standing_first_day or "", standing_last_day=usage.standing_last_day or "")


class Standing:
    """A daily standing charge of 45.67 net + 5 % VAT per local day in Europe/London."""

    standing_zone = "Europe/London"

    def standing_gross(self, day) -> Decimal:
        return Decimal("45.67") * Decimal("1.05")


class Pair:
    """One PAYG meter: the gateway's account and the head-end's credit control, exchanging usage."""

    def __init__(self, store: S.PaygStore, policy: CC.GrantPolicy) -> None:
        self.store = store
        self.cc = CC.CreditControl(store, S.SqlSessionStore(store), policy, store.vat,
                                   tokens=S.StoreTokenReservations(store))
        self.gw = C.AccountState(account="M1", cfg=C.PrepaymentConfig(max_credit_balance=1_000_000))
        self.window = T.ReplayWindow()
        self.session, self.n, self.open = "S1", -1, False
        self.sold = self.charged = self.spent = self.standing = 0
        self.undelivered: list = []
        self.now = T0

    def sell(self, amount: int) -> None:
        ref = f"sale:SHOP1:{len(self.undelivered)}-{self.sold}"
        self.store.append([L.top_up(ref, self.now, "ACC1", "SHOP1", amount, "GBP", self.store.vat)])
        self.undelivered.append(S.issue_token(self.store, ref, "M1", "ACC1", amount, "GBP", KEY, self.now))
        self.sold += amount

    def type_in_tokens(self) -> None:
        for token in self.undelivered:
            self.gw, self.window, _ = T.apply_token(self.gw, self.window, token, PUB, self.now)
        self.undelivered = []

    def consume(self, wh: int) -> None:
        self.gw, standing = C.charge_standing(self.gw, Standing(), self.now)     # each local day once
        self.standing += sum(e.amount_minor for e in standing if isinstance(e, C.StandingCharged))
        self.gw, events = C.charge(self.gw, wh, PRICE, self.now)
        self.charged += sum(e.amount_minor for e in events if isinstance(e, C.Charged))
        if self.gw.emergency_credit_offered and not self.gw.emergency_credit_accepted:
            self.gw, _ = C.accept_emergency_credit(self.gw, self.now)

    def exchange(self, *, reaches: bool = True, answer_back: bool = True,
                 rtype: CC.RequestType = CC.RequestType.UPDATE_REQUEST) -> CC.CreditControlAnswer | None:
        """One credit-control exchange; `reaches=False`: the gateway is offline, `answer_back=False`:
        the head-end booked it but the answer was lost (the gateway retransmits the same request)."""
        self.gw, usage = C.begin_report(self.gw)
        if not self.open:
            req = request_from_usage(self.session, 0, CC.RequestType.INITIAL_REQUEST, usage)
        else:
            req = request_from_usage(self.session, self.n + 1, rtype, usage)
        if not reaches:
            return None
        with self.store.transaction():
            out = self.cc.handle(req, self.now)
        if not out.answer.ok and not self.open and usage.empty:   # no session opened, nothing booked
            assert out.answer.result_code == CC.ResultCode.CREDIT_LIMIT_REACHED, out.answer.detail
            self.gw = C.abandon_report(self.gw)
            return out.answer
        S.mark_tokens_applied(self.store, [r for r, _ in req.tokens], self.now)
        if out.replayed:
            self.spent -= req.window_spend_minor            # a retransmission books nothing
        if not answer_back:
            self.spent += req.window_spend_minor
            return None
        if False:
            return None
        self.spent += req.window_spend_minor                # booked once, when first received
        self.n, self.open = req.request_number, rtype != CC.RequestType.TERMINATION_REQUEST
        g = out.answer.grant
        if g is not None:
            self.gw, _ = C.apply_grant(self.gw, C.Grant(self.session, req.request_number, g.expires_at,
                                                        amount_minor=g.amount_minor), self.now)
        else:
            self.gw, _ = C.acknowledge(self.gw, self.now)
        return out.answer

    def check_agreement(self) -> None:
        """Everything reported and answered: both sides hold the same money to the cent."""
        ledger = list(self.store.transactions())
        assert self.gw.in_flight is None and self.gw.unreported.empty
        assert L.balance(ledger, L.debt("ACC1"), "GBP") == self.gw.accumulated_debt
        assert L.balance(ledger, L.emergency_credit_account("ACC1"), "GBP") == self.gw.emergency_credit_used
        assert L.customer_credit(ledger, "ACC1", "GBP") == self.sold - self.spent
        gross = sum(p.amount_minor for t in ledger
                    if t.kind in ("consumption", "emergency-consumption", "over-usage-debt")
                    for p in t.postings if p.amount_minor > 0)
        assert gross == self.charged
        standing = sum(p.amount_minor for t in ledger if t.kind.startswith("standing-charge")
                       for p in t.postings if p.amount_minor > 0)
        assert standing == self.standing
        assert L.totals_by_currency(ledger) == {"GBP": 0}


def _policy() -> CC.GrantPolicy:
    return CC.GrantPolicy(validity=timedelta(hours=6), min_grant_minor=100, max_grant_minor=600,
                          initial_burn_rate_minor_per_h=Decimal(40))


def test_several_grants_topups_and_a_three_day_offline_stretch_agree_to_the_cent(tmp_path):
    store = S.PaygStore(f"sqlite:///{tmp_path}/hd.db")
    p = Pair(store, _policy())
    p.sell(2_000)
    p.type_in_tokens()
    first = p.exchange()                   # CCR-Initial reports the token: its money is granted, not added twice
    assert first.grant.amount_minor == 300 == p.gw.credit_balance          # 40/h x 6 h x 1.25
    assert L.customer_credit(list(store.transactions()), "ACC1", "GBP") == 2_000
    for hour in range(1, 13):                             # online: a grant every 3 hours
        p.now = T0 + timedelta(hours=hour)
        p.consume(1_500)
        if hour % 3 == 0:
            p.exchange()
    p.sell(1_000)                                         # a top-up sold while online, typed in later
    for hour in range(13, 13 + 72):                       # 3 days offline: every update is lost
        p.now = T0 + timedelta(hours=hour)
        p.consume(1_000)
        if hour == 20:
            p.type_in_tokens()                            # the customer types the token in offline
        if hour % 3 == 0:
            assert p.exchange(reaches=False) is None
    assert p.gw.emergency_credit_used > 0 or p.gw.accumulated_debt > 0
    p.now += timedelta(hours=1)
    p.exchange(answer_back=False)                         # back online: booked, answer lost
    # the head-end restarts: sessions (grants, stored answers) are in the database
    p.cc = CC.CreditControl(store, S.SqlSessionStore(store), _policy(), store.vat,
                            tokens=S.StoreTokenReservations(store))
    p.exchange()                                          # retransmission: same answer, booked once
    p.now += timedelta(minutes=5)
    p.exchange()                                          # reports what the grant repaid
    p.now += timedelta(minutes=5)
    p.exchange(rtype=CC.RequestType.TERMINATION_REQUEST)
    p.check_agreement()
    assert p.gw.credit_balance == 0                       # the terminated session's window is given back
    assert S.unapplied_tokens(store, "M1") == []
    store.close()


steps = st.lists(st.one_of(
    st.tuples(st.just("consume"), st.integers(0, 8_000)),
    st.tuples(st.just("sell"), st.integers(1, 3_000)),
    st.tuples(st.just("type_in")),
    st.tuples(st.just("update")),
    st.tuples(st.just("offline_update")),
    st.tuples(st.just("lost_answer")),
), min_size=1, max_size=30)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
@example([("type_in",), ("consume", 16), ("lost_answer",)] + [("consume", 0)] * 8 + [("type_in",)])  # grant expired on arrival
def test_any_sequence_of_usage_topups_and_lost_exchanges_agrees_to_the_cent(tmp_path, seq):
    store = S.PaygStore("sqlite://")
    try:
        p = Pair(store, _policy())
        p.sell(500)
        p.exchange()
        for op in seq:
            p.now += timedelta(minutes=40)
            if op[0] == "consume":
                p.consume(op[1])
            elif op[0] == "sell":
                p.sell(op[1])
            elif op[0] == "type_in":
                p.type_in_tokens()
            elif op[0] == "update":
                p.exchange()
            elif op[0] == "offline_update":
                p.exchange(reaches=False)
            else:
                p.exchange(answer_back=False)
            assert L.customer_credit(list(store.transactions()), "ACC1", "GBP") >= 0 or p.gw.accumulated_debt >= 0
        p.type_in_tokens()
        p.now += timedelta(minutes=1)
        p.exchange()                        # answers whatever is in flight (retransmitted if need be)
        p.now += timedelta(minutes=1)
        p.exchange()                        # reports the repayments the last grant made
        p.now += timedelta(minutes=1)
        p.exchange(rtype=CC.RequestType.TERMINATION_REQUEST)
        p.check_agreement()
    finally:
        store.close()
