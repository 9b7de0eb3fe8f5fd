"""`meterlink-gateway run` speaks sd_notify to a real unix datagram socket: READY=1 once a poll is journaled,
WATCHDOG=1 at half of WATCHDOG_USEC while every bus and the journal writer progress, and no more pings once a
bus read hangs (so systemd would restart the daemon)."""

from __future__ import annotations

import sqlite3
import os
import subprocess
import time

from meterlink.sim.meter import Faults

from .conftest import BIN, bus_toml, start_gateway, stop, write_config

WATCHDOG_USEC = "2000000"      # WatchdogSec=2: ping every 1 s, a bus busy for > 2 s is stuck


def _journaled(db) -> int:
    """Records in the gateway's journal; 0 while the daemon has created the file but not yet its schema."""
    try:
        with sqlite3.connect(db) as c:
            return c.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise


def test_ready_after_the_first_journaled_poll_then_watchdog_pings_at_half_the_period(
        tmp_path, pty_bus, notify_socket):
    a, b = pty_bus({1: None, 2: None}), pty_bus({3: None})
    cfg = write_config(tmp_path, bus_toml(a.client_path, [1, 2]) + bus_toml(b.client_path, [3]))
    t0 = time.monotonic()
    proc = start_gateway(cfg, tmp_path / "gw.log",
                         env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": WATCHDOG_USEC})
    try:
        ready = notify_socket.wait_for(lambda m: m.startswith("READY=1"), 15)
        assert ready is not None, (tmp_path / "gw.log").read_text()
        assert _journaled(tmp_path / "gw.db") > 0           # READY only once journal writes work
        assert "STATUS=polling 3 meter(s) on 2 bus(es)" in ready
        later = notify_socket.collect(3.0)
        pings = [m for m in later if m == "WATCHDOG=1"]
        assert 2 <= len(pings) <= 4, later                  # every 1 s (one may be late on a loaded machine)
        assert any(m.startswith("STATUS=polling 3 meter(s)") for m in later)
    finally:
        assert stop(proc) == 0
    assert time.monotonic() - t0 < 20
    assert any(m == "STOPPING=1" for _, m in notify_socket.messages) or \
        notify_socket.wait_for(lambda m: m == "STOPPING=1", 2) is not None


def test_a_bus_whose_read_hangs_stops_the_watchdog_pings_while_the_other_bus_still_polls(
        tmp_path, pty_bus, notify_socket):
    healthy = pty_bus({1: None})
    stuck = pty_bus({2: Faults(delay_s=60.0)})        # the meter answers after a minute...
    cfg = write_config(tmp_path, bus_toml(healthy.client_path, [1])
                       + bus_toml(stuck.client_path, [2], timeout_s=90.0))   # ...and the bus waits for it
    proc = start_gateway(cfg, tmp_path / "gw.log",
                         env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": WATCHDOG_USEC})
    try:
        assert notify_socket.wait_for(lambda m: m.startswith("READY=1"), 15) is not None, \
            (tmp_path / "gw.log").read_text()
        stalled = notify_socket.wait_for(lambda m: m.startswith("STATUS=stalled"), 10)
        assert stalled is not None and stalled_bus_named(stalled, stuck.client_path), stalled
        before = _journaled(tmp_path / "gw.db")
        after_stall = notify_socket.collect(3.0)
        assert "WATCHDOG=1" not in after_stall, after_stall  # systemd kills the daemon after WatchdogSec
        assert _journaled(tmp_path / "gw.db") > before       # the healthy bus still polls meanwhile
    finally:
        stop(proc, kill=True)                                 # as systemd's watchdog would (SIGABRT)


def stalled_bus_named(status: str, port: str) -> bool:
    return port in status and "journal writer" not in status


def test_without_notify_socket_the_daemon_runs_and_sends_nothing(tmp_path, pty_bus):
    a = pty_bus({1: None})
    cfg = write_config(tmp_path, bus_toml(a.client_path, [1]))
    proc = start_gateway(cfg, tmp_path / "gw.log", env={"NOTIFY_SOCKET": "", "WATCHDOG_USEC": ""})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ((tmp_path / "gw.db").exists() and _journaled(tmp_path / "gw.db")):
            time.sleep(0.1)
        assert _journaled(tmp_path / "gw.db") > 0
    finally:
        assert stop(proc) == 0


def test_headend_serve_sends_ready_once_it_listens(tmp_path, notify_socket):
    (tmp_path / "headend.toml").write_text("")
    proc = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--config", str(tmp_path / "headend.toml"),
                             "--database", f"sqlite:///{tmp_path / 'he.db'}", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": notify_socket.path})
    try:
        addr = proc.stdout.readline().strip()
        ready = notify_socket.wait_for(lambda m: m.startswith("READY=1"), 15)
        assert ready is not None and f"STATUS=listening on {addr}" in ready, (addr, ready)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert notify_socket.wait_for(lambda m: m == "STOPPING=1", 2) is not None
