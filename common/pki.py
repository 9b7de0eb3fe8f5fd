"""The head-end's own certificate authority and the key material of gateways (X.509 via `cryptography`); never opens a socket or reads a clock.

Choices (see docs/enrolment.md):
  * TLS keys and certificates are ECDSA P-256 with SHA-256 signatures: what every TLS stack,
    grpcio's BoringSSL included, accepts for server and client authentication in TLS 1.2 and 1.3.
  * Record and configuration signatures are Ed25519 (raw 32-byte public keys). A gateway therefore
    holds two keys made on the device: `tls.key` (P-256, its mTLS identity) and `signing.key`
    (Ed25519, signs its journal's chain head). Enrolment binds both to the gateway name: the CSR
    carries the TLS key, and the Ed25519 key signs the CSR bytes (proof of possession).
  * The head-end holds the CA key, its own TLS server key, and an Ed25519 key that signs
    configuration deltas; a gateway learns that public key at enrolment over the pinned channel.
  * The gateway name is the certificate's subject CN and a SAN URI `urn:meterlink:gateway:NAME`.

Every function takes `now` when time matters. Certificates are back-dated by `CLOCK_SKEW` so
that a gateway whose clock lags a little still accepts them.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ValidationError

CLOCK_SKEW = timedelta(days=1)
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=825)
CLIENT_VALIDITY = timedelta(days=825)
GATEWAY_URI_PREFIX = "urn:meterlink:gateway:"


class PkiError(ValidationError):
    """A certificate, request, key or signature is not acceptable (the message names which and why)."""


# ----------------------------------------------------------------------------------------- keys

def new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes, what: str = "private key"):
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{what}: not a PEM private key ({exc})") from None


def raw_public_key(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_public(raw: bytes, what: str = "Ed25519 public key") -> ed25519.Ed25519PublicKey:
    if len(raw) != 32:
        raise PkiError(f"{what}: expected 32 bytes, got {len(raw)}")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def key_id(raw_public: bytes) -> str:
    """Short name of an Ed25519 public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def sign(key: ed25519.Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify_signature(raw_public: bytes, data: bytes, signature: bytes, what: str) -> None:
    """Raise PkiError naming `what` unless `signature` is a valid Ed25519 signature of `data`."""
    try:
        ed25519_public(raw_public, what).verify(signature, data)
    except InvalidSignature:
        raise PkiError(f"{what}: signature does not verify with key {key_id(raw_public)}") from None


def write_private(path: str | Path, data: bytes) -> None:
    """Write key material readable by its owner only (0600), atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- certificates

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"{what}: not a PEM X.509 certificate ({exc})") from None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as lowercase hex: what `gateways add` prints and gateways pin."""
    return cert.fingerprint(hashes.SHA256()).hex()


def normalise_fingerprint(text: str) -> str:
    """Accept 'ab:cd:..', 'AB CD ..', 'sha256:abcd..' -> 'abcd..' (64 hex digits) or raise PkiError."""
    t = text.strip().lower()
    if t.startswith("sha256:"):
        t = t[7:]
    t = t.replace(":", "").replace(" ", "")
    if len(t) != 64 or any(c not in "0123456789abcdef" for c in t):
        raise PkiError(f"CA fingerprint {text!r}: expected 64 hex digits (SHA-256)")
    return t


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meterlink"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_ca(common_name: str, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA (P-256), valid CA_VALIDITY from `now` - CLOCK_SKEW."""
    key = new_tls_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, subject: x509.Name, public_key, sans: list, eku, now: datetime,
          validity: timedelta, serial: int | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + validity)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    return builder.sign(ca_key, hashes.SHA256())


def _san_entry(host: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(ca_key, ca_cert: x509.Certificate, public_key, hosts: list[str],
                      now: datetime) -> x509.Certificate:
    """The head-end's TLS server certificate; `hosts` become SANs (DNS names or IP addresses)."""
    if not hosts:
        raise PkiError("server certificate: at least one host name or address is needed")
    return _leaf(ca_key, ca_cert, _name(hosts[0]), public_key, [_san_entry(h) for h in hosts],
                 ExtendedKeyUsageOID.SERVER_AUTH, now, SERVER_VALIDITY)


def build_csr(tls_key: ec.EllipticCurvePrivateKey, gateway: str) -> x509.CertificateSigningRequest:
    return (x509.CertificateSigningRequestBuilder().subject_name(_name(gateway))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(GATEWAY_URI_PREFIX + gateway)]),
                           critical=False)
            .sign(tls_key, hashes.SHA256()))


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise PkiError(f"certificate request: not a DER CSR ({exc})") from None
    if not csr.is_signature_valid:
        raise PkiError("certificate request: its self-signature does not verify")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey) or \
            not isinstance(csr.public_key().curve, ec.SECP256R1):
        raise PkiError("certificate request: the key must be ECDSA P-256")
    return csr


