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

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
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
        top_ups=[payg_pb2.AppliedTopUp(reference=r, amount_minor=a) for r, a in u.tokens],
        standing_minor=u.standing_minor, standing_days=u.standing_days,
        standing_from_emergency_minor=u.standing_from_emergency, standing_to_debt_minor=u.standing_to_debt,
        standing_first_day=u.standing_first_day or "", standing_last_day=u.standing_last_day or "",
        import_wh_from=u.import_wh_from, import_wh_to=u.import_wh_to)      # None: unset (no range)


_REFUSAL_METADATA = "meterlink-refusal"        # headend/gatewayauth.py REFUSAL_METADATA
_UNARY = {payg_pb2.REQUEST_TYPE_INITIAL: "Reserve", payg_pb2.REQUEST_TYPE_UPDATE: "Update",
          payg_pb2.REQUEST_TYPE_TERMINATION: "Terminate"}


class LinkError(grpc.RpcError):
    """A credit-control exchange that got no answer (or a refusal) on the stream, shaped like the
    `grpc.RpcError` of a unary call: `code()`, `details()`, `trailing_metadata()`."""

    def __init__(self, code: grpc.StatusCode, details: str, refusal: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._refusal = code, details, refusal

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return ((_REFUSAL_METADATA, self._refusal),) if self._refusal else ()


class _Stream:
    """One open `CreditControl.Session` call: requests go out in order, the answers come back in the
    same order and are matched to the waiting futures (each checked by session and request number)."""

    _END = object()

    def __init__(self, stub) -> None:
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.failed: grpc.RpcError | None = None
        self._answers = stub.Session(iter(self._out.get, self._END))
        self._reader = threading.Thread(target=self._read, name="payg-cc-stream", daemon=True)
        self._reader.start()

    def send(self, req: payg_pb2.CreditControlRequest) -> Future:
        f: Future = Future()
        with self._lock:
            if self.failed is not None:
                f.set_exception(self.failed)
                return f
            self._pending.append((req.session_id, req.request_number, f))
            self._out.put(req)
        return f

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def _read(self) -> None:
        error: grpc.RpcError = LinkError(grpc.StatusCode.UNAVAILABLE, "the head-end ended the credit-control stream")
        try:
            for ans in self._answers:
                with self._lock:
                    sid, n, f = self._pending.popleft() if self._pending else (None, None, None)
                if f is None or (ans.session_id, ans.request_number) != (sid, n):
                    error = LinkError(grpc.StatusCode.INTERNAL,
                                      f"credit-control stream answered {ans.session_id}#{ans.request_number} "
                                      f"where {sid}#{n} was due: stream reset")
                    if f is not None:
                        f.set_exception(error)
                    self._answers.cancel()
                    break
                f.set_result(ans)
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - whatever ends the stream fails the waiting requests
            error = LinkError(grpc.StatusCode.UNKNOWN, f"credit-control stream: {exc}")
        with self._lock:
            self.failed = error
            pending, self._pending = list(self._pending), collections.deque()
        for _, _, f in pending:
            f.set_exception(error)

    def close(self) -> None:
        self._out.put(self._END)
        self._answers.cancel()


class CreditControlLink:
    """The gateway's credit-control connection to the head-end, shared by its meters' sessions.

    Requests go on one long-lived `CreditControl.Session` stream (opened at the first request,
    opened again after it fails), which costs the head-end about half the CPU of a unary call per
    request; a refusal answered in-band is raised as PERMISSION_DENIED like a unary call's. A
    head-end without `Session` (UNIMPLEMENTED: older than this gateway) gets the unary
    Reserve/Update/Terminate calls from then on; so does a link made with ``stream=False``.
    An exchange that gets no answer within its timeout resets the stream (the requests in flight
    on it fail and are sent again by their sessions later, which the head-end answers from its
    stored answers without booking twice). A stream with nothing in flight for `idle_s` seconds
    is closed (each open stream holds a worker thread of the head-end's gRPC server, so a gateway
    should hold one for a burst of exchanges — its meters' exchanges after boot or when their
    periodic syncs fall due together — not all the time); the next exchange opens one."""

    def __init__(self, channel: grpc.Channel, *, stream: bool = True, idle_s: float = 2.0) -> None:
        self.stub = payg_pb2_grpc.CreditControlStub(channel)
        self.streaming, self.idle_s = stream, idle_s
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._idle: threading.Timer | None = None
        self._uses = 0                      # exchanges started: an idle timer armed before a newer one is void
        self._unary_until = 0.0             # monotonic: the head-end had no stream free, unary until then

    STREAM_RETRY_S = 30.0

    def submit(self, req: payg_pb2.CreditControlRequest) -> Future:
        """Send `req` on the stream without waiting: the future resolves to its answer (a refusal
        included, in `refusal`) or to the `grpc.RpcError` that ended the stream. For a caller with
        many requests in flight (the benchmark); `exchange` is the gateway's own path."""
        return self._open().send(req)

    def exchange(self, req: payg_pb2.CreditControlRequest, timeout: float) -> payg_pb2.CreditControlAnswer:
        """The answer to `req` (its `request_type` says which request it is); raises `grpc.RpcError`."""
        if self.streaming and time.monotonic() >= self._unary_until:
            stream = self._open()
            f = stream.send(req)
            try:
                ans = f.result(timeout)
                self._arm_idle(stream)
            except TimeoutError:
                self._reset(stream)
                raise LinkError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no credit-control answer within {timeout:g} s: stream reset") from None
            except grpc.RpcError as exc:
                self._reset(stream)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # the head-end's streams are all taken: this request (never run) and those of the
                    # next STREAM_RETRY_S seconds go unary
                    log.info("head-end has no credit-control stream free (%s): unary calls for %g s",
                             exc.details(), self.STREAM_RETRY_S)
                    self._unary_until = time.monotonic() + self.STREAM_RETRY_S
                elif exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("head-end has no CreditControl.Session: credit control over unary calls")
                    self.streaming = False      # nothing was booked: the same request goes unary
                else:
                    raise
            else:
                if ans.refusal:
                    raise LinkError(grpc.StatusCode.PERMISSION_DENIED, f"{ans.refusal}: {ans.detail}", ans.refusal)
                return ans
        return getattr(self.stub, _UNARY[req.request_type])(req, timeout=timeout)

    def _open(self) -> _Stream:
        with self._lock:
            self._uses += 1
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            if self._stream is None or self._stream.failed is not None:
                self._stream = _Stream(self.stub)
            return self._stream

    def _arm_idle(self, stream: _Stream) -> None:
        with self._lock:
            if self._stream is not stream or self._idle is not None:
                return
            uses = self._uses
            self._idle = threading.Timer(self.idle_s, self._close_idle, args=(stream, uses))
            self._idle.daemon = True
            self._idle.start()

    def _close_idle(self, stream: _Stream, uses: int) -> None:
        with self._lock:
            if self._stream is not stream or self._uses != uses or stream.in_flight():
                return
            self._stream, self._idle = None, None
        stream.close()

    def _reset(self, stream: _Stream) -> None:
        with self._lock:
            if self._stream is stream:
                self._stream = None
        stream.close()

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
        if stream is not None:
            stream.close()


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

    def __init__(self, meter: PaygMeter, channel: grpc.Channel | CreditControlLink | None, *, gateway_id: str,
                 account: str, currency: str = "GBP", state_path: str | Path | None = None,
                 timeout: float = 5.0) -> None:
        self.meter, self.gateway_id, self.account, self.currency = meter, gateway_id, account, currency
        self.link = (channel if isinstance(channel, CreditControlLink) or channel is None
                     else CreditControlLink(channel))
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

    def sync(self, *, terminate: bool = False, lock=None, decide: bool = True) -> SyncResult:
        """One credit-control exchange (Reserve when no session is open, else Update/Terminate).

        `lock` (the meter's lock) is held while the report is taken and while the answer is applied,
        NOT during the RPC: the meter keeps being charged meanwhile (that usage goes into the next
        report). `decide=False`: the answer changes credit only, the relay is left to the caller."""
        if self.link is None:
            return SyncResult("offline", detail="no head-end channel")
        guard = lock if lock is not None else contextlib.nullcontext()
        with guard:
            usage = self.meter.usage_report()
            req = payg_pb2.CreditControlRequest(
                gateway_id=self.gateway_id, session_id=self.session_id, request_number=self.number,
                account_id=self.account, meter_id=self.meter.meter_id, currency=self.currency,
                used=usage_to_proto(usage), gateway_at_ms=to_ms(self.meter.clock.now()),
                card_lists_digest=T.card_lists_digest(self.meter.card_list, self.meter.blacklist),
                request_type=(payg_pb2.REQUEST_TYPE_INITIAL if not self.open else
                              payg_pb2.REQUEST_TYPE_TERMINATION if terminate else payg_pb2.REQUEST_TYPE_UPDATE))
        try:
            ans = self.link.exchange(req, self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                log.error("meter %s: credit control refused: %s", self.meter.meter_id, exc.details())
                return SyncResult("refused", detail=exc.details() or "")
            log.info("meter %s: head-end unreachable (%s); enforcing offline with credit %d, emergency %d",
                     self.meter.meter_id, exc.code().name, self.meter.state.credit_balance,
                     self.meter.state.emergency_credit_available)
            return SyncResult("offline", detail=exc.code().name)
        with guard:
            deferred = self.meter.defer_decisions
            self.meter.defer_decisions = deferred or not decide
            try:
                return self._answer(ans, usage, terminate)
            finally:
                self.meter.defer_decisions = deferred

    def _answer(self, ans: payg_pb2.CreditControlAnswer, usage: C.Usage, terminate: bool) -> SyncResult:
        code = ans.result_code
        arrears = ans.arrears_minor if ans.HasField("arrears_minor") else None
        self.meter.set_headend_books_standing(ans.books_standing_charges)
        if code in (UNKNOWN_SESSION, OUT_OF_ORDER, INVALID_VALUE):
            log.warning("meter %s: session %s request %d answered %d (%s): starting a new session",
                        self.meter.meter_id, self.session_id, self.number, code, ans.detail)
            self._new_session()
            return SyncResult("new_session", code, detail=ans.detail)
        if not self.open and code != SUCCESS and usage.empty:
            # nothing was booked and no session opened (no credit for a first grant)
            self.meter.abandon_report()
            self.balance_minor = ans.balance_minor
            self.meter.set_reported_balance(ans.balance_minor, arrears)
            return SyncResult("no_grant", code, detail=ans.detail, tokens_applied=self._apply_tokens(ans))
        n = self.number
        self.balance_minor = ans.balance_minor
        granted = 0
        # the meter first (its state file drops the in-flight report), then the request number: a
        # crash in between re-sends the old number with another report, which the head-end refuses
        # (5004) instead of booking the answered report twice under the next number
        if code == SUCCESS and ans.HasField("granted"):
            g = ans.granted
            granted = g.amount_minor
            self.meter.apply_grant(C.Grant(
                session_id=ans.session_id, request_number=n, valid_until=from_ms(g.expires_at_ms),
                amount_minor=g.amount_minor, wh=0, currency=self.currency,
                final_unit_action=_FUA.get(ans.final_unit_action, "terminate"),
                balance_minor=ans.balance_minor, arrears_minor=arrears))
            if self.meter.state.in_flight is not None:
                # the grant was refused (expired on arrival, currency): the report WAS booked
                self.meter.acknowledge(ans.balance_minor, arrears)
        else:
            self.meter.acknowledge(ans.balance_minor, arrears)
        self.number, self.open = n + 1, not terminate
        if terminate:
            self.generation, self.number, self.open = self.generation + 1, 0, False
        self._save()
        applied = self._apply_tokens(ans)
        return SyncResult("granted" if granted else "no_grant", code, granted, applied, ans.detail)

    def _apply_card_lists(self, ans) -> None:
        if not (ans.card_list and ans.blacklist):
            return
        from .payg import _blacklist_from_json, _card_list_from_json
        try:
            self.meter.set_card_lists(_card_list_from_json(json.loads(ans.card_list)),
                                      _blacklist_from_json(json.loads(ans.blacklist)))
        except Exception as exc:  # noqa: BLE001 - keep the last verified lists
            log.error("meter %s: card lists from the head-end not installed: %s", self.meter.meter_id, exc)

    def _apply_tokens(self, ans) -> int:
        self._apply_card_lists(ans)
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


# --------------------------------------------------------------------------- daemon wiring ([[payg]])

@dataclass(frozen=True)
class PaygConfig:
    """One ``[[payg]]`` table of gateway.toml (see docs/payg.md)."""

    meter_id: str
    account: str
    currency: str = "GBP"
    price_minor_per_kwh: str = "0"            # FALLBACK gross unit price until a tariff for the account is pulled
    market: str | None = None                 # TOML with [prepayment] and [friendly_credit]
    token_public_key: str | None = None       # head-end token key: 64 hex digits (raw Ed25519)
    state_dir: str = "var/payg"
    sync_s: float = 900.0                     # credit-control exchange at most this often (clock seconds)
    timeout_s: float = 5.0
    card_socket: str | None = None            # Unix socket for a local card terminal (gateway/cardterminal.py)


def load_payg_sections(root, meter_ids: set[str]) -> tuple[PaygConfig, ...]:
    """Parse ``[[payg]]`` tables (called by gateway/config.py); paths are relative to the config file."""
    from decimal import InvalidOperation, Decimal

    base = Path(root.path).parent
    out, seen = [], set()
    for sec in root.sections("payg"):
        sec.check_known({"meter_id", "account", "currency", "price_minor_per_kwh", "market", "token_public_key",
                         "state_dir", "sync_s", "timeout_s", "card_socket"})
        meter = sec.get("meter_id", str)
        if meter not in meter_ids:
            raise sec.error("meter_id", f"meter {meter!r} is not configured on any [[bus]]")
        if meter in seen:
            raise sec.error("meter_id", f"meter {meter!r} has two [[payg]] tables")
        seen.add(meter)
        price = str(sec.get("price_minor_per_kwh", (str, int), "0"))
        try:
            if Decimal(price) < 0:
                raise InvalidOperation
        except InvalidOperation:
            raise sec.error("price_minor_per_kwh", f"{price!r} is not a non-negative decimal") from None
        market = sec.get("market", str, None)
        if market is not None and not Path(market).is_absolute():
            market = str(base / market)
        state_dir = sec.get("state_dir", str, "var/payg")
        sync_s = float(sec.get("sync_s", (int, float), 900))
        if sync_s <= 0:
            raise sec.error("sync_s", "must be a positive number of seconds")
        card_socket = sec.get("card_socket", str, None)
        if card_socket is not None and not Path(card_socket).is_absolute():
            card_socket = str(base / card_socket)
        if card_socket is not None and len(os.fsencode(card_socket)) > 100:
            raise sec.error("card_socket", f"{card_socket!r} is too long for a Unix socket path (100 bytes at most)")
        out.append(PaygConfig(meter, sec.get("account", str), sec.get("currency", str, "GBP"), price, market,
                              sec.get("token_public_key", str, None), state_dir, sync_s,
                              float(sec.get("timeout_s", (int, float), 5.0)), card_socket))
    return tuple(out)


def load_market(path: str | None, currency: str):
    """(PrepaymentConfig, FriendlyConfig | None) from a market TOML: [prepayment] keys are the
    `credit.PrepaymentConfig` fields; [friendly_credit] as in docs/payg.md."""
    import dataclasses

    from meterlink.config import load_section

    from .friendly import friendly_config_from_mapping
    if path is None:
        return C.PrepaymentConfig(currency=currency), None
    root = load_section(path)
    root.check_known({"prepayment", "friendly_credit"})
    pre = root.section("prepayment", required=False)
    pre.check_known({f.name for f in dataclasses.fields(C.PrepaymentConfig)})
    cfg = C.PrepaymentConfig(**{"currency": currency, **pre.data})
    friendly = None
    if "friendly_credit" in root.data:
        friendly = friendly_config_from_mapping(root.data["friendly_credit"], source=f"{path}: friendly_credit")
    return cfg, friendly


class PaygSyncWorker:
    """The thread that talks to the head-end for a gateway's PAYG meters (never a bus thread).

    Bus threads `request` an exchange for a meter and go on polling; this thread runs
    `PaygDaemonHook.exchange` for each requested meter in turn (one at a time, a meter at most once
    in the queue). An unreachable head-end costs this thread up to `timeout_s` per attempt and the
    buses nothing. With a `SimClock` (lock-step simulated time) the worker takes part in the lock
    step while it has work, so an exchange takes no simulated time, like a Modbus read."""

    def __init__(self, hook: "PaygDaemonHook") -> None:
        self.hook = hook
        self._pending: list[str] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._joined = None                       # the LockstepSleeper joined while work is queued
        self.thread: threading.Thread | None = None
        self.exchanges = 0                        # exchanges run (figures for tests and logs)

    def request(self, mid: str) -> bool:
        """Queue an exchange for `mid` (no-op if one is queued or running); never blocks on the network."""
        with self._cv:
            if self._stopping:
                return False
            if mid in self._pending:
                return True
            self._pending.append(mid)
            if self._joined is None:
                sleeper = self.hook.lockstep_sleeper()
                if sleeper is not None:
                    sleeper.join()                # before the bus thread sleeps: simulated time waits
                    self._joined = sleeper
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="payg sync", daemon=True)
                self.thread.start()
            self._cv.notify_all()
            return True

    def busy(self, mid: str) -> bool:
        with self._cv:
            return mid in self._pending

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running (tests); True if idle."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending, timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    return
                mid = self._pending[0]
            try:
                self.hook.exchange(mid)
            except Exception:  # noqa: BLE001 - the worker goes on with the other meters
                log.exception("PAYG meter %s: credit-control exchange failed", mid)
            with self._cv:
                self.exchanges += 1
                if mid in self._pending:          # (stop() may have cleared the queue meanwhile)
                    self._pending.remove(mid)
                if not self._pending:
                    self._release()
                self._cv.notify_all()

    def _release(self) -> None:
        if self._joined is not None:
            self._joined.leave()
            self._joined = None

    def stop(self, timeout: float = 1.0) -> None:
        with self._cv:
            self._stopping = True
            self._pending.clear()
            self._release()
            self._cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)             # a call stuck on the network ends at its deadline (daemon thread)


