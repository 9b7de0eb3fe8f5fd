"""The gateway's per-bus schedulers on real pty/TCP simulators: dead meters, recovery, priorities, relay."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from meterlink.clock import ScaledClock
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.readings import BILLING_OBIS
from meterlink.sim.server import TcpServer

from .conftest import START, sim_meters


class Recorder:
    """Stands in for the MQTT publisher: sees every accepted poll, in order."""

    def __init__(self) -> None:
        self.readings = []
        self.lock = threading.Lock()
        self.first = threading.Event()

    def publish(self, readings) -> None:
        with self.lock:
            self.readings.extend(readings)
        self.first.set()

    def close(self) -> None:
        pass

    def taken(self, meter: str, obis: str = "1.8.0"):
        with self.lock:
            return [r.taken_at for r in self.readings if r.meter_id == meter and r.obis == obis]


def write_config(tmp_path, buses: list[tuple[str, dict, dict[int, str]]], interval: int) -> str:
    text = f'[gateway]\nid = "gw-ops"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = {interval}\n'
    for port, extra, meters in buses:
        text += f'\n[[bus]]\nport = "{port}"\n' + "".join(f"{k} = {v}\n" for k, v in extra.items())
        for unit, mid in meters.items():
            text += f'\n[[bus.meter]]\nid = "{mid}"\nunit = {unit}\nprofile = "eastron_sdm630"\n'
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


def test_with_one_of_five_meters_dead_the_other_four_keep_their_poll_interval_and_it_recovers(tmp_path, pty_bus):
    """Scaled clock (10x): 10 s polls, 0.2 s real timeout = 2 simulated seconds per try of the dead meter."""
    speed, interval, timeout_sim = 10, 10, 2.0
    clock = ScaledClock(START, speed)
    meters = sim_meters(clock, {u: "eastron_sdm630" for u in range(1, 6)})
    first = clock.now().replace(microsecond=0) + timedelta(seconds=2)
    back_at = first + timedelta(seconds=25)
    meters[3].faults.absent = ((START, back_at),)        # M3 is dead for the first 25 simulated seconds
    bus = pty_bus(meters)
    cfg = write_config(tmp_path, [(bus.client_path, {"timeout_s": timeout_sim / speed},
                                   {u: f"M{u}" for u in range(1, 6)})], interval)
    rec = Recorder()
    gw = Gateway(load_config(cfg), clock, publisher=rec)
    failures = []            # when M3's tries failed (the daemon notes every failed poll)
    note = gw._note

    def noting(message: str) -> None:
        if "meter M3 " in message:
            failures.append(clock.now())
        note(message)
    gw._note = noting
    try:
        gw.run(threading.Event(), until=first + timedelta(seconds=4 * interval), first=first)
        slot = gw.workers[0].schedule.slots["M3"]
    finally:
        gw.close()
    boundaries = [first + timedelta(seconds=k * interval) for k in range(5)]
    for meter in ("M1", "M2", "M4", "M5"):
        got = rec.taken(meter)
        assert len(got) == 5, (meter, got)               # one poll in every interval, none skipped
        for at, boundary in zip(got, boundaries):
            delay = (at - boundary).total_seconds()
            # at most one timeout of the dead meter plus the live reads (generous for a loaded machine)
            assert 0 <= delay <= timeout_sim + 4.0, (meter, boundary, delay)
    # M3 failed, backed off, came back and is polled on the grid again with its backoff reset
    assert slot.polls_failed >= 3 and len(failures) == slot.polls_failed
    gaps = [(b - a).total_seconds() for a, b in zip(failures, failures[1:])]
    assert gaps[-1] > gaps[0], gaps                      # the retries backed off
    assert (slot.failures, slot.retry_at) == (0, None) and slot.last_ok is not None
    m3 = rec.taken("M3")
    assert m3 and all(at >= back_at for at in m3)
    assert any(0 <= (at - boundaries[-1]).total_seconds() <= 4.0 for at in m3), m3   # back on the grid
    assert gw.stats.read_errors == slot.polls_failed


def test_buses_poll_in_lock_step_on_a_simulated_clock_with_stagger_and_priorities(tmp_path, clock, pty_bus):
    rtu = pty_bus(sim_meters(clock, {1: "eastron_sdm630", 2: "eastron_sdm630"}))
    tcp = TcpServer(sim_meters(clock, {7: "eastron_sdm630"})).start()
    try:
        cfg = write_config(tmp_path, [(rtu.client_path, {"stagger_s": 60}, {1: "R1", 2: "R2"}),
                                      (f"tcp://{tcp.address}", {}, {7: "T7"})], 900)
        rec = Recorder()
        gw = Gateway(load_config(cfg), clock, publisher=rec)
        try:
            gw.run(threading.Event(), until=START + timedelta(hours=2), first=START)
        finally:
            gw.close()
    finally:
        tcp.stop()
    grid = [START + timedelta(minutes=15 * k) for k in range(9)]
    assert rec.taken("R1") == grid
    # staggered by 60 s / 2 meters; its 02:00:30 poll is after `until`
    assert rec.taken("R2") == [t + timedelta(seconds=30) for t in grid[:-1]]
    assert rec.taken("T7") == grid
    assert rec.taken("T7", "1.7.0") == grid                                 # instantaneous values too
    # on each bus, every billing register of a sweep is read before any instantaneous value
    first_sweep = [r for r in rec.readings if r.taken_at == START and r.meter_id in ("R1", "T7")]
    kinds = [r.obis in BILLING_OBIS for r in first_sweep if r.meter_id == "R1"]
    assert kinds == sorted(kinds, reverse=True) and kinds[0]
    assert gw.stats.read_errors == 0 and gw.stats.flagged == 0


def test_a_relay_command_wakes_a_sleeping_bus_and_goes_before_any_read(tmp_path, pty_bus):
    clock = ScaledClock(START, 1.0)
    meters = sim_meters(clock, {1: "eastron_sdm630"})
    bus = pty_bus(meters)
    cfg = write_config(tmp_path, [(bus.client_path, {"timeout_s": 0.5}, {1: "M1"})], 900)
    rec = Recorder()
    gw = Gateway(load_config(cfg), clock, publisher=rec)
    stop = threading.Event()
    runner = threading.Thread(target=gw.run, kwargs={"stop": stop, "first": clock.now()}, daemon=True)
    runner.start()
    try:
        assert rec.first.wait(10), "the first poll did not happen"
        started = time.monotonic()
        done_at = gw.switch_relay("M1", False).result(timeout=10)
        assert time.monotonic() - started < 5               # not at the next 15-minute poll
        assert meters[1].relay_closed is False
        assert done_at <= clock.now()
        with pytest.raises(KeyError):
            gw.switch_relay("nobody", True)
    finally:
        stop.set()
        runner.join(10)
        gw.close()
    assert not runner.is_alive()


def test_a_meter_register_going_backwards_on_the_wire_is_journaled_with_a_decrease_flag(tmp_path, clock, pty_bus):
    meters = sim_meters(clock, {1: "eastron_sdm630"})
    bus = pty_bus(meters)
    cfg = write_config(tmp_path, [(bus.client_path, {}, {1: "M1"})], 900)
    rec = Recorder()
    gw = Gateway(load_config(cfg), clock, publisher=rec)
    try:
        gw.poll_once()
        clock.advance(timedelta(minutes=15))
        meters[1].advance()
        meters[1].import_mj -= 5_000 * 3_600_000            # the register drops by 5 kWh
        gw.poll_once()
        clock.advance(timedelta(minutes=15))
        meters[1].advance()
        meters[1].import_mj += 10_000_000 * 3_600_000       # +10 MWh in 15 minutes: beyond 69 kW
        gw.poll_once()
    finally:
        gw.close()
    flags = [r.quality for r in rec.readings if r.obis == "1.8.0"]
    assert flags == [0, 2, 4]                               # OK, DECREASE, IMPLAUSIBLE_JUMP
    values = [r.value for r in rec.readings if r.obis == "1.8.0"]
    assert values[1] < values[0] < values[2]                # kept as read, not "fixed"


def test_a_meter_exchanged_on_the_bus_is_flagged_from_its_serial_number_not_as_a_decrease(tmp_path, clock, pty_bus):
    meters = sim_meters(clock, {1: "eastron_sdm630"})
    meters[1].faults.exchange_at = START + timedelta(minutes=20)
    meters[1].faults.exchange_serial = 77_000_001
    meters[1].faults.exchange_import_wh = 50
    bus = pty_bus(meters)
    cfg = write_config(tmp_path, [(bus.client_path, {}, {1: "M1"})], 900)
    rec = Recorder()
    gw = Gateway(load_config(cfg), clock, publisher=rec)
    try:
        gw.run(threading.Event(), until=START + timedelta(minutes=45), first=START)
    finally:
        gw.close()
    imports = [(r.value, r.quality) for r in rec.readings if r.obis == "1.8.0"]
    assert [q for _, q in imports] == [0, 0, 8, 0]          # METER_EXCHANGE at 00:30 only, no DECREASE
    assert imports[2][0] < imports[1][0]                     # the new meter's register, kept as read
    assert gw.memos["M1"].serial == 77_000_001
