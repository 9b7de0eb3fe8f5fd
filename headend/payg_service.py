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

Vending has no gateway identity: its methods are exempted from the gateway interceptor
(`VENDING_METHODS`); the card's signature over the head-end's challenge authenticates the sale.
The CreditControl methods are exempted from it too when the servicer has the registry
(`CREDIT_CONTROL_METHODS`): the servicer makes the same check itself, with the request's meter,
once per call instead of twice (a parsed certificate per call and one plain registry read).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import grpc

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
                          "/meterlink.v1.CreditControl/Terminate")
METER_NOT_BOUND = "METER_NOT_BOUND"

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
        tokens=tuple((t.reference, t.amount_minor) for t in u.top_ups))


def answer_to_proto(answer: CC.CreditControlAnswer, tokens: list[str], balance_minor: int) -> payg_pb2.CreditControlAnswer:
    pb = payg_pb2.CreditControlAnswer(session_id=answer.session_id, request_number=answer.request_number,
                                      result_code=int(answer.result_code),
                                      final_unit_action=_FUA_TO_PB[answer.final_unit_action],
                                      detail=answer.detail, tokens=tokens, balance_minor=balance_minor)
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
        self.cc = CC.CreditControl(store, S.SqlSessionStore(store), policy, store.vat,
                                   account_active=self._active, tokens=S.StoreTokenReservations(store))

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
            balance = -self.store.balance(L.prepaid(req.account_id), req.currency)
            lists = self._card_lists(req, bytes(request.card_lists_digest), now)
        pb = answer_to_proto(out.answer, tokens, balance)
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
        entries = tuple(T.CardEntry(c.card_id, req.meter_id, c.public_key) for c, _ in cards)
        black = frozenset(c.card_id for c, bl in cards if V.blacklisted(bl, c.card_id, now))
        version = to_ms(now)
        card_list = T.CardList(version, now, entries)
        blacklist = T.Blacklist(version, now, black)
        if T.card_lists_digest(card_list, blacklist) == digest:
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

    def Reserve(self, request, context):
        return self._handle(request, context, CC.RequestType.INITIAL_REQUEST)

    def Update(self, request, context):
        return self._handle(request, context, CC.RequestType.UPDATE_REQUEST)

    def Terminate(self, request, context):
        return self._handle(request, context, CC.RequestType.TERMINATION_REQUEST)


class VendingService(payg_pb2_grpc.VendingServicer):
    """Sale authorisation for vendors: one store transaction per sale (see `PaygStore.authorise`)."""

    def __init__(self, store: S.PaygStore, clock: Clock, *, token_key=None) -> None:
        self.store, self.clock, self.token_key = store, clock, token_key

    def Challenge(self, request, context):
        return payg_pb2.ChallengeReply(challenge=self.store.issue_challenge(self.clock.now()))

    def Authorise(self, request, context):
        now = _ms(self.clock.now())
        sale = V.SaleRequest(request.sale_id, request.vendor_id, request.card_id, request.account_id,
                             request.amount_minor, request.currency, request.challenge, request.card_signature)
        result = self.store.authorise(sale, now)
        if not result.authorised:
            return payg_pb2.AuthoriseReply(authorised=False, reason=result.reason.value, detail=result.detail)
        token = ""
        if request.meter_id and self.token_key is not None:
            try:
                token = S.token_for_sale(self.store, request.vendor_id, request.sale_id, request.meter_id,
                                         self.token_key, now).encode()
            except ValidationError as exc:
                log.warning("sale %s/%s authorised, token not issued: %s", request.vendor_id, request.sale_id, exc)
        return payg_pb2.AuthoriseReply(authorised=True, commission_minor=result.sale.commission_minor,
                                       vat_on_commission_minor=result.sale.vat_on_commission_minor, token=token)

    def Reverse(self, request, context):
        result = self.store.reverse(request.vendor_id, request.sale_id, request.reversal_id, _ms(self.clock.now()),
                                    request.reason)
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


__all__ = ["CREDIT_CONTROL_METHODS", "CreditControlService", "PaygServices", "VENDING_METHODS", "VendingService", "add_to_server",
           "answer_to_proto", "policy_from_args", "request_from_proto", "serve_hook"]
