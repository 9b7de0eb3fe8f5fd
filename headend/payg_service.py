"""PAYG over gRPC: the `CreditControl` (gateways, RFC 4006) and `Vending` (vendors) servicers over `PaygStore` and the credit-control core; conversion only, every decision is the cores'.

Credit control runs on the gateways' mutual-TLS server, next to the sync service: the calling
gateway is the one of the client certificate (`gatewayauth.peer_of`), `gateway_id` must name it,
and the request's meter must be provisioned to it in the registry and bound to the request's
account in `payg_meter` — so a gateway may only credit-control its own meters. Each request runs
in ONE store transaction: the balance read, the postings, the session update, the tokens marked
applied and the over-usage CRM events.

Offline card top-ups the gateway reports (``card:{card}:{nonce}`` in `used.top_ups`) are booked
once in the same transaction (`_reconcile_cards`), before the report is measured.

Token delivery: every answer carries the signed tokens issued for the meter and not yet reported
applied (re-signed identically, `payg_store.issue_token` is idempotent); the gateway applies each
once and reports it in its next request.

Vending is for vendors, authenticated as vendors: each call must come with a vendor client
certificate issued by the head-end CA (`issue_vendor_certificate`: subject CN and SAN URI
``urn:meterlink:vendor:{id}``, the serial recorded in `payg_vendor_cert`), whose vendor is the
request's `vendor_id`, not revoked and not superseded by a newer certificate (`authorise_vendor`);
otherwise PERMISSION_DENIED with the reason (``VENDOR_*``) in the ``meterlink-refusal`` trailing
metadata and at the start of the details, and nothing is stored. A gateway's certificate is not a
vendor's, nor the reverse. The Vending methods are exempted from the gateway interceptor
(`VENDING_METHODS`); the card's signature over the head-end's challenge authenticates the card.
The CreditControl methods are exempted from it too when the servicer has the registry
(`CREDIT_CONTROL_METHODS`): the servicer makes the same check itself, with the request's meter,
once per call instead of twice (a parsed certificate per call and one plain registry read).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta

import grpc

from meterlink import pki
from meterlink.clock import Clock, from_ms, to_ms
from meterlink.errors import ValidationError
from meterlink.v1 import payg_pb2, payg_pb2_grpc

from . import creditcontrol as CC
from . import ledger as L
from . import payg_store as S
from . import vendors as V
from .gatewayauth import NO_CLIENT_CERTIFICATE, REFUSAL_METADATA, Refusal, authorise, peer_of

log = logging.getLogger("meterlink.headend.payg")

VENDING_METHODS = ("/meterlink.v1.Vending/Challenge", "/meterlink.v1.Vending/Authorise",
                   "/meterlink.v1.Vending/Reverse")
CREDIT_CONTROL_METHODS = ("/meterlink.v1.CreditControl/Reserve", "/meterlink.v1.CreditControl/Update",
                          "/meterlink.v1.CreditControl/Terminate", "/meterlink.v1.CreditControl/Session")
METER_NOT_BOUND = "METER_NOT_BOUND"
VENDOR_URI_PREFIX = "urn:meterlink:vendor:"
VENDOR_NOT_AUTHENTICATED = "VENDOR_NOT_AUTHENTICATED"
VENDOR_IDENTITY_MISMATCH = "VENDOR_IDENTITY_MISMATCH"
VENDOR_UNKNOWN = "VENDOR_UNKNOWN"
VENDOR_REVOKED = "VENDOR_REVOKED"
VENDOR_CERTIFICATE_SUPERSEDED = "VENDOR_CERTIFICATE_SUPERSEDED"

_FUA_TO_PB = {None: payg_pb2.FINAL_UNIT_ACTION_NONE, CC.FinalUnitAction.TERMINATE: payg_pb2.FINAL_UNIT_ACTION_TERMINATE,
              CC.FinalUnitAction.REDIRECT: payg_pb2.FINAL_UNIT_ACTION_REDIRECT,
              CC.FinalUnitAction.RESTRICT_ACCESS: payg_pb2.FINAL_UNIT_ACTION_RESTRICT_ACCESS}


def _ms(now):
    """The ledger keeps milliseconds."""
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def request_from_proto(pb: payg_pb2.CreditControlRequest, rtype: CC.RequestType) -> CC.CreditControlRequest:
    u = pb.used
    return CC.CreditControlRequest(
        pb.session_id, rtype, pb.request_number, pb.account_id, pb.meter_id, pb.currency,
        u.used_minor, u.used_wh, from_emergency_minor=u.from_emergency_minor, to_debt_minor=u.to_debt_minor,
        repaid_debt_minor=u.repaid_debt_minor, repaid_emergency_minor=u.repaid_emergency_minor,
        recovered_arrears_minor=u.recovered_arrears_minor,
        tokens=tuple((t.reference, t.amount_minor) for t in u.top_ups),
        standing_minor=u.standing_minor, standing_days=u.standing_days,
        standing_from_emergency_minor=u.standing_from_emergency_minor, standing_to_debt_minor=u.standing_to_debt_minor,
        standing_first_day=u.standing_first_day, standing_last_day=u.standing_last_day,
        import_wh_from=u.import_wh_from if u.HasField("import_wh_from") else None,
        import_wh_to=u.import_wh_to if u.HasField("import_wh_to") else None)


def answer_to_proto(answer: CC.CreditControlAnswer, tokens: list[str], balance_minor: int,
                    arrears_minor: int | None = None) -> payg_pb2.CreditControlAnswer:
    pb = payg_pb2.CreditControlAnswer(session_id=answer.session_id, request_number=answer.request_number,
                                      result_code=int(answer.result_code),
                                      final_unit_action=_FUA_TO_PB[answer.final_unit_action],
                                      detail=answer.detail, tokens=tokens, balance_minor=balance_minor,
                                      books_standing_charges=True)   # used.standing_* are booked (creditcontrol)
    if arrears_minor is not None:
        pb.arrears_minor = max(0, arrears_minor)
    g = answer.grant
    if g is not None:
        pb.granted.CopyFrom(payg_pb2.GrantedUnits(
            amount_minor=g.amount_minor, wh=g.wh or 0, has_wh=g.wh is not None, validity_time_s=g.validity_time,
            issued_at_ms=to_ms(g.issued_at), expires_at_ms=to_ms(g.expires_at)))
    return pb


class CreditControlService(payg_pb2_grpc.CreditControlServicer):
    """RFC 4006 credit control for the gateways' PAYG meters."""

    def __init__(self, store: S.PaygStore, clock: Clock, policy: CC.GrantPolicy, *, token_key=None,
                 registry=None, auth=None) -> None:
        self.store, self.clock, self.token_key, self.registry = store, clock, token_key, registry
        self.auth = auth            # the interceptor whose refusal counters/metrics our refusals join
        self._bound = threading.local()
        self._peers: dict = {}
        self._digests: dict = {}        # card-list content -> `card_lists_digest` (`_card_lists`)
        self.engine = _CreditControlEngine(self)
        self.streams_open = 0           # CreditControl.Session calls open now (each holds an rpc worker)
        self.max_streams: int | None = None     # at most this many at once (add_to_server: workers - 2)
        self._streams_lock = threading.Lock()
        self.cc = CC.CreditControl(store, S.SqlSessionStore(store), policy, store.vat,
                                   account_active=self._active, tokens=S.StoreTokenReservations(store),
                                   inputs=store.credit_inputs)

    def _active(self, account_id: str) -> bool:
        known = getattr(self._bound, "value", None)       # read with the meter binding, same transaction
        if known is not None and known[0] == account_id:
            return known[1]
        return self.store.account_active(account_id)

    def _refuse(self, context, refusal: Refusal):
        log.warning("credit control refused %s: %s", refusal.reason, refusal.message)
        if self.auth is not None:
            self.auth.refusals[refusal.reason] = self.auth.refusals.get(refusal.reason, 0) + 1
            if self.auth.on_refusal:
                self.auth.on_refusal(refusal.reason)
        context.set_trailing_metadata(((REFUSAL_METADATA, refusal.reason),))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{refusal.reason}: {refusal.message}")

    def _peer(self, context):
        """`gatewayauth.peer_of`, memoised per client certificate (parsing it costs ~0.2 ms)."""
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return None
        pem = pems[0]
        peer = self._peers.get(pem)
        if peer is None:
            peer = peer_of(context)
            if peer is not None:
                if len(self._peers) >= 4096:
                    self._peers.clear()
                self._peers[pem] = peer
        return peer

    def _check(self, request, context) -> None:
        if self.registry is not None:
            peer = self._peer(context)
            if peer is None:
                self._refuse(context, Refusal(NO_CLIENT_CERTIFICATE, "no verified gateway client certificate"))
            refusal = authorise(self.registry.access_record(peer.name, [request.meter_id]), peer,
                                request.gateway_id, [request.meter_id])
            if refusal is not None:
                self._refuse(context, refusal)

    def _check_bound(self, request, context) -> None:
        """The request's meter is the PAYG meter of its account (read inside the request's transaction)."""
        binding = self.store.meter_binding(request.meter_id)
        self._bound.value = binding
        bound = binding[0] if binding else None
        if bound != request.account_id:
            self._refuse(context, Refusal(METER_NOT_BOUND, f"meter {request.meter_id} is "
                                          + (f"bound to account {bound}" if bound else "not a PAYG meter")
                                          + f", not account {request.account_id}"))

    def _handle(self, request, context, rtype: CC.RequestType) -> payg_pb2.CreditControlAnswer:
        self._check(request, context)
        return self._handle_checked(request, context, rtype)

    def _handle_checked(self, request, context, rtype: CC.RequestType) -> payg_pb2.CreditControlAnswer:
        """`_handle` once the gateway's access was checked (`_check`, outside any store transaction:
        the registry's own write transactions must not wait behind ours on one SQLite file)."""
        req = request_from_proto(request, rtype)
        now = _ms(self.clock.now())
        self._bound.value = None
        with self.store.transaction():
            self._check_bound(request, context)
            self._reconcile_cards(request, req, now)
            out = self.cc.handle(req, now)
            if out.session is not None and req.tokens:
                S.mark_tokens_applied(self.store, [r for r, _ in req.tokens], now)
            for ev in out.events:
                S.record_over_usage(self.store, ev)
            reported = {r for r, _ in req.tokens}
            tokens = []
            if self.token_key is not None:
                for token_id, reference, amount in S.unapplied_tokens(self.store, req.meter_id):
                    if token_id not in reported:
                        tokens.append(S.issue_token(self.store, reference, req.meter_id, req.account_id, amount,
                                                    req.currency, self.token_key, now).encode())
            after = self.cc.balances_after(req.account_id, req.currency)     # read before + booked since
            if after is None:
                prepaid, arrears_acct = L.prepaid(req.account_id), L.arrears_account(req.account_id)
                both = self.store.balances((prepaid, arrears_acct), req.currency)       # one read
                after = -both[prepaid], both[arrears_acct]
            balance, arrears = after
            lists = self._card_lists(req, bytes(request.card_lists_digest), now)
        pb = answer_to_proto(out.answer, tokens, balance, arrears)
        if lists is not None:
            pb.card_list, pb.blacklist = lists
        return pb

    def _card_lists(self, req: CC.CreditControlRequest, digest: bytes, now) -> tuple[str, str] | None:
        """The account's cards for the meter and the blacklisted ones among them now, signed — only
        when they differ from what the gateway holds (`digest`); None without a signing key."""
        if self.token_key is None:
            return None
        from meterlink.gateway import payg as GP
        from meterlink.gateway import tokens as T
        cards = [(c, bl) for c, bl in self.store.account_cards_blacklist(req.account_id) if c.active]
        black = frozenset(c.card_id for c, bl in cards if V.blacklisted(bl, c.card_id, now))
        version = to_ms(now)
        card_list = T.CardList(version, now, tuple(T.CardEntry(c.card_id, req.meter_id, c.public_key)
                                                   for c, _ in cards))
        blacklist = T.Blacklist(version, now, black)
        # the digest depends on the lists' content only: memoised by it (its JSON + SHA-256 ~30 us a call)
        key = (req.meter_id, tuple((c.card_id, c.public_key) for c, _ in cards), black)
        known = self._digests.get(key)
        if known is None:
            known = T.card_lists_digest(card_list, blacklist)
            if len(self._digests) >= 4096:
                self._digests.clear()
            self._digests[key] = known
        if known == digest:
            return None
        import json
        return (json.dumps(GP._card_list_to_json(card_list.signed(self.token_key))),
                json.dumps(GP._blacklist_to_json(blacklist.signed(self.token_key))))

    def _reconcile_cards(self, pb, req: CC.CreditControlRequest, now) -> None:
        """Offline card top-ups reported in `used.top_ups` (``card:{card}:{nonce}``) are booked once
        (`payg_store.reconcile_offline_card_topups`, which also catches a card blacklisted after the
        gateway's last list) before the report is measured, so their money counts in the window. Only
        cards registered to the request's account are booked; others stay unconfirmed (over-usage)."""
        topups = []
        for ref, amount in req.tokens:
            parts = ref.split(":")
            if len(parts) != 3 or parts[0] != "card" or amount <= 0:
                continue
            card = self.store._card(parts[1]).get(parts[1])
            if card is None or card.account_id != req.account_id:
                log.warning("meter %s: card top-up %s is not for a card of account %s: not booked",
                            req.meter_id, ref, req.account_id)
                continue
            at = _ms(from_ms(pb.gateway_at_ms)) if pb.gateway_at_ms else now
            topups.append(S.OfflineCardTopUp(ref, parts[1], req.account_id, amount, req.currency, min(at, now),
                                             pb.gateway_id))
        if topups:
            S.reconcile_offline_card_topups(self.store, topups)

    def Session(self, requests, context):
        """Requests of any of the gateway's sessions on one stream, answered in order, each exactly as
        its unary method would (same transaction, idempotency and booking); a refusal in-band
        (`refusal`, `detail`) instead of ending the call, so the stream goes on.

        Pipelined: a reader thread hands each request to the service's `_CreditControlEngine` as it
        arrives, without waiting for the answers before it, and this generator sends the answers in
        order as their batches commit — so a stream is not held to one durable COMMIT per request."""
        call = _InBandCall(context)
        pending: queue.SimpleQueue = queue.SimpleQueue()
        with self._streams_lock:
            full = self.max_streams is not None and self.streams_open >= self.max_streams
            if not full:
                self.streams_open += 1
        if full:                  # keep workers for unary calls: the gateway uses those meanwhile
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_streams} CreditControl.Session streams open on this process: "
                          "use Reserve/Update/Terminate")
        if not context.add_callback(self._stream_closed):      # already over: nothing to serve
            self._stream_closed()
            return

        def read() -> None:
            try:
                for request in requests:
                    pending.put(self.engine.submit(request, call, _STREAM_TYPES.get(request.request_type)))
            except Exception:  # noqa: BLE001 - the client cancelled or went away: the stream ends
                pass
            finally:
                pending.put(None)

        threading.Thread(target=read, name="cc-session-reader", daemon=True).start()
        while (answer := pending.get()) is not None:
            yield answer.result()

    def _stream_closed(self) -> None:
        with self._streams_lock:
            self.streams_open -= 1

    def _refused_outright(self, request, call, rtype) -> payg_pb2.CreditControlAnswer | None:
        """Before the engine's transaction: the answer to a request that is refused outright (no
        request type on a Session stream, or the gateway's access: `_check`), else None."""
        if rtype is None:
            return payg_pb2.CreditControlAnswer(
                session_id=request.session_id, request_number=request.request_number,
                result_code=int(CC.ResultCode.INVALID_AVP_VALUE),
                detail=f"request_type {request.request_type} on Session: say INITIAL, UPDATE or TERMINATION")
        try:
            self._check(request, call)
        except _Refused as refused:
            return _refused_answer(request, refused)
        return None

    def _unary(self, request, context, rtype: CC.RequestType) -> payg_pb2.CreditControlAnswer:
        """A unary request, run by the engine like a stream's (batched with whatever else is queued);
        a refusal ends the call with PERMISSION_DENIED and the reason in `meterlink-refusal`."""
        answer = self.engine.submit(request, _InBandCall(context), rtype, inline=True).result()
        if answer.refusal:
            context.set_trailing_metadata(((REFUSAL_METADATA, answer.refusal),))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, answer.detail)
        return answer

    def Reserve(self, request, context):
        return self._unary(request, context, CC.RequestType.INITIAL_REQUEST)

    def Update(self, request, context):
        return self._unary(request, context, CC.RequestType.UPDATE_REQUEST)

    def Terminate(self, request, context):
        return self._unary(request, context, CC.RequestType.TERMINATION_REQUEST)


