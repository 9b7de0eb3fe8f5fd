"""End to end over mutual TLS with real processes: `serve --pki-dir`, `gateways add`, `gateways meters --add`,
`meterlink-gateway enroll --config`, then `run` with simulated meters: readings arrive over mTLS, the signed
configuration is pulled periodically, and a meter not provisioned to the gateway is refused and counted."""

from __future__ import annotations

import json
import os
import subprocess

from .conftest import BIN, bus_toml, start_gateway, stop, write_config
from .test_metrics_endpoints import scrape, wait_for_line, wait_until


def headend(tmp_path, *args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "meterlink-headend"), *args, "--config", str(tmp_path / "headend.toml")],
                          capture_output=True, text=True, check=check, cwd=tmp_path)


def test_an_enrolled_daemon_pushes_over_mutual_tls_pulls_its_config_and_an_unprovisioned_meter_is_refused(
        tmp_path, pty_bus):
    (tmp_path / "headend.toml").write_text(
        f'[headend]\nlisten = "127.0.0.1:0"\ndatabase = "sqlite:///{tmp_path}/headend.db"\n')
    serve = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--config", str(tmp_path / "headend.toml"),
                              "--pki-dir", str(tmp_path / "he-pki"), "--enrol-listen", "127.0.0.1:0",
                              "--metrics-listen", "127.0.0.1:0"],
                             stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    gw = None
    try:
        address = serve.stdout.readline().strip()
        enrol = serve.stdout.readline().split()          # enrol PORT ca-sha256 FP
        he_metrics = serve.stdout.readline().split()[1]
        pki = ["--pki-dir", str(tmp_path / "he-pki")]
        added = json.loads(headend(tmp_path, "gateways", "add", "GW-T", "--json", *pki).stdout)
        headend(tmp_path, "gateways", "meters", "GW-T", "--add", "T-1", *pki)
        bus = pty_bus({1: None, 2: None})
        extra = f'\n[headend]\naddress = "{address}"\npki_dir = "{tmp_path / "gw-pki"}"\nconfig_pull_s = 1\n'
        cfg = write_config(tmp_path, bus_toml(bus.client_path, [1], first_id="T"), gateway_id="GW-T", extra=extra)
        out = subprocess.run([str(BIN / "meterlink-gateway"), "enroll", "--config", str(cfg), "--headend",
                              f"127.0.0.1:{enrol[1]}", "--code", added["code"], "--ca-fingerprint", enrol[3]],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr

        gw = start_gateway(cfg, tmp_path / "gw.log", "--metrics-listen", "127.0.0.1:0")
        url = wait_for_line(tmp_path / "gw.log", r"metrics on (http://\S+/metrics)").group(1)
        assert wait_until(lambda: scrape(he_metrics).get("meterlink_headend_records_total", 0) >= 30), \
            (tmp_path / "gw.log").read_text()
        rows = json.loads(headend(tmp_path, "readings", "--meter", "T-1", "--json",
                                  "--database", f"sqlite:///{tmp_path}/headend.db").stdout)["readings"]
        assert len(rows) >= 30 and {r["obis"] for r in rows} >= {"1.8.0", "1.7.0"}
        # the operator changes the gateway's configuration: the daemon pulls it within config_pull_s
        headend(tmp_path, "gateways", "meters", "GW-T", "--add", "T-9", *pki)
        state = tmp_path / "gw-pki" / "config-state.json"
        assert wait_until(lambda: state.exists() and "T-9" in json.loads(state.read_text())["meters"]), \
            (tmp_path / "gw.log").read_text()
        assert scrape(url)['meterlink_gateway_config_pulls_total{result="ok"}'] >= 2
        assert stop(gw) == 0
        gw = None

        # a meter the head-end never provisioned to GW-T: its batch is refused over mTLS, and counted
        write_config(tmp_path, bus_toml(bus.client_path, [1, 2], first_id="T"), gateway_id="GW-T", extra=extra)
        gw = start_gateway(cfg, tmp_path / "gw2.log", "--metrics-listen", "127.0.0.1:0")
        url = wait_for_line(tmp_path / "gw2.log", r"metrics on (http://\S+/metrics)").group(1)
        key = 'meterlink_headend_refused_batches_total{reason="ACCESS_REFUSAL_METER_NOT_PROVISIONED"}'
        assert wait_until(lambda: scrape(he_metrics).get(key, 0) >= 1), scrape(he_metrics)
        assert wait_until(lambda: scrape(url).get("meterlink_gateway_push_failures_total", 0) >= 1)
        assert scrape(url)["meterlink_gateway_unacked_records"] > 0
        assert "meter T-2 is not provisioned" in (tmp_path / "gw2.log").read_text()
        rows2 = json.loads(headend(tmp_path, "readings", "--meter", "T-2", "--json",
                                   "--database", f"sqlite:///{tmp_path}/headend.db").stdout)["readings"]
        assert rows2 == []
    finally:
        if gw is not None:
            stop(gw)
        stop(serve)
