"""The operator's path end to end: `serve` with [pki], `gateways add`, `meterlink-gateway enroll`, `pull-config`, `gateways revoke`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meterlink.gateway.cli import main as gateway_main
from meterlink.gateway.config import load_config as load_gateway_config
from meterlink.headend.cli import main as headend_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path):
    cfg = tmp_path / "headend.toml"
    cfg.write_text(f'[headend]\nlisten = "127.0.0.1:0"\ndatabase = "sqlite:///{tmp_path}/headend.db"\n\n'
                   f'[pki]\ndir = "{tmp_path}/pki"\nenrol_listen = "127.0.0.1:0"\n'
                   f'server_names = ["localhost", "127.0.0.1"]\n')
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "meterlink.headend.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        main_addr = proc.stdout.readline().strip()
        enrol_line = proc.stdout.readline().split()
        assert main_addr and enrol_line[0] == "enrol", proc.stderr.read() if proc.poll() is not None else main_addr
        yield cfg, main_addr, f"127.0.0.1:{enrol_line[1]}", enrol_line[3]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(main, argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_operator_enrols_a_gateway_which_then_pulls_its_config_until_revoked(served, tmp_path, capsys):
    cfg, addr, enrol_addr, served_fp = served
    rc, out, _ = run(headend_main, ["gateways", "add", "gw-0001", "--meter", "MTR-0001", "--config", str(cfg),
                                    "--json"], capsys)
    added = json.loads(out)
    assert rc == 0 and added["ca_fingerprint"] == served_fp
    state = tmp_path / "gw-pki"
    rc, out, _ = run(gateway_main, ["enroll", "--headend", enrol_addr, "--code", added["code"],
                                    "--ca-fingerprint", added["ca_fingerprint"], "--state-dir", str(state)], capsys)
    assert rc == 0 and "enrolled as gateway gw-0001" in out
    rc, out, _ = run(gateway_main, ["pull-config", "--headend", addr, "--state-dir", str(state)], capsys)
    assert rc == 0 and json.loads(out)["meters"] == ["MTR-0001"]
    rc, out, _ = run(headend_main, ["gateways", "list", "--config", str(cfg), "--json"], capsys)
    assert json.loads(out)[0]["status"] == "enrolled"
    assert run(headend_main, ["gateways", "revoke", "gw-0001", "--config", str(cfg)], capsys)[0] == 0
    rc, _, err = run(gateway_main, ["pull-config", "--headend", addr, "--state-dir", str(state)], capsys)
    assert rc == 2 and "PERMISSION_DENIED" in err and "ACCESS_REFUSAL_GATEWAY_REVOKED" in err


def test_a_reused_code_fails_with_a_clear_message_and_exit_status_2(served, tmp_path, capsys):
    cfg, addr, enrol_addr, fp = served
    code = json.loads(run(headend_main, ["gateways", "add", "gw-0002", "--config", str(cfg), "--json"], capsys)[1])["code"]
    assert run(gateway_main, ["enroll", "--headend", enrol_addr, "--code", code, "--ca-fingerprint", fp,
                              "--state-dir", str(tmp_path / "a")], capsys)[0] == 0
    rc, _, err = run(gateway_main, ["enroll", "--headend", enrol_addr, "--code", code, "--ca-fingerprint", fp,
                                    "--state-dir", str(tmp_path / "b")], capsys)
    assert rc == 2 and "was already used" in err


def test_gateway_config_names_its_enrolled_identity_for_mutual_tls(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nid = "gw-0001"\n\n[headend]\naddress = "127.0.0.1:50051"\n'
                    'pki_dir = "/var/lib/meterlink/pki"\nserver_name = "headend.example"\n')
    cfg = load_gateway_config(str(path))
    assert cfg.headend_pki_dir == "/var/lib/meterlink/pki" and cfg.headend_server_name == "headend.example"


def test_enrolling_with_the_gateway_config_registers_the_key_the_daemon_signs_with(served, tmp_path, capsys):
    from meterlink.gateway.daemon import signing_key_path
    from meterlink.gateway.enrol import load_identity
    from meterlink import pki
    cfg, addr, enrol_addr, fp = served
    code = json.loads(run(headend_main, ["gateways", "add", "gw-0003", "--config", str(cfg), "--json"], capsys)[1])["code"]
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(f'[gateway]\nid = "gw-0003"\ndatabase = "{tmp_path}/gw/journal.db"\n\n'
                       f'[headend]\naddress = "{addr}"\npki_dir = "{tmp_path}/gw/pki"\n')
    rc, out, err = run(gateway_main, ["enroll", "--headend", enrol_addr, "--code", code, "--ca-fingerprint", fp,
                                      "--config", str(gw_toml)], capsys)
    assert rc == 0, err
    identity = load_identity(tmp_path / "gw" / "pki")
    daemon_key = pki.load_private_key(signing_key_path(load_gateway_config(str(gw_toml))).read_bytes())
    assert pki.raw_public_key(daemon_key) == identity.signing_public
    rc, out, _ = run(headend_main, ["gateways", "list", "--config", str(cfg), "--json"], capsys)
    listed = {g["gateway"]: g for g in json.loads(out)}
    assert listed["gw-0003"]["signing_key"] == pki.key_id(identity.signing_public)


def test_adding_a_gateway_with_another_gateways_meter_makes_no_code(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/h.db"
    base = ["--database", db, "--pki-dir", str(tmp_path / "pki"), "--config", str(tmp_path / "none.toml")]
    assert run(headend_main, ["gateways", "add", "gw-a", "--meter", "MTR-1", *base], capsys)[0] == 0
    rc, out, err = run(headend_main, ["gateways", "add", "gw-b", "--meter", "MTR-1", *base], capsys)
    assert rc == 2 and "meter MTR-1 is provisioned to gateway gw-a" in err and "code" not in out
    rc, out, _ = run(headend_main, ["gateways", "list", "--json", *base], capsys)
    assert [g["gateway"] for g in json.loads(out)] == ["gw-a"]


def test_operator_publishes_a_tariff_and_a_payg_assignment_which_the_gateway_pulls(served, tmp_path, capsys):
    cfg, addr, enrol_addr, fp = served
    code = json.loads(run(headend_main, ["gateways", "add", "gw-0004", "--config", str(cfg), "--json"], capsys)[1])["code"]
    state = tmp_path / "gw-pki"
    assert run(gateway_main, ["enroll", "--headend", enrol_addr, "--code", code, "--ca-fingerprint", fp,
                              "--state-dir", str(state)], capsys)[0] == 0
    e7 = ROOT / "headend" / "data" / "tariff_gb_economy7.toml"
    rc, _, err = run(headend_main, ["gateways", "payg-tariff", "ACC-1", "--tariff", "gb-e7", "--vat-rate", "0.05",
                                    "--config", str(cfg)], capsys)
    assert rc == 2 and "tariff gb-e7 was never published to every gateway" in err
    broken = tmp_path / "broken.toml"
    broken.write_text('[tariff]\nname = "x"\ncurrency = 7\n')
    rc, _, err = run(headend_main, ["gateways", "tariff", "bad", "--file", str(broken), "--config", str(cfg)], capsys)
    assert rc == 2 and "broken.toml" in err                                  # refused before any gateway sees it
    rc, out, _ = run(headend_main, ["gateways", "tariff", "gb-e7", "--file", str(e7), "--config", str(cfg)], capsys)
    assert rc == 0 and "tariff gb-e7 published to every gateway" in out
    rc, out, _ = run(headend_main, ["gateways", "payg-tariff", "ACC-1", "--tariff", "gb-e7", "--vat-rate", "0.05",
                                    "--interval-minutes", "30", "--config", str(cfg)], capsys)
    assert rc == 0 and "priced offline with tariff gb-e7" in out
    rc, _, err = run(headend_main, ["gateways", "payg-tariff", "ACC-2", "--tariff", "gb-e7", "--vat-rate", "1.5",
                                    "--config", str(cfg)], capsys)
    assert rc == 2 and "VAT rate 1.5 out of range" in err
    rc, out, _ = run(gateway_main, ["pull-config", "--headend", addr, "--state-dir", str(state)], capsys)
    assert rc == 0
    from meterlink.gateway.configpull import load_state
    pulled = load_state(state / "config-state.json")
    assert pulled.tariffs == {"gb-e7": e7.read_text()}
    assert {k: (v["tariff"], v["vat_rate"], v["interval_minutes"]) for k, v in pulled.payg_tariffs.items()} == \
        {"ACC-1": ("gb-e7", "0.05", 30)}