AUTHORIZATION_REJECTED = 5003      # Diameter result of a request refused in-band on Session
_STREAM_TYPES = {payg_pb2.REQUEST_TYPE_INITIAL: CC.RequestType.INITIAL_REQUEST,
                 payg_pb2.REQUEST_TYPE_UPDATE: CC.RequestType.UPDATE_REQUEST,
                 payg_pb2.REQUEST_TYPE_TERMINATION: CC.RequestType.TERMINATION_REQUEST}


class _CreditControlEngine:
    """Runs every credit-control request of a servicer, in batches: all requests queued when a
    batch starts (at most `MAX_BATCH`) run in ONE store transaction, each in its own SAVEPOINT (a
    failing or refused request rolls back only its own writes), and their answers are released
    only after that transaction's durable COMMIT (a failed COMMIT fails every request of the batch:
    none of them happened). One batch runs at a time (`_running`), so requests do not contend for
    the connection, and a burst costs one COMMIT instead of one each.

    Queued requests are run by the engine's thread (started with the first, a daemon). A unary
    call that finds nothing submitted and unanswered runs its request on its own thread instead
    (`inline`): at low load no hand-over between threads (about 0.3 ms CPU per request here).
    Session streams always queue, so that a stream's requests keep arriving while a batch commits."""

    MAX_BATCH = 64

    def __init__(self, service: "CreditControlService") -> None:
        self.service = service
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = threading.Lock()  # held while a batch runs (the engine's thread or an inline caller)
        self.batches = 0                  # batches run and requests answered (figures, tests)
        self.requests = 0
        self._unanswered = 0              # submitted and not yet answered (`drain`)
        self._idle = threading.Condition()

    def drain(self, timeout: float = 20.0) -> bool:
        """Wait until every request handed in so far has been answered (or `timeout` s): called by
        `service.stop_server` after the handlers returned, before the store is closed."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._unanswered and time.monotonic() < deadline:
                self._idle.wait(0.05)
            return not self._unanswered

    def submit(self, request, call, rtype: CC.RequestType | None, inline: bool = False) -> Future:
        """Hand one request over (`rtype` None: a Session request without its type, answered 5004).
        `inline`: run it on this thread, answered when this returns, if nothing else is submitted and
        unanswered and no batch runs; otherwise (and without `inline`) queue it for the engine's thread."""
        f: Future = Future()
        item = (request, call, rtype, f)
        with self._idle:
            alone = inline and self._unanswered == 0 and self._running.acquire(blocking=False)
            self._unanswered += 1
        if alone:
            try:
                self._run_batch([item])
            finally:
                self._running.release()
            return f
        self._queue.put(item)
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="cc-engine", daemon=True)
                    self._thread.start()
        return f

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with self._running:
                while len(batch) < self.MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        try:
            self._process(batch)
        except BaseException as exc:  # noqa: BLE001 - never leave a request unanswered
            log.exception("credit-control batch failed")
            for *_, f in batch:
                if not f.done():
                    f.set_exception(exc)
        with self._idle:
            self._unanswered -= len(batch)
            self._idle.notify_all()

    def _process(self, batch: list) -> None:
        store, service = self.service.store, self.service
        done: list = []
        checked = []
        for request, call, rtype, f in batch:      # the access checks first, outside the transaction
            refused = service._refused_outright(request, call, rtype)
            if refused is None:
                checked.append((request, call, rtype, f))
            else:
                done.append((f, refused, None))
        try:
            with store.transaction() as db:
                for request, call, rtype, f in checked:
                    db.execute("SAVEPOINT cc_stream")
                    try:
                        done.append((f, service._handle_checked(request, call, rtype), None))
                    except _Refused as refused:
                        db.execute("ROLLBACK TO cc_stream")
                        done.append((f, _refused_answer(request, refused), None))
                    except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                        db.execute("ROLLBACK TO cc_stream")
                        log.exception("credit control on a stream failed: session %s request %d",
                                      request.session_id, request.request_number)
                        done.append((f, None, exc))
                    db.execute("RELEASE cc_stream")
        except BaseException as exc:      # the COMMIT or the connection failed: no request of it happened
            for *_, f in checked:
                f.set_exception(exc)
            checked = []
            done = [d for d in done if not d[0].done()]
        self.batches += 1
        self.requests += len(batch)
        for f, answer, exc in done:
            if exc is None:
                f.set_result(answer)
            else:
                f.set_exception(exc)


