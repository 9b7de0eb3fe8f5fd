"""A gateway's real pure account (`gateway/credit.py`) talking to the real credit-control servicer
(`CreditControlService._handle`, as a unary call runs it) with its own session: the double the
booked-once tests (standing charges, consumption) drive."""

from __future__ import annotations

from meterlink.clock import SimClock, from_ms
from meterlink.gateway import credit as C
from meterlink.gateway.payg_sync import usage_to_proto
from meterlink.headend import creditcontrol as CC
from meterlink.headend import payg_service
from meterlink.v1 import payg_pb2


class ServicedGateway:
    def __init__(self, service: payg_service.CreditControlService, clock: SimClock, session: str) -> None:
        self.service, self.clock, self.session, self.n = service, clock, session, -1
        self.state = C.AccountState(account="M1", cfg=C.PrepaymentConfig(max_credit_balance=1_000_000))

    def exchange(self) -> payg_pb2.CreditControlAnswer:
        now = self.clock.now()
        self.state, usage = C.begin_report(self.state)
        n = self.n + 1
        rtype = CC.RequestType.INITIAL_REQUEST if n == 0 else CC.RequestType.UPDATE_REQUEST
        pb = payg_pb2.CreditControlRequest(session_id=self.session, request_number=n, account_id="ACC1",
                                           meter_id="M1", currency="GBP", used=usage_to_proto(usage))
        answer = self.service._handle(pb, None, rtype)
        assert answer.result_code == CC.ResultCode.SUCCESS, answer.detail
        self.n = n
        g = answer.granted
        self.state, _ = C.apply_grant(self.state, C.Grant(self.session, n, from_ms(g.expires_at_ms),
                                                          amount_minor=g.amount_minor,
                                                          balance_minor=answer.balance_minor), now)
        return answer
