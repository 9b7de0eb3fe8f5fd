"""`meterlink-headend` billing commands: bindings, quote, bill, export, reconcile, exceptions; thin calls into billing_store and the pure cores, no rules here."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from meterlink.clock import clock_from_spec
from meterlink.errors import ValidationError

DB_HELP = "sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME, overrides the config"


def _common(p) -> None:
    p.add_argument("--config", default="headend.toml", help="config file (default headend.toml)")
    p.add_argument("--database", help=DB_HELP)
    p.add_argument("--clock", default="system", help="system | sim:ISO (the instant used as 'now')")
    p.add_argument("--markets", help="markets TOML (default: bundled headend/data/markets.toml)")
    p.add_argument("--vat-rates", help="VAT rates TOML (default: bundled headend/data/vat_rates.toml)")
    p.add_argument("--tariff-dir", help="directory of tariff_*.toml files (default: the bundled tariffs)")


def _url(args) -> str:
    from .cli import _database
    return _database(args)


def _ref(args):
    from .tariff import bundled_tariffs, load_tariff
    from .vat import load_markets, load_vat_table
    markets = load_markets(args.markets) if args.markets else load_markets()
    vat = load_vat_table(args.vat_rates) if args.vat_rates else load_vat_table()
    paths = sorted(Path(args.tariff_dir).glob("tariff_*.toml")) if args.tariff_dir else bundled_tariffs()
    tariffs = {t.id: t for t in (load_tariff(p) for p in paths)}
    return markets, vat, tariffs


def _open(args):
    from .billing_store import BillingStore
    from .store import open_repository
    url = _url(args)
    return open_repository(url), BillingStore(url)


def _now(args):
    return clock_from_spec(args.clock).now()


def _instant(text: str):
    from .binding import parse_instant
    return parse_instant(text)


# --------------------------------------------------------------------------- bindings

def cmd_bindings(args) -> int:
    from dataclasses import replace

    from .binding import Meter, load_bindings, load_demo_bindings
    markets, vat, _ = _ref(args)
    repo, store = _open(args)
    try:
        action = args.bindings_command
        if action == "load":
            b = load_bindings(args.toml, args.csv) if args.toml else load_demo_bindings()
            store.import_bindings(b, markets, vat)
            print(f"loaded {len(b.customers)} customers, {len(b.accounts)} accounts, {len(b.service_points)} "
                  f"service points, {len(b.meters)} meters, {len(b.installations)} installations, "
                  f"{len(b.supplies)} supplies")
            return 0
        if action == "list":
            return _print_bindings(store.bindings(), args.json)
        if action == "exchange-read":
            from .vee import MeterExchange
            store.add_exchange_read(MeterExchange(args.meter, args.obis, _instant(args.at), args.final_read,
                                                  args.initial_read, args.old_serial or "", args.new_serial or ""))
            print(f"recorded exchange reads of meter {args.meter} {args.obis} at {args.at}")
            return 0

        def edit(b):                                     # the bindings as stored, read in the edit's transaction
            if action == "add":
                if args.kind == "meter":
                    return replace(b, meters={**b.meters, args.meter: Meter(args.meter, args.serial or "")})
                if args.kind == "installation":
                    return b.install(args.meter, args.service_point, _instant(args.from_),
                                     _instant(args.to) if args.to else None)
                return b.move_in(args.service_point, args.account, _instant(args.from_),
                                 _instant(args.to) if args.to else None)
            if action == "end":
                return (b.remove_meter(args.meter, _instant(args.at)) if args.kind == "installation"
                        else b.move_out(args.service_point, _instant(args.at)))
            new = b.exchange_meter(args.meter, args.new_meter, _instant(args.at))          # exchange
            if args.new_meter not in b.meters:
                raise ValidationError(f"meter {args.new_meter} is unknown; add it first: bindings add meter "
                                      f"--meter {args.new_meter}")
            return new
        rebound = store.edit_bindings(edit)             # read, edit and store in one transaction: never lost
        print(f"bindings updated; {rebound} interval(s) re-bound")
        return 0
    finally:
        store.close()
        repo.close()


def _print_bindings(b, as_json: bool) -> int:
    def iso(t):
        return t.isoformat().replace("+00:00", "Z") if t else ""
    if as_json:
        print(json.dumps({"installations": [{"meter": i.meter_id, "service_point": i.service_point_id,
                                             "from": iso(i.valid_from), "to": iso(i.valid_to) or None,
                                             "reason": i.reason} for i in b.installations],
                          "supplies": [{"service_point": s.service_point_id, "account": s.account_id,
                                        "from": iso(s.valid_from), "to": iso(s.valid_to) or None,
                                        "reason": s.reason} for s in b.supplies]}))
        return 0
    print(f"{'kind':13} {'subject':14} {'target':14} {'from (UTC)':21} {'to (UTC)':21} reason")
    for i in b.installations:
        print(f"{'installation':13} {i.meter_id:14} {i.service_point_id:14} {iso(i.valid_from):21} "
              f"{iso(i.valid_to) or 'open':21} {i.reason}")
    for s in b.supplies:
        print(f"{'supply':13} {s.service_point_id:14} {s.account_id:14} {iso(s.valid_from):21} "
              f"{iso(s.valid_to) or 'open':21} {s.reason}")
    return 0


# --------------------------------------------------------------------------- process, quote, bill

def cmd_process(args) -> int:
    from .billing_store import process_readings
    from .rating_worker import holding_run_lock
    markets, _, tariffs = _ref(args)
    repo, store = _open(args)
    try:
        with holding_run_lock(_url(args)):          # not at the same time as serve's rating
            res = process_readings(repo, store, markets, _now(args), tariffs=tariffs)
    finally:
        store.close()
        repo.close()
    print(f"processed {res.meters} meter(s), {res.readings} reading(s): {res.rows_changed} interval(s) new or "
          f"changed and rated, {res.exceptions_queued} exception(s) queued")
    return 0


def _money(minor: int, currency: str) -> str:
    from meterlink.money import Money
    return str(Money(minor, currency))


def cmd_quote(args) -> int:
    from .billing import quote_window
    markets, vat, tariffs = _ref(args)
    repo, store = _open(args)
    try:
        b = store.bindings()
        if args.account not in b.accounts:
            raise ValidationError(f"unknown account {args.account}")
        market = markets[b.market_of_account(args.account)]
        tariff = tariffs[b.accounts[args.account].tariff_id or market.default_tariff]
        q = quote_window(args.account, date.fromisoformat(args.from_), date.fromisoformat(args.to), bindings=b,
                         market=market, tariff=tariff, vat=vat, rows=store.rows().values())
    finally:
        store.close()
        repo.close()
    if args.json:
        print(json.dumps({"account": q.account_id, "from": q.start.isoformat(), "to": q.end.isoformat(),
                          "currency": q.currency, "usage_wh": q.usage_wh, "net_minor": q.net_minor,
                          "vat_minor": q.vat.vat_minor, "gross_minor": q.vat.gross_minor,
                          "lines": [{"description": il.line.description, "quantity": str(il.line.quantity_kwh),
                                     "unit": il.line.unit_code, "unit_price": str(il.line.unit_price),
                                     "net_minor": il.line.net_minor, "vat_rate": str(il.vat_rate)}
                                    for il in q.lines]}))
        return 0
    print(f"quote {q.account_id} {q.start} .. {q.end} (exclusive), tariff {tariff.id}, {q.usage_wh} Wh")
    for il in q.lines:
        line = il.line
        print(f"  {line.description:40} {line.quantity_kwh:>12} {line.unit_code:4} x {line.unit_price:>10} = "
              f"{_money(line.net_minor, q.currency):>14}  VAT {il.vat_rate * 100:.4g} %")
    print(f"  net {_money(q.net_minor, q.currency)}  VAT {_money(q.vat.vat_minor, q.currency)}  "
          f"total {_money(q.vat.gross_minor, q.currency)}")
    return 0


def cmd_bill(args) -> int:
    from .billing_store import process_readings, run_billing
    markets, vat, tariffs = _ref(args)
    repo, store = _open(args)
    now = _now(args)
    try:
        if not args.no_process:
            from .rating_worker import holding_run_lock
            with holding_run_lock(_url(args)):      # not at the same time as serve's rating
                process_readings(repo, store, markets, now, tariffs=tariffs)
        from .cli_insights import accepted_rating_promotions     # accepted percent discounts (insights)
        run = run_billing(store, args.period, markets=markets, tariffs=tariffs, vat=vat,
                          issue_date=date.fromisoformat(args.issue_date) if args.issue_date else now.date(), now=now,
                          promotions=accepted_rating_promotions(_url(args)))
    finally:
        store.close()
        repo.close()
    for item in run.items:
        print(f"{item.account_id:14} {item.period} {len(item.lines):>3} lines  net {_money(item.net_minor, item.currency):>14}"
              f"  VAT {_money(item.vat_minor, item.currency):>12}  total {_money(item.gross_minor, item.currency):>14}")
    print(f"billed {len(run.items)} account(s) for {args.period}"
          + (f"; {len(run.skipped)} already billed: {', '.join(run.skipped)}" if run.skipped else ""))
    return 0


# --------------------------------------------------------------------------- export, reconcile, exceptions

def cmd_export(args) -> int:
    from .export import export, rich_progress
    repo, store = _open(args)
    clock = clock_from_spec(args.clock)
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    update, stop = rich_progress(f"export {args.format}") if show else (None, lambda: None)
    try:
        res = export(store, args.to, args.format, now=clock.now, consumer=args.consumer, batch_size=args.batch_size,
                     progress=update)
    finally:
        stop()
        store.close()
        repo.close()
    print(f"exported {res.items} billable item(s) and {res.invoices} invoice(s) to {args.to} in {len(res.files)} "
          f"file(s); cursor {res.consumer}: item {res.item_position}, invoice {res.invoice_position}")
    return 0


def cmd_reconcile(args) -> int:
    from .billing_store import reconcile_period
    markets, _, _ = _ref(args)
    repo, store = _open(args)
    try:
        rep = reconcile_period(repo, store, args.period, markets=markets, default_market=args.market,
                               strict=args.strict)
    finally:
        store.close()
        repo.close()
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.format())
    return 0 if rep.ok else 1


def cmd_exceptions(args) -> int:
    from .exceptions import format_table
    repo, store = _open(args)
    try:
        if args.exceptions_command == "resolve":
            e = store.resolve_exception(args.id, "release" if args.release else "resolve", args.note or "", _now(args))
            print(f"exception {e.id} ({e.meter_id} {e.obis} {e.kind}) resolved: {e.resolution}"
                  + ("; the held intervals bill at the next process/bill" if args.release else ""))
            return 0
        items = store.exceptions(status=None if args.all else "open", meter_id=args.meter)
    finally:
        store.close()
        repo.close()
    if args.json:
        print(json.dumps([{"id": e.id, "meter_id": e.meter_id, "obis": e.obis, "kind": e.kind,
                           "at": e.at.isoformat(), "detail": e.detail, "status": e.status,
                           "resolution": e.resolution} for e in items]))
    else:
        print(format_table(items))
    return 0


# --------------------------------------------------------------------------- parser

def register(sub) -> None:
    b = sub.add_parser("bindings", help="customers/accounts/meters and effective-dated bindings: load, list, edit",
                       epilog="example: meterlink-headend bindings add supply --service-point SP-GB-001 "
                              "--account A-GB-001 --from 2026-11-01T00:00:00Z --database sqlite:///var/headend.db")
    bsub = b.add_subparsers(dest="bindings_command", required=True)
    ld = bsub.add_parser("load", help="import entities and bindings from TOML (+ CSV); default: the bundled demo",
                         epilog="example: meterlink-headend bindings load --toml bindings.toml --csv bindings.csv")
    ld.add_argument("--toml", help="entities (and bindings) TOML")
    ld.add_argument("--csv", action="append", default=[], help="bindings CSV (kind,subject,target,from,to,reason)")
    ls = bsub.add_parser("list", help="list installations and supplies",
                         epilog="example: meterlink-headend bindings list --json")
    ls.add_argument("--json", action="store_true")
    add = bsub.add_parser("add", help="add a meter, an installation (meter -> service point) or a supply "
                          "(service point -> account, i.e. a move-in; may be back-dated)",
                          epilog="example: meterlink-headend bindings add installation --meter MTR-RTU-01 "
                                 "--service-point SP-GB-001 --from 2026-11-01T00:00:00Z")
    add.add_argument("kind", choices=("meter", "installation", "supply"))
    add.add_argument("--meter")
    add.add_argument("--serial")
    add.add_argument("--service-point")
    add.add_argument("--account")
    add.add_argument("--from", dest="from_", help="UTC instant, e.g. 2026-11-01T00:00:00Z")
    add.add_argument("--to", help="UTC instant (exclusive); omit for open-ended")
    end = bsub.add_parser("end", help="end an installation (meter removal) or a supply (move-out) at an instant",
                          epilog="example: meterlink-headend bindings end supply --service-point SP-GB-001 "
                                 "--at 2026-12-01T00:00:00Z")
    end.add_argument("kind", choices=("installation", "supply"))
    end.add_argument("--meter")
    end.add_argument("--service-point")
    end.add_argument("--at", required=True)
    ex = bsub.add_parser("exchange", help="meter exchange: close the old meter's installation, install the new one",
                         epilog="example: meterlink-headend bindings exchange --meter MTR-RTU-01 --new-meter MTR-RTU-09 "
                                "--at 2026-11-15T10:00:00Z")
    ex.add_argument("--meter", required=True)
    ex.add_argument("--new-meter", required=True)
    ex.add_argument("--at", required=True)
    er = bsub.add_parser("exchange-read", help="record final/initial register reads of a register reset under one "
                         "meter id (resolves VEE 'meter_exchange' holds at the next process)",
                         epilog="example: meterlink-headend bindings exchange-read --meter MTR-RTU-01 --obis 1.8.0 "
                                "--at 2026-11-15T10:00:00Z --final-read 1234567 --initial-read 0")
    er.add_argument("--meter", required=True)
    er.add_argument("--obis", default="1.8.0")
    er.add_argument("--at", required=True)
    er.add_argument("--final-read", type=int, required=True)
    er.add_argument("--initial-read", type=int, required=True)
    er.add_argument("--old-serial")
    er.add_argument("--new-serial")
    for p in (ld, ls, add, end, ex, er):
        _common(p)
    b.set_defaults(func=cmd_bindings)

    pr = sub.add_parser("process", help="derive intervals (VEE) from the readings that arrived since the last run, "
                        "bind them, rate them into the pending day-band aggregates, queue exceptions",
                        epilog="example: meterlink-headend process --database sqlite:///var/headend.db")
    _common(pr)
    pr.set_defaults(func=cmd_process)

    q = sub.add_parser("quote", help="price any window of local dates for an account (VAT included; changes nothing)",
                       epilog="example: meterlink-headend quote --account A-GB-001 --from 2026-11-01 --to 2026-11-15")
    q.add_argument("--account", required=True)
    q.add_argument("--from", dest="from_", required=True, help="first local date (YYYY-MM-DD)")
    q.add_argument("--to", required=True, help="first local date NOT included (YYYY-MM-DD)")
    q.add_argument("--json", action="store_true")
    _common(q)
    q.set_defaults(func=cmd_quote)

    bl = sub.add_parser("bill", help="process readings, then one billable item + invoice (JSON, UBL) per account "
                        "for a period, summed from the pending day-band aggregates", epilog="example: meterlink-headend bill --period 2026-11 --clock sim:2026-12-02T06:00:00Z")
    bl.add_argument("--period", required=True, help="local month YYYY-MM")
    bl.add_argument("--issue-date", help="invoice issue date (default: today by --clock)")
    bl.add_argument("--no-process", action="store_true", help="bill what is already processed")
    _common(bl)
    bl.set_defaults(func=cmd_bill)

    ex = sub.add_parser("export", help="write billable items and invoices after the consumer's cursor (resumable)",
                        epilog="example: meterlink-headend export --to out/crm --format jsonl --consumer crm")
    ex.add_argument("--to", required=True, help="directory")
    ex.add_argument("--format", choices=("csv", "jsonl", "ubl"), default="jsonl")
    ex.add_argument("--consumer", help="cursor name (default: the format)")
    ex.add_argument("--batch-size", type=int, default=500)
    ex.add_argument("--progress", action="store_true", default=None, help="show a progress bar (default: on a TTY)")
    _common(ex)
    ex.set_defaults(func=cmd_export)

    rc = sub.add_parser("reconcile", help="prove register difference == billed + parked + held + pending per meter; "
                        "exit 1 when anything does not reconcile",
                        epilog="example: meterlink-headend reconcile --period 2026-11 --strict")
    rc.add_argument("--period", required=True, help="local month YYYY-MM")
    rc.add_argument("--market", default="GB", help="market whose zone bounds the period for unbound meters")
    rc.add_argument("--strict", action="store_true", help="also fail on chain gaps, parked usage, open exceptions")
    rc.add_argument("--json", action="store_true")
    _common(rc)
    rc.set_defaults(func=cmd_reconcile)

    exc = sub.add_parser("exceptions", help="the VEE exception queue: list, resolve",
                         epilog="example: meterlink-headend exceptions resolve 3 --release --note 'meter tested'")
    esub = exc.add_subparsers(dest="exceptions_command", required=True)
    el = esub.add_parser("list", help="open exceptions (--all: also resolved)",
                         epilog="example: meterlink-headend exceptions list --meter MTR-RTU-01")
    el.add_argument("--all", action="store_true")
    el.add_argument("--meter")
    el.add_argument("--json", action="store_true")
    er = esub.add_parser("resolve", help="resolve one exception; --release makes its held intervals billable",
                         epilog="example: meterlink-headend exceptions resolve 3 --note 'register reset confirmed'")
    er.add_argument("id", type=int)
    er.add_argument("--release", action="store_true")
    er.add_argument("--note")
    for p in (el, er):
        _common(p)
    exc.set_defaults(func=cmd_exceptions)
