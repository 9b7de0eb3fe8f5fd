"""The real processes of the end-to-end PAYG tests: `meterlink-headend serve --payg` with mutual TLS, the head-end
CLI against its database, `meterlink-sim modbus-tcp` on a scaled clock; waiting for and stopping them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def wait_until(predicate, timeout: float = 10.0, step: float = 0.05):
    """Poll `predicate` every `step` s until it is truthy (-> its value) or `timeout` s passed (-> its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def evening_peak_start(now: datetime | None = None) -> datetime:
    """The next 17:00 UTC (always ahead of `now`, by at most a day): the simulator's household shape
    draws 1.9-2.6 kW from then until 20:00 (firmware-sim/meter.py DAILY_SHAPE_W), so a scaled clock
    anchored there uses credit at a known pace whatever the hour the test runs. Anchored at the real
    now, a run at 21:00 UTC starts in the night-time trough and a few pounds last most of a night."""
    now = now or datetime.now(timezone.utc)
    peak = now.replace(hour=17, minute=0, second=0, microsecond=0)
    return peak if peak > now else peak + timedelta(days=1)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
    return proc.wait(timeout=20)


def write_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key, also written to `path` as PKCS#8 PEM (a token key or a card key)."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def start_payg_headend(tmp_path: Path, db: Path, max_grant: int) -> tuple[subprocess.Popen, str, str, str]:
    """`serve --payg` with a CA in tmp_path/he-pki and the token key tmp_path/token.pem
    -> (process, address, enrolment address, CA fingerprint)."""
    (tmp_path / "headend.toml").write_text(f'[headend]\nlisten = "127.0.0.1:0"\ndatabase = "sqlite:///{db}"\n')
    serve = subprocess.Popen(
        [str(BIN / "meterlink-headend"), "serve", "--config", str(tmp_path / "headend.toml"),
         "--pki-dir", str(tmp_path / "he-pki"), "--enrol-listen", "127.0.0.1:0",
         "--payg", "--payg-token-key", str(tmp_path / "token.pem"), "--payg-min-grant", "100",
         "--payg-max-grant", str(max_grant), "--payg-burn-rate", "200", "--payg-grant-validity-s", str(30 * 86400)],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    address = serve.stdout.readline().strip()
    enrol = serve.stdout.readline().split()          # enrol PORT ca-sha256 FP
    if not (address and enrol):
        stop(serve)
        raise AssertionError("head-end did not start")
    return serve, address, f"127.0.0.1:{enrol[1]}", enrol[3]


def headend_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The head-end CLI on the database and CA of `start_payg_headend`; a failure raises."""
    return subprocess.run([str(BIN / "meterlink-headend"), *args, "--config", str(tmp_path / "headend.toml"),
                           "--pki-dir", str(tmp_path / "he-pki")],
                          capture_output=True, text=True, check=True, cwd=tmp_path)


def start_sim(clock: str) -> tuple[subprocess.Popen, str]:
    """An SDM630 with a relay coil on Modbus TCP on `clock` -> (process, HOST:PORT)."""
    sim = subprocess.Popen([str(BIN / "meterlink-sim"), "modbus-tcp", "--profile", "eastron_sdm630", "--unit", "1",
                            "--seed", "1", "--import-wh", "10000", "--clock", clock, "--listen", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, text=True, env=ENV)
    return sim, sim.stdout.readline().strip()
