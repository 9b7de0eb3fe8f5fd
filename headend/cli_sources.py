"""`meterlink-headend import` and `mqtt-ingest`: readings from other sources, thin calls into headend.importer / mqtt_ingest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from meterlink.clock import clock_from_spec, to_ms
from meterlink.stopping import bound_shutdown, stop_on_signals

from .importer import import_files
from .store import open_repository
from .cli import _database as _db   # the one --database/--config resolution

IMPORT_EPILOG = """\
columns (CSV header or JSONL keys): meter, obis, timestamp (ISO 8601 with offset), value, unit (Wh|kWh)
example: meterlink-headend import readings-2026-11.csv --database sqlite:///var/headend.db --rejects rejects.csv"""

MQTT_EPILOG = """\
topic <prefix>/<meter id>, payload {"obis": "1.8.0", "timestamp": "2026-11-25T10:15:00Z", "value": "123.456", "unit": "kWh"}
example: meterlink-headend mqtt-ingest --broker 127.0.0.1:1883 --database sqlite:///var/headend.db"""


def cmd_import(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    repo = open_repository(_db(args))
    clock = clock_from_spec(args.clock)
    try:
        with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), transient=True,
                      disable=args.json or not sys.stderr.isatty()) as progress:
            task = progress.add_task("import", total=None)   # rows are counted as parsed
            summary = import_files(repo, args.files, to_ms(clock.now()), fmt=args.format, rejects=args.rejects,
                                   progress=lambda n: progress.advance(task, n))
    finally:
        repo.close()
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        s = summary
        print(f"read {s.read}, new {s.new}, duplicate {s.duplicate}, conflict {s.conflict}, rejected {s.rejected}")
        for e in s.errors[:10]:
            print(f"  rejected {e}", file=sys.stderr)
        if len(s.errors) > 10:
            print(f"  ... {len(s.errors) - 10} more" + (f" in {args.rejects}" if args.rejects else ""), file=sys.stderr)
    return 1 if summary.rejected or summary.conflict else 0


def cmd_mqtt_ingest(args) -> int:
    from .mqtt_ingest import MqttIngest

    host, _, port = args.broker.rpartition(":")
    repo = open_repository(_db(args))
    stop = stop_on_signals()
    ing = MqttIngest(repo, clock_from_spec(args.clock), host or "127.0.0.1", int(port), prefix=args.prefix).start()
    print(f"subscribed to {args.prefix}/+ on {args.broker}", flush=True)
    stop.wait()
    bound_shutdown(60)                 # QoS 1: what is not yet committed is redelivered
    ing.stop()
    repo.close()
    s = ing.stats
    print(f"received {s.received}, new {s.new}, duplicate {s.duplicate}, conflict {s.conflict}, rejected {s.rejected}")
    return 0


def register(sub) -> None:
    imp = sub.add_parser("import", help="import readings from CSV/JSONL files through the ingest path",
                         epilog=IMPORT_EPILOG, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    imp.add_argument("files", nargs="+", type=Path, help="CSV or JSONL files")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: by file suffix (.jsonl/.ndjson = jsonl)")
    imp.add_argument("--rejects", type=Path, help="write rejected rows here (CSV: file, line, field, error, raw)")
    imp.add_argument("--config", default="headend.toml")
    imp.add_argument("--database", help="sqlite:///PATH or postgresql://..., overrides the config")
    imp.add_argument("--clock", default="system", help="clock for the received-at stamp")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.set_defaults(func=cmd_import)
    mq = sub.add_parser("mqtt-ingest", help="subscribe to an MQTT broker for readings from third-party devices",
                        epilog=MQTT_EPILOG, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    mq.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT")
    mq.add_argument("--prefix", default="meterlink/ingest", help="topic prefix")
    mq.add_argument("--config", default="headend.toml")
    mq.add_argument("--database", help="sqlite:///PATH or postgresql://..., overrides the config")
    mq.add_argument("--clock", default="system")
    mq.set_defaults(func=cmd_mqtt_ingest)
