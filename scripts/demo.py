"""The meterlink demo: real processes, real wires, simulated time.

Starts the head-end, two simulated SDM630 meters on a Modbus RTU pseudo-terminal bus and one on
Modbus TCP, and the gateway (registered, enrolled, pushing over mutual TLS); all four share one
scaled clock (yesterday's 24 simulated hours, or --start DAY's, in about half a minute). Then reads
the head-end back, prints one line per meter, and bills, reconciles, exports and draws the month.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from meterlink.clock import parse_instant
from meterlink.money import wh_to_kwh

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Start a process and return it with the first line it prints (its address/path)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(timeout=5)
        raise SystemExit(f"{cmd[0]} failed to start; see {log}:\n{log.read_text()}")
    return proc, line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hours", type=int, default=24, help="simulated hours (default 24)")
    ap.add_argument("--start", help="simulated start date YYYY-MM-DD (default: yesterday, UTC)")
    ap.add_argument("--speed", type=float, default=3000, help="simulated seconds per real second")
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out", help="working directory (recreated)")
    args = ap.parse_args()

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # the operator registers the gateway and the meters it may speak for; the head-end's CA is made
    # here (one-time enrolment code, CA fingerprint for the gateway to pin)
    added = json.loads(subprocess.run(
        [str(BIN / "meterlink-headend"), "gateways", "add", "gw-demo-1", "--meter", "MTR-RTU-01", "--meter",
         "MTR-RTU-02", "--meter", "MTR-TCP-01", "--json", "--database", f"sqlite:///{out / 'headend.db'}",
         "--pki-dir", str(out / "headend-pki"), "--config", os.devnull],
        check=True, capture_output=True, text=True).stdout)
    # yesterday (UTC) by default: the head-end's CA dates certificates by the simulated clock, so the
    # simulated days must lie in the real past (and within the certificates' 825 days) for TLS to accept them
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    start_at = parse_instant(f"{args.start}T00:00:00Z") if args.start else today - timedelta(days=1)
    earliest = max(today - timedelta(days=700), parse_instant("2026-01-01T00:00:00Z"))   # demo bindings start
    if not earliest <= start_at <= today - timedelta(days=1):
        ap.error(f"--start {args.start}: pick a day between {earliest:%Y-%m-%d} and yesterday")
    until = start_at + timedelta(hours=args.hours)
    anchor = time.time() + 6.0  # every process starts (and the gateway enrols) before simulated midnight
    clock = f"scaled:{start_at.isoformat()},{args.speed},{anchor}"
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        he, he_addr = start([str(BIN / "meterlink-headend"), "serve", "--listen", "127.0.0.1:0",
                             "--database", f"sqlite:///{out / 'headend.db'}", "--clock", clock,
                             "--pki-dir", str(out / "headend-pki"), "--enrol-listen", "127.0.0.1:0",
                             "--config", os.devnull], out / "headend.log")
        procs.append(he)
        enrol_port = he.stdout.readline().split()[1]          # "enrol PORT ca-sha256 FP"
        rtu, pty = start([str(BIN / "meterlink-sim"), "modbus-rtu", "--profile", "eastron_sdm630",
                          "--unit", "1", "--unit", "2", "--seed", "11", "--import-wh", "1520000",
                          "--clock", clock], out / "sim-rtu.log")
        procs.append(rtu)
        tcp, tcp_addr = start([str(BIN / "meterlink-sim"), "modbus-tcp", "--profile", "eastron_sdm630",
                               "--unit", "1", "--seed", "31", "--import-wh", "88000", "--listen", "127.0.0.1:0",
                               "--clock", clock], out / "sim-tcp.log")
        procs.append(tcp)
        (out / "gateway.toml").write_text(f"""\
[gateway]
id = "gw-demo-1"
database = "{out / 'gateway.db'}"
poll_interval_s = 900

[headend]
address = "{he_addr}"
pki_dir = "{out / 'gateway-pki'}"

[[bus]]
port = "{pty}"
baud = 9600

[[bus.meter]]
id = "MTR-RTU-01"
unit = 1
profile = "eastron_sdm630"

[[bus.meter]]
id = "MTR-RTU-02"
unit = 2
profile = "eastron_sdm630"

[[bus]]
port = "tcp://{tcp_addr}"