def issue_client_cert(ca_key, ca_cert: x509.Certificate, csr: x509.CertificateSigningRequest, gateway: str,
                      now: datetime) -> x509.Certificate:
    """A gateway's mTLS client certificate for the key in `csr`; the name comes from the registry, not the CSR."""
    return _leaf(ca_key, ca_cert, _name(gateway), csr.public_key(),
                 [x509.UniformResourceIdentifier(GATEWAY_URI_PREFIX + gateway)],
                 ExtendedKeyUsageOID.CLIENT_AUTH, now, CLIENT_VALIDITY)


def gateway_name_of(cert: x509.Certificate) -> str:
    """The gateway name a client certificate speaks for (SAN URI, which must agree with the CN)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(f"certificate serial {cert.serial_number:x}: no subject alternative name") from None
    names = [u[len(GATEWAY_URI_PREFIX):] for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(GATEWAY_URI_PREFIX)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1 or cns != names:
        raise PkiError(f"certificate serial {cert.serial_number:x}: not a meterlink gateway certificate")
    return names[0]


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, now: datetime,
                     what: str = "certificate") -> None:
    """Raise PkiError unless `cert` is signed by `ca_cert` and valid at `now`."""
    if cert.issuer != ca_cert.subject:
        raise PkiError(f"{what}: issued by {cert.issuer.rfc4514_string()}, not by this CA")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{what}: not signed by CA {fingerprint(ca_cert)[:16]} ({exc or 'bad signature'})") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(f"{what}: not valid at {now.isoformat()} (valid {cert.not_valid_before_utc.isoformat()}"
                       f" .. {cert.not_valid_after_utc.isoformat()})")


# --------------------------------------------------------------------------- head-end key store

@dataclass(frozen=True)
class HeadendPki:
    """The head-end's key material, as loaded from its pki directory."""
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    server_cert: x509.Certificate
    signing_key: ed25519.Ed25519PrivateKey

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self.ca_cert)

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca_cert)

    @property
    def signing_public(self) -> bytes:
        return raw_public_key(self.signing_key)

    def server_key_pem(self) -> bytes:
        return private_key_pem(self.server_key)

    def server_chain_pem(self) -> bytes:
        """Server certificate then the CA: the chain the TLS handshake presents (gateways pin the CA)."""
        return cert_pem(self.server_cert) + cert_pem(self.ca_cert)


HEADEND_FILES = ("ca.key", "ca.crt", "server.key", "server.crt", "signing.key")


def ensure_headend_pki(directory: str | Path, hosts: list[str], now: datetime,
                       ca_name: str = "meterlink head-end CA") -> HeadendPki:
    """Load the head-end's CA, server and signing keys from `directory`, creating what is missing.

    The CA and signing key are made once and never replaced here. The server certificate is
    (re)issued when missing or when `hosts` are not all among its SANs.
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    # `serve` and `gateways add` may both arrive first: one makes the CA, the other loads it.
    with open(d / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_headend_pki(d, hosts, now, ca_name)


def _ensure_headend_pki(d: Path, hosts: list[str], now: datetime, ca_name: str) -> HeadendPki:
    if (d / "ca.key").exists() != (d / "ca.crt").exists():
        raise PkiError(f"{d}: ca.key and ca.crt must both exist or both be absent")
    if not (d / "ca.key").exists():
        ca_key, ca_cert = create_ca(ca_name, now)
        write_private(d / "ca.key", private_key_pem(ca_key))
        write_public(d / "ca.crt", cert_pem(ca_cert))
    ca_key = load_private_key((d / "ca.key").read_bytes(), f"{d / 'ca.key'}")
    ca_cert = load_cert((d / "ca.crt").read_bytes(), f"{d / 'ca.crt'}")
    if not (d / "signing.key").exists():
        write_private(d / "signing.key", private_key_pem(new_signing_key()))
    signing = load_private_key((d / "signing.key").read_bytes(), f"{d / 'signing.key'}")
    if not isinstance(signing, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{d / 'signing.key'}: must be an Ed25519 key")
    server_cert = None
    if (d / "server.crt").exists() and (d / "server.key").exists():
        server_cert = load_cert((d / "server.crt").read_bytes(), f"{d / 'server.crt'}")
        if not set(hosts) <= _sans(server_cert) or server_cert.issuer != ca_cert.subject:
            server_cert = None
    if server_cert is None:
        server_key = new_tls_key()
        server_cert = issue_server_cert(ca_key, ca_cert, server_key.public_key(), hosts, now)
        write_private(d / "server.key", private_key_pem(server_key))
        write_public(d / "server.crt", cert_pem(server_cert))
    server_key = load_private_key((d / "server.key").read_bytes(), f"{d / 'server.key'}")
    return HeadendPki(ca_key, ca_cert, server_key, server_cert, signing)


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(sans.get_values_for_type(x509.DNSName)) | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
