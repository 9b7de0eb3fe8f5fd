"""Persistence of bindings, interval usage, exceptions, billable items, invoices and export cursors (tables of migrations 0002/0003), and the thin steps that call the pure cores; SQL and orchestration only, no business rules.

Works on SQLite (``sqlite:///PATH``) and PostgreSQL (``postgresql://...``) through one small
adapter: the SQL is written once with ``?`` placeholders (turned into ``%s`` for psycopg) and
only uses syntax both accept (``ON CONFLICT``, ``RETURNING``). The schema itself belongs to the
readings repository: opening a store calls `open_repository(url)` once so its migrations run
(SQLite) or are checked (PostgreSQL: run ``meterlink-headend migrate`` first).

Steps (each one transaction, each callable from tests and the CLI):
  * `process_readings`: readings -> VEE intervals -> bound `UsageRow`s merged with their billing
    state; VEE exceptions queued;
  * `apply_bindings`: validated binding edit; billed usage may not move (billing.check_rebinding);
    parked rows a back-dated binding now covers are bound;
  * `run_billing`: one billable item + invoice (JSON, UBL) per account for a period, the billed
    rows marked and the billed Wh per meter recorded in ``billed_usage``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Iterable, Iterator, Mapping, Sequence

from meterlink.clock import from_ms, to_ms
from meterlink.errors import ConfigError

from .billing import (Adjustment, BillRun, RowKey, UsageRow, bill_run, bind_intervals, check_rebinding, merge_rows,
                      rebind)
from .binding import Account, Bindings, Customer, Installation, Meter, ServicePoint, Supply
from .exceptions import QueuedException, released_keys
from .invoice import invoice_to_json, make_invoice
from .tariff import Tariff
from .ubl import to_ubl
from .vat import Market, VatTable
from .vee import MeterExchange, VeeConfig, VeeException, derive_intervals

ROW_COLS = "meter_id, obis, start_ms, end_ms, wh, estimated, flags, account_id, revision, billed_wh, billed_account"


class _Db:
    """One connection, SQLite or PostgreSQL, with `?` placeholders and explicit transactions."""

    def __init__(self, url: str) -> None:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        self.lock = threading.RLock()
        if scheme in ("postgresql", "postgres"):
            import psycopg
            self.dialect = "postgres"
            try:
                self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise ConfigError(f"cannot connect to {url.split('@')[-1]}: {str(exc).strip().splitlines()[0]}") from None
        elif scheme in ("sqlite", ""):
            path = url[len("sqlite:///"):] if scheme else url
            if scheme and url == "sqlite://":
                raise ConfigError("billing needs a database file (sqlite:///PATH), not an in-memory database")
            self.dialect = "sqlite"
            self.conn = sqlite3.connect(path.split("?", 1)[0], check_same_thread=False, isolation_level=None,
                                        timeout=30)
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA synchronous=FULL")
        else:
            raise ConfigError(f"database URL {url!r}: unsupported scheme {scheme!r}")

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    def q(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self.lock:
            return list(self.conn.execute(self._sql(sql), tuple(args)).fetchall())

    def x(self, sql: str, args: Sequence = ()) -> None:
        with self.lock:
            self.conn.execute(self._sql(sql), tuple(args))

    def many(self, sql: str, rows: Iterable[Sequence]) -> None:
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        with self.lock:
            if self.dialect == "sqlite":
                self.conn.executemany(sql, rows)
            else:
                with self.conn.cursor() as cur:
                    cur.executemany(self._sql(sql), rows)

    @contextmanager
    def tx(self) -> Iterator[None]:
        with self.lock:
            if self.dialect == "sqlite":
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            else:
                with self.conn.transaction():
                    yield

    def close(self) -> None:
        self.conn.close()


def _ms(t: datetime | None) -> int | None:
    return None if t is None else to_ms(t)


def _t(ms: int | None) -> datetime | None:
    return None if ms is None else from_ms(ms)


def _row(r: tuple) -> UsageRow:
    m, o, s, e, wh, est, flags, acct, rev, bwh, bacct = r
    return UsageRow(m, o, from_ms(s), from_ms(e), wh, bool(est), frozenset(f for f in flags.split(",") if f),
                    acct, bwh, bacct, rev)


def _row_args(r: UsageRow) -> tuple:
    return (r.meter_id, r.obis, to_ms(r.start), to_ms(r.end), r.wh, r.estimated, ",".join(sorted(r.flags)),
            r.account_id, r.revision, r.billed_wh, r.billed_account)


class BillingStore:
    """The billing tables of one head-end database."""

    def __init__(self, url: str, *, migrate: bool | None = None) -> None:
        from .store import open_repository
        open_repository(url, migrate=migrate).close()          # the schema is the repository's
        self.url = url
        self.db = _Db(url)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "BillingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ bindings
    def import_bindings(self, b: Bindings, markets: Mapping[str, Market], vat: VatTable) -> None:
        """Markets, VAT rates, entities upserted; installations and supplies replaced by `b`'s."""
        b.validate()
        with self.db.tx():
            self.db.many("INSERT INTO market VALUES (?,?,?,?,?,?,?) ON CONFLICT (market_id) DO UPDATE SET "
                         "country=excluded.country, currency=excluded.currency, time_zone=excluded.time_zone, "
                         "rounding_mode=excluded.rounding_mode, rounding_stage=excluded.rounding_stage, "
                         "interval_minutes=excluded.interval_minutes",
                         [(m.id, m.country, m.currency, m.timezone, m.rounding_mode, m.rounding_stage,
                           m.interval_minutes) for m in markets.values()])
            self.db.many("INSERT INTO market_vat_rate VALUES (?,?,?,?,?,?) ON CONFLICT (market_id, category, "
                         "valid_from) DO UPDATE SET valid_to=excluded.valid_to, rate=excluded.rate, source=excluded.source",
                         [(r.market, r.category, r.valid_from.isoformat(),
                           r.valid_to.isoformat() if r.valid_to else None, str(r.rate), r.source)
                          for r in vat.rates if r.market in markets])
            self.db.many("INSERT INTO customer VALUES (?,?,?,?) ON CONFLICT (customer_id) DO UPDATE SET "
                         "market_id=excluded.market_id, name=excluded.name, email=excluded.email",
                         [(c.id, c.market, c.name, c.email) for c in b.customers.values()])
            self.db.many("INSERT INTO account VALUES (?,?,?,?) ON CONFLICT (account_id) DO UPDATE SET "
                         "customer_id=excluded.customer_id, payment=excluded.payment, tariff_id=excluded.tariff_id",
                         [(a.id, a.customer_id, a.payment, a.tariff_id) for a in b.accounts.values()])
            self.db.many("INSERT INTO service_point VALUES (?,?,?,?) ON CONFLICT (service_point_id) DO UPDATE SET "
                         "market_id=excluded.market_id, address=excluded.address, external_id=excluded.external_id",
                         [(s.id, s.market, s.address, s.external_id) for s in b.service_points.values()])
            self.db.many("INSERT INTO meter (meter_id, serial, register_max, max_power_w) VALUES (?,?,?,?) "
                         "ON CONFLICT (meter_id) DO UPDATE SET serial=excluded.serial, "
                         "register_max=excluded.register_max, max_power_w=excluded.max_power_w",
                         [(m.id, m.serial, m.register_max, m.max_power_w) for m in b.meters.values()])
            self._replace_links(b)
            self._rebind(b)

    def _replace_links(self, b: Bindings) -> None:
        self.db.x("DELETE FROM meter_installation")
        self.db.x("DELETE FROM supply")
        self.db.many("INSERT INTO meter_installation (meter_id, service_point_id, valid_from_ms, valid_to_ms, reason) "
                     "VALUES (?,?,?,?,?)", [(i.meter_id, i.service_point_id, _ms(i.valid_from), _ms(i.valid_to),
                                             i.reason) for i in b.installations])
        self.db.many("INSERT INTO supply (service_point_id, account_id, valid_from_ms, valid_to_ms, reason) "
                     "VALUES (?,?,?,?,?)", [(s.service_point_id, s.account_id, _ms(s.valid_from), _ms(s.valid_to),
                                             s.reason) for s in b.supplies])

    def _rebind(self, b: Bindings) -> int:
        rows = self.rows()
        check_rebinding(rows.values(), b)
        changed = rebind(rows.values(), b)
        self.save_rows(changed.values())
        return len(changed)

    def bindings(self) -> Bindings:
        q = self.db.q
        customers = {r[0]: Customer(*r) for r in q("SELECT customer_id, market_id, name, email FROM customer")}
        accounts = {r[0]: Account(*r) for r in q("SELECT account_id, customer_id, payment, tariff_id FROM account")}
        sps = {r[0]: ServicePoint(*r) for r in q("SELECT service_point_id, market_id, address, external_id "
                                                 "FROM service_point")}
        meters = {r[0]: Meter(*r) for r in q("SELECT meter_id, serial, register_max, max_power_w FROM meter")}
        insts = tuple(Installation(m, sp, from_ms(f), _t(t), reason) for m, sp, f, t, reason in
                      q("SELECT meter_id, service_point_id, valid_from_ms, valid_to_ms, reason FROM meter_installation "
                        "ORDER BY meter_id, valid_from_ms"))
        sups = tuple(Supply(sp, a, from_ms(f), _t(t), reason) for sp, a, f, t, reason in
                     q("SELECT service_point_id, account_id, valid_from_ms, valid_to_ms, reason FROM supply "
                       "ORDER BY service_point_id, valid_from_ms"))
        return Bindings(customers, accounts, sps, meters, insts, sups)

    def apply_bindings(self, new: Bindings) -> int:
        """Store an edited binding set (validated; billed usage may not move); returns rows re-bound."""
        new.validate()
        with self.db.tx():
            self.db.many("INSERT INTO meter (meter_id, serial, register_max, max_power_w) VALUES (?,?,?,?) "
                         "ON CONFLICT (meter_id) DO NOTHING",
                         [(m.id, m.serial, m.register_max, m.max_power_w) for m in new.meters.values()])
            self._replace_links(new)
            return self._rebind(new)

    def add_exchange_read(self, e: MeterExchange) -> None:
        with self.db.tx():
            self.db.x("INSERT INTO meter_exchange_read VALUES (?,?,?,?,?,?,?)",
                      (e.meter_id, e.obis, to_ms(e.at), e.final_read, e.initial_read, e.old_serial, e.new_serial))

    def exchange_reads(self, meter_id: str) -> list[MeterExchange]:
        return [MeterExchange(m, o, from_ms(t), f, i, os_, ns) for m, o, t, f, i, os_, ns in self.db.q(
            "SELECT meter_id, obis, at_ms, final_read, initial_read, old_serial, new_serial FROM meter_exchange_read "
            "WHERE meter_id=? ORDER BY at_ms", (meter_id,))]

    # ------------------------------------------------------------------ usage rows
    def rows(self, meter_id: str | None = None, start: datetime | None = None,
             end: datetime | None = None) -> dict[RowKey, UsageRow]:
        sql, args = f"SELECT {ROW_COLS} FROM interval_usage WHERE 1=1", []
        if meter_id is not None:
            sql += " AND meter_id=?"
            args.append(meter_id)
        if start is not None:
            sql += " AND start_ms>=?"
            args.append(to_ms(start))
        if end is not None:
            sql += " AND start_ms<?"
            args.append(to_ms(end))
        out = {}
        for r in self.db.q(sql + " ORDER BY meter_id, obis, start_ms", args):
            row = _row(r)
            out[row.key] = row
        return out

    def save_rows(self, rows: Iterable[UsageRow]) -> None:
        self.db.many(f"INSERT INTO interval_usage ({ROW_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                     "ON CONFLICT (meter_id, obis, start_ms) DO UPDATE SET end_ms=excluded.end_ms, wh=excluded.wh, "
                     "estimated=excluded.estimated, flags=excluded.flags, account_id=excluded.account_id, "
                     "revision=excluded.revision, billed_wh=excluded.billed_wh, billed_account=excluded.billed_account",
                     [_row_args(r) for r in rows])

    # ------------------------------------------------------------------ exceptions
    def queue_exceptions(self, excs: Iterable[VeeException], now: datetime) -> int:
        before = len(self.db.q("SELECT 1 FROM vee_exception"))
        self.db.many("INSERT INTO vee_exception (meter_id, obis, kind, at_ms, detail, raised_at_ms) VALUES "
                     "(?,?,?,?,?,?) ON CONFLICT (meter_id, obis, kind, at_ms) DO NOTHING",
                     [(e.meter_id, e.obis, e.kind, to_ms(e.at), e.detail, to_ms(now)) for e in excs])
        return len(self.db.q("SELECT 1 FROM vee_exception")) - before

    def exceptions(self, status: str | None = None, meter_id: str | None = None) -> list[QueuedException]:
        sql = ("SELECT exception_id, meter_id, obis, kind, at_ms, detail, status, raised_at_ms, resolved_at_ms, "
               "resolution FROM vee_exception WHERE 1=1")
        args = []
        if status:
            sql += " AND status=?"
            args.append(status)
        if meter_id:
            sql += " AND meter_id=?"
            args.append(meter_id)
        return [QueuedException(i, m, o, k, from_ms(a), d, s, from_ms(r), _t(rt), res)
                for i, m, o, k, a, d, s, r, rt, res in self.db.q(sql + " ORDER BY exception_id", args)]

    def resolve_exception(self, exception_id: int, action: str, note: str, now: datetime) -> QueuedException:
        from meterlink.errors import ValidationError
        with self.db.tx():
            found = self.db.q("SELECT status FROM vee_exception WHERE exception_id=?", (exception_id,))
            if not found:
                raise ValidationError(f"no exception with id {exception_id}")
            if found[0][0] != "open":
                raise ValidationError(f"exception {exception_id} is already resolved")
            self.db.x("UPDATE vee_exception SET status='resolved', resolved_at_ms=?, resolution=? WHERE exception_id=?",
                      (to_ms(now), f"{action}: {note}".strip(), exception_id))
        return next(e for e in self.exceptions() if e.id == exception_id)

    # ------------------------------------------------------------------ items and invoices
    def billed_accounts(self, period: str) -> set[str]:
        return {r[0] for r in self.db.q("SELECT account_id FROM billable_item WHERE period=?", (period,))}

    def billed_usage(self, usage_period: str | None = None) -> dict[tuple[str, str, str], int]:
        sql, args = "SELECT meter_id, obis, usage_period, wh FROM billed_usage", []
        if usage_period:
            sql += " WHERE usage_period=?"
            args.append(usage_period)
        out: dict[tuple[str, str, str], int] = {}
        for m, o, p, wh in self.db.q(sql, args):
            out[(m, o, p)] = out.get((m, o, p), 0) + wh
        return out

    def items(self, after: int = 0, limit: int | None = None, period: str | None = None) -> list[tuple[int, dict]]:
        sql, args = "SELECT item_seq, document FROM billable_item WHERE item_seq>?", [after]
        if period:
            sql += " AND period=?"
            args.append(period)
        sql += " ORDER BY item_seq" + (f" LIMIT {int(limit)}" if limit else "")
        return [(s, json.loads(d)) for s, d in self.db.q(sql, args)]

    def invoices(self, after: int = 0, limit: int | None = None, period: str | None = None) -> list[tuple[int, str, dict, str]]:
        sql, args = "SELECT invoice_seq, invoice_id, json, ubl FROM invoice WHERE invoice_seq>?", [after]
        if period:
            sql += " AND period=?"
            args.append(period)
        sql += " ORDER BY invoice_seq" + (f" LIMIT {int(limit)}" if limit else "")
        return [(s, i, json.loads(j), u) for s, i, j, u in self.db.q(sql, args)]

    def max_positions(self) -> tuple[int, int]:
        a = self.db.q("SELECT COALESCE(MAX(item_seq), 0) FROM billable_item")[0][0]
        b = self.db.q("SELECT COALESCE(MAX(invoice_seq), 0) FROM invoice")[0][0]
        return a, b

    def cursor(self, consumer: str) -> tuple[int, int]:
        r = self.db.q("SELECT item_position, invoice_position FROM export_cursor WHERE consumer=?", (consumer,))
        return (r[0][0], r[0][1]) if r else (0, 0)

    def set_cursor(self, consumer: str, item_position: int, invoice_position: int, now: datetime) -> None:
        with self.db.tx():
            self.db.x("INSERT INTO export_cursor (consumer, item_position, invoice_position, updated_at_ms) "
                      "VALUES (?,?,?,?) ON CONFLICT (consumer) DO UPDATE SET item_position=excluded.item_position, "
                      "invoice_position=excluded.invoice_position, updated_at_ms=excluded.updated_at_ms",
                      (consumer, item_position, invoice_position, to_ms(now)))

    def store_bill_run(self, run: BillRun, bindings: Bindings, markets: Mapping[str, Market], issue_date: date,
                       now: datetime) -> list[str]:
        """Items, invoices, billed usage and billed rows of a run, in one transaction; returns invoice ids."""
        try:
            return self._store_bill_run(run, bindings, markets, issue_date, now)
        except Exception as exc:                 # sqlite3.IntegrityError / psycopg UniqueViolation
            if "unique" in str(exc).lower() or "UNIQUE" in type(exc).__name__.upper():
                from meterlink.errors import ValidationError
                raise ValidationError(f"period {run.period}: another bill run stored an item for one of "
                                      f"{', '.join(b.item.account_id for b in run.bills)} meanwhile; nothing of this "
                                      f"run was stored, run bill again ({exc})") from None
            raise

    def _store_bill_run(self, run: BillRun, bindings: Bindings, markets: Mapping[str, Market], issue_date: date,
                        now: datetime) -> list[str]:
        ids = []
        with self.db.tx():
            for bill in run.bills:
                item = bill.item
                seq = self.db.q("INSERT INTO billable_item (account_id, period, currency, net_minor, vat_minor, "
                                "gross_minor, document, created_at_ms) VALUES (?,?,?,?,?,?,?,?) RETURNING item_seq",
                                (item.account_id, item.period, item.currency, item.net_minor, item.vat_minor,
                                 item.gross_minor, item.to_json(), to_ms(now)))[0][0]
                self.db.many("INSERT INTO billed_usage VALUES (?,?,?,?,?)",
                             [(seq, u.meter_id, u.obis, u.usage_period, u.wh) for u in item.usage])
                customer = bindings.customers[bindings.accounts[item.account_id].customer_id]
                inv = make_invoice(item, customer, markets[item.market], issue_date)
                self.db.x("INSERT INTO invoice (invoice_id, account_id, period, issue_date, currency, net_minor, "
                          "vat_minor, gross_minor, json, ubl, created_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (inv.id, item.account_id, item.period, issue_date.isoformat(), item.currency,
                           inv.line_total_minor, inv.vat_minor, inv.payable_minor, invoice_to_json(inv), to_ubl(inv),
                           to_ms(now)))
                self.save_rows(bill.billed_rows)
                ids.append(inv.id)
        return ids

    def gateways(self) -> list[str]:
        return [r[0] for r in self.db.q("SELECT gateway_id FROM gateway_sync ORDER BY 1")]


