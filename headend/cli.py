"""`meterlink-headend`: the head-end service and operator commands (thin calls into the library)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass

from meterlink.clock import clock_from_spec
from meterlink.config import load_section
from meterlink.errors import MeterlinkError

from .service import make_server
from .store import open_repository


@dataclass(frozen=True)
class HeadendConfig:
    listen: str
    database: str


def load_config(path: str) -> HeadendConfig:
    root = load_section(path)
    sec = root.section("headend", required=False)
    sec.check_known({"listen", "database"})
    return HeadendConfig(listen=sec.get("listen", str, "127.0.0.1:50051"),
                         database=sec.get("database", str, "sqlite:///var/headend.db"))


def cmd_serve(args) -> int:
    cfg = load_config(args.config)
    clock = clock_from_spec(args.clock)
    repo = open_repository(args.database or cfg.database)
    server, port = make_server(repo, clock, args.listen or cfg.listen)
    server.start()
    host = (args.listen or cfg.listen).rpartition(":")[0]
    print(f"{host}:{port}", flush=True)
    logging.getLogger("meterlink.headend").info("head-end listening on %s:%d, database %s", host, port,
                                                args.database or cfg.database)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(grace=2).wait()
    repo.close()
    return 0


def _database(args) -> str:
    if args.database:
        return args.database
    return load_config(args.config).database


def cmd_readings(args) -> int:
    repo = open_repository(_database(args))
    rows = repo.readings(args.meter, args.obis)
    repo.close()
    if args.json:
        print(json.dumps({"meter": args.meter, "readings": [
            {"obis": r.obis, "taken_at": r.taken_at.isoformat().replace("+00:00", "Z"), "value": r.value,
             "unit": r.unit, "quality": r.quality} for r in rows]}, indent=None))
        return 0
    if not rows:
        print(f"no readings for meter {args.meter}")
        return 0
    print(f"{'taken at (UTC)':25} {'OBIS':8} {'value':>14} unit")
    for r in rows:
        print(f"{r.taken_at.isoformat().replace('+00:00', 'Z'):25} {r.obis:8} {r.value:>14} {r.unit}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterlink-headend", description=__doc__,
                                     epilog="example: meterlink-headend serve --config headend.toml")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each batch")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC service (prints HOST:PORT when listening)",
                           epilog="example: meterlink-headend serve --config headend.toml --listen 127.0.0.1:50051")
    serve.add_argument("--config", default="headend.toml", help="config file (default headend.toml)")
    serve.add_argument("--listen", help="HOST:PORT, overrides the config (port 0 picks a free one)")
    serve.add_argument("--database", help="sqlite:///PATH, overrides the config")
    serve.add_argument("--clock", default="system", help="system | sim:ISO | scaled:ISO,SPEED[,ANCHOR_UNIX]")
    serve.set_defaults(func=cmd_serve)
    rd = sub.add_parser("readings", help="list the readings held for a meter",
                        epilog="example: meterlink-headend readings --meter MTR-0001 --json")
    rd.add_argument("--meter", required=True, help="meter id")
    rd.add_argument("--obis", help="only this register, e.g. 1.8.0")
    rd.add_argument("--config", default="headend.toml")
    rd.add_argument("--database", help="sqlite:///PATH, overrides the config")
    rd.add_argument("--json", action="store_true", help="print one JSON object")
    rd.set_defaults(func=cmd_readings)
    from . import cli_sources
    cli_sources.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except MeterlinkError as exc:
        print(f"meterlink-headend: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
