"""Enrolment over real gRPC on loopback, then mutual TLS: who may push what, refused with which reason."""

from __future__ import annotations

import stat
from datetime import timedelta

import grpc
import pytest

from meterlink import pki
from meterlink.chain import link, sign_head
from meterlink.clock import to_ms
from meterlink.gateway.enrol import EnrolmentError, enroll, load_identity, secure_channel
from meterlink.headend.gatewayauth import refusal_of
from meterlink.readings import Reading
from meterlink.v1 import sync_pb2, sync_pb2_grpc


def signed_push(identity, meter_ids, clock, gateway_id=None, count=3):
    """A correctly chained and signed batch of `count` readings per meter, as the gateway would push it."""
    gw = gateway_id or identity.name
    bodies = [Reading(m, "1.8.0", clock.now() + timedelta(minutes=15 * i), 1000 + i, "Wh", 0)
              for i in range(count) for m in meter_ids]
    records = link(bodies)
    head = records[-1]
    from meterlink.chain import hash_of
    head_hash = hash_of(head)
    return sync_pb2.PushRequest(
        gateway_id=gw, head_hash=head_hash,
        head_signature=sign_head(identity.signing_key, gw, head.seq, head_hash),
        records=[sync_pb2.Record(seq=r.seq, prev_hash=r.prev_hash, reading=sync_pb2.Reading(
            meter_id=r.body.meter_id, obis=r.body.obis, taken_at_ms=to_ms(r.body.taken_at), value=r.body.value,
            unit=r.body.unit, quality=r.body.quality)) for r in records])


def enrolled(headend, tmp_path, name, meters=()):
    code = headend.registry.add(name, headend.clock.now())
    if meters:
        headend.registry.provision(name, list(meters), [], headend.clock.now())
    return enroll(headend.enrol_address, code, tmp_path / name, ca_fingerprint=headend.keys.ca_fingerprint)


def push(identity, headend, request):
    channel = secure_channel(headend.address, identity)
    try:
        return sync_pb2_grpc.GatewaySyncStub(channel).Push(request, timeout=10)
    finally:
        channel.close()


