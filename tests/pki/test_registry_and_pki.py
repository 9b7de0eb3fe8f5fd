"""The gateway registry (SQLite and PostgreSQL) and the pure PKI helpers."""

from __future__ import annotations

import stat
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509

from meterlink import pki
from meterlink.headend.gatewayauth import Peer, authorise
from meterlink.headend.registry import EnrolmentRefused, RegistryError, hash_code, open_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: pgserver
from pgserver import PG_UNAVAILABLE, fresh_schema_url  # noqa: E402

NOW = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request, tmp_path):
    if request.param == "postgres":
        if PG_UNAVAILABLE:
            pytest.skip(PG_UNAVAILABLE)
        reg = open_registry(fresh_schema_url())
    else:
        reg = open_registry(f"sqlite:///{tmp_path / 'headend.db'}")
    yield reg
    reg.close()


def issue_nothing(name):
    return "abc123", bytes(32), name


def test_the_code_is_stored_only_as_its_hash(registry, tmp_path):
    code = registry.add("gw-1", NOW)
    if registry.dialect == "sqlite":
        raw = Path(registry.url[len("sqlite:///"):]).read_bytes()
        assert code.replace("-", "").encode() not in raw and code.encode() not in raw
    assert registry.enrol(code.lower().replace("-", " "), NOW, issue_nothing) == ("gw-1", "gw-1")  # typed loosely


def test_a_code_is_consumed_by_exactly_one_of_two_racing_enrolments(registry):
    code = registry.add("gw-1", NOW)
    results = []

    def attempt():
        try:
            results.append(registry.enrol(code, NOW, issue_nothing)[0])
        except EnrolmentRefused as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("gw-1") == 1 and sum("already used" in r for r in results) == 3


def test_a_failed_issue_leaves_the_code_usable(registry):
    code = registry.add("gw-1", NOW)

    def broken(name):
        raise pki.PkiError("certificate request: its self-signature does not verify")

    with pytest.raises(pki.PkiError):
        registry.enrol(code, NOW, broken)
    assert registry.enrol(code, NOW, issue_nothing)[0] == "gw-1"


def test_revoked_gateways_get_no_new_code_and_names_are_unique(registry):
    registry.add("gw-1", NOW)
    with pytest.raises(RegistryError, match="gw-1 is already registered"):
        registry.add("gw-1", NOW)
    registry.revoke("gw-1", NOW)
    with pytest.raises(RegistryError, match="gw-1 is revoked"):
        registry.new_code("gw-1", NOW)
    assert registry.get("gw-1").status == "revoked"
    with pytest.raises(RegistryError, match="gateway name"):
        registry.add("gw 1; DROP", NOW)


def test_changes_for_one_gateway_and_for_all_come_in_version_order(registry):
    registry.add("gw-1", NOW)
    registry.add("gw-2", NOW)
    registry.provision("gw-1", ["M1"], [], NOW)
    registry.provision("gw-2", ["M2"], [], NOW)
    v = registry.publish("*", "tariff.set", {"name": "flat", "toml": "x"}, NOW)
    latest, changes = registry.changes_since("gw-1", 0)
    assert latest == v and [(c.kind, c.body) for c in changes] == [("meter.add", {"meter": "M1"}),
                                                                  ("tariff.set", {"name": "flat", "toml": "x"})]
    assert registry.changes_since("gw-1", v) == (v, [])


def test_authorise_names_the_first_reason_a_call_is_refused(registry):
    registry.add("gw-1", NOW)
    code = registry.new_code("gw-1", NOW)
    registry.enrol(code, NOW, issue_nothing)
    registry.provision("gw-1", ["M1"], [], NOW)
    rec = registry.get("gw-1")
    peer = Peer("gw-1", "abc123")
    assert authorise(rec, peer, "gw-1", ["M1"]) is None
    assert authorise(None, peer, "gw-1", []).reason == "ACCESS_REFUSAL_UNKNOWN_GATEWAY"
    assert authorise(rec, Peer("gw-1", "0ld"), "gw-1", []).reason == "ACCESS_REFUSAL_CERTIFICATE_SUPERSEDED"
    assert authorise(rec, peer, "gw-2", []).reason == "ACCESS_REFUSAL_IDENTITY_MISMATCH"
    assert authorise(rec, peer, "gw-1", ["M1", "M9"]).message == "gateway gw-1: meter M9 is not provisioned to it"