# --------------------------------------------------------------------------- steps

@dataclass(frozen=True)
class ProcessResult:
    meters: int
    rows_changed: int
    exceptions_queued: int


def vee_config(bindings: Bindings, markets: Mapping[str, Market], meter_id: str) -> VeeConfig:
    market = markets.get(bindings.market_of_meter(meter_id) or "")
    meter = bindings.meters.get(meter_id)
    return VeeConfig(interval=timedelta(minutes=market.interval_minutes if market else 15),
                     register_max=meter.register_max if meter else None,
                     max_power_w=meter.max_power_w if meter else None)


def process_readings(repo, store: BillingStore, markets: Mapping[str, Market], now: datetime,
                     meters: Iterable[str] | None = None) -> ProcessResult:
    """Readings of each meter -> intervals -> bound rows, merged with their billing state; exceptions queued."""
    bindings = store.bindings()
    released_from = [e for e in store.exceptions(status="resolved") if e.released]
    n_meters = changed_total = queued = 0
    for meter_id in (meters if meters is not None else repo.meters()):
        readings = [r for r in repo.readings(meter_id) if r.obis in ("1.8.0", "2.8.0")]
        result = derive_intervals(readings, vee_config(bindings, markets, meter_id), store.exchange_reads(meter_id))
        fresh = bind_intervals(result.intervals, bindings)
        released = released_keys(fresh, [e for e in released_from if e.meter_id == meter_id])
        with store.db.tx():
            changed = merge_rows(store.rows(meter_id), fresh, released)
            store.save_rows(changed.values())
            queued += store.queue_exceptions(result.exceptions, now)
        n_meters += 1
        changed_total += len(changed)
    return ProcessResult(n_meters, changed_total, queued)


