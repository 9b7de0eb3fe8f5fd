"""`meterlink-sim`: run simulated meters that speak real Modbus RTU (pty) or Modbus TCP."""

from __future__ import annotations

import argparse
import sys

from meterlink.clock import clock_from_spec
from meterlink.errors import MeterlinkError
from meterlink.stopping import stop_on_signals
from meterlink.gateway.profiles import load_profile

from . import dsmr
from .meter import MeterModel, add_fault_arguments, apply_fault_arguments
from .server import RtuPtyServer, TcpServer

EPILOG_RTU = "example: meterlink-sim modbus-rtu --profile eastron_sdm630 --unit 1 --baud 9600"
EPILOG_TCP = "example: meterlink-sim modbus-tcp --profile eastron_sdm630 --unit 1 --listen 127.0.0.1:5020"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="eastron_sdm630", help="meter profile name or TOML path")
    p.add_argument("--unit", type=int, action="append", help="Modbus unit id (repeat for several meters on one bus)")
    p.add_argument("--seed", type=int, default=1, help="load-profile seed of the first meter (next units: +1)")
    p.add_argument("--import-wh", type=int, default=1_000_000, help="initial import register of the first unit, Wh")
    p.add_argument("--clock", default="system",
                   help="time source: system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX] (default system)")
    add_fault_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterlink-sim", description=__doc__,
                                     epilog="example: meterlink-sim modbus-rtu --profile eastron_sdm630 --unit 1")
    sub = parser.add_subparsers(dest="command", required=True)
    rtu = sub.add_parser("modbus-rtu", help="serve Modbus RTU on a pseudo-terminal; prints the client path first",
                         epilog=EPILOG_RTU)
    _common(rtu)
    rtu.add_argument("--baud", type=int, default=9600, help="nominal baud rate (a pty does not enforce it)")
    rtu.add_argument("--pace", action="store_true",
                     help="emulate the wire time of --baud 8N1 (characters, t3.5 gaps, response delay) before each answer")
    tcp = sub.add_parser("modbus-tcp", help="serve Modbus TCP", epilog=EPILOG_TCP)
    _common(tcp)
    tcp.add_argument("--listen", default="127.0.0.1:5020", help="HOST:PORT to listen on (port 0 picks one)")
    dsmr.add_subcommand(sub)
    return parser


def make_meters(args, clock) -> dict[int, MeterModel]:
    profile = load_profile(args.profile)
    units = args.unit or [1]
    # Each further unit on the bus is a different household: other seed, register and size.
    meters = {u: MeterModel.starting_at(profile, clock, unit=u, seed=args.seed + i,
                                        import_wh=args.import_wh + 250_000 * i, scale_pct=100 + 25 * i)
              for i, u in enumerate(units)}
    apply_fault_arguments(meters, args)
    return meters


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dsmr":
        return dsmr.serve(args)
    stop = stop_on_signals()
    try:
        clock = clock_from_spec(args.clock)
        meters = make_meters(args, clock)
        if args.command == "modbus-rtu":
            from meterlink.modbus import SerialLine
            server = RtuPtyServer(meters, pace=SerialLine(args.baud) if args.pace else None).start()
            print(server.client_path, flush=True)
        else:
            host, _, port = args.listen.rpartition(":")
            server = TcpServer(meters, host or "127.0.0.1", int(port)).start()
            print(server.address, flush=True)
    except (MeterlinkError, ValueError, OSError) as exc:
        print(f"meterlink-sim: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {len(meters)} simulated {next(iter(meters.values())).profile.model} meter(s), "
          f"units {sorted(meters)}; Ctrl-C stops", file=sys.stderr, flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