def test_headend_pki_is_made_once_with_private_keys_0600(tmp_path):
    d = tmp_path / "pki"
    first = pki.ensure_headend_pki(d, ["localhost", "127.0.0.1"], NOW)
    for name in ("ca.key", "server.key", "signing.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    again = pki.ensure_headend_pki(d, ["127.0.0.1"], NOW)
    assert again.ca_fingerprint == first.ca_fingerprint and again.server_cert == first.server_cert
    grown = pki.ensure_headend_pki(d, ["headend.example", "10.0.0.1"], NOW)     # new SANs: server cert reissued
    assert grown.ca_fingerprint == first.ca_fingerprint and grown.signing_public == first.signing_public
    sans = grown.server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "headend.example" in sans.get_values_for_type(x509.DNSName)
    pki.verify_issued_by(grown.server_cert, grown.ca_cert, NOW)


def test_the_certificate_name_comes_from_the_registry_not_from_the_csr(tmp_path):
    ca_key, ca = pki.create_ca("test CA", NOW)
    csr = pki.build_csr(pki.new_tls_key(), "i-am-someone-else")
    cert = pki.issue_client_cert(ca_key, ca, csr, "gw-1", NOW)
    assert pki.gateway_name_of(cert) == "gw-1"
    with pytest.raises(pki.PkiError, match="not valid at"):
        pki.verify_issued_by(cert, ca, NOW + timedelta(days=3000))
    other_key, other = pki.create_ca("test CA", NOW)
    with pytest.raises(pki.PkiError, match="not signed by CA"):
        pki.verify_issued_by(cert, other, NOW)


def test_a_csr_with_a_non_p256_key_or_a_bad_signature_is_refused():
    from cryptography.hazmat.primitives.asymmetric import ec
    p384 = pki.csr_der(pki.build_csr(ec.generate_private_key(ec.SECP384R1()), "gw-1"))
    with pytest.raises(pki.PkiError, match="ECDSA P-256"):
        pki.load_csr(p384)
    with pytest.raises(pki.PkiError, match="not a DER CSR"):
        pki.load_csr(b"garbage")


def test_fingerprints_are_accepted_in_the_usual_spellings():
    fp = "AB:" * 31 + "CD"
    assert pki.normalise_fingerprint(fp) == "ab" * 31 + "cd"
    assert pki.normalise_fingerprint("sha256:" + "ab" * 32) == "ab" * 32
    with pytest.raises(pki.PkiError, match="64 hex digits"):
        pki.normalise_fingerprint("abcd")


def test_code_hash_ignores_case_dashes_and_spaces():
    assert hash_code("k7qm-2xwd") == hash_code("K7QM 2XWD") == hash_code("K7QM2XWD")


def test_every_proto_file_has_committed_generated_code():
    # scripts/gen_proto.py compiles every proto/meterlink/v1/*.proto; the skeleton's staleness test
    # compares what it produces with what is committed, so a new .proto without code fails there too.
    v1 = Path(__file__).resolve().parents[2] / "proto" / "meterlink" / "v1"
    for proto in sorted(v1.glob("*.proto")):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (v1 / f"{proto.stem}{suffix}").exists(), f"{proto.name}: {proto.stem}{suffix} missing; run make proto"
    assert {"enrol.proto", "config.proto", "sync.proto"} <= {p.name for p in v1.glob("*.proto")}


def test_two_processes_creating_the_headend_ca_at_once_end_up_with_one(tmp_path):
    import subprocess
    code = ("import sys; from datetime import datetime, timezone; from meterlink import pki; "
            "print(pki.ensure_headend_pki(sys.argv[1], ['127.0.0.1'], datetime(2026, 11, 24, tzinfo=timezone.utc))"
            ".ca_fingerprint)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "pki")], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    prints = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(prints) == 1 and prints == {pki.fingerprint(pki.load_cert((tmp_path / "pki" / "ca.crt").read_bytes()))}