class PaygDaemonHook:
    """Runs the PAYG meters of a `Gateway`: local decisions on the bus threads, credit control on
    its own thread.

    * The bus thread of a meter's bus, after each read: charges the 1.8.0 register, applies the
      customer's requests and decides the supply from what the meter holds (window, emergency
      credit, friendly periods; pure, no network), switching the relay through that bus's own
      Modbus master (no second thread touches the port). When an exchange is due (`sync_s`) or
      urgent (window used up, grant expired, report unanswered; retried every `sync_s / 10` while
      the head-end is unreachable) it only QUEUES one for the `PaygSyncWorker`.
    * The sync worker runs the credit-control exchange (bounded by `timeout_s`) without holding
      the meter: the report is taken and the answer applied under the meter's lock, the RPC runs
      outside it. After an answer (grant, tokens) it queues the decision as a RELAY-priority job on
      the meter's bus (`BusWorker.submit_relay_action`), which wakes the bus at once.
    * A card top-up (card terminal thread) is applied under the meter's lock and the decision is
      queued the same way: the supply is re-armed at once, not at the next poll.
    * No relay flaps while the head-end answers: when the window is used up and an exchange is
      queued while the head-end was reachable at the last attempt, the bus thread holds an OPEN
      decision for that answer (the worker queues the decision when it is done; at most until the
      meter's next poll). Unreachable: the meter decides at once.

    Outside `Gateway.run` (no running bus thread, e.g. tests calling `on_poll`), exchanges and
    decisions run inline on the caller's thread, as before.

    Credit, relay and card events are appended to the hash-chained journal as ``credit.*`` /
    ``relay.*`` / ``card.topup`` events.

    Pricing: each meter is priced with the tariff the head-end assigned to its account
    (``payg.tariff`` in the pulled, signature-verified configuration state, gateway/pricing.py);
    until one is pulled, with the ``price_minor_per_kwh`` of its ``[[payg]]`` table. The state file
    is re-read when it changes (checked before each meter's charge); which price is in force is logged.
    """

    def __init__(self, gateway, configs: tuple[PaygConfig, ...], *, channel: grpc.Channel | None = None,
                 publish=None) -> None:
        from .payg import RelaySwitch
        self.gateway, self.clock = gateway, gateway.clock
        self.meters: dict[str, PaygMeter] = {}
        self.sessions: dict[str, CreditSession] = {}
        self.configs = {c.meter_id: c for c in configs}
        self.next_sync: dict[str, object] = {}
        self._retry: dict[str, object] = {}        # earliest urgent retry after a failed exchange
        self._journaled: dict[str, int] = {}
        self.locks: dict[str, threading.RLock] = {}
        self.online: dict[str, bool] = {}          # the last exchange reached the head-end
        self.held: dict[str, object] = {}          # meter -> instant an OPEN decision waits for an answer
        self.worker = PaygSyncWorker(self)
        self.price_in_force: dict[str, str] = {}    # meter -> "tariff NAME@VERSION" | "flat"
        self._flat: dict[str, Decimal] = {}
        self._prices_lock = threading.Lock()
        self._config_stamp: tuple | None = None
        pki_dir = getattr(gateway.config, "headend_pki_dir", None)
        from .configpull import STATE_FILE
        self.config_state_path = Path(pki_dir) / STATE_FILE if pki_dir else None
        self.card_servers: list = []
        self.link = CreditControlLink(channel) if channel is not None else None    # one stream for all meters
        where = {m.id: (bus, master, m) for bus, master in zip(gateway.config.buses, gateway.masters)
                 for m in bus.meters}
        for c in configs:
            bus, master, meter = where[c.meter_id]
            if meter.profile.relay_coil is None:
                raise ValueError(f"PAYG meter {c.meter_id}: profile {meter.profile.name} has no relay coil")
            cfg, friendly = load_market(c.market, c.currency)
            key = bytes.fromhex(c.token_public_key) if c.token_public_key else bytes(32)
            state_dir = Path(c.state_dir)
            pm = PaygMeter(c.meter_id, RelaySwitch(master, meter.unit, meter.profile.relay_coil, meter_id=c.meter_id),
                           self.clock, cfg=cfg, friendly=friendly, price=Decimal(c.price_minor_per_kwh),
                           head_end_key=key, state_path=state_dir / f"{c.meter_id}.json", publish=publish,
                           gateway_id=gateway.config.id)
            self.meters[c.meter_id] = pm
            self.sessions[c.meter_id] = CreditSession(pm, self.link, gateway_id=gateway.config.id, account=c.account,
                                                      currency=c.currency,
                                                      state_path=state_dir / f"{c.meter_id}.cc.json",
                                                      timeout=c.timeout_s)
            self._journaled[c.meter_id] = 0
            self.locks[c.meter_id] = threading.RLock()
            self._flat[c.meter_id] = Decimal(c.price_minor_per_kwh)
        self.where = where
        self.refresh_prices(force=True)

    # ---------------------------------------------------------------- pricing

    def refresh_prices(self, force: bool = False) -> None:
        """Price each meter with the pulled tariff of its account, else with its flat fallback;
        re-read only when the configuration state file changed (or `force`)."""
        from .configpull import ConfigState, load_state
        from .pricing import price_for_account
        with self._prices_lock:
            state, stamp = ConfigState(), None
            if self.config_state_path is not None:
                try:
                    st = self.config_state_path.stat()
                    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                except FileNotFoundError:
                    stamp = None
            if not force and stamp == self._config_stamp:
                return
            if stamp is not None:
                try:
                    state = load_state(self.config_state_path)
                except Exception as exc:  # noqa: BLE001 - keep the prices in force
                    log.error("PAYG: configuration state %s unreadable, prices unchanged: %s",
                              self.config_state_path, exc)
                    return
            self._config_stamp = stamp
            for mid, c in self.configs.items():
                try:
                    tp = price_for_account(state, c.account, c.currency)
                    if tp is not None:                   # before the tariff's first version: the fallback
                        tp = dataclasses.replace(tp, before_start=self._flat[mid])
                except Exception as exc:  # noqa: BLE001 - an unusable assignment keeps the old price
                    log.error("PAYG meter %s: %s; keeping %s", mid, exc, self.price_in_force.get(mid))
                    continue
                key = "flat" if tp is None else (f"tariff {tp.tariff_name}@{tp.config_version}#" + hashlib.sha256(
                    state.tariffs[tp.tariff_name].encode()).hexdigest()[:16])
                if key == self.price_in_force.get(mid):
                    continue
                with self.locks[mid]:
                    if tp is not None:
                        self.meters[mid].set_price(tp, f"the pulled {tp.describe()}")
                    else:
                        self.meters[mid].set_price(
                            self._flat[mid], f"the FALLBACK flat price_minor_per_kwh {c.price_minor_per_kwh} "
                            f"(gateway.toml), no standing charge deducted: no tariff pulled for account {c.account} yet")
                        if self._flat[mid] == 0:
                            log.warning("PAYG meter %s: the fallback price is 0: consumption is free until a "
                                        "tariff is pulled", mid)
                self.price_in_force[mid] = key

    # ---------------------------------------------------------------- card terminals

    def start_card_terminals(self) -> None:
        """One `CardTerminalServer` per distinct ``card_socket`` (meters may share one)."""
        from .cardterminal import CardDesk, CardTerminalServer
        paths: dict[str, dict[str, str]] = {}
        for c in self.configs.values():
            if c.card_socket:
                paths.setdefault(c.card_socket, {})[c.meter_id] = c.currency
        for path, meters in paths.items():
            if any(srv.path == Path(path) for srv in self.card_servers):
                continue
            desk = CardDesk(self.clock, meters, self.card_topup)
            try:
                self.card_servers.append(CardTerminalServer(path, desk).start())
            except OSError as exc:
                log.error("PAYG card terminal socket %s not opened: %s", path, exc)

    def card_topup(self, mid: str, topup: T.CardTopUp, expected_nonce: bytes | None) -> list:
        """A card top-up from a terminal (any thread): applied under the meter's lock and journaled
        at once; an applied one queues the supply decision on the meter's bus (re-armed at once)."""
        pm = self.meters[mid]
        with self.locks[mid]:
            events = pm.card_topup(topup, expected_nonce, decide=False)
            self._journal(mid)
        if any(isinstance(e, C.TopUpApplied) for e in events):
            self.dispatch(mid)
        return events

    def close(self) -> None:
        self.worker.stop()
        for srv in self.card_servers:
            srv.stop()
        self.card_servers = []
        if self.link is not None:
            self.link.close()

    def boot(self) -> None:
        """Before the first poll: read each PAYG meter's relay and register, re-evaluate, then switch.
        One exchange per meter first (grant and tokens, relay untouched); once the head-end proves
        unreachable the other meters boot without trying (their first poll queues an exchange)."""
        from .payg import read_import_wh
        self.refresh_prices()
        unreachable = False
        for mid, pm in self.meters.items():
            bus, master, meter = self.where[mid]
            with self.locks[mid]:
                try:
                    pm.defer_decisions = True         # the grant and tokens first, then ONE decision
                    if not unreachable:
                        unreachable = self.exchange(mid, decide=False).outcome == "offline"
                    pm.boot(read_import_wh(master, meter.unit, meter.profile))
                except Exception as exc:  # noqa: BLE001 - a meter that cannot boot decides at its next reading
                    pm.defer_decisions = False
                    log.error("PAYG meter %s: boot failed: %s", mid, exc)
                self._journal(mid)
        self.start_card_terminals()

    def on_poll(self, meter, readings) -> None:
        """Bus thread, after a successful read of `meter`: charge the 1.8.0 register, decide, maybe
        queue an exchange (never waits for the head-end while a bus thread runs)."""
        pm = self.meters.get(meter.id)
        if pm is None:
            return
        self.refresh_prices()
        with self.locks[meter.id]:
            self._on_poll(pm, meter, readings)

    def _on_poll(self, pm: PaygMeter, meter, readings) -> None:
        mid = meter.id
        self._customer_requests(mid)
        for r in readings:
            if getattr(r, "obis", None) == "1.8.0" and getattr(r, "unit", "Wh") == "Wh":
                try:
                    pm.charge_reading(int(r.value))
                except Exception as exc:  # noqa: BLE001 - PAYG must never stop the bus
                    log.error("PAYG meter %s: reading %s not charged: %s", mid, r.value, exc)
                break
        due = self.next_sync.get(mid)
        st = pm.state
        # the window is used up (emergency credit aside: a new grant comes before it) or the grant
        # expired, or a report waits for its answer
        urgent = ((st.credit_balance <= 0 and st.granted_wh <= 0) or st.exhausted or st.grant_expiry_reported
                  or st.in_flight is not None)
        now = self.clock.now()
        wanted = due is None or now >= due or (urgent and now >= self._retry_at(mid))
        pending = False
        if wanted and self.sessions[mid].link is not None:
            if self._bus_worker(mid) is not None:
                pending = self.worker.request(mid)           # the sync worker talks to the head-end
            else:
                self.exchange(mid, decide=False)              # no bus thread running: inline, as before
        elif self.worker.busy(mid):
            pending = True
        if pending and self.online.get(mid) and mid not in self.held:
            d = C.decide_supply(pm.state, pm.friendly, now)
            if d.switch and d.relay == "open":
                self.held[mid] = now                          # the answer decides (the worker queues it)
                log.info("PAYG meter %s: window used up; waiting for the head-end's answer before opening", mid)
                self._journal(mid)
                return
        self.held.pop(mid, None)
        try:
            pm.evaluate()
        except Exception as exc:  # noqa: BLE001
            log.error("PAYG meter %s: evaluation failed: %s", mid, exc)
        self._journal(mid)

    # ---------------------------------------------------------------- decisions off the bus thread

    def _bus_worker(self, mid: str):
        """The running `BusWorker` of the bus `mid` is on (None outside `Gateway.run`)."""
        for w in getattr(self.gateway, "workers", None) or ():
            if mid in (getattr(w, "meters", None) or {}) and hasattr(w, "submit_relay_action"):
                return w if w.running else None
        return None

    def lockstep_sleeper(self):
        """The `LockstepSleeper` of the running buses (simulated clock), if any."""
        from .scheduler import LockstepSleeper
        for w in getattr(self.gateway, "workers", None) or ():
            sleeper = getattr(w, "sleeper", None)
            if isinstance(sleeper, LockstepSleeper) and getattr(w, "running", False):
                return sleeper
        return None

    def dispatch(self, mid: str) -> None:
        """Decide the supply of `mid` on its bus thread: a RELAY-priority job that wakes the bus at
        once; inline when no bus thread runs (nothing else uses the bus master then)."""
        worker = self._bus_worker(mid)
        if worker is not None:
            worker.submit_relay_action(mid, lambda: self.decide(mid))
        else:
            self.decide(mid)

    def decide(self, mid: str) -> None:
        """Evaluate the supply of `mid` now and switch the relay if needed (the bus thread's job)."""
        with self.locks[mid]:
            self.held.pop(mid, None)
            try:
                self.meters[mid].evaluate()
            except Exception as exc:  # noqa: BLE001
                log.error("PAYG meter %s: evaluation failed: %s", mid, exc)
            self._journal(mid)

    def _customer_requests(self, mid: str) -> None:
        """Apply requests left by `meterlink-gateway payg accept-emergency-credit|confirm-reconnect`."""
        from .payg import request_path
        pm = self.meters[mid]
        for name, apply in (("accept-emergency-credit", pm.accept_emergency_credit),
                            ("confirm-reconnect", pm.confirm_reconnect)):
            marker = request_path(self.configs[mid].state_dir, mid, name)
            if marker.exists():
                try:
                    apply()
                finally:
                    marker.unlink(missing_ok=True)

    def _retry_at(self, mid: str):
        return self._retry.get(mid, self.clock.now())

    def exchange(self, mid: str, *, decide: bool = True) -> SyncResult:
        """One credit-control exchange of `mid` (the sync worker's, or inline). The meter's lock is
        held only while the report is taken and the answer applied. `decide`: queue the supply
        decision on the meter's bus after an answer (or when an OPEN decision waits for it)."""
        from datetime import timedelta
        lock, session = self.locks[mid], self.sessions[mid]
        # one exchange of a meter at a time: the sync worker while the buses run, else the caller
        res = session.sync(lock=lock, decide=False)
        if res.outcome == "no_grant" and not session.open and res.tokens_applied:
            res = session.sync(lock=lock, decide=False)                 # report the tokens at once
        c = self.configs[mid]
        with lock:
            now = self.clock.now()
            self.next_sync[mid] = now + timedelta(seconds=c.sync_s)
            # offline or refused: urgent retries at most every sync_s / 10
            failed = res.outcome in ("offline", "refused")
            self._retry[mid] = now + timedelta(seconds=c.sync_s / 10 if failed else 0)
            self.online[mid] = not failed
            waiting = mid in self.held
            self._journal(mid)
        if decide and (waiting or not failed):
            self.dispatch(mid)
        return res

    def _journal(self, mid: str) -> None:
        from meterlink.chain import Event
        pm = self.meters[mid]
        end = len(pm.journal)
        new = pm.journal[self._journaled[mid]:end]
        if not new:
            return
        events = []
        for e, cid in new:
            payload = {"kind": e.kind, **{k: v for k, v in _jsonable_event(e).items()}}
            if cid:
                payload["command_id"] = cid
            name = ("relay.open" if isinstance(e, C.Disconnected) else "relay.close" if isinstance(e, C.Reconnected)
                    else "card.topup" if isinstance(e, C.TopUpApplied) and e.reference.startswith("card:")
                    else f"credit.{_snake(e.kind)}")
            events.append(Event(name, mid, e.at, json.dumps(payload, sort_keys=True,
                                                            separators=(",", ":")).encode()))
        try:
            self.gateway.journal.append(events)
            # journaled (hash chain, on flash): drop them from memory so the list never grows without bound
            del pm.journal[:end]
            self._journaled[mid] = 0
        except Exception as exc:  # noqa: BLE001 - retried with the next reading
            log.error("PAYG meter %s: %d event(s) not journaled yet: %s", mid, len(events), exc)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def _jsonable_event(e) -> dict:
    import dataclasses
    from .payg import _jsonable
    return {f.name: _jsonable(getattr(e, f.name)) for f in dataclasses.fields(e)}


__all__ = ["CreditSession", "PaygConfig", "PaygDaemonHook", "PaygSyncWorker", "SyncResult", "load_market", "load_payg_sections",
           "usage_to_proto"]


def hook_for_gateway(gateway) -> PaygDaemonHook | None:
    """The PAYG hook a `Gateway` with ``[[payg]]`` tables needs (None without): credit control over
    the head-end channel (mutual TLS when enrolled), CRM events over MQTT when ``[mqtt]`` is set."""
    configs = getattr(gateway.config, "payg", ())
    if not configs:
        return None
    from .enrol import headend_channel
    cfg = gateway.config
    channel = headend_channel(cfg) if cfg.headend else None
    if channel is None and cfg.headend:
        channel = grpc.insecure_channel(cfg.headend)
    publish = None
    if cfg.mqtt is not None:
        from .payg import MqttPublisher
        publish = MqttPublisher(cfg.mqtt.host, cfg.mqtt.port, client_id=f"{cfg.id}-payg")
    return PaygDaemonHook(gateway, configs, channel=channel, publish=publish)
