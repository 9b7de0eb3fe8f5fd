"""The gateway's credit-control client for its PAYG meters (RFC 4006 over gRPC): report usage, apply the grant and the delivered tokens; offline, keep enforcing with what it holds.

One `CreditSession` per PAYG meter drives `PaygMeter` (gateway/payg.py):

    usage = meter.usage_report()            # the report point (the same report until answered)
    answer = Reserve/Update(session, n, usage)
    meter.apply_grant(grant)  | meter.acknowledge()       # the grant REPLACES the old window
    meter.enter_token(t) for each delivered token          # reported in the next request

A lost exchange (head-end unreachable, answer lost) changes nothing: the next `sync` sends the
same request number with the same report, which the head-end answers from its stored answer
without booking twice. Meanwhile the meter keeps enforcing offline with its window, emergency
credit (once accepted) and friendly-credit periods (gateway/credit.py decides).

A head-end that lost the session (5002 UNKNOWN_SESSION_ID, e.g. after a restart) gets a new
session whose CCR-Initial carries the unanswered usage (`credit.abandon_report`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from meterlink.clock import from_ms, to_ms
from meterlink.v1 import payg_pb2, payg_pb2_grpc

from . import credit as C
from . import tokens as T
from .payg import PaygMeter

log = logging.getLogger("meterlink.gateway.payg")

SUCCESS, DENIED, CREDIT_LIMIT_REACHED = 2001, 4010, 4012
UNKNOWN_SESSION, INVALID_VALUE, OUT_OF_ORDER = 5002, 5004, 5012
_FUA = {payg_pb2.FINAL_UNIT_ACTION_RESTRICT_ACCESS: "restrict_access"}


def usage_to_proto(u: C.Usage) -> payg_pb2.UsedUnits:
    return payg_pb2.UsedUnits(
        used_minor=u.used_minor, used_wh=u.used_wh, from_emergency_minor=u.from_emergency, to_debt_minor=u.to_debt,
        repaid_debt_minor=u.repaid_debt, repaid_emergency_minor=u.repaid_emergency,
        recovered_arrears_minor=u.recovered_arrears,
        top_ups=[payg_pb2.AppliedTopUp(reference=r, amount_minor=a) for r, a in u.tokens])


@dataclass
class SyncResult:
    """What one `sync` did: 'granted' | 'no_grant' | 'offline' | 'new_session' | 'refused'."""
    outcome: str
    result_code: int = 0
    granted_minor: int = 0
    tokens_applied: int = 0
    detail: str = ""


class CreditSession:
    """Credit control of one PAYG meter; session number and request number persist in `state_path`."""

    def __init__(self, meter: PaygMeter, channel: grpc.Channel | None, *, gateway_id: str, account: str,
                 currency: str = "GBP", state_path: str | Path | None = None, timeout: float = 5.0) -> None:
        self.meter, self.gateway_id, self.account, self.currency = meter, gateway_id, account, currency
        self.stub = payg_pb2_grpc.CreditControlStub(channel) if channel is not None else None
        self.timeout = timeout
        self.state_path = Path(state_path) if state_path else None
        self.generation, self.number, self.open = 1, 0, False
        self.balance_minor: int | None = None
        if self.state_path is not None and self.state_path.exists():
            d = json.loads(self.state_path.read_text())
            self.generation, self.number, self.open = d["generation"], d["number"], d["open"]

    @property
    def session_id(self) -> str:
        return f"{self.gateway_id}/{self.meter.meter_id}/{self.generation}"

    def _save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.state_path.name, dir=self.state_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"generation": self.generation, "number": self.number, "open": self.open}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def _new_session(self) -> None:
        self.meter.abandon_report()
        self.generation, self.number, self.open = self.generation + 1, 0, False
        self._save()

    def sync(self, *, terminate: bool = False) -> SyncResult:
        """One credit-control exchange (Reserve when no session is open, else Update/Terminate)."""
        if self.stub is None:
            return SyncResult("offline", detail="no head-end channel")
        usage = self.meter.usage_report()
        req = payg_pb2.CreditControlRequest(
            gateway_id=self.gateway_id, session_id=self.session_id, request_number=self.number,
            account_id=self.account, meter_id=self.meter.meter_id, currency=self.currency,
            used=usage_to_proto(usage), gateway_at_ms=to_ms(self.meter.clock.now()))
        call = self.stub.Reserve if not self.open else (self.stub.Terminate if terminate else self.stub.Update)
        try:
            ans = call(req, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                log.error("meter %s: credit control refused: %s", self.meter.meter_id, exc.details())
                return SyncResult("refused", detail=exc.details() or "")
            log.info("meter %s: head-end unreachable (%s); enforcing offline with credit %d, emergency %d",
                     self.meter.meter_id, exc.code().name, self.meter.state.credit_balance,
                     self.meter.state.emergency_credit_available)
            return SyncResult("offline", detail=exc.code().name)
        return self._answer(ans, usage, terminate)

    def _answer(self, ans: payg_pb2.CreditControlAnswer, usage: C.Usage, terminate: bool) -> SyncResult:
        code = ans.result_code
        if code in (UNKNOWN_SESSION, OUT_OF_ORDER, INVALID_VALUE):
            log.warning("meter %s: session %s request %d answered %d (%s): starting a new session",
                        self.meter.meter_id, self.session_id, self.number, code, ans.detail)
            self._new_session()
            return SyncResult("new_session", code, detail=ans.detail)
        if not self.open and code != SUCCESS and usage.empty:
            # nothing was booked and no session opened (no credit for a first grant)
            self.meter.abandon_report()
            self.balance_minor = ans.balance_minor
            return SyncResult("no_grant", code, detail=ans.detail, tokens_applied=self._apply_tokens(ans))
        n = self.number
        self.number, self.open = n + 1, not terminate
        if terminate:
            self.generation, self.number, self.open = self.generation + 1, 0, False
        self._save()
        self.balance_minor = ans.balance_minor
        granted = 0
        if code == SUCCESS and ans.HasField("granted"):
            g = ans.granted
            granted = g.amount_minor
            self.meter.apply_grant(C.Grant(
                session_id=ans.session_id, request_number=n, valid_until=from_ms(g.expires_at_ms),
                amount_minor=g.amount_minor, wh=0, currency=self.currency,
                final_unit_action=_FUA.get(ans.final_unit_action, "terminate")))
        else:
            self.meter.acknowledge()
        applied = self._apply_tokens(ans)
        return SyncResult("granted" if granted else "no_grant", code, granted, applied, ans.detail)

    def _apply_tokens(self, ans) -> int:
        applied = 0
        for text in ans.tokens:
            try:
                token = T.TopUpToken.decode(text)
            except Exception as exc:           # a malformed token is logged, the rest still applied
                log.error("meter %s: undecodable token from the head-end: %s", self.meter.meter_id, exc)
                continue
            if token.meter == self.meter.meter_id and self.meter.window.is_spent(token.counter):
                continue                       # applied after the report point; reported next time
            events = self.meter.enter_token(text)
            applied += sum(1 for e in events if isinstance(e, C.TopUpApplied))
        return applied


__all__ = ["CreditSession", "SyncResult", "usage_to_proto"]
