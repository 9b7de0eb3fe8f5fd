"""Bus benchmark: N Eastron SDM630 meters on one 9600 8N1 RS-485 bus.

Prints, per sweep of the bus, for N = 1, 10, 32, 100:
  * the wire-time model (gateway/readplan.py): requests, bytes on the wire, modelled wire time, the
    theoretical minimum (fewest requests the block limit allows, carrying only the registers the
    quantities occupy) and the ratio minimum / modelled; the same for one request per value (mbmd);
  * measured against the real simulator over a pty (`meterlink-sim modbus-rtu`, a separate process):
    the gateway's CPU time (time.process_time of this process only) per 1000 meter reads, merged vs
    one request per value;
  * with the simulator pacing its answers at 9600 baud (`--pace`): the measured sweep time against
    the modelled wire time, i.e. how close the gateway gets to what the wire allows.

Run: .venv/bin/python bench/bench_bus.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone

from meterlink import modbus
from meterlink.clock import SimClock
from meterlink.gateway.poller import MeterReader
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.readplan import block_of, plan_meter, sweep_cost
from meterlink.gateway.transport import RtuMaster
from meterlink.modbus import SerialLine

LINE = SerialLine(9600, "N", 1)
PROFILE = "eastron_sdm630"
CLOCK = SimClock(datetime(2026, 11, 24, 12, tzinfo=timezone.utc))


def start_sim(units: int, pace: bool = False) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "meterlink.sim.cli", "modbus-rtu", "--profile", PROFILE,
            "--clock", "sim:2026-11-24T12:00:00Z"]
    for u in range(1, units + 1):
        args += ["--unit", str(u)]
    if pace:
        args.append("--pace")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, proc.stdout.readline().strip()


def modelled() -> None:
    profile = load_profile(PROFILE)
    print(f"wire-time model: {profile.manufacturer} {profile.model} ({len(profile.quantities)} quantities, "
          f"max_block {profile.max_block}, response delay {profile.response_delay_ms} ms) on {LINE.describe()}")
    head = (f"{'meters':>6} {'req/sweep':>9} {'bytes/sweep':>11} {'wire s':>8} {'min s':>8} {'min/wire':>8}"
            f" | {'mbmd req':>8} {'mbmd s':>8} {'speed-up':>8}")
    print(head)
    print("-" * len(head))
    for n in (1, 10, 32, 100):
        plans = [plan_meter(f"m{i}", profile, LINE) for i in range(n)]
        c = sweep_cost(LINE, plans)
        print(f"{n:>6} {c.requests:>9} {c.bytes_on_wire:>11} {c.wire_time_s:>8.3f} {c.min_wire_time_s:>8.3f} "
              f"{c.efficiency:>8.1%} | {c.per_value_requests:>8} {c.per_value_wire_time_s:>8.3f} "
              f"{c.per_value_wire_time_s / c.wire_time_s:>7.2f}x")
    print("as the gateway daemon polls today (billing job with the serial number + separate instantaneous job):")
    for n in (1, 10, 32, 100):
        c = sweep_cost(LINE, [plan_meter(f"m{i}", profile, LINE, with_serial=True, split_priorities=True)
                              for i in range(n)])
        print(f"{n:>6} {c.requests:>9} {c.bytes_on_wire:>11} {c.wire_time_s:>8.3f} {c.min_wire_time_s:>8.3f} "
              f"{c.efficiency:>8.1%} |")
    c1 = sweep_cost(LINE, [plan_meter("m", profile, LINE)])
    print(f"requests per meter: {c1.requests} (= fewest the {profile.max_block}-register block limit allows: "
          f"{c1.min_requests}); mbmd-style: {c1.per_value_requests}")
    hole = 16 * 2 * LINE.char_time_s
    extra = 13 * LINE.char_time_s + 2 * LINE.gap_s + profile.response_delay_ms / 1000
    print(f"the gap to the minimum is the SDM630's 16-register hole 0x0036-0x0045 between total power and "
          f"frequency: reading through it costs {hole * 1000:.1f} ms per meter, a third request would cost "
          f"{extra * 1000:.1f} ms, so the plan (an exact optimum of the model) reads through it")
    print()


def per_value_read(master: RtuMaster, unit: int, profile) -> int:
    """The one-request-per-value approach (as mbmd does it), with our own master and decoder."""
    from meterlink.gateway.profiles import decode
    n = 0
    for q in profile.quantities:
        b = block_of([q])
        words = master.execute(modbus.read_request(unit, b.function, b.address, b.count))
        decode(q, words, profile.no_value)
        n += 1
    return n


def cpu_per_1000_reads(meters: int, reads: int) -> None:
    profile = load_profile(PROFILE)
    proc, path = start_sim(meters)
    try:
        master = RtuMaster(path, 9600, timeout=1.0)
        readers = [MeterReader(f"m{u}", u, profile) for u in range(1, meters + 1)]
        for r in readers:  # warm up (plans made, pty settled)
            r.read(master, CLOCK)
        sweeps = max(1, reads // meters)
        for label, fn in (("merged (meterlink)", lambda r: r.read(master, CLOCK).requests),
                          ("one request per value (mbmd-style)", lambda r: per_value_read(master, r.unit, profile))):
            requests = 0
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(sweeps):
                for r in readers:
                    requests += fn(r)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            done = sweeps * meters
            print(f"  {label:36} {done} meter reads, {requests / done:4.1f} req/read: "
                  f"gateway CPU {cpu / done * 1000:6.3f} s per 1000 meter reads; "
                  f"wall {wall / done * 1000:6.2f} ms per read (pty, unpaced)")
        master.close()
    finally:
        proc.terminate()
        proc.wait(5)


def paced(meters: int, sweeps: int) -> None:
    profile = load_profile(PROFILE)
    cost = sweep_cost(LINE, [plan_meter(f"m{u}", profile, LINE) for u in range(meters)])
    proc, path = start_sim(meters, pace=True)
    try:
        master = RtuMaster(path, 9600, timeout=1.0)
        readers = [MeterReader(f"m{u}", u, profile) for u in range(1, meters + 1)]
        for r in readers:
            r.read(master, CLOCK)
        t0 = time.perf_counter()
        for _ in range(sweeps):
            for r in readers:
                r.read(master, CLOCK)
        per_sweep = (time.perf_counter() - t0) / sweeps
        master.close()
    finally:
        proc.terminate()
        proc.wait(5)
    print(f"  {meters} meters, {sweeps} sweeps at a paced 9600 baud: measured {per_sweep:.3f} s/sweep, "
          f"modelled {cost.wire_time_s:.3f} s -> the gateway reaches {cost.wire_time_s / per_sweep:.1%} "
          f"of the wire's limit")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    modelled()
    print("gateway CPU time (time.process_time of the gateway process; simulator in its own process):")
    cpu_per_1000_reads(10, 200 if quick else 1000)
    print()
    print("measured sweep time against the model (simulator paces answers at the line's speed):")
    paced(10, 1 if quick else 3)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
