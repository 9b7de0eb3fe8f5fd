"""Gateway enrolment over gRPC and the head-end's TLS credentials; the servicer is thin, key work is in meterlink.pki, records in the registry.

The enrolment port is TLS with the head-end's server certificate only (a gateway has no client
certificate yet). Everything else is served on the mutual-TLS port (`mtls_server_credentials`).
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc

from meterlink import pki
from meterlink.clock import Clock
from meterlink.errors import MeterlinkError
from meterlink.v1 import config_pb2_grpc, enrol_pb2, enrol_pb2_grpc

from .configpub import ConfigService
from .gatewayauth import GatewayAuthInterceptor
from .registry import EnrolmentRefused, GatewayRegistry

log = logging.getLogger("meterlink.headend.enrolment")


def mtls_server_credentials(keys: pki.HeadendPki) -> grpc.ServerCredentials:
    """Server credentials that demand a client certificate issued by the head-end CA."""
    return grpc.ssl_server_credentials([(keys.server_key_pem(), keys.server_chain_pem())],
                                       root_certificates=keys.ca_pem, require_client_auth=True)


def tls_server_credentials(keys: pki.HeadendPki) -> grpc.ServerCredentials:
    """Server-authenticated TLS only: the enrolment port."""
    return grpc.ssl_server_credentials([(keys.server_key_pem(), keys.server_chain_pem())])


def enroll(registry: GatewayRegistry, keys: pki.HeadendPki, request: enrol_pb2.EnrollRequest,
           now) -> enrol_pb2.EnrollResponse:
    """Check the request, consume the code and issue the certificate (one registry transaction)."""
    csr = pki.load_csr(request.csr_der)
    pki.verify_signature(request.signing_public_key, request.csr_der, request.signing_proof,
                         "enrolment request's proof of the Ed25519 signing key")

    def issue(name: str):
        cert = pki.issue_client_cert(keys.ca_key, keys.ca_cert, csr, name, now)
        return format(cert.serial_number, "x"), bytes(request.signing_public_key), cert

    name, cert = registry.enrol(request.code, now, issue)
    log.info("gateway %s enrolled: certificate serial %x, signing key %s", name, cert.serial_number,
             pki.key_id(request.signing_public_key))
    return enrol_pb2.EnrollResponse(gateway_id=name, certificate_pem=pki.cert_pem(cert),
                                    ca_certificate_pem=keys.ca_pem, headend_signing_key=keys.signing_public)


class EnrolmentService(enrol_pb2_grpc.EnrolmentServicer):
    """`on_enrolled(name, signing_public_key, now)` runs after each enrolment (e.g. trust the key for chain heads)."""

    def __init__(self, registry: GatewayRegistry, keys: pki.HeadendPki, clock: Clock,
                 on_enrolled: Callable | None = None) -> None:
        self.registry, self.keys, self.clock, self.on_enrolled = registry, keys, clock, on_enrolled

    def Enroll(self, request, context):
        try:
            now = self.clock.now()
            response = enroll(self.registry, self.keys, request, now)
            if self.on_enrolled:
                self.on_enrolled(response.gateway_id, bytes(request.signing_public_key), now)
            return response
        except EnrolmentRefused as exc:
            log.warning("enrolment refused from %s: %s", context.peer(), exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except MeterlinkError as exc:
            log.warning("bad enrolment request from %s: %s", context.peer(), exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def make_enrolment_server(registry: GatewayRegistry, keys: pki.HeadendPki, clock: Clock, listen: str,
                          workers: int = 2, on_enrolled: Callable | None = None) -> tuple[grpc.Server, int]:
    """Build (not start) the server-TLS enrolment server; returns it and the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    enrol_pb2_grpc.add_EnrolmentServicer_to_server(EnrolmentService(registry, keys, clock, on_enrolled), server)
    port = server.add_secure_port(listen, tls_server_credentials(keys))
    if port == 0:
        raise MeterlinkError(f"cannot listen on {listen} (enrolment)")
    return server, port


@dataclass
class SecureHeadend:
    """The head-end's two servers: mutual TLS (sync, config pull) and server-TLS enrolment (built, not started)."""
    server: grpc.Server
    port: int
    enrol_server: grpc.Server
    enrol_port: int
    auth: GatewayAuthInterceptor

    def start(self) -> "SecureHeadend":
        self.server.start()
        self.enrol_server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        from .service import stop_server
        self.enrol_server.stop(grace)
        stop_server(self.server, grace)      # handlers have returned before the caller closes the stores


def make_secure_servers(repo, clock: Clock, keys: pki.HeadendPki, registry: GatewayRegistry, listen: str,
                        enrol_listen: str, metrics=None, chain=None, workers: int = 8) -> SecureHeadend:
    """Mutual-TLS sync + config server guarded by the registry, and the enrolment server beside it.

    Chain heads are verified against the Ed25519 key each gateway enrolled with
    (`GatewayRegistry.signing_public_key`), so enrolment is all it takes to trust a gateway's key.
    """
    from .service import make_server

    on_refusal = (lambda reason: metrics.refusals.labels(reason).inc()) if metrics is not None else None
    auth = GatewayAuthInterceptor(registry, on_refusal=on_refusal)
    server, port = make_server(repo, clock, listen, workers=workers, chain=chain, metrics=metrics,
                               credentials=mtls_server_credentials(keys), interceptors=(auth,),
                               public_key=registry.signing_public_key)
    config_pb2_grpc.add_ConfigServicer_to_server(ConfigService(registry, keys.signing_key, clock), server)
    enrol_server, enrol_port = make_enrolment_server(registry, keys, clock, enrol_listen)
    return SecureHeadend(server, port, enrol_server, enrol_port, auth)
