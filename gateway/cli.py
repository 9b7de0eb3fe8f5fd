"""`meterlink-gateway`: the concentrator daemon and the field engineer's commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from meterlink.clock import clock_from_spec, parse_instant
from meterlink.errors import MeterlinkError, ValidationError
from meterlink.readings import UNITS
from meterlink.stopping import stop_on_signals

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
    c = reader.counters
    if c.crc_errors or c.truncated or c.malformed or c.garbage_bytes:
        print(f"  refused before it: {c.crc_errors} CRC errors, {c.truncated} truncated, {c.malformed} malformed; "
              f"{c.garbage_bytes} garbage bytes")
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
    listen = args.metrics_listen or config.metrics_listen
    if listen:                                   # Prometheus /metrics ([metrics] listen or --metrics-listen)
        from meterlink.metrics import serve_metrics
        port = serve_metrics(gw.enable_metrics().registry, listen)
        print(f"gateway {config.id}: metrics on http://{listen.rpartition(':')[0]}:{port}/metrics",
              file=sys.stderr, flush=True)
    stop = stop_on_signals()
    print(f"gateway {config.id}: {sum(len(b.meters) for b in config.buses)} meter(s) on "
          f"{len(config.buses)} bus(es), every {config.poll_interval_s} s", file=sys.stderr, flush=True)
    try:
        from meterlink.sdnotify import Notifier, watchdog_interval_s   # systemd Type=notify + WatchdogSec
        gw.run(stop, until=until, first=first, notifier=Notifier(), watchdog_s=watchdog_interval_s())
        gw.sync_once()
    except KeyboardInterrupt:
        pass
    finally:
        s = gw.stats
        if gw.mqtt is not None:
            m = gw.mqtt.stats
            print(f"gateway {config.id}: MQTT {m.sent} published, {m.delivered} acknowledged, {m.dropped} dropped",
                  file=sys.stderr, flush=True)
        print(f"gateway {config.id}: {s.polls} polls, {s.readings} readings, {s.read_errors} read errors, "
              f"{s.pushed} pushed, {gw.journal.unacked_count()} unacked", file=sys.stderr, flush=True)
        gw.close()
    return 0


def _progress_bar(total: int, label: str):
    """A rich progress bar on stderr (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    task = progress.add_task("", total=total)
    return progress, lambda text: progress.update(task, advance=1, description=text)


def cmd_scan(args) -> int:
    from . import commissioning as c

    units = c.parse_units(args.units)
    settings = c.settings_to_try(args.baud, args.parity)
    if args.port.startswith("tcp://"):
        settings = settings[:1]
    profiles = c.all_profiles(args.profile)
    clock = clock_from_spec(args.clock)
    progress, tick = _progress_bar(len(units) * len(settings), "scan")
    with progress:
        found = c.scan(lambda baud, parity: open_master(args.port, baud=baud, parity=parity, timeout=args.timeout),
                       units, settings, profiles, clock, progress=tick)
    if args.json:
        print(json.dumps({"port": args.port, "meters": [f.as_dict() for f in found]}))
        return 0 if found else 1
    if not found:
        print(f"no meter answered on {args.port} (units {args.units}, "
              f"{'auto' if args.baud == 'auto' else args.baud} baud)")
        return 1
    for f in found:
        line = f"unit {f.unit:3}  {f.profile or '?':22}"
        if f.baud:
            line += f" {f.baud} 8{f.parity}1"
        if f.serial is not None:
            line += f"  serial {f.serial}"
        if "1.8.0" in f.values:
            line += f"  1.8.0 = {f.values['1.8.0']} Wh"
        if f.note:
            line += f"  ({f.note})"
        print(line)
    return 0


def cmd_provision(args) -> int:
    from .commissioning import provision

    config = provision(args.config, port=args.port, unit=args.unit, profile=args.profile, meter_id=args.meter_id,
                       binding_code=args.binding_code, baud=args.baud, parity=args.parity)
    n = sum(len(b.meters) for b in config.buses)
    print(f"{args.config}: added meter {args.meter_id} (unit {args.unit}, {args.profile}) on {args.port}; "
          f"{n} meter(s) on {len(config.buses)} bus(es)")
    return 0


def cmd_diagnose(args) -> int:
    from . import commissioning as c

    units = c.parse_units(args.units)
    profile = load_profile(args.profile)
    clock = clock_from_spec(args.clock)
    master = open_master(args.port, baud=args.baud, parity=args.parity, stopbits=args.stopbits, timeout=args.timeout)
    try:
        progress, tick = _progress_bar(len(units) * args.count, "diagnose")
        with progress:
            report = c.diagnose(master, units, profile, clock, rounds=args.count, progress=tick)
    finally:
        master.close()
    if args.json:
        print(json.dumps({"port": args.port, "profile": profile.name, "units": [d.as_dict() for d in report]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.port}: {args.count} reads of {profile.name} per unit")
    for col in ("unit", "requests", "ok", "timeouts", "CRC errors", "exceptions", "other", "error rate",
                "latency ms min/median/p95/max"):
        table.add_column(col, justify="right")
    for d in report:
        lat = d.latency()
        lat_txt = "-" if lat["min"] is None else "/".join(f"{lat[k]:.1f}" for k in ("min", "median", "p95", "max"))
        table.add_row(str(d.unit), str(d.requests), str(d.ok), str(d.timeouts), str(d.crc_errors),
                      str(d.exceptions), str(d.other_errors), f"{d.error_rate:.1%}", lat_txt)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
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
    run.add_argument("--metrics-listen", help="HOST:PORT of the Prometheus /metrics endpoint, overrides "
                                              "[metrics] listen (port 0 picks one), e.g. 127.0.0.1:9108")
    run.set_defaults(func=cmd_run)
    sc = sub.add_parser("scan", help="find meters on a bus and identify their model from the profiles",
                        epilog="example: meterlink-gateway scan --port /dev/ttyUSB0 --baud auto --units 1-247")
    sc.add_argument("--port", required=True, help="serial device (RTU) or tcp://HOST:PORT")
    sc.add_argument("--baud", default="9600", help="baud rate, or 'auto' to try the common rates (default 9600)")
    sc.add_argument("--parity", default="N", choices=["N", "E", "O", "auto"],
                    help="parity, or 'auto' to try N, E and O (default N)")
    sc.add_argument("--units", default="1-247", help="unit ids to probe, e.g. 1-247 or 1,2,10-20 (default 1-247)")
    sc.add_argument("--timeout", type=float, default=0.2,
                    help="seconds to wait for each probe (default 0.2; a whole 1-247 scan of a silent bus "
                         "then takes about 50 s)")
    sc.add_argument("--profile", action="append", help="only try these profiles (repeatable; default: all)")
    sc.add_argument("--clock", default="system", help=argparse.SUPPRESS)
    sc.add_argument("--json", action="store_true", help="print one JSON object")
    sc.set_defaults(func=cmd_scan)
    pv = sub.add_parser("provision", help="add a found meter to the configuration file (validated, comments kept)",
                        epilog="example: meterlink-gateway provision --config gateway.toml --port /dev/ttyUSB0 "
                               "--unit 3 --profile eastron_sdm630 --meter-id MTR-0003 --binding-code 4F7K-22QX")
    pv.add_argument("--config", default="gateway.toml")
    pv.add_argument("--port", required=True, help="the bus the meter is on (a new [[bus]] if not configured yet)")
    pv.add_argument("--unit", type=int, required=True)
    pv.add_argument("--profile", required=True)
    pv.add_argument("--meter-id", required=True)
    pv.add_argument("--binding-code", help="the customer's binding code (links the meter to the account)")
    pv.add_argument("--baud", type=int, default=9600, help="for a new bus only (default 9600)")
    pv.add_argument("--parity", default="N", choices=["N", "E", "O"], help="for a new bus only (default N)")
    pv.set_defaults(func=cmd_provision)
    dg = sub.add_parser("diagnose", help="per-meter error rates (timeouts, CRC errors, exceptions) and latency",
                        epilog="example: meterlink-gateway diagnose --port /dev/ttyUSB0 --units 1-5 "
                               "--profile eastron_sdm630 --count 20")
    dg.add_argument("--port", required=True, help="serial device (RTU) or tcp://HOST:PORT")
    dg.add_argument("--units", required=True, help="unit ids, e.g. 1-5 or 1,3")
    dg.add_argument("--profile", default="eastron_sdm630", help="profile whose read plan is used (default eastron_sdm630)")
    dg.add_argument("--count", type=int, default=10, help="reads per unit (default 10)")
    dg.add_argument("--baud", type=int, default=9600)
    dg.add_argument("--parity", default="N", choices=["N", "E", "O"])
    dg.add_argument("--stopbits", type=int, default=1, choices=[1, 2])
    dg.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for each answer (default 0.5)")
    dg.add_argument("--clock", default="system", help=argparse.SUPPRESS)
    dg.add_argument("--json", action="store_true", help="print one JSON object")
    dg.set_defaults(func=cmd_diagnose)
    from .enrol import add_parsers as add_enrolment_parsers   # enroll, pull-config
    add_enrolment_parsers(sub)
    from .sync import add_parsers as add_sync_parsers         # signing-key
    add_sync_parsers(sub)
    from .profiles import add_parsers as add_profile_parsers  # profiles list|check, bus-plan
    add_profile_parsers(sub)
    from .payg import add_parsers as add_payg_parsers         # payg status
    add_payg_parsers(sub)
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
