"""Prometheus endpoints of both daemons, scraped over HTTP from real processes: readings, bus errors by kind,
journal depth, unacked records, push latency and pushed records on the gateway; ingested and duplicate
records, refusals by reason and handling latency on the head-end."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request

from meterlink.sim.meter import Faults

from .conftest import BIN, bus_toml, start_gateway, stop, write_config


def scrape(url: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample on a /metrics page."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_for_line(path, pattern: str, timeout: float = 30) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text() if path.exists() else "")
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path}:\n{path.read_text() if path.exists() else ''}")


def wait_until(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def start_headend(tmp_path):
    (tmp_path / "headend.toml").write_text("")
    proc = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--config", str(tmp_path / "headend.toml"),
                             "--database", f"sqlite:///{tmp_path / 'he.db'}", "--listen", "127.0.0.1:0",
                             "--metrics-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    addr = proc.stdout.readline().strip()
    metrics = proc.stdout.readline().split()[1]
    return proc, addr, metrics


def test_gateway_and_headend_metrics_move_while_a_real_daemon_polls_and_pushes(tmp_path, pty_bus):
    he, he_addr, he_metrics = start_headend(tmp_path)
    gw = None
    try:
        subprocess.run([str(BIN / "meterlink-gateway"), "signing-key", "--key", str(tmp_path / "signing.key"),
                        "--out", str(tmp_path / "gw.pub")], check=True, capture_output=True)
        subprocess.run([str(BIN / "meterlink-headend"), "trust-gateway", "GW-D", "--public-key",
                        str(tmp_path / "gw.pub"), "--database", f"sqlite:///{tmp_path / 'he.db'}",
                        "--config", str(tmp_path / "headend.toml")], check=True, capture_output=True)
        bus = pty_bus({1: None, 2: Faults(exception_code=4), 3: Faults(corrupt_crc_every=2)})
        cfg = write_config(tmp_path, bus_toml(bus.client_path, [1, 2, 3], timeout_s=0.3),
                           extra=f'\n[headend]\naddress = "{he_addr}"\n\n[metrics]\nlisten = "127.0.0.1:0"\n')
        gw = start_gateway(cfg, tmp_path / "gw.log")
        url = wait_for_line(tmp_path / "gw.log", r"metrics on (http://\S+/metrics)").group(1)
        bus_label = f'bus="{bus.client_path}"'
        got = wait_until(lambda: (s := scrape(url)).get("meterlink_gateway_pushed_records_total") and
                         s.get(f'meterlink_gateway_bus_errors_total{{{bus_label},kind="crc"}}') and s)
        assert got, scrape(url)
        readings = f"meterlink_gateway_readings_total{{{bus_label}}}"
        assert got[readings] > 0
        later = wait_until(lambda: (s := scrape(url))[readings] > got[readings] and s)   # the next poll counts
        assert later, (got, scrape(url))
        assert later[f'meterlink_gateway_bus_errors_total{{{bus_label},kind="exception"}}'] > 0
        assert later[f'meterlink_gateway_bus_errors_total{{{bus_label},kind="crc"}}'] > 0
        assert later[f'meterlink_gateway_bus_errors_total{{{bus_label},kind="timeout"}}'] == 0
        assert later[f"meterlink_gateway_failed_reads_total{{{bus_label}}}"] > 0
        assert later[f"meterlink_gateway_bus_requests_total{{{bus_label}}}"] > 0
        assert later["meterlink_gateway_journal_records"] >= later["meterlink_gateway_unacked_records"] >= 0
        assert later["meterlink_gateway_journal_records"] > 0
        assert later["meterlink_gateway_push_seconds_count"] > 0
        pushed = later["meterlink_gateway_pushed_records_total"]
        h = scrape(he_metrics)
        assert h["meterlink_headend_records_total"] >= pushed > 0
        assert h["meterlink_headend_batches_total"] > 0
        assert h["meterlink_headend_ingest_seconds_count"] > 0
    finally:
        if gw is not None:
            assert stop(gw) == 0
        stop(he)


def test_headend_counts_a_refused_batch_by_reason(tmp_path, pty_bus):
    he, he_addr, he_metrics = start_headend(tmp_path)
    gw = None
    try:                          # the gateway's key was never trusted: every batch is refused
        bus = pty_bus({1: None})
        cfg = write_config(tmp_path, bus_toml(bus.client_path, [1]), extra=f'\n[headend]\naddress = "{he_addr}"\n')
        gw = start_gateway(cfg, tmp_path / "gw.log", "--metrics-listen", "127.0.0.1:0")
        url = wait_for_line(tmp_path / "gw.log", r"metrics on (http://\S+/metrics)").group(1)
        key = 'meterlink_headend_refused_batches_total{reason="UNKNOWN_GATEWAY"}'
        assert wait_until(lambda: scrape(he_metrics).get(key, 0) >= 1), scrape(he_metrics)
        assert wait_until(lambda: scrape(url).get(
            'meterlink_gateway_push_refusals_total{reason="REFUSAL_UNKNOWN_GATEWAY"}', 0) >= 1)
        assert scrape(url)["meterlink_gateway_unacked_records"] > 0
    finally:
        if gw is not None:
            assert stop(gw) == 0
        stop(he)
