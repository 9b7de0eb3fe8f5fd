"""Who may call the head-end: the authenticated gateway behind each mutual-TLS call, checked against the registry; never touches readings.

`authorise` is the pure rule; `GatewayAuthInterceptor` is the shell that reads the peer certificate
from the TLS session (``context.auth_context()``), asks the registry and refuses with
PERMISSION_DENIED, the reason (an `AccessRefusal` name) in the trailing metadata
``meterlink-refusal`` and at the start of the details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc

from meterlink import pki
from meterlink.chain import wire_meter_id
from meterlink.v1 import enrol_pb2

from .registry import GatewayRecord, GatewayRegistry

log = logging.getLogger("meterlink.headend.auth")

REFUSAL_METADATA = "meterlink-refusal"
NO_CLIENT_CERTIFICATE = enrol_pb2.AccessRefusal.Name(enrol_pb2.ACCESS_REFUSAL_NO_CLIENT_CERTIFICATE)
UNKNOWN_GATEWAY = enrol_pb2.AccessRefusal.Name(enrol_pb2.ACCESS_REFUSAL_UNKNOWN_GATEWAY)
GATEWAY_REVOKED = enrol_pb2.AccessRefusal.Name(enrol_pb2.ACCESS_REFUSAL_GATEWAY_REVOKED)
CERTIFICATE_SUPERSEDED = enrol_pb2.AccessRefusal.Name(enrol_pb2.ACCESS_REFUSAL_CERTIFICATE_SUPERSEDED)
IDENTITY_MISMATCH = enrol_pb2.AccessRefusal.Name(enrol_pb2.ACCESS_REFUSAL_IDENTITY_MISMATCH)
METER_NOT_PROVISIONED = enrol_pb2.AccessRefusal.Name(enrol_pb2.ACCESS_REFUSAL_METER_NOT_PROVISIONED)


@dataclass(frozen=True)
class Peer:
    """The gateway a TLS session authenticated: name and serial (hex) of its client certificate."""
    name: str
    serial: str


@dataclass(frozen=True)
class Refusal:
    reason: str     # an AccessRefusal enum name
    message: str


def authorise(record: GatewayRecord | None, peer: Peer, claimed_gateway: str | None,
              meter_ids: Iterable[str], provisioned: frozenset[str] | None = None) -> Refusal | None:
    """None when `peer` may make this call; otherwise the first reason it may not.

    `claimed_gateway`: the gateway_id the request speaks for (None if the call has none);
    `meter_ids`: meters the request carries records for; `provisioned`: the meters of the gateway
    (default: `record.meters`).
    """
    if record is None:
        return Refusal(UNKNOWN_GATEWAY, f"gateway {peer.name} is not registered at this head-end")
    if record.revoked:
        return Refusal(GATEWAY_REVOKED, f"gateway {peer.name} was revoked at {record.revoked_at.isoformat()}")
    if record.cert_serial != peer.serial:
        return Refusal(CERTIFICATE_SUPERSEDED, f"gateway {peer.name}: certificate serial {peer.serial} is not the "
                                               f"current one (re-enrolled; serial {record.cert_serial})")
    if claimed_gateway is not None and claimed_gateway != peer.name:
        return Refusal(IDENTITY_MISMATCH, f"certificate of gateway {peer.name} cannot speak for gateway "
                                          f"{claimed_gateway!r}")
    allowed = record.meters if provisioned is None else provisioned
    for meter in meter_ids:
        if meter not in allowed:
            return Refusal(METER_NOT_PROVISIONED, f"gateway {peer.name}: meter {meter} is not provisioned to it")
    return None


def peer_of(context: grpc.ServicerContext) -> Peer | None:
    """The gateway identity of the verified client certificate on this call, or None."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        cert = pki.load_cert(pems[0], "client certificate")
        return Peer(pki.gateway_name_of(cert), format(cert.serial_number, "x"))
    except pki.PkiError:
        return None


def request_meters(request) -> list[str]:
    """Meter ids a request carries records for (any `records[*].<body>.meter_id`, and the meter of each
    canonical-bytes record in `chain_records`), in first-seen order."""
    seen: dict[str, None] = {}
    for rec in getattr(request, "records", ()):
        which = rec.WhichOneof("body") if hasattr(rec, "WhichOneof") else None
        body = getattr(rec, which) if which else None
        meter = getattr(body, "meter_id", None)
        if meter:
            seen.setdefault(meter, None)
    for raw in getattr(request, "chain_records", ()):
        meter = wire_meter_id(raw)
        if meter:
            seen.setdefault(meter, None)
    return list(seen)


class GatewayAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every unary call on the mTLS server unless the peer certificate's gateway is allowed.

    `exempt`: full method names that need no gateway identity (none by default).
    `on_refusal(reason)`: called for each refusal (e.g. a Prometheus counter's labels(reason).inc).
    """

    def __init__(self, registry: GatewayRegistry, exempt: Iterable[str] = (),
                 on_refusal: Callable[[str], None] | None = None) -> None:
        self.registry, self.exempt, self.on_refusal = registry, frozenset(exempt), on_refusal
        self.refusals: dict[str, int] = {}

    def check(self, request, context) -> Peer:
        peer = peer_of(context)
        if peer is None:
            self._refuse(context, Refusal(NO_CLIENT_CERTIFICATE, "no verified gateway client certificate"))
        claimed = getattr(request, "gateway_id", None)
        refusal = authorise(self.registry.get(peer.name), peer, claimed, request_meters(request))
        if refusal is not None:
            self._refuse(context, refusal)
        return peer

    def _checked(self, requests, context):
        for request in requests:
            self.check(request, context)
            yield request

    def _refuse(self, context, refusal: Refusal):
        self.refusals[refusal.reason] = self.refusals.get(refusal.reason, 0) + 1
        if self.on_refusal:
            self.on_refusal(refusal.reason)
        log.warning("refused %s: %s: %s", context.peer(), refusal.reason, refusal.message)
        context.set_trailing_metadata(((REFUSAL_METADATA, refusal.reason),))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{refusal.reason}: {refusal.message}")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        kw = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request, context):
                self.check(request, context)
                return inner_uu(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request, context):
                self.check(request, context)
                yield from inner_us(request, context)
            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        # Client-streaming calls: the identity is checked before the first message is read, and every
        # message as it is read (its gateway_id and meters, like a unary request).
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            def stream_unary(requests, context):
                self.check(None, context)
                return inner_su(self._checked(requests, context), context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner_ss = handler.stream_stream

        def stream_stream(requests, context):
            self.check(None, context)
            yield from inner_ss(self._checked(requests, context), context)
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def refusal_of(exc: grpc.RpcError) -> str | None:
    """The AccessRefusal name a refused call carried (client side), or None."""
    for key, value in (exc.trailing_metadata() or ()):
        if key == REFUSAL_METADATA:
            return value
    return None
