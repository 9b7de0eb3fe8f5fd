"""The gateway daemon polls a [[p1]] port (simulated meter on a real pty) and journals whole telegrams."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from meterlink.clock import SimClock
from meterlink.gateway.config import P1Config, load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.p1 import P1Reader, P1Worker
from meterlink.gateway.profiles import load_profile
from meterlink.readings import Reading
from meterlink.sim.dsmr import P1Faults, P1Meter, P1PtyServer
from meterlink.sim.meter import MeterModel

UTC = timezone.utc
START = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)


def sim_port(clock, faults=None) -> P1PtyServer:
    meter = MeterModel.starting_at(load_profile("eastron_sdm630"), clock, seed=9, import_wh=3_000_000)
    return P1PtyServer(P1Meter(meter, version="5"), faults=faults)


class Feeder:
    """The meter's side: a telegram every 20 ms of real time, at whatever the simulated clock says."""

    def __init__(self, server: P1PtyServer) -> None:
        self.server, self.stop = server, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.server.emit_once()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_daemon_journals_every_p1_poll_with_the_meter_time_and_the_gas_meter(tmp_path):
    clock = SimClock(START)
    server = sim_port(clock, P1Faults(bad_crc_every=3, garbage=b"noise\r\n"))
    path = tmp_path / "gateway.toml"
    path.write_text(f'''
[gateway]
id = "gw-p1"
database = "{tmp_path / 'gw.db'}"
poll_interval_s = 900

[[p1]]
port = "{server.client_path}"
version = "5"
meter_id = "HOUSE-1"
gas_meter_id = "GAS-1"
''')
    gw = Gateway(load_config(str(path)), clock)
    first = START + timedelta(minutes=15)
    try:
        with Feeder(server):
            gw.run(threading.Event(), until=first + timedelta(minutes=30), first=first)
        records = [r.body for r in gw.journal.records() if isinstance(r.body, Reading)]
    finally:
        gw.close()
        server.stop()
    elec = [r for r in records if r.meter_id == "HOUSE-1"]
    gas = [r for r in records if r.meter_id == "GAS-1"]
    polls = [first, first + timedelta(minutes=15), first + timedelta(minutes=30)]
    assert sorted({r.taken_at for r in elec}) == polls
    assert len(gas) == 3 and all(r.unit == "dm3" for r in gas)
    totals = [sum(r.value for r in elec if r.taken_at == t and r.obis in ("1.8.1", "1.8.2")) for t in polls]
    assert totals == sorted(totals) and totals[0] > 3_000_000
    assert len(elec) == 3 * 18 and gw.stats.polls == 3 and gw.stats.read_errors == 0
    assert all(r.quality == 0 for r in records)


def test_a_silent_p1_port_is_reported_and_nothing_is_delivered():
    clock = SimClock(START)
    server = sim_port(clock)
    reader = P1Reader(server.client_path, "5", clock=clock)
    delivered, errors = [], []
    worker = P1Worker(P1Config(server.client_path), reader, clock, None, 900, START,
                      lambda cfg, got: delivered.append(got), errors.append, stop=threading.Event(), wait_s=0.3)
    try:
        assert worker.poll_once() is None
        server.emit_once()                  # sent before the poll: stale, dropped by the poll
        assert worker.poll_once() is None
    finally:
        reader.close()
        server.stop()
    assert delivered == [] and len(errors) == 2
    assert errors[0].startswith(f"P1 port {server.client_path}: ") and "no valid telegram in 0.3 s" in errors[0]