class _CreditControlCollector:
    """Prometheus metrics of the credit-control engine and streams (`serve --metrics-listen`)."""

    def __init__(self, service: "CreditControlService") -> None:
        self.service = service

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        engine = self.service.engine
        yield CounterMetricFamily("meterlink_headend_payg_credit_control_requests",
                                  "Credit-control requests answered (unary and Session streams)",
                                  value=engine.requests)
        yield CounterMetricFamily("meterlink_headend_payg_credit_control_batches",
                                  "Engine batches: store transactions that carried credit-control requests",
                                  value=engine.batches)
        yield GaugeMetricFamily("meterlink_headend_payg_credit_control_unanswered",
                                "Credit-control requests handed to the engine and not answered yet",
                                value=engine._unanswered)
        yield GaugeMetricFamily("meterlink_headend_payg_credit_control_streams",
                                "CreditControl.Session streams open (each holds a gRPC worker thread: "
                                "serve --rpc-workers)", value=self.service.streams_open)


def _refused_answer(request, refused: "_Refused") -> payg_pb2.CreditControlAnswer:
    return payg_pb2.CreditControlAnswer(session_id=request.session_id, request_number=request.request_number,
                                        result_code=AUTHORIZATION_REJECTED, refusal=refused.reason,
                                        detail=refused.detail)


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _InBandCall:
    """The call context one request on `CreditControl.Session` sees: `abort` (a refusal) ends that
    request with `_Refused` instead of the stream; the rest is the stream's own context."""

    __slots__ = ("_context", "_reason")

    def __init__(self, context) -> None:
        self._context, self._reason = context, ""

    def auth_context(self):
        return self._context.auth_context()

    def peer(self):
        return self._context.peer()

    def set_trailing_metadata(self, metadata) -> None:
        self._reason = dict(metadata).get(REFUSAL_METADATA, "")

    def abort(self, code, details: str):
        reason, self._reason = self._reason, ""
        raise _Refused(reason or code.name, details)


