"""Requests per sweep on a real pty simulator: an SDM630 whose billing and instantaneous reads fall due together
is read in ONE merged plan (2 requests), the serial number only every `serial_every`th poll and right after a
failed read or a falling register; relay commands still go first."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from meterlink.clock import SimClock
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.readplan import check_bus
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import RtuPtyServer

START = datetime(2026, 11, 24, tzinfo=timezone.utc)
INTERVAL = timedelta(seconds=900)


def setup(tmp_path, units=(1,), serial_every=3):
    clock = SimClock(START)
    meters = {u: MeterModel.starting_at(load_profile("eastron_sdm630"), clock, unit=u, seed=u, import_wh=10_000 * u)
              for u in units}
    server = RtuPtyServer(meters).start()
    text = (f'[gateway]\nid = "gw-eff"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 900\n'
            f'serial_every = {serial_every}\n\n[[bus]]\nport = "{server.client_path}"\ntimeout_s = 0.3\n')
    for u in units:
        text += f'\n[[bus.meter]]\nid = "E-{u}"\nunit = {u}\nprofile = "eastron_sdm630"\n'
    (tmp_path / "gateway.toml").write_text(text)
    gw = Gateway(load_config(str(tmp_path / "gateway.toml")), clock)
    return clock, meters, server, gw


def sweep(gw, server, at: datetime) -> int:
    """Run the daemon for the one sweep at `at`; the requests the simulated meters received."""
    before = server.frames_in
    gw.run(threading.Event(), until=at, first=at)
    return server.frames_in - before


def test_an_sdm630_costs_two_requests_per_sweep_and_its_serial_every_nth_poll(tmp_path):
    clock, meters, server, gw = setup(tmp_path, serial_every=3)
    try:
        counts = [sweep(gw, server, START + i * INTERVAL) for i in range(7)]
        assert counts == [3, 2, 2, 3, 2, 2, 3]          # 2 merged blocks; +1 for the serial on polls 0, 3, 6
        assert gw.stats.readings == 7 * len(load_profile("eastron_sdm630").quantities)   # every value, every sweep
        assert gw.stats.read_errors == 0
    finally:
        gw.close()
        server.stop()


def test_after_a_failed_read_the_next_read_checks_the_serial_number(tmp_path):
    clock, meters, server, gw = setup(tmp_path, serial_every=96)
    try:
        assert sweep(gw, server, START) == 3                       # first poll: serial read once
        assert sweep(gw, server, START + INTERVAL) == 2
        meters[1].faults.silent = True
        sweep(gw, server, START + 2 * INTERVAL)                    # times out (no answer counted as a frame)
        assert gw.stats.read_errors >= 1
        meters[1].faults.silent = False
        assert sweep(gw, server, START + 3 * INTERVAL) == 3        # the serial is checked again
        assert sweep(gw, server, START + 4 * INTERVAL) == 2
    finally:
        gw.close()
        server.stop()


def test_an_exchanged_meter_is_recognised_on_the_poll_its_register_falls_though_the_serial_was_not_due(tmp_path):
    clock, meters, server, gw = setup(tmp_path, serial_every=96)
    published = []
    gw.mqtt = type("P", (), {"publish": lambda self, rs: published.extend(rs), "close": lambda self: None})()
    try:
        sweep(gw, server, START)
        sweep(gw, server, START + INTERVAL)
        meters[1].faults.exchange_at = START + INTERVAL + timedelta(minutes=1)
        meters[1].faults.exchange_serial, meters[1].faults.exchange_import_wh = 99_000_001, 5
        assert sweep(gw, server, START + 2 * INTERVAL) == 3        # register fell: serial read at once
        imports = [r.quality for r in published if r.obis == "1.8.0"]
        assert imports[:2] == [0, 0] and imports[2] & 8 and not imports[2] & 2    # METER_EXCHANGE, not DECREASE
    finally:
        gw.close()
        server.stop()


def test_the_bus_model_prices_the_merged_plan_the_daemon_now_sends():
    from meterlink.gateway.config import BusConfig, MeterConfig
    profile = load_profile("eastron_sdm630")
    bus = BusConfig(port="/dev/ttyUSB0", meters=tuple(MeterConfig(f"M{i}", i, profile) for i in range(1, 11)))
    merged = check_bus(bus, 900, split_priorities=False, with_serial=False)
    split = check_bus(bus, 900)
    assert merged.requests == 20 and split.requests == 40
    assert merged.wire_time_s < split.wire_time_s


def test_a_meter_that_accepts_shorter_reads_than_its_profile_is_replanned_once_with_the_learnt_limit(tmp_path):
    import dataclasses
    clock, meters, server, gw = setup(tmp_path, serial_every=96)
    strict = dataclasses.replace(load_profile("eastron_sdm630"), max_block=20)     # firmware below its datasheet
    meters[1] = MeterModel.starting_at(strict, clock, unit=1, seed=1, import_wh=10_000)
    server.meters[1] = meters[1]
    try:
        first = sweep(gw, server, START)               # 24-register block refused (exception 3), split
        later = [sweep(gw, server, START + i * INTERVAL) for i in (1, 2)]
        assert gw._max_block["E-1"] <= 20
        assert later[0] == later[1] < first            # re-planned within the limit: no refused requests
        assert gw.stats.read_errors == 0
        assert gw.stats.readings == 3 * len(strict.quantities)
    finally:
        gw.close()
        server.stop()


def test_the_scheduler_merges_a_meters_reads_due_together_but_relay_commands_still_go_first():
    from meterlink.gateway.scheduler import BusSchedule, Priority
    core = BusSchedule([("A", True, True), ("B", True, False), ("C", False, True)], 900, START, merge=True)
    core.submit_relay("C", False, START)
    jobs = [core.next_job(START) for _ in range(4)]
    assert [(j.priority, j.meter_id, j.merged) for j in jobs] == [
        (Priority.RELAY, "C", False),
        (Priority.BILLING, "A", True),            # billing + instantaneous in one job
        (Priority.BILLING, "B", False),           # only billing quantities: nothing to merge
        (Priority.INSTANT, "C", False)]           # only instantaneous: keeps its lower priority
    split = BusSchedule([("A", True, True)], 900, START)
    assert [j.priority for j in (split.next_job(START), split.next_job(START))] == [Priority.BILLING,
                                                                                  Priority.INSTANT]