def test_enrolment_issues_a_ca_signed_certificate_for_a_key_made_on_the_device(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001")
    cert = pki.load_cert(identity.cert_pem)
    assert pki.gateway_name_of(cert) == "gw-0001"
    pki.verify_issued_by(cert, headend.keys.ca_cert, headend.clock.now())
    for key_file in ("tls.key", "signing.key"):
        assert stat.S_IMODE((tmp_path / "gw-0001" / key_file).stat().st_mode) == 0o600
    record = headend.registry.get("gw-0001")
    assert record.cert_serial == format(cert.serial_number, "x")
    assert record.signing_public_key == identity.signing_public
    assert identity.headend_config_key == headend.keys.signing_public
    assert load_identity(tmp_path / "gw-0001").name == "gw-0001"


def test_an_enrolled_gateway_pushes_over_mutual_tls_and_the_headend_stores_it(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1", "MTR-2"])
    ack = push(identity, headend, signed_push(identity, ["MTR-1", "MTR-2"], headend.clock))
    assert ack.acked_seq == 6 and ack.accepted == 6, ack
    assert [r.value for r in headend.repo.readings("MTR-2")] == [1000, 1001, 1002]


def test_an_enrolment_code_works_once(headend, tmp_path):
    code = headend.registry.add("gw-0001", headend.clock.now())
    enroll(headend.enrol_address, code, tmp_path / "a", ca_fingerprint=headend.keys.ca_fingerprint)
    with pytest.raises(EnrolmentError, match="PERMISSION_DENIED.*gw-0001 was already used"):
        enroll(headend.enrol_address, code, tmp_path / "b", ca_fingerprint=headend.keys.ca_fingerprint)
    assert not (tmp_path / "b" / "tls.crt").exists()


def test_an_enrolment_code_expires(headend, tmp_path):
    code = headend.registry.add("gw-0001", headend.clock.now(), ttl=timedelta(hours=24))
    headend.clock.advance(timedelta(hours=24, seconds=1))
    with pytest.raises(EnrolmentError, match="code for gateway gw-0001 expired"):
        enroll(headend.enrol_address, code, tmp_path / "a", ca_fingerprint=headend.keys.ca_fingerprint)
    assert headend.registry.get("gw-0001").cert_serial is None


def test_an_unknown_code_is_refused(headend, tmp_path):
    headend.registry.add("gw-0001", headend.clock.now())
    with pytest.raises(EnrolmentError, match="code is not known"):
        enroll(headend.enrol_address, "AAAA-BBBB-CCCC-DDDD-EEEE", tmp_path / "a",
               ca_fingerprint=headend.keys.ca_fingerprint)


def test_a_headend_whose_ca_does_not_match_the_pinned_fingerprint_gets_no_code(headend, tmp_path):
    code = headend.registry.add("gw-0001", headend.clock.now())
    with pytest.raises(EnrolmentError, match="no certificate with fingerprint"):
        enroll(headend.enrol_address, code, tmp_path / "a", ca_fingerprint="ab" * 32)
    # the code was not sent, so it still works against the right CA
    enroll(headend.enrol_address, code, tmp_path / "a", ca_fingerprint=headend.keys.ca_fingerprint)


def test_a_certificate_from_another_ca_is_refused_in_the_tls_handshake(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    rogue_key, rogue_ca = pki.create_ca("meterlink head-end CA", headend.clock.now())   # same name, other key
    tls_key = pki.new_tls_key()
    forged = pki.issue_client_cert(rogue_key, rogue_ca, pki.build_csr(tls_key, "gw-0001"), "gw-0001",
                                   headend.clock.now())
    creds = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=pki.private_key_pem(tls_key),
                                         certificate_chain=pki.cert_pem(forged) + pki.cert_pem(rogue_ca))
    channel = grpc.secure_channel(headend.address, creds)
    with pytest.raises(grpc.RpcError) as err:
        sync_pb2_grpc.GatewaySyncStub(channel).Push(signed_push(identity, ["MTR-1"], headend.clock), timeout=10)
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert headend.repo.readings("MTR-1") == []


def test_a_client_without_a_certificate_cannot_even_connect(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    channel = grpc.secure_channel(headend.address, grpc.ssl_channel_credentials(root_certificates=identity.ca_pem))
    with pytest.raises(grpc.RpcError) as err:
        sync_pb2_grpc.GatewaySyncStub(channel).Push(signed_push(identity, ["MTR-1"], headend.clock), timeout=10)
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_revoked_gateway_is_refused(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    headend.registry.revoke("gw-0001", headend.clock.now())
    with pytest.raises(grpc.RpcError) as err:
        push(identity, headend, signed_push(identity, ["MTR-1"], headend.clock))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_of(err.value) == "ACCESS_REFUSAL_GATEWAY_REVOKED"
    assert "gw-0001 was revoked" in err.value.details()
    assert headend.repo.readings("MTR-1") == []
    assert headend.servers.auth.refusals == {"ACCESS_REFUSAL_GATEWAY_REVOKED": 1}


def test_pushing_for_a_meter_of_another_gateway_is_refused_naming_the_meter(headend, tmp_path):
    a = enrolled(headend, tmp_path, "gw-a", meters=["MTR-1"])
    enrolled(headend, tmp_path, "gw-b", meters=["MTR-2"])
    with pytest.raises(grpc.RpcError) as err:
        push(a, headend, signed_push(a, ["MTR-1", "MTR-2"], headend.clock))
    assert refusal_of(err.value) == "ACCESS_REFUSAL_METER_NOT_PROVISIONED"
    assert "meter MTR-2 is not provisioned" in err.value.details()
    assert headend.repo.readings("MTR-1") == [] and headend.repo.readings("MTR-2") == []


def test_a_gateway_cannot_push_under_another_gateways_name(headend, tmp_path):
    a = enrolled(headend, tmp_path, "gw-a", meters=["MTR-1"])
    enrolled(headend, tmp_path, "gw-b", meters=["MTR-1-b"])
    with pytest.raises(grpc.RpcError) as err:
        push(a, headend, signed_push(a, ["MTR-1"], headend.clock, gateway_id="gw-b"))
    assert refusal_of(err.value) == "ACCESS_REFUSAL_IDENTITY_MISMATCH"
    assert "cannot speak for gateway 'gw-b'" in err.value.details()


def test_re_enrolment_supersedes_the_old_certificate(headend, tmp_path):
    old = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    code = headend.registry.new_code("gw-0001", headend.clock.now())
    new = enroll(headend.enrol_address, code, tmp_path / "replacement", ca_fingerprint=headend.keys.ca_fingerprint)
    with pytest.raises(grpc.RpcError) as err:
        push(old, headend, signed_push(old, ["MTR-1"], headend.clock))
    assert refusal_of(err.value) == "ACCESS_REFUSAL_CERTIFICATE_SUPERSEDED"
    assert push(new, headend, signed_push(new, ["MTR-1"], headend.clock)).acked_seq == 3


def test_a_meter_belongs_to_one_gateway_at_a_time(headend):
    now = headend.clock.now()
    headend.registry.add("gw-a", now)
    headend.registry.add("gw-b", now)
    headend.registry.provision("gw-a", ["MTR-1"], [], now)
    with pytest.raises(Exception, match="meter MTR-1 is provisioned to gateway gw-a"):
        headend.registry.provision("gw-b", ["MTR-1"], [], now)
    headend.registry.provision("gw-a", [], ["MTR-1"], now)
    assert headend.registry.provision("gw-b", ["MTR-1"], [], now) == ("MTR-1",)


def test_the_gateways_journal_drains_over_mutual_tls_signed_with_the_enrolled_key(headend, tmp_path):
    from meterlink.gateway.enrol import channel_credentials
    from meterlink.gateway.journal import Journal
    from meterlink.gateway.sync import Pusher
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    journal = Journal(tmp_path / "gw.db")
    journal.append([Reading("MTR-1", "1.8.0", headend.clock.now() + timedelta(minutes=15 * i), 5000 + i, "Wh", 0)
                    for i in range(20)])
    pusher = Pusher("gw-0001", headend.address, journal, batch=8, key=identity.signing_key,
                    credentials=channel_credentials(identity))
    try:
        assert pusher.drain() == 20
    finally:
        pusher.close()
    assert journal.unacked_count() == 0
    assert [r.value for r in headend.repo.readings("MTR-1")] == list(range(5000, 5020))


def test_without_a_pinned_fingerprint_the_ca_is_trusted_on_first_use_and_recorded(headend, tmp_path):
    import json
    code = headend.registry.add("gw-0001", headend.clock.now())
    identity = enroll(headend.enrol_address, code, tmp_path / "gw")
    meta = json.loads((tmp_path / "gw" / "identity.json").read_text())
    assert meta["ca_fingerprint"] == headend.keys.ca_fingerprint and identity.ca_pem == headend.keys.ca_pem


def test_the_enrolment_port_serves_nothing_but_enrolment(headend, tmp_path):
    identity = enrolled(headend, tmp_path, "gw-0001", meters=["MTR-1"])
    channel = secure_channel(headend.enrol_address, identity)
    with pytest.raises(grpc.RpcError) as err:
        sync_pb2_grpc.GatewaySyncStub(channel).Push(signed_push(identity, ["MTR-1"], headend.clock), timeout=10)
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert headend.repo.readings("MTR-1") == []


def test_refusals_are_counted_by_reason_in_the_headend_metrics(tmp_path, clock):
    from meterlink.headend.enrolment import make_secure_servers
    from meterlink.headend.registry import open_registry
    from meterlink.headend.store import open_repository
    from meterlink.metrics import HeadendMetrics
    url = f"sqlite:///{tmp_path / 'h.db'}"
    repo, registry = open_repository(url), open_registry(url)
    keys = pki.ensure_headend_pki(tmp_path / "pki", ["127.0.0.1"], clock.now())
    metrics = HeadendMetrics.create()
    servers = make_secure_servers(repo, clock, keys, registry, "127.0.0.1:0", "127.0.0.1:0", metrics=metrics).start()
    try:
        code = registry.add("gw-0001", clock.now())
        identity = enroll(f"127.0.0.1:{servers.enrol_port}", code, tmp_path / "gw",
                          ca_fingerprint=keys.ca_fingerprint)
        channel = secure_channel(f"127.0.0.1:{servers.port}", identity)
        with pytest.raises(grpc.RpcError):
            sync_pb2_grpc.GatewaySyncStub(channel).Push(signed_push(identity, ["MTR-X"], clock), timeout=10)
        channel.close()
    finally:
        servers.stop(None)
        registry.close()
        repo.close()
    assert metrics.registry.get_sample_value("meterlink_headend_refused_batches_total",
                                             {"reason": "ACCESS_REFUSAL_METER_NOT_PROVISIONED"}) == 1


def test_an_enrolment_without_proof_of_the_signing_key_is_refused_and_the_code_survives(headend, tmp_path):
    from meterlink.gateway.enrol import build_request
    from meterlink.v1 import enrol_pb2_grpc
    code = headend.registry.add("gw-0001", headend.clock.now())
    request = build_request(code, pki.new_tls_key(), pki.new_signing_key())
    request.signing_public_key = pki.raw_public_key(pki.new_signing_key())     # claims a key it cannot sign with
    channel = grpc.secure_channel(headend.enrol_address, grpc.ssl_channel_credentials(headend.keys.ca_pem))
    with pytest.raises(grpc.RpcError) as err:
        enrol_pb2_grpc.EnrolmentStub(channel).Enroll(request, timeout=10)
    channel.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "proof of the Ed25519 signing key" in err.value.details()
    assert enroll(headend.enrol_address, code, tmp_path / "gw", ca_fingerprint=headend.keys.ca_fingerprint).name \
        == "gw-0001"