@dataclass(frozen=True)
class VendorPeer:
    """The vendor a TLS session authenticated: its id and the serial (hex) of its client certificate."""
    vendor_id: str
    serial: str


def vendor_of(cert) -> str:
    """The vendor a client certificate speaks for (SAN URI ``urn:meterlink:vendor:ID``, equal to the CN)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise pki.PkiError(f"certificate serial {cert.serial_number:x}: no subject alternative name") from None
    names = [u[len(VENDOR_URI_PREFIX):] for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(VENDOR_URI_PREFIX)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1 or cns != names:
        raise pki.PkiError(f"certificate serial {cert.serial_number:x}: not a meterlink vendor certificate")
    return names[0]


def vendor_peer_of(context) -> VendorPeer | None:
    """The vendor of the verified client certificate on this call, or None (no certificate, or a gateway's)."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        cert = pki.load_cert(pems[0], "client certificate")
        return VendorPeer(vendor_of(cert), format(cert.serial_number, "x"))
    except pki.PkiError:
        return None


def authorise_vendor(peer: VendorPeer | None, claimed_vendor: str,
                     record: tuple[str, object] | None) -> Refusal | None:
    """None when `peer` may act for `claimed_vendor`; otherwise the first reason it may not.
    `record`: (current certificate serial, revoked at or None) of the peer's vendor (`PaygStore.vendor_cert`)."""
    if peer is None:
        return Refusal(VENDOR_NOT_AUTHENTICATED, "no vendor client certificate on this call (a gateway's "
                                                 "certificate does not sell credit)")
    if claimed_vendor != peer.vendor_id:
        return Refusal(VENDOR_IDENTITY_MISMATCH, f"certificate of vendor {peer.vendor_id} cannot act for vendor "
                                                 f"{claimed_vendor!r}")
    if record is None:
        return Refusal(VENDOR_UNKNOWN, f"vendor {peer.vendor_id} has no client certificate on record here")
    serial, revoked_at = record
    if revoked_at is not None:
        return Refusal(VENDOR_REVOKED, f"vendor {peer.vendor_id}: certificate revoked at {revoked_at.isoformat()}")
    if serial != peer.serial:
        return Refusal(VENDOR_CERTIFICATE_SUPERSEDED, f"vendor {peer.vendor_id}: certificate serial {peer.serial} is "
                                                      f"not the current one (serial {serial})")
    return None


def issue_vendor_certificate(store: S.PaygStore, keys: pki.HeadendPki, vendor_id: str, public_key, now):
    """A vendor's mutual-TLS client certificate from the head-end CA for `public_key` (ECDSA P-256);
    its serial becomes the vendor's current one (an earlier certificate is superseded). The vendor
    must have a contract (`vendors add`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    L.vendor_receivable(vendor_id)                      # the ledger's id rule: non-empty, no ':' or blanks
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meterlink"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "vendor"),
                      x509.NameAttribute(NameOID.COMMON_NAME, vendor_id)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(keys.ca_cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - pki.CLOCK_SKEW).not_valid_after(now + pki.CLIENT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(VENDOR_URI_PREFIX + vendor_id)]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(keys.ca_key.public_key()),
                           critical=False)
            .sign(keys.ca_key, hashes.SHA256()))
    store.record_vendor_cert(vendor_id, format(cert.serial_number, "x"), now)
    return cert


VENDOR_FILES = ("vendor.key", "vendor.crt", "ca.crt")


def write_vendor_identity(store: S.PaygStore, keys: pki.HeadendPki, vendor_id: str, directory, now):
    """Make a key pair for vendor `vendor_id`, issue its certificate and write ``vendor.key`` (0600),
    ``vendor.crt`` and the CA's ``ca.crt`` into `directory`, to hand to the vendor; returns the directory."""
    from pathlib import Path
    d = Path(directory)
    key = pki.new_tls_key()
    cert = issue_vendor_certificate(store, keys, vendor_id, key.public_key(), now)
    pki.write_private(d / "vendor.key", pki.private_key_pem(key))
    pki.write_public(d / "vendor.crt", pki.cert_pem(cert))
    pki.write_public(d / "ca.crt", keys.ca_pem)
    return d


def vendor_channel_credentials(directory) -> grpc.ChannelCredentials:
    """A vendor client's mutual-TLS credentials from `write_vendor_identity`'s directory."""
    from pathlib import Path
    d = Path(directory)
    return grpc.ssl_channel_credentials(root_certificates=(d / "ca.crt").read_bytes(),
                                        private_key=(d / "vendor.key").read_bytes(),
                                        certificate_chain=(d / "vendor.crt").read_bytes())


class VendingService(payg_pb2_grpc.VendingServicer):
    """Sale authorisation for authenticated vendors: one store transaction per call, which also
    checks the caller's vendor certificate (`authorise_vendor`) before anything is stored."""

    def __init__(self, store: S.PaygStore, clock: Clock, *, token_key=None) -> None:
        self.store, self.clock, self.token_key = store, clock, token_key
        self._peers: dict = {}

    def _peer(self, context) -> VendorPeer | None:
        """`vendor_peer_of`, memoised per client certificate."""
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return None
        pem = pems[0]
        if pem not in self._peers:
            if len(self._peers) >= 4096:
                self._peers.clear()
            self._peers[pem] = vendor_peer_of(context)
        return self._peers[pem]

    def _check(self, request, context) -> None:
        """Refuse the call unless it comes from the vendor it names (inside the call's transaction)."""
        peer = self._peer(context)
        refusal = authorise_vendor(peer, request.vendor_id,
                                   self.store.vendor_cert(peer.vendor_id) if peer is not None else None)
        if refusal is not None:
            log.warning("vending refused %s: %s", refusal.reason, refusal.message)
            context.set_trailing_metadata(((REFUSAL_METADATA, refusal.reason),))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{refusal.reason}: {refusal.message}")

    def Challenge(self, request, context):
        with self.store.transaction():
            self._check(request, context)
            return payg_pb2.ChallengeReply(challenge=self.store.issue_challenge(self.clock.now()))

    def Authorise(self, request, context):
        now = _ms(self.clock.now())
        sale = V.SaleRequest(request.sale_id, request.vendor_id, request.card_id, request.account_id,
                             request.amount_minor, request.currency, request.challenge, request.card_signature)
        with self.store.transaction():
            self._check(request, context)
            result = self.store.authorise(sale, now)
            if not result.authorised:
                return payg_pb2.AuthoriseReply(authorised=False, reason=result.reason.value, detail=result.detail)
            token = ""
            if request.meter_id and self.token_key is not None:
                try:
                    token = S.token_for_sale(self.store, request.vendor_id, request.sale_id, request.meter_id,
                                             self.token_key, now).encode()
                except ValidationError as exc:
                    log.warning("sale %s/%s authorised, token not issued: %s", request.vendor_id, request.sale_id,
                                exc)
        return payg_pb2.AuthoriseReply(authorised=True, commission_minor=result.sale.commission_minor,
                                       vat_on_commission_minor=result.sale.vat_on_commission_minor, token=token)

    def Reverse(self, request, context):
        with self.store.transaction():
            self._check(request, context)
            result = self.store.reverse(request.vendor_id, request.sale_id, request.reversal_id,
                                        _ms(self.clock.now()), request.reason)
        if isinstance(result, V.Refusal):
            return payg_pb2.ReverseReply(reversed=False, reason=result.reason.value, detail=result.detail)
        return payg_pb2.ReverseReply(reversed=True)


@dataclass
class PaygServices:
    credit_control: CreditControlService
    vending: VendingService


def add_to_server(server: grpc.Server, store: S.PaygStore, clock: Clock, policy: CC.GrantPolicy | None = None, *,
                  token_key=None, registry=None, auth=None) -> PaygServices:
    """Register both PAYG services on `server` (before it starts). `registry`: check each credit-control
    call's gateway and meter (mutual TLS); `auth`: the server's `GatewayAuthInterceptor`, whose
    exemptions get the Vending methods (vendors hold no gateway certificate) and, when `registry`
    is given, the CreditControl methods (checked by the servicer instead, refusals counted in `auth`)."""
    cc = CreditControlService(store, clock, policy or CC.GrantPolicy(), token_key=token_key, registry=registry,
                              auth=auth)
    vending = VendingService(store, clock, token_key=token_key)
    payg_pb2_grpc.add_CreditControlServicer_to_server(cc, server)
    payg_pb2_grpc.add_VendingServicer_to_server(vending, server)
    server.drains = [*getattr(server, "drains", ()), cc.engine.drain]      # stop_server waits for the engine
    executor = getattr(server, "executor", None)
    if executor is not None:      # an open stream holds a worker thread: leave two for the unary calls
        cc.max_streams = max(1, executor._max_workers - 2)
    metrics = getattr(server, "metrics", None)
    if metrics is not None:
        metrics.registry.register(_CreditControlCollector(cc))
    if auth is not None:
        exempt = frozenset(VENDING_METHODS)
        if registry is not None:            # the servicer checks the gateway itself (`_check`)
            exempt |= frozenset(CREDIT_CONTROL_METHODS)
        auth.exempt = frozenset(auth.exempt) | exempt
    return PaygServices(cc, vending)


def serve_hook(database: str, clock: Clock, *, token_key_path: str | None = None,
               policy: CC.GrantPolicy | None = None):
    """A `service.SERVER_HOOKS` entry for `meterlink-headend serve --payg`: registers both PAYG
    services on every server `make_server` builds, guarded by the gateway interceptor's registry
    when the server has one (mutual TLS)."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization

    from meterlink.errors import ConfigError

    from .gatewayauth import GatewayAuthInterceptor

    key = None
    if token_key_path:
        try:
            key = serialization.load_pem_private_key(Path(token_key_path).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"PAYG token signing key: {exc}", path=token_key_path) from None
    store = S.PaygStore(database)

    def hook(server: grpc.Server, interceptors=()) -> None:
        auth = next((i for i in interceptors if isinstance(i, GatewayAuthInterceptor)), None)
        server.payg_services = add_to_server(server, store, clock, policy, token_key=key,
                                             registry=auth.registry if auth is not None else None, auth=auth)
    hook.store = store
    return hook


def policy_from_args(args) -> CC.GrantPolicy:
    """The grant policy from `serve --payg-*` options (defaults: `GrantPolicy()`)."""
    d = CC.GrantPolicy()
    return CC.GrantPolicy(
        validity=timedelta(seconds=args.payg_grant_validity_s) if args.payg_grant_validity_s else d.validity,
        min_grant_minor=args.payg_min_grant if args.payg_min_grant is not None else d.min_grant_minor,
        max_grant_minor=args.payg_max_grant if args.payg_max_grant is not None else d.max_grant_minor,
        initial_burn_rate_minor_per_h=(args.payg_burn_rate if args.payg_burn_rate is not None
                                       else d.initial_burn_rate_minor_per_h))


__all__ = ["CREDIT_CONTROL_METHODS", "CreditControlService", "PaygServices", "VENDING_METHODS", "VENDOR_FILES",
           "VENDOR_URI_PREFIX", "VendingService", "VendorPeer", "add_to_server", "answer_to_proto",
           "authorise_vendor", "issue_vendor_certificate", "policy_from_args", "request_from_proto", "serve_hook",
           "vendor_channel_credentials", "vendor_of", "vendor_peer_of", "write_vendor_identity"]
