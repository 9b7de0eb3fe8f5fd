"""systemd units verify, sd_notify messages reach a real socket, and the watchdog follows progress."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meterlink.gateway.health import ProgressMonitor
from meterlink.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not available")
@pytest.mark.parametrize("unit", ["meterlink-gateway.service", "meterlink-headend.service"])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path, unit):
    text = (ROOT / "systemd" / unit).read_text().replace("/opt/meterlink/.venv/bin", str(Path(sys.executable).parent))
    (tmp_path / unit).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    complaints = [l for l in (out.stdout + out.stderr).splitlines() if unit in l]
    assert not complaints, complaints


def test_gateway_unit_is_notify_with_watchdog_and_hardened():
    text = (ROOT / "systemd" / "meterlink-gateway.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "User=meterlink", "ProtectSystem=strict", "PrivateTmp=yes",
                 "SupplementaryGroups=dialout", "NoNewPrivileges=yes"):
        assert line in text, line


def test_notifier_sends_ready_and_watchdog_to_the_notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    n = Notifier(path)
    assert n.ready("polling 3 meters") and n.watchdog()
    assert sock.recv(256) == b"READY=1\nSTATUS=polling 3 meters"
    assert sock.recv(256) == b"WATCHDOG=1"
    sock.close()


def test_notifier_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready() and not n.watchdog()


def test_a_stuck_poller_makes_the_daemon_unhealthy_while_others_progress():
    mon = ProgressMonitor(max_silence_s=60)
    for name in ("bus:/dev/ttyUSB0", "bus:tcp://10.0.0.5:502", "journal"):
        mon.register(name, now=0)
    assert mon.healthy(30)
    for t in (50, 100, 150):
        mon.beat("bus:tcp://10.0.0.5:502", t)
        mon.beat("journal", t)
    assert mon.stalled(150) == ["bus:/dev/ttyUSB0"]
    assert not mon.healthy(150)
    mon.beat("bus:/dev/ttyUSB0", 151)
    assert mon.healthy(151)
