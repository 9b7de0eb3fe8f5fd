"""`meterlink-gateway`: the concentrator daemon and the field engineer's commands."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from meterlink.clock import clock_from_spec, parse_instant
from meterlink.errors import MeterlinkError, ValidationError
from meterlink.readings import UNITS

from .config import load_config
from .daemon import Gateway
from .poller import read_meter
from .profiles import load_profile
from .transport import open_master


def _display(value: int, unit: str) -> str:
    big, factor = UNITS[unit]
    if unit == "Wh":
        return f"{value} Wh"
    return f"{value / factor:g} {big}" if big else str(value)


def cmd_read_dsmr(args) -> int:
    """`read --dsmr`: the next valid telegram on a P1 port, printed like a Modbus read."""
    from meterlink.gateway.dsmr import ELECTRICITY_NAMES
    from meterlink.gateway.p1 import P1Reader

    reader = P1Reader(args.port, args.dsmr_version, clock=clock_from_spec(args.clock))
    wait = args.wait if args.wait is not None else (5.0 if args.dsmr_version == "5" else 35.0)
    try:
        got = reader.read_one(wait, meter_id=args.meter_id)
    finally:
        reader.close()
    t = got.telegram
    if args.json:
        print(json.dumps({"dsmr": args.dsmr_version, "port": args.port, "header": t.header,
                          "equipment_id": t.serial, "telegram_time": t.timestamp and t.timestamp.isoformat(),
                          "crc": None if t.crc is None else f"{t.crc:04X}", "values": [
                              {"meter": r.meter_id, "obis": r.obis, "value": r.value, "unit": r.unit,
                               "taken_at": r.taken_at.isoformat()} for r in got.readings]}))
        return 0
    crc = "no CRC" if t.crc is None else f"CRC {t.crc:04X}"
    print(f"DSMR {args.dsmr_version} P1 on {args.port}: {t.header}, meter {got.readings[0].meter_id}, "
          f"telegram time {t.timestamp.isoformat() if t.timestamp else '-'} ({crc})")
    for r in got.readings:
        name = ELECTRICITY_NAMES.get(r.obis, "")
        if r.obis == "24.2.1":
            name = f"gas, meter {r.meter_id}"
        print(f"  {r.obis:8} {name:24} {r.value:>14} {r.unit:4}  ({_display(r.value, r.unit)})")
    return 0


def cmd_read(args) -> int:
    if args.dsmr:
        return cmd_read_dsmr(args)
    if not args.profile:
        raise ValidationError("read: --profile is required for a Modbus meter (or give --dsmr for a P1 port)")
    profile = load_profile(args.profile)
    clock = clock_from_spec(args.clock)
    master = open_master(args.port, baud=args.baud, parity=args.parity, stopbits=args.stopbits, timeout=args.timeout)
    try:
        result = read_meter(master, args.unit, profile, args.meter_id or f"unit-{args.unit}", clock)
    finally:
        master.close()
    if args.json:
        print(json.dumps({"unit": args.unit, "profile": profile.name, "values": [
            {"obis": r.obis, "value": r.value, "unit": r.unit} for r in result.readings]}))
        return 0
    names = {q.obis: q.name for q in profile.quantities}
    print(f"{profile.manufacturer} {profile.model}, unit {args.unit} on {args.port} "
          f"({result.requests} requests)")
    for r in result.readings:
        print(f"  {r.obis:8} {names.get(r.obis, ''):24} {r.value:>14} {r.unit:4}  ({_display(r.value, r.unit)})")
    return 0


def cmd_run(args) -> int:
    config = load_config(args.config)
    clock = clock_from_spec(args.clock)
    until = parse_instant(args.until) if args.until else None
    first = parse_instant(args.first_poll) if args.first_poll else None
    gw = Gateway(config, clock)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"gateway {config.id}: {sum(len(b.meters) for b in config.buses)} meter(s) on "
          f"{len(config.buses)} bus(es), every {config.poll_interval_s} s", file=sys.stderr, flush=True)
    try:
        gw.run(stop, until=until, first=first)
        gw.sync_once()
    except KeyboardInterrupt:
        pass
    finally:
        s = gw.stats
        print(f"gateway {config.id}: {s.polls} polls, {s.readings} readings, {s.read_errors} read errors, "
              f"{s.pushed} pushed, {gw.journal.unacked_count()} unacked", file=sys.stderr, flush=True)
        gw.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterlink-gateway", description=__doc__,
                                     epilog="example: meterlink-gateway read --port /dev/ttyUSB0 --unit 1 "
                                            "--profile eastron_sdm630")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    rd = sub.add_parser("read", help="read one meter once and print every quantity",
                        epilog="example: meterlink-gateway read --port tcp://127.0.0.1:5020 --unit 1 "
                               "--profile eastron_sdm630 --json; for a DSMR P1 port: "
                               "meterlink-gateway read --dsmr --port /dev/ttyUSB0 --dsmr-version 5")
    rd.add_argument("--port", required=True, help="serial device (RTU) or tcp://HOST:PORT")
    rd.add_argument("--unit", type=int, default=1, help="Modbus unit id (default 1)")
    rd.add_argument("--profile", help="meter profile name or TOML path (required for Modbus)")
    rd.add_argument("--baud", type=int, default=9600)
    rd.add_argument("--parity", default="N", choices=["N", "E", "O"])
    rd.add_argument("--stopbits", type=int, default=1, choices=[1, 2])
    rd.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for each answer (default 1)")
    rd.add_argument("--meter-id", help="id to label the readings with")
    rd.add_argument("--clock", default="system", help=argparse.SUPPRESS)
    rd.add_argument("--json", action="store_true", help="print one JSON object")
    rd.add_argument("--dsmr", action="store_true",
                    help="PORT is a DSMR P1 port: print the next valid telegram (e.g. --dsmr --port /dev/ttyUSB0)")
    rd.add_argument("--dsmr-version", default="5", choices=["2.2", "4", "5"],
                    help="DSMR version, sets the serial line: 2.2 9600 7E1, 4 115200 7E1, 5 115200 8N1 (default 5)")
    rd.add_argument("--wait", type=float, help="DSMR: seconds to wait for a valid telegram (default 5; 35 before v5)")
    rd.set_defaults(func=cmd_read)
    run = sub.add_parser("run", help="poll the configured meters on schedule, journal, push to the head-end",
                         epilog="example: meterlink-gateway run --config gateway.toml")
    run.add_argument("--config", default="gateway.toml")
    run.add_argument("--clock", default="system", help="system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX]")
    run.add_argument("--first-poll", help="instant (ISO-8601) of the first poll; default: the next interval boundary")
    run.add_argument("--until", help="stop after the poll at this instant (ISO-8601), e.g. for a demo")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except MeterlinkError as exc:
        print(f"meterlink-gateway: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
