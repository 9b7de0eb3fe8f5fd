"""P1 ports are watched like buses: busy while waiting for a telegram, idle between polls; a port that waits
longer than the stall limit stops the watchdog pings."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

from meterlink.clock import SimClock
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.profiles import load_profile
from meterlink.sim.dsmr import P1Meter, P1PtyServer
from meterlink.sim.meter import MeterModel

START = datetime(2026, 11, 25, 6, 0, tzinfo=timezone.utc)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, msg: str) -> bool:
        self.sent.append(msg)
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")


def gateway(tmp_path, clock):
    meter = MeterModel.starting_at(load_profile("eastron_sdm630"), clock, seed=9, import_wh=3_000_000)
    server = P1PtyServer(P1Meter(meter, version="5"))
    (tmp_path / "gateway.toml").write_text(
        f'[gateway]\nid = "gw-p1w"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n\n'
        f'[[p1]]\nport = "{server.client_path}"\nversion = "5"\nmeter_id = "HOUSE-1"\n')
    return Gateway(load_config(str(tmp_path / "gateway.toml")), clock), server


def test_a_p1_port_that_delivers_is_ready_and_pinged(tmp_path):
    clock = SimClock(START)
    gw, server = gateway(tmp_path, clock)
    stop_feed = threading.Event()
    feeder = threading.Thread(target=lambda: [server.emit_once() for _ in iter(lambda: stop_feed.wait(0.02), True)])
    feeder.start()
    out = Recorder()
    try:
        gw.run(threading.Event(), until=START + timedelta(minutes=30), first=START, notifier=out, watchdog_s=0.1)
    finally:
        stop_feed.set()
        feeder.join()
        gw.close()
        server.stop()
    assert out.sent[0] == "READY=1" and out.sent[-1] == "STOPPING=1"
    assert f"p1 {server.client_path}" in gw.progress._last
    assert gw.progress.stalled(time.monotonic()) == []


def test_a_p1_port_waiting_past_the_stall_limit_stops_the_pings(tmp_path):
    clock = SimClock(START)
    gw, server = gateway(tmp_path, clock)              # the meter never sends: each poll waits 5 s
    out = Recorder()
    try:
        gw.run(threading.Event(), until=START, first=START, notifier=out, watchdog_s=0.2)   # stall after 0.4 s
    finally:
        gw.close()
        server.stop()
    stalled = [m for m in out.sent if m.startswith("STATUS=stalled")]
    assert stalled == [f"STATUS=stalled: p1 {server.client_path} (watchdog pings stopped)"]
    after = out.sent[out.sent.index(stalled[0]):]
    assert "WATCHDOG=1" not in after and gw.stats.read_errors == 1
