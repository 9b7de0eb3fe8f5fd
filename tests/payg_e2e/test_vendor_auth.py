"""Vending accepts only authenticated vendors: a vendor client certificate from the head-end CA whose
vendor is the request's, current and not revoked; everything else is refused with a reason and
stores nothing (real gRPC with mutual TLS on loopback)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meterlink import pki
from meterlink.gateway import tokens as T
from meterlink.gateway.enrol import secure_channel
from meterlink.headend import payg_service
from meterlink.headend import vendors as V
from meterlink.headend.gatewayauth import refusal_of
from meterlink.v1 import payg_pb2, payg_pb2_grpc


@pytest.fixture
def shop(payg_headend):
    """ACC1 with card CARD1; vendors SHOP1 (the fixture's) and SHOP2 under contract."""
    hd = payg_headend
    card = Ed25519PrivateKey.generate()
    hd.store.register_card("CARD1", "ACC1", T.public_bytes(card), hd.clock.now())
    hd.store.put_vendor(V.VendorContract("SHOP2", "GBP", Decimal(1), 0, Decimal("0.20"), contract_id="K-2"))
    return card


def sale(channel, card, vendor="SHOP1", sale_id="S-1", amount=1_000, claimed=None):
    """Challenge + Authorise as vendor `claimed` (default: `vendor`, whose name the card signs)."""
    claimed = claimed or vendor
    stub = payg_pb2_grpc.VendingStub(channel)
    challenge = stub.Challenge(payg_pb2.ChallengeRequest(vendor_id=claimed), timeout=5).challenge
    msg = V.sale_challenge_message(challenge, sale_id, claimed, "CARD1", "ACC1", amount, "GBP")
    return stub.Authorise(payg_pb2.AuthoriseRequest(
        vendor_id=claimed, sale_id=sale_id, card_id="CARD1", account_id="ACC1", amount_minor=amount,
        currency="GBP", challenge=challenge, card_signature=T.sign_ed25519(card, msg)), timeout=5)


def refused(call) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    return refusal_of(err.value), err.value.details()


def nothing_stored(hd) -> None:
    assert list(hd.store.transactions()) == []
    assert hd.store.refusals("SHOP1", datetime.min.replace(tzinfo=timezone.utc),
                             datetime.max.replace(tzinfo=timezone.utc)) == []
    count = hd.store._db.execute("SELECT COUNT(*) FROM payg_challenge").fetchone()[0]
    assert count == 0, f"{count} challenges issued to a refused caller"


def test_a_vendor_with_its_own_certificate_sells(payg_headend, shop):
    channel = payg_headend.vendor_channel("SHOP1")
    try:
        reply = sale(channel, shop)
        assert reply.authorised and reply.commission_minor == 30
    finally:
        channel.close()
    assert payg_headend.store.balance("vendor:SHOP1:receivable", "GBP") == 1_000 - 30 - 6


def test_a_gateway_certificate_cannot_sell_credit(payg_headend, shop, tmp_path):
    hd = payg_headend
    gateway = secure_channel(hd.address, hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"]))
    try:
        reason, details = refused(lambda: sale(gateway, shop))
        assert reason == "VENDOR_NOT_AUTHENTICATED" and "no vendor client certificate" in details
    finally:
        gateway.close()
    nothing_stored(hd)


def test_another_vendors_certificate_cannot_sell_as_this_vendor(payg_headend, shop):
    hd = payg_headend
    shop2 = hd.vendor_channel("SHOP2")
    try:
        reason, details = refused(lambda: sale(shop2, shop, vendor="SHOP2", claimed="SHOP1"))
        assert reason == "VENDOR_IDENTITY_MISMATCH"
        assert details == ("VENDOR_IDENTITY_MISMATCH: certificate of vendor SHOP2 cannot act for vendor 'SHOP1'")
        assert sale(shop2, shop, vendor="SHOP2", sale_id="S-2").authorised      # as itself it may
    finally:
        shop2.close()
    assert hd.store.sales("SHOP1", datetime.min.replace(tzinfo=timezone.utc),
                          datetime.max.replace(tzinfo=timezone.utc)) == []


def test_a_forged_vendor_certificate_from_another_ca_is_refused_in_the_handshake(payg_headend, shop, tmp_path):
    hd = payg_headend
    now = datetime.now(timezone.utc)
    ca_key, ca_cert = pki.create_ca("forger CA", now)
    key = pki.new_tls_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meterlink"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, "SHOP1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(payg_service.VENDOR_URI_PREFIX + "SHOP1")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    creds = grpc.ssl_channel_credentials(root_certificates=hd.keys.ca_pem, private_key=pki.private_key_pem(key),
                                         certificate_chain=pki.cert_pem(cert))
    forged = grpc.secure_channel(hd.address, creds)
    try:
        with pytest.raises(grpc.RpcError) as err:
            sale(forged, shop)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE      # the TLS handshake refuses it
    finally:
        forged.close()
    nothing_stored(hd)


def test_a_superseded_or_revoked_vendor_certificate_is_refused(payg_headend, shop, tmp_path):
    hd = payg_headend
    old = hd.vendor_channel("SHOP1")
    try:
        assert sale(old, shop, sale_id="S-1").authorised
        payg_service.write_vendor_identity(hd.store, hd.keys, "SHOP1", tmp_path / "shop1-new",
                                           datetime.now(timezone.utc))      # re-issued: the old one is stale
        reason, _ = refused(lambda: sale(old, shop, sale_id="S-2"))
        assert reason == "VENDOR_CERTIFICATE_SUPERSEDED"
        new = grpc.secure_channel(hd.address, payg_service.vendor_channel_credentials(tmp_path / "shop1-new"))
        try:
            assert sale(new, shop, sale_id="S-3").authorised
            hd.store.revoke_vendor_cert("SHOP1", hd.clock.now())
            reason, details = refused(lambda: sale(new, shop, sale_id="S-4"))
            assert reason == "VENDOR_REVOKED" and "revoked at" in details
        finally:
            new.close()
    finally:
        old.close()
    booked = [t.business_key for t in hd.store.transactions() if t.kind == "top-up"]
    assert booked == ["sale:SHOP1:S-1:top-up", "sale:SHOP1:S-3:top-up"]


def test_a_vendor_certificate_is_not_a_gateway_certificate(payg_headend, shop):
    hd = payg_headend
    channel = hd.vendor_channel("SHOP1")
    try:
        reason, _ = refused(lambda: payg_pb2_grpc.CreditControlStub(channel).Reserve(
            payg_pb2.CreditControlRequest(gateway_id="SHOP1", session_id="x", account_id="ACC1", meter_id="MTR-1",
                                          currency="GBP"), timeout=5))
        assert reason == "ACCESS_REFUSAL_NO_CLIENT_CERTIFICATE"
    finally:
        channel.close()


def test_a_vendor_certificate_needs_a_contract_and_a_plain_vendor_id(payg_headend, tmp_path):
    hd = payg_headend
    now = datetime.now(timezone.utc)
    with pytest.raises(Exception, match="SHOP9 has no contract"):
        payg_service.write_vendor_identity(hd.store, hd.keys, "SHOP9", tmp_path / "v9", now)
    with pytest.raises(Exception, match="bad vendor id"):
        payg_service.write_vendor_identity(hd.store, hd.keys, "SHOP:1", tmp_path / "vx", now)


def test_authorise_vendor_gives_the_first_reason():
    peer = payg_service.VendorPeer("SHOP1", "ab12")
    at = datetime(2026, 3, 9, 12, tzinfo=timezone.utc)
    assert payg_service.authorise_vendor(peer, "SHOP1", ("ab12", None)) is None
    cases = [(None, "SHOP1", ("ab12", None), "VENDOR_NOT_AUTHENTICATED"),
             (peer, "SHOP2", ("ab12", None), "VENDOR_IDENTITY_MISMATCH"),
             (peer, "SHOP1", None, "VENDOR_UNKNOWN"),
             (peer, "SHOP1", ("ab12", at), "VENDOR_REVOKED"),
             (peer, "SHOP1", ("cd34", None), "VENDOR_CERTIFICATE_SUPERSEDED")]
    for p, claimed, record, reason in cases:
        assert payg_service.authorise_vendor(p, claimed, record).reason == reason
