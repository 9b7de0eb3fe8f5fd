"""The operator issues and revokes vendor certificates with `meterlink-headend vendors cert|revoke-cert`; a vendor
selling with the issued identity is accepted over mutual TLS, and refused once revoked (real gRPC on loopback)."""

from __future__ import annotations

import stat

import grpc
from .test_vendor_auth import refused, sale, shop  # noqa: F401  (shop is a fixture)

from meterlink.headend import payg_service
from meterlink.headend.cli import main as headend_main


def run(argv, capsys) -> tuple[int, str, str]:
    rc = headend_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_vendor_identity_from_the_cli_sells_until_revoked(payg_headend, shop, tmp_path, capsys):
    hd = payg_headend
    base = ["--database", f"sqlite:///{tmp_path / 'headend.db'}", "--config", str(tmp_path / "none.toml")]
    out_dir = tmp_path / "shop1-identity"
    rc, out, _ = run(["vendors", "cert", "--vendor", "SHOP1", "--out", str(out_dir),
                      "--pki-dir", str(tmp_path / "headend-pki"), *base], capsys)
    assert rc == 0 and f"written to {out_dir}" in out
    assert stat.S_IMODE((out_dir / "vendor.key").stat().st_mode) == 0o600
    with grpc.secure_channel(hd.address, payg_service.vendor_channel_credentials(out_dir)) as channel:
        assert sale(channel, shop, sale_id="S-CLI-1").authorised
        assert run(["vendors", "revoke-cert", "--vendor", "SHOP1", *base], capsys)[0] == 0
        reason, _ = refused(lambda: sale(channel, shop, sale_id="S-CLI-2"))
    assert reason == "VENDOR_REVOKED"


def test_a_certificate_for_a_vendor_without_a_contract_is_not_issued(payg_headend, tmp_path, capsys):
    base = ["--database", f"sqlite:///{tmp_path / 'headend.db'}", "--config", str(tmp_path / "none.toml")]
    rc, _, err = run(["vendors", "cert", "--vendor", "NOBODY", "--out", str(tmp_path / "x"),
                      "--pki-dir", str(tmp_path / "headend-pki"), *base], capsys)
    assert rc == 2 and "vendor NOBODY has no contract" in err and not (tmp_path / "x").exists()
    rc, _, err = run(["vendors", "revoke-cert", "--vendor", "NOBODY", *base], capsys)
    assert rc == 2 and "vendor NOBODY has no client certificate to revoke" in err