[[bus.meter]]
id = "MTR-TCP-01"
unit = 1
profile = "eastron_sdm630"
""")
        # on the device: keys made there, CSR -> client certificate from the head-end's CA (pinned)
        subprocess.run([str(BIN / "meterlink-gateway"), "enroll", "--config", str(out / "gateway.toml"),
                        "--headend", f"127.0.0.1:{enrol_port}", "--code", added["code"],
                        "--ca-fingerprint", added["ca_fingerprint"]], check=True, stdout=subprocess.DEVNULL)
        print(f"head-end {he_addr} (mutual TLS; gw-demo-1 enrolled) | RTU bus {pty} (units 1, 2) | TCP meter {tcp_addr}")
        print(f"simulating {args.hours} h of 15-minute polls from {start_at:%Y-%m-%d %H:%M} UTC "
              f"at {args.speed:g}x ...", flush=True)
        gw = subprocess.run([str(BIN / "meterlink-gateway"), "run", "--config", str(out / "gateway.toml"),
                             "--clock", clock, "--first-poll", start_at.isoformat(), "--until", until.isoformat()],
                            stderr=open(out / "gateway.log", "w"))
        if gw.returncode != 0:
            print((out / "gateway.log").read_text(), file=sys.stderr)
            return gw.returncode
        rows = []
        for meter in ("MTR-RTU-01", "MTR-RTU-02", "MTR-TCP-01"):
            res = subprocess.run([str(BIN / "meterlink-headend"), "readings", "--meter", meter, "--obis", "1.8.0",
                                  "--json", "--database", f"sqlite:///{out / 'headend.db'}"],
                                 capture_output=True, text=True, check=True)
            readings = json.loads(res.stdout)["readings"]
            if not readings:
                rows.append((meter, 0, "-", "-", "-", "-", "-"))
                continue
            first, last = readings[0], readings[-1]
            rows.append((meter, len(readings), first["taken_at"][:16], first["value"], last["taken_at"][:16],
                         last["value"], f"{wh_to_kwh(last['value'] - first['value']):.3f}"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    print()
    head = ("meter", "reads", "first at (UTC)", "first 1.8.0 Wh", "last at (UTC)", "last 1.8.0 Wh", "used kWh")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print(f"\n(read back from the head-end database {out / 'headend.db'}; {time.monotonic() - t0:.1f} s real time)")
    print((out / "gateway.log").read_text().strip().splitlines()[-1])
    ok = all(r[1] == args.hours * 4 + 1 for r in rows)
    ok = billing(out, start_at) and ok
    if not ok:
        print("\ndemo: some meters were not read at every 15-minute boundary (see demo-out/*.log)", file=sys.stderr)
    return 0 if ok else 1


def billing(out: Path, start_at) -> bool:
    """Bind the demo meters to their accounts, bill the month, prove it, export it, draw one customer's report."""
    db = ["--database", f"sqlite:///{out / 'headend.db'}", "--config", os.devnull]
    period = f"{start_at:%Y-%m}"
    next_month = (start_at.replace(day=1) + timedelta(days=32)).replace(day=1)   # bills are issued after the month
    steps = [
        ("bindings", ["bindings", "load"]),                        # the bundled demo customers and bindings
        ("bill", ["bill", "--period", period, "--clock", f"sim:{next_month:%Y-%m-%d}T06:00:00Z"]),
        ("reconcile", ["reconcile", "--period", period]),
        ("export", ["export", "--to", str(out / "export"), "--format", "ubl"]),
        ("report", ["report", "--account", "A-GB-001", "--period", period, "--out", str(out / "report-A-GB-001.html")]),
        ("report", ["report", "--account", "A-GB-001", "--period", period, "--start", f"{start_at:%Y-%m-%d}",
                    "--end", f"{start_at + timedelta(days=1):%Y-%m-%d}", "--out", str(out / "report-A-GB-001-day.png")]),
    ]
    print()
    for name, cmd in steps:
        res = subprocess.run([str(BIN / "meterlink-headend"), *cmd, *db], capture_output=True, text=True)
        lines = res.stdout.strip().splitlines()
        shown = lines if name in ("bill",) else lines[:1]
        for line in shown:
            print(f"{name:10} {line}")
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
