"""Gateway enrolment and identity: keys made on the device, the CSR, the pinned head-end CA, mutual-TLS channels; never sends a reading.

State directory (default ``var/pki``; files with keys are 0600)::

    tls.key      ECDSA P-256 private key of the gateway's client certificate
    signing.key  Ed25519 private key that signs the chain head of every pushed batch (or the daemon's
                 key beside the journal, when enrolling with --config: the key must be the one the
                 daemon signs with, and identity.json records its path)
    tls.crt      client certificate issued by the head-end CA (name in CN and SAN URI)
    ca.crt       the head-end CA (trust anchor of every connection to the head-end)
    headend-config.pub  the head-end's Ed25519 configuration key (32 raw bytes)
    identity.json       {"gateway": NAME, "headend": HOST:PORT, "ca_fingerprint": HEX}

Keys are created once, before the first enrolment, and reused if enrolment is retried.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from meterlink import pki
from meterlink.errors import DeviceError
from meterlink.v1 import enrol_pb2, enrol_pb2_grpc

DEFAULT_STATE_DIR = "var/pki"
# Python 3.11's ssl keeps the presented chain behind the private `get_unverified_chain` (public in 3.13).
_ENCODING_DER = getattr(ssl, "ENCODING_DER", None) or getattr(__import__("_ssl"), "ENCODING_DER", 2)


class EnrolmentError(DeviceError):
    """Enrolment failed: head-end unreachable, CA fingerprint mismatch, code refused (message says which)."""


@dataclass(frozen=True)
class GatewayIdentity:
    """What a gateway needs to talk to its head-end after enrolment."""
    name: str
    tls_key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    signing_key: object            # Ed25519PrivateKey
    headend_config_key: bytes      # raw Ed25519 public key
    state_dir: Path

    @property
    def signing_public(self) -> bytes:
        return pki.raw_public_key(self.signing_key)


def ensure_keys(state_dir: str | Path, signing_key_path: str | Path | None = None):
    """Load or create (0600) the device's TLS and signing keys -> (tls_key, signing_key)."""
    d = Path(state_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    sk = Path(signing_key_path) if signing_key_path else d / "signing.key"
    if not (d / "tls.key").exists():
        pki.write_private(d / "tls.key", pki.private_key_pem(pki.new_tls_key()))
    if not sk.exists():
        pki.write_private(sk, pki.private_key_pem(pki.new_signing_key()))
    return (pki.load_private_key((d / "tls.key").read_bytes(), str(d / "tls.key")),
            pki.load_private_key(sk.read_bytes(), str(sk)))


def build_request(code: str, tls_key, signing_key, name_hint: str = "gateway") -> enrol_pb2.EnrollRequest:
    """The Enroll request: CSR for the TLS key, the Ed25519 public key and its proof over the CSR."""
    der = pki.csr_der(pki.build_csr(tls_key, name_hint))
    return enrol_pb2.EnrollRequest(code=code, csr_der=der, signing_public_key=pki.raw_public_key(signing_key),
                                   signing_proof=pki.sign(signing_key, der))


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EnrolmentError(f"head-end address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_ca(address: str, fingerprint: str | None, timeout_s: float = 10.0) -> tuple[bytes, str]:
    """The CA certificate the head-end's TLS handshake presents -> (CA PEM, its fingerprint).

    With `fingerprint`, the chain must contain a certificate with exactly that SHA-256 and the
    server certificate must be signed by it (pinning). Without it, the self-signed root of the
    presented chain is taken on trust (trust on first use) and its fingerprint returned so the
    caller can show it for comparison.
    """
    host, port = _split(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE       # verified below against the pinned fingerprint
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            chain = [c.public_bytes(_ENCODING_DER) if hasattr(c, "public_bytes") else c
                     for c in tls._sslobj.get_unverified_chain()]
    except (OSError, ssl.SSLError) as exc:
        raise EnrolmentError(f"head-end {address}: TLS handshake failed ({exc})") from None
    from cryptography import x509
    certs = [x509.load_der_x509_certificate(bytes(d)) for d in chain]
    if not certs:
        raise EnrolmentError(f"head-end {address}: presented no certificate")
    if fingerprint:
        want = pki.normalise_fingerprint(fingerprint)
        matches = [c for c in certs if pki.fingerprint(c) == want]
        if not matches:
            raise EnrolmentError(f"head-end {address}: no certificate with fingerprint {want} in its chain "
                                 f"(got {', '.join(pki.fingerprint(c)[:16] for c in certs)}); refusing to enrol")
        ca = matches[0]
    else:
        roots = [c for c in certs if c.issuer == c.subject]
        if not roots:
            raise EnrolmentError(f"head-end {address}: its chain has no self-signed CA; pass --ca-fingerprint")
        ca = roots[0]
    try:
        certs[0].verify_directly_issued_by(ca)
    except Exception:
        raise EnrolmentError(f"head-end {address}: server certificate is not signed by CA "
                             f"{pki.fingerprint(ca)[:16]}") from None
    return pki.cert_pem(ca), pki.fingerprint(ca)


def enroll(address: str, code: str, state_dir: str | Path = DEFAULT_STATE_DIR, ca_fingerprint: str | None = None,
           server_name: str | None = None, timeout_s: float = 10.0,
           signing_key_path: str | Path | None = None) -> GatewayIdentity:
    """Enrol this device at the head-end's enrolment port; writes the state directory, returns the identity.

    `signing_key_path`: the Ed25519 chain-signing key to register (default `state_dir`/signing.key).
    """
    d = Path(state_dir)
    sk_path = Path(signing_key_path).resolve() if signing_key_path else d / "signing.key"
    tls_key, signing_key = ensure_keys(d, sk_path)
    ca_pem, fp = fetch_ca(address, ca_fingerprint, timeout_s)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=options)
    try:
        resp = enrol_pb2_grpc.EnrolmentStub(channel).Enroll(build_request(code, tls_key, signing_key),
                                                             timeout=timeout_s)
    except grpc.RpcError as exc:
        raise EnrolmentError(f"enrolment at {address} refused: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()
    ca = pki.load_cert(ca_pem)
    if resp.ca_certificate_pem.strip() != ca_pem.strip():
        raise EnrolmentError(f"head-end {address} answered with another CA than the pinned {fp[:16]}")
    cert = pki.load_cert(resp.certificate_pem, "issued certificate")
    if pki.gateway_name_of(cert) != resp.gateway_id:
        raise EnrolmentError(f"issued certificate names {pki.gateway_name_of(cert)!r}, not {resp.gateway_id!r}")
    if cert.public_key().public_numbers() != tls_key.public_key().public_numbers():
        raise EnrolmentError("issued certificate is not for this device's key")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise EnrolmentError("issued certificate is not signed by the pinned CA") from None
    pki.ed25519_public(resp.headend_signing_key, "head-end configuration key")
    pki.write_public(d / "ca.crt", ca_pem)
    pki.write_public(d / "tls.crt", resp.certificate_pem)
    pki.write_public(d / "headend-config.pub", resp.headend_signing_key)
    pki.write_public(d / "identity.json", json.dumps({"gateway": resp.gateway_id, "headend": address,
                                                       "ca_fingerprint": fp, "signing_key": str(sk_path)},
                                                      indent=2).encode() + b"\n")
    return load_identity(d)


def load_identity(state_dir: str | Path = DEFAULT_STATE_DIR) -> GatewayIdentity:
    """The enrolled identity in `state_dir`, or EnrolmentError naming what is missing."""
    d = Path(state_dir)
    missing = [n for n in ("tls.key", "tls.crt", "ca.crt", "headend-config.pub", "identity.json")
               if not (d / n).exists()]
    if missing:
        raise EnrolmentError(f"{d}: not enrolled (missing {', '.join(missing)}); run meterlink-gateway enroll")
    meta = json.loads((d / "identity.json").read_text())
    sk = Path(meta.get("signing_key") or d / "signing.key")
    if not sk.exists():
        raise EnrolmentError(f"{d}: the enrolled signing key {sk} is missing; enrol again")
    signing = pki.load_private_key(sk.read_bytes(), str(sk))
    return GatewayIdentity(meta["gateway"], (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes(),
                           (d / "ca.crt").read_bytes(), signing, (d / "headend-config.pub").read_bytes(), d)


def channel_credentials(identity: GatewayIdentity) -> grpc.ChannelCredentials:
    """Mutual TLS: trust only the head-end CA, present the gateway's client certificate."""
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.tls_key_pem,
                                        certificate_chain=identity.cert_pem)


def secure_channel(address: str, identity: GatewayIdentity, server_name: str | None = None) -> grpc.Channel:
    """A mutual-TLS channel to the head-end; `server_name` overrides the name checked in its certificate."""
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, channel_credentials(identity), options=options)


def headend_credentials(config) -> grpc.ChannelCredentials | None:
    """Mutual-TLS credentials for the `Pusher` when gateway.toml has ``[headend] pki_dir``, else None (plaintext)."""
    pki_dir = getattr(config, "headend_pki_dir", None)
    return channel_credentials(load_identity(pki_dir)) if pki_dir else None


def headend_channel(config) -> grpc.Channel | None:
    """The mutual-TLS channel a GatewayConfig asks for (``[headend] pki_dir``), or None for plaintext."""
    pki_dir = getattr(config, "headend_pki_dir", None)
    if not pki_dir or not config.headend:
        return None
    return secure_channel(config.headend, load_identity(pki_dir), getattr(config, "headend_server_name", None))


# ------------------------------------------------------------------------------------------ CLI

def cmd_enroll(args) -> int:
    state_dir, signing_key_path = args.state_dir, None
    if args.config:
        # enrol the key the daemon signs with, into the directory the daemon reads ([headend] pki_dir)
        from .config import load_config
        from .daemon import signing_key_path as daemon_key_path
        config = load_config(args.config)
        signing_key_path = daemon_key_path(config)
        state_dir = state_dir or config.headend_pki_dir
        if not state_dir:
            raise EnrolmentError(f"{args.config}: [headend] pki_dir is not set (or pass --state-dir)")
    identity = enroll(args.headend, args.code, state_dir or DEFAULT_STATE_DIR, ca_fingerprint=args.ca_fingerprint,
                      server_name=args.server_name, signing_key_path=signing_key_path)
    meta = json.loads((identity.state_dir / "identity.json").read_text())
    if not args.ca_fingerprint:
        print(f"WARNING: no --ca-fingerprint given: trusted the head-end CA on first use; compare "
              f"{meta['ca_fingerprint']} with `meterlink-headend gateways add` output", flush=True)
    cert = pki.load_cert(identity.cert_pem)
    print(f"enrolled as gateway {identity.name}: certificate serial {cert.serial_number:x}, valid until "
          f"{cert.not_valid_after_utc.isoformat().replace('+00:00', 'Z')}; signing key "
          f"{pki.key_id(identity.signing_public)}; state in {identity.state_dir}")
    return 0


def cmd_pull_config(args) -> int:
    from .configpull import ConfigPuller
    identity = load_identity(args.state_dir)
    channel = secure_channel(args.headend, identity, args.server_name)
    try:
        state = ConfigPuller.for_identity(channel, identity).pull_once()
    finally:
        channel.close()
    print(json.dumps({"gateway": identity.name, "version": state.version, "meters": list(state.meters),
                      "tariffs": sorted(state.tariffs), "blacklist": list(state.blacklist)}))
    return 0


def add_parsers(sub) -> None:
    """Register `enroll` and `pull-config` on the gateway CLI's subparsers."""
    en = sub.add_parser("enroll", help="make this device's keys and get a client certificate from the head-end",
                        epilog="example: meterlink-gateway enroll --headend headend.example:50052 --code "
                               "K7QM-2XWD-9PLA-4TRE-HN3C --ca-fingerprint 5f3c...e1 --state-dir /var/lib/meterlink/pki")
    en.add_argument("--headend", required=True, help="HOST:PORT of the head-end's enrolment port")
    en.add_argument("--code", required=True, help="one-time code from `meterlink-headend gateways add`")
    en.add_argument("--ca-fingerprint", help="SHA-256 of the head-end CA, as printed by `gateways add` "
                                             "(without it the CA is trusted on first use)")
    en.add_argument("--state-dir", help=f"keys and certificates (default: [headend] pki_dir of --config, "
                                        f"else {DEFAULT_STATE_DIR})")
    en.add_argument("--config", help="gateway.toml: enrol the daemon's chain-signing key into its [headend] pki_dir")
    en.add_argument("--server-name", help="name to check in the head-end certificate instead of HOST")
    en.set_defaults(func=cmd_enroll)
    pc = sub.add_parser("pull-config", help="pull, verify and apply the head-end's signed configuration delta",
                        epilog="example: meterlink-gateway pull-config --headend headend.example:50051 "
                               "--state-dir /var/lib/meterlink/pki")
    pc.add_argument("--headend", required=True, help="HOST:PORT of the head-end's mutual-TLS port")
    pc.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"enrolled identity (default {DEFAULT_STATE_DIR})")
    pc.add_argument("--server-name", help="name to check in the head-end certificate instead of HOST")
    pc.set_defaults(func=cmd_pull_config)