def run_billing(store: BillingStore, period: str, *, markets: Mapping[str, Market], tariffs: Mapping[str, Tariff],
                vat: VatTable, issue_date: date, now: datetime, adjustments: Sequence[Adjustment] = (),
                accounts: Iterable[str] | None = None, promotions: Mapping[str, Sequence] | None = None) -> BillRun:
    """Bill `period` for every account not yet billed for it and store items and invoices.

    `promotions`: account id -> accepted rating Promotions (cli_insights.accepted_rating_promotions).
    """
    bindings = store.bindings()
    run = bill_run(period, bindings=bindings, markets=markets, tariffs=tariffs, vat=vat,
                   rows=store.rows().values(), already_billed=store.billed_accounts(period),
                   adjustments=adjustments, accounts=accounts, promotions=promotions)
    store.store_bill_run(run, bindings, markets, issue_date, now)
    return run


def reconcile_period(repo, store: BillingStore, period: str, *, markets: Mapping[str, Market],
                     default_market: str, strict: bool = False):
    """Gather what `reconcile.reconcile` compares for `period` (each meter in its market's zone)."""
    from zoneinfo import ZoneInfo

    from .billing import period_instants
    from .reconcile import reconcile

    bindings = store.bindings()
    fresh, rows_by, readings_by, bounds = {}, {}, {}, {}
    default = period_instants(period, ZoneInfo(markets[default_market].timezone))
    meters = sorted(set(repo.meters()) | {k[0] for k in store.rows()})
    for meter_id in meters:
        market = markets.get(bindings.market_of_meter(meter_id) or "", markets[default_market])
        start, end = bounds[meter_id] = period_instants(period, ZoneInfo(market.timezone))
        readings = [r for r in repo.readings(meter_id) if r.obis in ("1.8.0", "2.8.0")]
        result = derive_intervals(readings, vee_config(bindings, markets, meter_id), store.exchange_reads(meter_id))
        for iv in result.intervals:
            fresh.setdefault((meter_id, iv.obis), []).append(iv)
        for r in readings:
            readings_by.setdefault((meter_id, r.obis), []).append(r)
        for row in store.rows(meter_id, start, end).values():
            rows_by.setdefault((meter_id, row.obis), []).append(row)
    billed = {(m, o): wh for (m, o, p), wh in store.billed_usage(period).items()}
    gaps = [(g, a, b) for g in store.gateways() for a, b in repo.gaps(g)]
    return reconcile(period, *default, fresh=fresh, rows=rows_by, billed=billed, readings=readings_by,
                     items=[d for _, d in store.items(period=period)], chain_gaps=gaps,
                     open_exceptions=store.exceptions(status="open"), strict=strict, bounds=bounds)
