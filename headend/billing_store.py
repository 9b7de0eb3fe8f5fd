"""Persistence of bindings, interval usage, exceptions, billable items, invoices and export cursors (tables of migrations 0002-0007), and the thin steps that call the pure cores; SQL and orchestration only, no business rules.

Works on SQLite (``sqlite:///PATH``) and PostgreSQL (``postgresql://...``) through one small
adapter: the SQL is written once with ``?`` placeholders (turned into ``%s`` for psycopg) and
only uses syntax both accept (``ON CONFLICT``, ``RETURNING``). The schema itself belongs to the
readings repository: opening a store calls `open_repository(url)` once so its migrations run
(SQLite) or are checked (PostgreSQL: run ``meterlink-headend migrate`` first).

Steps (each one transaction, each callable from tests and the CLI):
  * `process_readings`: readings -> VEE intervals -> bound `UsageRow`s merged with their billing
    state; VEE exceptions queued;
  * `apply_bindings` / `edit_bindings`: validated binding edit (`edit_bindings` reads, edits and stores the
    bindings in one write transaction, so concurrent edits never lose one); billed usage may not move
    (billing.check_rebinding); parked rows a back-dated binding now covers are bound;
  * `run_billing`: one billable item + invoice (JSON, UBL) per account for a period, the billed
    rows marked and the billed Wh per meter recorded in ``billed_usage``.
"""

from __future__ import annotations

import json
import sqlite3
from bisect import bisect_left
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence
from zoneinfo import ZoneInfo

from meterlink.clock import from_ms, to_ms
from meterlink.errors import ConfigError, ValidationError

from .billing import (AccountBill, Adjustment, BillRun, DateRange, RowKey, UsageRow, bind_intervals, check_rebinding,
                      item_from_pending, local_midnight, merge_rows, parse_period, pending_contributions, rebind,
                      split_by_account, subtract_ranges, supply_ranges, tariff_digest)
from .binding import Account, Bindings, Customer, Installation, Meter, ServicePoint, Supply
from .exceptions import QueuedException, released_keys
from .invoice import invoice_to_json, make_invoice
from .rating import IMPORT_OBIS, AggKey, DayBandAggregate, has_tiers, merge_aggregates, rate_starts
from .store import epoch_ms
from .tariff import Tariff
from .ubl import to_ubl
from .vat import Market, VatTable
from .vee import ENERGY_UNITS, HOLD_FLAGS, MeterExchange, VeeConfig, VeeException, derive_intervals, regular_intervals

# pg_advisory_xact_lock key held by `process` and the bill run (a fixed signed 63-bit number)
RATING_LOCK_KEY = 0x6D6C_7261_7469_6E67 >> 1
BILL_CHUNK = 500           # accounts whose stored aggregates a bill run loads at once
PROCESS_CHUNK_METERS = 200     # `process` stores at most this many meters' rows per transaction ...
PROCESS_CHUNK_READINGS = 50_000  # ... or the rows derived from about this many readings
CHECKPOINT_EVERY_S = 1.0     # a SQLite store's write transactions checkpoint the WAL at most this often
READ_GROUP_METERS = 64         # `process` reads the new readings of up to this many meters in one query
AGG_COLS = "account_id, local_date, band, kind, wh, amount_dec, unit_price, days"
_NOT_HELD = " AND ".join(f"(',' || flags || ',') NOT LIKE '%,{f},%'" for f in sorted(HOLD_FLAGS))

ROW_COLS = "meter_id, obis, start_ms, end_ms, wh, estimated, flags, account_id, revision, billed_wh, billed_account"

class _Db:
    """One connection, SQLite or PostgreSQL, with `?` placeholders and explicit transactions."""

    def __init__(self, url: str, durable: bool = True) -> None:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        self.lock = threading.RLock()
        if scheme in ("postgresql", "postgres"):
            import psycopg
            self.dialect = "postgres"
            try:
                self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise ConfigError(f"cannot connect to {url.split('@')[-1]}: {str(exc).strip().splitlines()[0]}") from None
            if not durable:
                self.conn.execute("SET synchronous_commit TO off")
        elif scheme in ("sqlite", ""):
            if scheme and url == "sqlite://":
                raise ConfigError("billing needs a database file (sqlite:///PATH), not an in-memory database")
            from .store import sqlite_path
            self.dialect = "sqlite"
            from .writerqueue import writer_queue
            self.conn = sqlite3.connect(sqlite_path(url), check_same_thread=False, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA foreign_keys=ON")
            wal = self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
            # write transactions queue with serve's ingest (headend/writerqueue.py); the WAL checkpoint SQLite
            # runs inside a COMMIT is run after leaving the queue instead (`_checkpoint`), so copying pages back
            # never keeps the ingest waiting for its turn
            self.writers = writer_queue(sqlite_path(url)) if wal else None
            self._checkpointed = 0.0
            if self.writers:
                self.conn.execute("PRAGMA wal_autocheckpoint=0")
            # NORMAL only in WAL mode, where a crash may lose the last commits but never corrupts the file
            self.conn.execute("PRAGMA synchronous=FULL" if durable or not wal else "PRAGMA synchronous=NORMAL")
            # `process` re-reads the newest readings of every register it derives: a page cache bigger than
            # the default 2 MiB keeps their pages (memory is taken as pages are read, up to 64 MiB)
            self.conn.execute("PRAGMA cache_size=-65536")
        else:
            raise ConfigError(f"database URL {url!r}: unsupported scheme {scheme!r}")

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s") if self.dialect == "postgres" else sql

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

    def copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
        """PostgreSQL: `rows` into `table` by COPY (one stream instead of a statement per row)."""
        if not rows:
            return
        with self.lock, self.conn.cursor() as cur:
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)

    @contextmanager
    def tx(self, exclusive: bool = False) -> Iterator[None]:
        """One transaction; `exclusive` also serialises it against other exclusive ones (SQLite's
        BEGIN IMMEDIATE already does; PostgreSQL takes a transaction-scoped advisory lock), which
        `process` and the bill run use so the pending aggregates and the rows always agree."""
        with self.lock:
            if self.dialect == "sqlite":
                with self.writers.turn() if self.writers else nullcontext():
                    self.conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield
                    except BaseException:
                        self.conn.execute("ROLLBACK")
                        raise
                    self.conn.execute("COMMIT")
                if self.writers:
                    self._checkpoint()
            else:
                with self.conn.transaction():
                    if exclusive:
                        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (RATING_LOCK_KEY,)).fetchall()
                    yield

    def _checkpoint(self) -> None:
        """Copy the WAL's committed pages back into the database file (PASSIVE: never waits for readers or
        writers), at most every CHECKPOINT_EVERY_S: in place of SQLite's automatic checkpoint (every 1000
        pages), which would run inside the COMMIT, while this connection holds its turn of the writers' queue."""
        now = time.monotonic()
        if now - self._checkpointed >= CHECKPOINT_EVERY_S:
            self._checkpointed = now
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def day(self, d: date):
        return d.isoformat() if self.dialect == "sqlite" else d

    def dec(self, x: Decimal):
        return str(x) if self.dialect == "sqlite" else x

    def close(self) -> None:
        self.conn.close()
        if self.dialect == "sqlite" and self.writers:
            self.writers.close()


_EPOCH, _ONE_MS = datetime(1970, 1, 1, tzinfo=timezone.utc), timedelta(milliseconds=1)
_READ_INSTANTS: dict[int, datetime] = {}     # reading instant (ms) -> datetime: polls share instants across meters


class _StoredReading(NamedTuple):
    """A stored reading as VEE reads it (the fields of `meterlink.readings.Reading`): a tuple, cheaper to make."""
    meter_id: str
    obis: str
    taken_at: datetime
    value: int
    unit: str
    quality: int


def _ms(t: datetime | None) -> int | None:
    return None if t is None else to_ms(t)


def _t(ms: int | None) -> datetime | None:
    return None if ms is None else from_ms(ms)


def _date(d) -> date:
    return d if isinstance(d, date) else date.fromisoformat(d)


def _row(r: tuple) -> UsageRow:
    m, o, s, e, wh, est, flags, acct, rev, bwh, bacct = r
    return UsageRow(m, o, from_ms(s), from_ms(e), wh, bool(est), frozenset(f for f in flags.split(",") if f),
                    acct, bwh, bacct, rev)


def _row_args(r: UsageRow) -> tuple:
    return (r.meter_id, r.obis, epoch_ms(r.start), epoch_ms(r.end), r.wh, r.estimated,
            ",".join(sorted(r.flags)) if r.flags else "", r.account_id, r.revision, r.billed_wh, r.billed_account)


class BillingStore:
    """The billing tables of one head-end database."""

    def __init__(self, url: str, *, migrate: bool | None = None, durable: bool = True) -> None:
        """`durable=False` (the rating worker's store): a commit returns before it is on disk (SQLite WAL
        synchronous=NORMAL, PostgreSQL synchronous_commit off). Only for what `process` writes, which is
        derived from the stored readings: a crash loses at most the last runs whole (rows, aggregates and
        the cursors that say what they covered commit together, and a later durable commit syncs the
        earlier ones), and the next run derives them again. Bills, bindings and payments stay durable."""
        from .store import open_repository
        open_repository(url, migrate=migrate).close()          # the schema is the repository's
        self.url = url
        self.db = _Db(url, durable)
        self._backfill_standing()

    def _backfill_standing(self) -> None:
        """Accounts migration 0005 listed in ``standing_backfill`` (billed before standing charges were
        recorded): their supply days (current bindings) up to the end of their last billed period are counted
        as charged in ``standing_charged``, so the first bill after the upgrade neither charges nor credits
        those months again. Once: each account's row is deleted in the same transaction."""
        if not self.db.q("SELECT 1 FROM standing_backfill LIMIT 1"):
            return
        with self.db.tx(exclusive=True):
            todo = self.db.q("SELECT account_id, through_period FROM standing_backfill ORDER BY account_id")
            if not todo:                                   # another replica did it meanwhile
                return
            bindings = self.bindings()
            zones = dict(self.db.q("SELECT market_id, time_zone FROM market"))
            rows = []
            for account, period in todo:
                if account not in bindings.accounts:
                    continue
                zone = ZoneInfo(zones.get(bindings.market_of_account(account), "UTC"))
                rows += [(account, self.db.day(a), self.db.day(b)) for a, b in supply_ranges(
                    bindings.supplies_of_account(account), zone, date(1970, 1, 1), parse_period(period)[1])]
            self.db.many("INSERT INTO standing_charged VALUES (?,?,?)", rows)
            self.db.x("DELETE FROM standing_backfill")

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
        with self.db.tx(exclusive=True):
            self._bump_bindings()
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
            self.needs_full(b.meters)                  # register_max / max_power_w may have changed
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
        self.mark_stale({r.account_id for r in changed.values()} | {rows[k].account_id for k in changed})
        return len(changed)

    def _bump_bindings(self) -> None:
        """A binding edit's first write, in its transaction (taken with the rating lock, `tx(exclusive=True)`,
        so on PostgreSQL too it commits wholly before or after a `process` chunk's write transaction): raises
        the bindings' generation, which tells a `process` run that read the bindings before that they changed."""
        self.db.x("UPDATE bindings_generation SET generation = generation + 1")

    def bindings_generation(self) -> int:
        return int(self.db.q("SELECT generation FROM bindings_generation")[0][0])

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
        """Store an edited binding set (validated; billed usage may not move); returns rows re-bound. It replaces
        what is stored: an edit of bindings read before must go through `edit_bindings`, or it may undo an edit
        committed since."""
        new.validate()
        with self.db.tx(exclusive=True):
            return self._store_bindings(new)

    def edit_bindings(self, edit: Callable[[Bindings], Bindings]) -> int:
        """Read-modify-write of the bindings in one write transaction (SQLite BEGIN IMMEDIATE; PostgreSQL the
        rating lock every binding edit takes, the bindings read after it): `edit(current)` returns the edited
        set, which is validated and stored as `apply_bindings` does; returns rows re-bound. Two edits at the same
        time both apply, the second to what the first stored (or it fails, naming why, when it no longer fits);
        `edit`'s exceptions roll the transaction back."""
        with self.db.tx(exclusive=True):
            new = edit(self.bindings())
            new.validate()
            return self._store_bindings(new)

    def _store_bindings(self, new: Bindings) -> int:
        """In the caller's exclusive transaction: `new` (validated) stored and the rows re-bound."""
        self._bump_bindings()
        self.db.many("INSERT INTO meter (meter_id, serial, register_max, max_power_w) VALUES (?,?,?,?) "
                     "ON CONFLICT (meter_id) DO NOTHING",
                     [(m.id, m.serial, m.register_max, m.max_power_w) for m in new.meters.values()])
        self._replace_links(new)
        return self._rebind(new)

    def add_exchange_read(self, e: MeterExchange) -> None:
        with self.db.tx(exclusive=True):
            self._bump_bindings()
            self.db.x("INSERT INTO meter_exchange_read VALUES (?,?,?,?,?,?,?)",
                      (e.meter_id, e.obis, to_ms(e.at), e.final_read, e.initial_read, e.old_serial, e.new_serial))
            self.needs_full([e.meter_id])

    def all_exchange_reads(self) -> dict[str, list[MeterExchange]]:
        """Exchange reads of every meter (one query), as `exchange_reads` gives them per meter."""
        out: dict[str, list[MeterExchange]] = {}
        for m, o, t, f, i, os_, ns in self.db.q(
                "SELECT meter_id, obis, at_ms, final_read, initial_read, old_serial, new_serial FROM meter_exchange_read "
                "ORDER BY meter_id, at_ms"):
            out.setdefault(m, []).append(MeterExchange(m, o, from_ms(t), f, i, os_, ns))
        return out

    def exchange_reads(self, meter_id: str) -> list[MeterExchange]:
        return [MeterExchange(m, o, from_ms(t), f, i, os_, ns) for m, o, t, f, i, os_, ns in self.db.q(
            "SELECT meter_id, obis, at_ms, final_read, initial_read, old_serial, new_serial FROM meter_exchange_read "
            "WHERE meter_id=? ORDER BY at_ms", (meter_id,))]

    # ------------------------------------------------------------------ usage rows
    def rows(self, meter_id: str | None = None, start: datetime | None = None,
             end: datetime | None = None, *, obis: str | None = None, account: str | None = None,
             unbilled: bool = False) -> dict[RowKey, UsageRow]:
        sql, args = f"SELECT {ROW_COLS} FROM interval_usage WHERE 1=1", []
        if account is not None:
            sql += " AND account_id=?"
            args.append(account)
        if unbilled:
            sql += " AND wh<>billed_wh"
        if obis is not None:
            sql += " AND obis=?"
            args.append(obis)
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

    def insert_new_rows(self, rows: Sequence[tuple]) -> None:
        """New plain rows (meter, obis, start_ms, end_ms, wh, account_id): not estimated, no flag, revision 0,
        nothing billed; the caller knows no row of theirs is stored (a duplicate fails, it never overwrites)."""
        if self.db.dialect == "postgres":
            self.db.copy("interval_usage", ("meter_id", "obis", "start_ms", "end_ms", "wh", "account_id"), rows)
        else:
            self.db.many("INSERT INTO interval_usage (meter_id, obis, start_ms, end_ms, wh, account_id) "
                         "VALUES (?,?,?,?,?,?)", rows)

    # ------------------------------------------------------------------ exceptions
    def queue_exceptions(self, excs: Iterable[VeeException], now: datetime) -> int:
        excs = list(excs)
        if not excs:
            return 0
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
            self.needs_full([r[0] for r in self.db.q("SELECT meter_id FROM vee_exception WHERE exception_id=?",
                                                     (exception_id,))])
        return next(e for e in self.exceptions() if e.id == exception_id)

    # ------------------------------------------------------------------ items and invoices
    def standing_ranges(self, among: Sequence[str] | None = None) -> dict[str, list[DateRange]]:
        """Per account, the merged local date ranges whose standing charges issued items carried."""
        sql, args = "SELECT account_id, from_date, to_date FROM standing_charged", []
        if among is not None:
            sql += f" WHERE account_id IN ({','.join('?' * len(among))})"
            args.extend(among)
        out: dict[str, list[DateRange]] = {}
        for a, f, t in self.db.q(sql + " ORDER BY account_id, from_date", args):
            out.setdefault(a, []).append((_date(f), _date(t)))
        return out

    def record_standing(self, account: str, ranges: Sequence[DateRange], credited: Sequence[DateRange] = ()) -> None:
        """Add the ranges an item charged to the account's charged ranges and remove those it credited (kept
        merged: usually one UPDATE)."""
        if not ranges and not credited:
            return
        old = self.standing_ranges([account]).get(account, [])
        merged = subtract_ranges([*old, *ranges], credited)
        starts = {a for a, _ in merged}
        self.db.many("DELETE FROM standing_charged WHERE account_id=? AND from_date=?",
                     [(account, self.db.day(a)) for a, _ in old if a not in starts])
        self.db.many("INSERT INTO standing_charged VALUES (?,?,?) ON CONFLICT (account_id, from_date) "
                     "DO UPDATE SET to_date=excluded.to_date",
                     [(account, self.db.day(a), self.db.day(b)) for a, b in merged if (a, b) not in old])

    def first_billed_period(self) -> str | None:
        return self.db.q("SELECT MIN(period) FROM billable_item")[0][0]

    def billed_import(self, account: str, start: datetime, end: datetime, zone: ZoneInfo) -> dict[date, int]:
        """Import Wh per local date already billed to the account for rows starting in [start, end)."""
        out: dict[date, int] = {}
        for s_ms, wh in self.db.q("SELECT start_ms, billed_wh FROM interval_usage WHERE account_id=? AND "
                                  "billed_account=? AND obis=? AND billed_wh<>0 AND start_ms>=? AND start_ms<?",
                                  (account, account, IMPORT_OBIS, to_ms(start), to_ms(end))):
            d = from_ms(s_ms).astimezone(zone).date()
            out[d] = out.get(d, 0) + int(wh)
        return out

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
                       now: datetime, *, _in_tx: bool = False) -> list[str]:
        """Items, invoices, billed usage and billed rows of a run, in one transaction; returns invoice ids.

        A run summed from the pending aggregates (`run_billing`, bills without rows) consumes them; a run
        rated from rows (`billing.bill_run`, bills carrying their billed rows) saves those rows and marks
        the account's aggregates stale, to be rated again from the rows."""
        try:
            return self._store_bill_run(run, bindings, markets, issue_date, now, _in_tx)
        except Exception as exc:                 # sqlite3.IntegrityError / psycopg UniqueViolation
            if "unique" in str(exc).lower() or "UNIQUE" in type(exc).__name__.upper():
                from meterlink.errors import ValidationError
                raise ValidationError(f"period {run.period}: another bill run stored an item for one of "
                                      f"{', '.join(b.item.account_id for b in run.bills)} meanwhile; nothing of this "
                                      f"run was stored, run bill again ({exc})") from None
            raise

    def _store_bill_run(self, run: BillRun, bindings: Bindings, markets: Mapping[str, Market], issue_date: date,
                        now: datetime, in_tx: bool = False) -> list[str]:
        ids = []
        with (nullcontext() if in_tx else self.db.tx(exclusive=True)):
            for bill in run.bills:
                item = bill.item
                seq = self.db.q("INSERT INTO billable_item (account_id, period, currency, net_minor, vat_minor, "
                                "gross_minor, document, created_at_ms) VALUES (?,?,?,?,?,?,?,?) RETURNING item_seq",
                                (item.account_id, item.period, item.currency, item.net_minor, item.vat_minor,
                                 item.gross_minor, item.to_json(), to_ms(now)))[0][0]
                self.db.many("INSERT INTO billed_usage VALUES (?,?,?,?,?)",
                             [(seq, u.meter_id, u.obis, u.usage_period, u.wh) for u in item.usage])
                self.record_standing(item.account_id, item.standing_charged, item.standing_credited)
                customer = bindings.customers[bindings.accounts[item.account_id].customer_id]
                inv = make_invoice(item, customer, markets[item.market], issue_date)
                self.db.x("INSERT INTO invoice (invoice_id, account_id, period, issue_date, currency, net_minor, "
                          "vat_minor, gross_minor, json, ubl, created_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (inv.id, item.account_id, item.period, issue_date.isoformat(), item.currency,
                           inv.line_total_minor, inv.vat_minor, inv.payable_minor, invoice_to_json(inv), to_ubl(inv),
                           to_ms(now)))
                if bill.billed_rows is not None:
                    self.save_rows(bill.billed_rows)
                    self.mark_stale([item.account_id])
                else:
                    zone = ZoneInfo(markets[item.market].timezone)
                    self.consume_pending(item.account_id, item.period, local_midnight(item.end, zone))
                ids.append(inv.id)
        return ids

    def gateways(self) -> list[str]:
        return [r[0] for r in self.db.q("SELECT gateway_id FROM gateway_sync ORDER BY 1")]

    # ------------------------------------------------------------------ pending (unbilled) rated usage
    def _agg(self, r: tuple) -> DayBandAggregate:
        a, d, band, kind, wh, amount, price, days = r
        return DayBandAggregate(a, d if isinstance(d, date) else date.fromisoformat(d), band, int(wh),
                                Decimal(amount), kind, Decimal(price), int(days))

    def pending_aggregates(self, account: str | None = None, before: date | None = None,
                           among: Sequence[str] | None = None,
                           since: date | None = None) -> dict[str, dict[AggKey, DayBandAggregate]]:
        """Stored day-band aggregates of not yet billed usage, per account (local dates < `before`;
        only the accounts `among`, when given)."""
        sql, args = f"SELECT {AGG_COLS} FROM day_band_aggregate WHERE 1=1", []
        if account is not None:
            sql += " AND account_id=?"
            args.append(account)
        if among is not None:
            sql += f" AND account_id IN ({','.join('?' * len(among))})"
            args.extend(among)
        if before is not None:
            sql += " AND local_date<?"
            args.append(self.db.day(before))
        if since is not None:
            sql += " AND local_date>=?"
            args.append(self.db.day(since))
        out: dict[str, dict[AggKey, DayBandAggregate]] = {}
        for r in self.db.q(sql, args):
            agg = self._agg(r)
            out.setdefault(agg.account_id, {})[agg.key] = agg
        return out

    def pending_usage(self, account: str | None = None, through: str | None = None,
                      among: Sequence[str] | None = None) -> dict[str, dict[tuple[str, str, str], int]]:
        """Pending Wh per account and (meter, obis, local month <= `through`)."""
        sql, args = "SELECT account_id, meter_id, obis, usage_period, wh FROM pending_usage WHERE 1=1", []
        if account is not None:
            sql += " AND account_id=?"
            args.append(account)
        if among is not None:
            sql += f" AND account_id IN ({','.join('?' * len(among))})"
            args.extend(among)
        if through is not None:
            sql += " AND usage_period<=?"
            args.append(through)
        out: dict[str, dict[tuple[str, str, str], int]] = {}
        for a, m, o, p, wh in self.db.q(sql, args):
            out.setdefault(a, {})[(m, o, p)] = int(wh)
        return out

    def rating_states(self) -> dict[str, tuple[str, str, bool]]:
        return {a: (t, d, bool(s)) for a, t, d, s in
                self.db.q("SELECT account_id, tariff_id, digest, stale FROM rating_state")}

    def mark_stale(self, accounts: Iterable[str | None]) -> None:
        """These accounts' pending aggregates no longer match their rows: re-rate them before use."""
        self.db.many("INSERT INTO rating_state (account_id, stale) VALUES (?, 1) "
                     "ON CONFLICT (account_id) DO UPDATE SET stale=1", [(a,) for a in sorted(a for a in accounts if a)])

    def add_pending(self, account: str, aggs: Mapping[AggKey, DayBandAggregate],
                    usage: Mapping[tuple[str, str, str], int]) -> None:
        """Add deltas to the stored pending aggregates and usage (raises ValueError on a unit price that
        differs from the stored one: the caller re-rates the account)."""
        refused = self.add_pending_many({account: (aggs, usage)})
        if refused:
            raise ValueError(refused[account])

    def add_pending_many(self, deltas: Mapping[str, tuple[Mapping[AggKey, DayBandAggregate],
                                                          Mapping[tuple[str, str, str], int]]]) -> dict[str, str]:
        """`add_pending` for several accounts: account -> (aggregate deltas, usage deltas), read in one query
        per 500 accounts and written in one statement per kind. Returns the accounts refused (account ->
        why): a delta whose unit price differs from the stored one; nothing is written for those (the
        caller re-rates them), the others are added."""
        refused: dict[str, str] = {}
        with_aggs = sorted(a for a, (aggs, _) in deltas.items() if aggs)
        have: dict[str, dict[AggKey, DayBandAggregate]] = {}
        if with_aggs:
            dates = {k[1] for a in with_aggs for k in deltas[a][0]}
            lo, hi = min(dates), max(dates) + timedelta(days=1)
            for i in range(0, len(with_aggs), 500):
                have.update(self.pending_aggregates(among=with_aggs[i:i + 500], before=hi, since=lo))
        upsert, delete, usage_rows, usage_accounts = [], [], [], []
        for account, (aggs, usage) in deltas.items():
            mine = have.get(account, {})
            rows, gone = [], []
            try:
                for key, delta in aggs.items():
                    old = mine.get(key)
                    new = delta if old is None else old + delta
                    if new.wh or new.amount_dec or new.days:
                        rows.append((new.account_id, self.db.day(new.local_date), new.band, new.kind, new.wh,
                                     self.db.dec(new.amount_dec), self.db.dec(new.unit_price), new.days))
                    elif old is not None:
                        gone.append((account, self.db.day(key[1]), key[2], old.kind))
            except ValueError as exc:
                refused[account] = str(exc)
                continue
            upsert += rows
            delete += gone
            if usage:
                usage_rows += [(account, m, o, p, wh) for (m, o, p), wh in usage.items()]
                usage_accounts.append((account,))
        upsert_sql = ("ON CONFLICT (account_id, local_date, band, kind) DO UPDATE SET wh=excluded.wh, "
                      "amount_dec=excluded.amount_dec, unit_price=excluded.unit_price, days=excluded.days")
        usage_sql = ("ON CONFLICT (account_id, meter_id, obis, usage_period) DO UPDATE SET "
                     "wh=pending_usage.wh+excluded.wh")
        if self.db.dialect == "postgres":          # one statement each over arrays, not a statement per row
            if upsert:
                self.db.x(f"INSERT INTO day_band_aggregate ({AGG_COLS}) SELECT * FROM unnest(?::text[], ?::date[], "
                          f"?::text[], ?::text[], ?::bigint[], ?::numeric[], ?::numeric[], ?::int[]) {upsert_sql}",
                          [list(c) for c in zip(*upsert)])
            if delete:
                self.db.x("DELETE FROM day_band_aggregate WHERE (account_id, local_date, band, kind) IN "
                          "(SELECT * FROM unnest(?::text[], ?::date[], ?::text[], ?::text[]))",
                          [list(c) for c in zip(*delete)])
            if usage_rows:
                self.db.x("INSERT INTO pending_usage SELECT * FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], "
                          f"?::bigint[]) {usage_sql}", [list(c) for c in zip(*usage_rows)])
                self.db.x("DELETE FROM pending_usage WHERE wh=0 AND account_id = ANY(?::text[])",
                          [[a for a, in usage_accounts]])
            return refused
        self.db.many(f"INSERT INTO day_band_aggregate ({AGG_COLS}) VALUES (?,?,?,?,?,?,?,?) {upsert_sql}", upsert)
        self.db.many("DELETE FROM day_band_aggregate WHERE account_id=? AND local_date=? AND band=? AND kind=?",
                     delete)
        self.db.many(f"INSERT INTO pending_usage VALUES (?,?,?,?,?) {usage_sql}", usage_rows)
        self.db.many("DELETE FROM pending_usage WHERE account_id=? AND wh=0", usage_accounts)
        return refused

    def rerate_pending(self, account: str, tariff: Tariff, zone: ZoneInfo) -> None:
        """Rate the account's pending usage from scratch from its unbilled rows (inside a transaction)."""
        self.db.x("DELETE FROM day_band_aggregate WHERE account_id=?", (account,))
        self.db.x("DELETE FROM pending_usage WHERE account_id=?", (account,))
        rows = self.rows(account=account, unbilled=True).values()
        aggs, usage = pending_contributions(((None, r) for r in rows), tariff, zone)
        self.add_pending(account, aggs, usage)
        self._rated_with(account, tariff)

    def unbilled_rows(self, account: str) -> int:
        return int(self.db.q("SELECT COUNT(*) FROM interval_usage WHERE account_id=? AND wh<>billed_wh", (account,))[0][0])

    def _rated_with(self, account: str, tariff: Tariff) -> None:
        self.db.x("INSERT INTO rating_state VALUES (?,?,?,0) ON CONFLICT (account_id) DO UPDATE SET "
                  "tariff_id=excluded.tariff_id, digest=excluded.digest, stale=0",
                  (account, tariff.id, tariff_digest(tariff)))

    def consume_pending(self, account: str, period: str, t_end: datetime) -> None:
        """A bill for `period` took the account's pending usage dated before its end: drop it and mark
        those rows billed (one set-based UPDATE, no rating)."""
        _, end = parse_period(period)
        self.db.x("DELETE FROM day_band_aggregate WHERE account_id=? AND local_date<?", (account, self.db.day(end)))
        self.db.x("DELETE FROM pending_usage WHERE account_id=? AND usage_period<=?", (account, period))
        self.db.x(f"UPDATE interval_usage SET billed_wh=wh, billed_account=account_id WHERE account_id=? "
                  f"AND start_ms<? AND wh<>billed_wh AND {_NOT_HELD}", (account, to_ms(t_end)))

    # ------------------------------------------------------------------ incremental processing state
    def needs_full(self, meters: Iterable[str]) -> None:
        """Flag meters to be derived whole by the next `process`: raises each one's flag generation (migration
        0007), so a run that read an older one leaves the flag set (`full_done`)."""
        self.db.many("INSERT INTO process_full (meter_id) VALUES (?) ON CONFLICT (meter_id) DO UPDATE SET "
                     "generation = process_full.generation + 1", [(m,) for m in meters])

    def full_meters(self) -> dict[str, int]:
        """The meters flagged to be derived whole, with the generation of their flag."""
        return {m: int(g) for m, g in self.db.q("SELECT meter_id, generation FROM process_full "
                                                 "WHERE generation > derived_generation")}

    def full_done(self, derived: Mapping[str, int]) -> None:
        """Clear the flags a run derived the meters for (meter -> the generation it read), each only if no
        flagging came since: compare-and-clear, in the run's write transaction (a flag raised meanwhile holds
        the row lock on PostgreSQL until it commits, then the generation no longer matches)."""
        self.db.many("UPDATE process_full SET derived_generation=? WHERE meter_id=? AND generation=?",
                     [(g, m, g) for m, g in derived.items()])

    def process_cursors(self) -> dict[str, tuple[int, list[tuple[int, int]]]]:
        return {g: (int(m), [tuple(x) for x in json.loads(gaps)]) for g, m, gaps in
                self.db.q("SELECT gateway_id, max_seq, gaps FROM process_cursor")}

    def set_process_cursor(self, gateway_id: str, max_seq: int, gaps: Sequence[tuple[int, int]]) -> None:
        self.db.x("INSERT INTO process_cursor VALUES (?,?,?) ON CONFLICT (gateway_id) DO UPDATE SET "
                  "max_seq=excluded.max_seq, gaps=excluded.gaps", (gateway_id, max_seq, json.dumps(list(gaps))))

    def changed_registers(self, gateway_id: str, after_seq: int, upto_seq: int,
                          gaps: Sequence[tuple[int, int]]) -> dict[tuple[str, str], int]:
        """(meter, obis) -> earliest taken_at_ms among the gateway's records with seq in (after, upto] or in
        the old `gaps` ranges (records that arrived since the last process)."""
        out: dict[tuple[str, str], int] = {}
        ranges = [(after_seq + 1, upto_seq), *gaps]
        for lo, hi in ranges:
            if hi < lo:
                continue
            for m, o, t in self.db.q("SELECT meter_id, obis, MIN(taken_at_ms) FROM gateway_record WHERE gateway_id=? "
                                     "AND seq BETWEEN ? AND ? AND obis IN ('1.8.0', '2.8.0') GROUP BY meter_id, obis",
                                     (gateway_id, lo, hi)):
                out[(m, o)] = min(out.get((m, o), t), t)
        return out

    def max_seq(self, gateway_id: str) -> int:
        return int(self.db.q("SELECT COALESCE(MAX(seq), 0) FROM gateway_record WHERE gateway_id=?", (gateway_id,))[0][0])

    def reading_instants_before(self, meter_id: str, obis: str, before_ms: int, n: int = 2, *,
                                snapshot: Mapping[str, int] | None = None) -> list[int]:
        """The last `n` distinct reading instants (ms) of a register strictly before `before_ms`, newest first;
        with `snapshot` (gateway -> highest seq) only of the records in it (sources it does not name, which
        `process` keeps no cursor for, e.g. file imports, count whole)."""
        if snapshot is None:
            return [int(r[0]) for r in self.db.q(
                "SELECT DISTINCT taken_at_ms FROM gateway_record WHERE meter_id=? AND obis=? AND taken_at_ms<? "
                f"ORDER BY taken_at_ms DESC LIMIT {int(n)}", (meter_id, obis, before_ms))]
        sql = ("SELECT taken_at_ms, gateway_id, seq FROM gateway_record WHERE meter_id=? AND obis=? AND taken_at_ms<? "
               "ORDER BY taken_at_ms DESC")
        limit = 4 * n
        while True:
            got = self.db.q(sql + ("" if limit is None else f" LIMIT {limit}"), (meter_id, obis, before_ms))
            out: list[int] = []
            for t, g, seq in got:
                if seq <= snapshot.get(g, seq) and (not out or out[-1] != t):
                    out.append(int(t))
                    if len(out) == n:
                        return out
            if limit is None or len(got) < limit:
                return out
            limit = None                               # records after the snapshot in the way: look at all

    def instants_before_all(self, before_ms: Mapping[tuple[str, str], int], n: int = 2, *,
                            snapshot: Mapping[str, int] | None = None) -> dict[tuple[str, str], list[int]]:
        """`reading_instants_before` of many registers ((meter, obis) -> before_ms) in one query per 100
        registers; a register whose first 4n records before the instant do not settle it (records after the
        snapshot in the way) is asked on its own."""
        keys = sorted(before_ms)
        limit = 4 * n
        part = ("SELECT * FROM (SELECT meter_id, obis, taken_at_ms, gateway_id, seq FROM gateway_record WHERE "
                f"meter_id=? AND obis=? AND taken_at_ms<? ORDER BY taken_at_ms DESC LIMIT {limit}) AS r{{i}}")
        got: dict[tuple[str, str], list] = {k: [] for k in keys}
        for lo in range(0, len(keys), 100):
            some = keys[lo:lo + 100]
            args: list = []
            for m, o in some:
                args += [m, o, before_ms[(m, o)]]
            for m, o, t, g, seq in self.db.q(" UNION ALL ".join(part.format(i=i) for i in range(len(some))), args):
                got[(m, o)].append((t, g, seq))
        out: dict[tuple[str, str], list[int]] = {}
        for key in keys:
            rows = sorted(got[key], key=lambda r: -r[0])
            mine: list[int] = []
            for t, g, seq in rows:
                if (snapshot is None or seq <= snapshot.get(g, seq)) and (not mine or mine[-1] != t):
                    mine.append(int(t))
                    if len(mine) == n:
                        break
            if len(mine) < n and len(rows) == limit:
                mine = self.reading_instants_before(key[0], key[1], before_ms[key], n, snapshot=snapshot)
            out[key] = mine
        return out

    def plain_windows(self, news: Mapping[str, Mapping[str, int | None]], snapshot: Mapping[str, int] | None,
                      n: int = 2) -> dict[str, dict[str, tuple[int | None, list[int], list]]]:
        """`instants_before_all` and `plain_columns` in one query, for the usual case with a snapshot the
        database filters (None or <= 32 gateways): meter -> obis (-> earliest new instant ms, None = whole
        history) -> (since, taken_at_ms list, value list) where `since` is the n-th latest distinct instant
        before the new one (None when there are fewer: the whole history) and the rows are the register's
        records from `since` on, as `plain_columns` gives them. Per register the n+1 newest records before the
        new instant are read with the records from it on; a meter with a register those do not settle (the
        rows end at `since`, more rows there may be cut off: several records at one instant) is left out:
        ask it the two-step way."""
        if snapshot is not None and len(snapshot) > 32:
            raise ValueError("plain_windows: the snapshot of more than 32 gateways is filtered row by row")
        keys = [(m, o, t) for m in sorted(news) for o, t in sorted(news[m].items())]
        units = ", ".join(f"'{u}'" for u in sorted(ENERGY_UNITS))
        limit = n + 1                       # enough when the newest instants are distinct (the usual case)
        if self.db.dialect == "postgres":
            return self._settle_windows(keys, self._pg_windows(keys, snapshot, units, limit), n, limit)
        snap_sql, snap_args = "", []
        if snapshot:
            snap_sql = " AND seq <= CASE gateway_id " + "WHEN ? THEN ? " * len(snapshot) + "ELSE seq END"
            for g, upto in sorted(snapshot.items()):
                snap_args += [g, upto]
        head = (f"SELECT * FROM (SELECT {{k}} AS k, taken_at_ms, CASE WHEN quality=0 AND unit IN ({units}) THEN value "
                f"END AS v FROM gateway_record WHERE meter_id=? AND obis=?")
        got: dict[int, tuple[list[int], list]] = {}
        for lo in range(0, len(keys), 100):
            some = keys[lo:lo + 100]
            parts, args = [], []
            for i, (m, o, t) in enumerate(some):
                if t is None:
                    parts.append(head.format(k=2 * i + 1) + snap_sql + f" ORDER BY taken_at_ms) AS r{2 * i + 1}")
                    args += [m, o, *snap_args]
                    continue
                parts.append(head.format(k=2 * i) + " AND taken_at_ms<?" + snap_sql
                             + f" ORDER BY taken_at_ms DESC LIMIT {limit}) AS r{2 * i}")
                parts.append(head.format(k=2 * i + 1) + " AND taken_at_ms>=?" + snap_sql
                             + f" ORDER BY taken_at_ms) AS r{2 * i + 1}")
                args += [m, o, t, *snap_args, m, o, t, *snap_args]
            _collect(self.db.q(" UNION ALL ".join(parts), args), got, 2 * lo)
        return self._settle_windows(keys, got, n, limit)

    def _pg_windows(self, keys: list, snapshot: Mapping[str, int] | None, units: str,
                    limit: int) -> dict[int, tuple[list[int], list]]:
        """PostgreSQL's `plain_windows` read: the registers and the snapshot as arrays joined LATERAL to the
        index, one statement text whatever the sizes (planned once, not per register)."""
        snap = sorted((snapshot or {}).items())
        cols = (f"taken_at_ms, CASE WHEN quality=0 AND unit IN ({units}) THEN value END AS v FROM gateway_record r "
                "WHERE r.meter_id = w.m AND r.obis = w.o AND NOT EXISTS (SELECT 1 FROM snap WHERE snap.g = "
                "r.gateway_id AND r.seq > snap.upto)")
        sql = ("WITH snap AS (SELECT * FROM unnest(?::text[], ?::bigint[]) AS s(g, upto)), "
               "w AS (SELECT * FROM unnest(?::int[], ?::text[], ?::text[], ?::bigint[]) AS w(k, m, o, t)) "
               f"SELECT 2 * w.k, b.taken_at_ms, b.v FROM w CROSS JOIN LATERAL (SELECT {cols} "
               f"AND r.taken_at_ms < w.t ORDER BY r.taken_at_ms DESC LIMIT {limit}) b WHERE w.t IS NOT NULL "
               f"UNION ALL SELECT 2 * w.k + 1, a.taken_at_ms, a.v FROM w CROSS JOIN LATERAL (SELECT {cols} "
               "AND r.taken_at_ms >= COALESCE(w.t, -9223372036854775808) ORDER BY r.taken_at_ms) a")
        got: dict[int, tuple[list[int], list]] = {}
        for lo in range(0, len(keys), 500):
            some = keys[lo:lo + 500]
            _collect(self.db.q(sql, [[g for g, _ in snap], [u for _, u in snap], list(range(lo, lo + len(some))),
                                     [m for m, _, _ in some], [o for _, o, _ in some], [t for _, _, t in some]]),
                     got, 0)
        return got

    @staticmethod
    def _settle_windows(keys: list, got: Mapping[int, tuple[list[int], list]], n: int,
                        limit: int) -> dict[str, dict[str, tuple[int | None, list[int], list]]]:
        """`plain_windows`' answer from the rows read: key 2i = register i's rows before its new instant
        (newest first, at most `limit`), 2i+1 = its rows from the new instant on."""
        out: dict[str, dict[str, tuple[int | None, list[int], list]]] = {}
        unsure: set[str] = set()
        for i, (m, o, t_new) in enumerate(keys):
            b_times, b_values = got.get(2 * i, ((), ()))
            a_times, a_values = got.get(2 * i + 1, ([], []))
            since = None
            if t_new is not None:
                order = sorted(range(len(b_times)), key=lambda j: -b_times[j])
                distinct: list[int] = []
                for j in order:
                    if not distinct or distinct[-1] != b_times[j]:
                        distinct.append(b_times[j])
                if len(b_times) == limit and (len(distinct) < n or distinct[n - 1] == distinct[-1]):
                    unsure.add(m)                       # the rows at `since` (or before) may be cut off
                    continue
                since = distinct[n - 1] if len(distinct) >= n else None
                keep = [j for j in reversed(order) if since is None or b_times[j] >= since]
                a_times = [b_times[j] for j in keep] + a_times
                a_values = [b_values[j] for j in keep] + a_values
            out.setdefault(m, {})[o] = (since, a_times, a_values)
        return {m: regs for m, regs in out.items() if m not in unsure}

    def plain_columns(self, starts: Mapping[str, Mapping[str, int | None]],
                      snapshot: Mapping[str, int] | None) -> dict[str, dict[str, tuple[list[int], list]] | None]:
        """The usual case's read: for several meters' registers (as `snapshot_columns`) only instants and
        values, meter -> obis -> (taken_at_ms list, value list), a value None where the reading is not a plain
        energy reading (quality set, or a unit VEE refuses); one query per 100 registers, three numbers per
        reading. Same records as `snapshot_columns` (snapshot and `starts` filters), each register by instant;
        rows at one instant are in no particular order (the usual case has none: its caller then reads
        the meter with `snapshot_columns`). Meters without records are left out."""
        keys = [(m, o, t) for m in sorted(starts) for o, t in sorted(starts[m].items())]
        units = ", ".join(f"'{u}'" for u in sorted(ENERGY_UNITS))
        snap_sql, snap_args, by_row = "", [], snapshot is not None and len(snapshot) > 32
        if snapshot is not None and not by_row and snapshot:      # a few gateways: filtered by the database
            snap_sql = " AND seq <= CASE gateway_id " + "WHEN ? THEN ? " * len(snapshot) + "ELSE seq END"
            for g, upto in sorted(snapshot.items()):
                snap_args += [g, upto]
        extra = ", gateway_id, seq" if by_row else ""
        out: dict[str, dict[str, tuple[list[int], list]] | None] = {}
        for lo in range(0, len(keys), 100):
            some = keys[lo:lo + 100]
            parts, args = [], []
            for i, (m, o, t) in enumerate(some):
                parts.append(f"SELECT * FROM (SELECT {i} AS k, taken_at_ms, CASE WHEN quality=0 AND unit IN ({units}) "
                             f"THEN value END AS v{extra} FROM gateway_record WHERE meter_id=? AND obis=?"
                             + ("" if t is None else " AND taken_at_ms>=?") + snap_sql
                             + f" ORDER BY taken_at_ms) AS r{i}")
                args += [m, o] + ([] if t is None else [t]) + snap_args
            cols: dict[int, tuple[list[int], list]] = {}
            key, times, values = None, None, None
            for row in self.db.q(" UNION ALL ".join(parts), args):
                if by_row and row[4] > snapshot.get(row[3], row[4]):
                    continue
                if row[0] != key:
                    key = row[0]
                    got = cols.get(key)
                    if got is None:
                        got = cols[key] = ([], [])
                    times, values = got
                times.append(row[1])
                values.append(row[2])
            for i, (times, values) in cols.items():
                m, o, _ = some[i]
                out.setdefault(m, {})[o] = (times, values)
        return out

    def snapshot_columns(self, starts: Mapping[str, Mapping[str, int | None]],
                         snapshot: Mapping[str, int] | None) -> dict[str, dict[str, list[tuple[int, int, str, int]]]]:
        """The readings of several meters' registers (meter -> obis -> from instant ms, None = whole history)
        as plain rows: meter -> obis -> [(taken_at_ms, value, unit, quality)], each register's rows in the
        order `repo.readings` gives them (instant, then gateway and seq); with `snapshot` (gateway -> highest
        seq) only the records in it (sources it does not name, which `process` keeps no cursor for, e.g. file
        imports, count whole). One query (an OR of index ranges), no object made per reading (no
        re-validation of what ingest validated)."""
        terms, args = [], []
        for m in sorted(starts):
            for o, t in sorted(starts[m].items()):
                if t is None:
                    terms.append("(meter_id=? AND obis=?)")
                    args += [m, o]
                else:
                    terms.append("(meter_id=? AND obis=? AND taken_at_ms>=?)")
                    args += [m, o, t]
        if not terms:
            return {}
        order = ' ORDER BY meter_id, obis, taken_at_ms, gateway_id COLLATE "C", seq' \
            if self.db.dialect == "postgres" else " ORDER BY meter_id, obis, taken_at_ms, gateway_id, seq"
        out: dict[str, dict[str, list[tuple[int, int, str, int]]]] = {}
        key = got = None
        for m, o, t, v, u, q, g, seq in self.db.q(
                "SELECT meter_id, obis, taken_at_ms, value, unit, quality, gateway_id, seq FROM gateway_record "
                f"WHERE {' OR '.join(terms)}{order}", args):
            if snapshot is not None and seq > snapshot.get(g, seq):
                continue
            if (m, o) != key:
                key = (m, o)
                got = out.setdefault(m, {}).setdefault(o, [])
            got.append((t, v, u, q))
        return out

    def rows_since(self, windows: Mapping[str, Mapping[str, datetime | None]]) -> dict[str, dict[RowKey, UsageRow]]:
        """Stored rows of several meters' registers (meter -> obis -> from start, None = all), per meter; one
        query per 100 registers (an OR of whole index ranges: each term names meter and register)."""
        terms: list[tuple[str, list]] = []
        for m in sorted(windows):
            for obis, since in sorted(windows[m].items()):
                if since is None:
                    terms.append(("(meter_id=? AND obis=?)", [m, obis]))
                else:
                    terms.append(("(meter_id=? AND obis=? AND start_ms>=?)", [m, obis, to_ms(since)]))
        out: dict[str, dict[RowKey, UsageRow]] = {}
        for lo in range(0, len(terms), 100):
            some = terms[lo:lo + 100]
            for r in self.db.q(f"SELECT {ROW_COLS} FROM interval_usage WHERE {' OR '.join(t for t, _ in some)}",
                               [a for _, args in some for a in args]):
                row = _row(r)
                out.setdefault(row.meter_id, {})[row.key] = row
        return out

    def chain_gaps(self) -> list[tuple[str, int, int]]:
        """Missing seq ranges [first, last] of every gateway's chain as the chain store holds it: seqs up to
        the head with no record hash or stored reading (events have a hash, so they are no gaps), and runs the
        gateway pruned before delivering them (tombstones: those readings never arrived)."""
        from .chainstore import open_chain_store
        open_chain_store(self.url).close()            # its tables exist (created on first open)
        out = []
        for g, head in self.db.q("SELECT gateway_id, head_seq FROM gateway_chain_head ORDER BY gateway_id"):
            head = int(head)
            # held seqs: a record hash, or a reading stored with the chain (its hash is the next prev_hash)
            held = ("(SELECT seq FROM gateway_chain_hash WHERE gateway_id=? UNION ALL "
                    "SELECT seq FROM gateway_record WHERE gateway_id=? AND seq<=?) h")
            lo, hi = self.db.q(f"SELECT MIN(seq), MAX(seq) FROM {held}", (g, g, head))[0]
            missing = []
            if lo is None:
                missing.append((1, head))
            else:
                missing.append((1, int(lo) - 1))
                missing += [(int(a) + 1, int(b) - 1) for a, b in self.db.q(
                    f"SELECT seq, nxt FROM (SELECT seq, LEAD(seq) OVER (ORDER BY seq) AS nxt FROM {held}) t "
                    "WHERE nxt IS NOT NULL AND nxt > seq + 1", (g, g, head))]
                missing.append((int(hi) + 1, head))
            missing += [(int(first), int(last)) for last, first in self.db.q(
                "SELECT seq, at_ms FROM gateway_event WHERE gateway_id=? AND kind='tombstone'", (g,))]
            merged: list[list[int]] = []
            for a, b in sorted(r for r in missing if r[0] <= r[1]):
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            out += [(g, a, b) for a, b in merged]
        return out


# --------------------------------------------------------------------------- steps

class _BindingsChanged(Exception):
    """Raised in a `process` chunk's write transaction (rolling it back) when a binding edit committed since the
    run read the bindings."""


@dataclass(frozen=True)
class ProcessResult:
    meters: int
    rows_changed: int
    exceptions_queued: int
    readings: int = 0                 # readings derived (the incremental windows, or whole histories)
    accounts_rerated: int = 0         # accounts whose pending usage was rated again from their rows


def vee_config(bindings: Bindings, markets: Mapping[str, Market], meter_id: str) -> VeeConfig:
    market = markets.get(bindings.market_of_meter(meter_id) or "")
    meter = bindings.meters.get(meter_id)
    return VeeConfig(interval=timedelta(minutes=market.interval_minutes if market else 15),
                     register_max=meter.register_max if meter else None,
                     max_power_w=meter.max_power_w if meter else None)


def _grid_ceil_ms(ms: int, step_ms: int) -> int:
    return -(-ms // step_ms) * step_ms


def _work(repo, store: BillingStore, meters: Iterable[str] | None,
          known: Mapping[str, tuple[int, list]], full: Iterable[str] = ()) -> tuple[dict, dict]:
    """What to derive: meter -> {obis: from instant ms, or None = whole history}, and the cursors to
    store once done. Explicit `meters` and the meters `full` (flagged for a full run) are derived whole."""
    work: dict[str, dict[str, int | None]] = {}
    cursors: dict[str, tuple[int, list]] = {}
    if meters is not None:
        for m in meters:
            work[m] = {"1.8.0": None, "2.8.0": None}
        return work, cursors
    for m in full:
        work[m] = {"1.8.0": None, "2.8.0": None}
    for g in store.gateways():
        upto = store.max_seq(g)                 # the run's snapshot of this gateway: seq <= upto
        gaps = [(a, b) for a, b in repo.gaps(g)]   # after upto: a seq <= upto missing now is in a gap
        after, old_gaps = known.get(g, (0, []))
        for (m, o), t in store.changed_registers(g, after, upto, old_gaps).items():
            regs = work.setdefault(m, {})
            if o in regs and regs[o] is None:
                continue
            regs[o] = t if o not in regs else min(regs[o], t)
        cursors[g] = (upto, [(a, b) for a, b in gaps if a <= upto])
    return work, cursors


def process_readings(repo, store: BillingStore, markets: Mapping[str, Market], now: datetime,
                     meters: Iterable[str] | None = None, *,
                     tariffs: Mapping[str, Tariff] | None = None) -> ProcessResult:
    """New readings -> intervals -> bound rows merged with their billing state, rated into the pending
    day-band aggregates of their accounts (the delta only); exceptions queued. Incremental.

    Only registers with readings that arrived since the last run (per gateway, by seq) are derived, from
    the second-last reading before the earliest new one (VEE is local: an interval depends on the
    readings around it), and only the stored rows from there on are compared. A run derives the
    snapshot it took at its start (per gateway, the records with seq <= the cursor it stores at the end):
    readings arriving during the run are left to the next run, which derives them once. `meters` given,
    meters with an exchange read and meters marked (exchange recorded, exception resolved, meter data
    changed) are derived whole. Without `tariffs` (or for an account whose tariff is not loaded) the
    touched accounts are marked stale and re-rated from their rows by the next run that has tariffs.

    Storing is done a chunk of meters per transaction (at most PROCESS_CHUNK_METERS meters or
    PROCESS_CHUNK_READINGS readings), not one per meter: fewer commits (fsyncs), short write locks. A chunk's
    stored rows are read, merged and rated into deltas before its transaction (SQLite's write lock is the
    ingest's too); the transaction re-reads them and merges and rates again only if another writer changed
    them meanwhile, then writes rows, exceptions, aggregates and (the run's last one) the cursors.

    Binding edits do not wait for a run: they raise the bindings' generation in their own transaction, which
    takes the rating lock (`BillingStore._bump_bindings`), and the run reads the generation before the bindings.
    A chunk whose transaction finds another generation was bound with replaced bindings: it is rolled back
    unwritten, the run reads the bindings (exchange reads, rating states) again and derives, merges and rates
    that chunk anew. Chunks written before the edit are the edit's to re-bind (it re-binds every stored row),
    so the rows and aggregates end as if the edit had come before or after the whole run.

    Resolving an exception does not wait for a run either: it raises the meter's full-derivation flag
    (`needs_full`). The run reads the flags (with their generations) before the resolved exceptions, and the
    write transaction of the chunk that derived a flagged meter whole clears only the generation the run read
    (`full_done`); a resolve committed after that read leaves the flag set, and the next run derives the
    meter whole with it, releasing what it released.
    """
    generation = store.bindings_generation()          # first: an edit while the bindings are read is seen
    bindings = store.bindings()
    # the flags before the resolutions: a resolve committed in between raised the flag's generation, which the
    # run then leaves set (`full_done` clears only the generation read), so the next run derives the meter again
    full = store.full_meters() if meters is None else {}
    released_from = [e for e in store.exceptions(status="resolved") if e.released]
    released_meters = {e.meter_id for e in released_from}
    known = store.process_cursors() if meters is None else {}
    work, cursors = _work(repo, store, meters, known, full)
    snapshot = None if meters is not None else {g: upto for g, (upto, _) in cursors.items()}
    exchanges_of = store.all_exchange_reads()
    states = store.rating_states()
    n_meters = changed_total = queued = n_readings = 0
    rerated: set[str] = set()
    chunk: list = []
    chunk_readings = 0

    def flush(final: bool = False) -> bool:
        """Store the chunk (and, `final`, move the cursors); False, with nothing written, when the bindings
        changed since the run read them: the caller then `rewind`s and derives the chunk again."""
        nonlocal queued, changed_total, chunk_readings
        moved = [(g, c) for g, c in cursors.items() if final and known.get(g) != c]
        if not chunk and not moved:
            return True
        # read and computed without the write lock (ingest keeps committing meanwhile): the chunk's stored rows,
        # merged with what was derived, and their rating deltas ...
        windows = {item[0]: item[1] for item in chunk}
        stored_of = store.rows_since(windows)
        merged = _merge_chunk(chunk, stored_of, bindings)
        rating = _rating_deltas(bindings, markets, tariffs, states, merged.pairs, merged.plain)
        # ... then one short write transaction stores them; rows another writer changed meanwhile (a bill run)
        # are merged and rated again under the lock, from what is stored now; a binding edit meanwhile (another
        # generation) rolls the transaction back before it wrote anything
        try:
            with store.db.tx(exclusive=True):
                if chunk and store.bindings_generation() != generation:
                    raise _BindingsChanged
                if chunk:
                    now_stored = store.rows_since(windows)
                    if now_stored != stored_of:
                        merged = _merge_chunk(chunk, now_stored, bindings)
                        rating = _rating_deltas(bindings, markets, tariffs, states, merged.pairs, merged.plain)
                for g, (upto, gaps) in moved:          # the run's last transaction also moves the cursors
                    store.set_process_cursor(g, upto, gaps)
                queued += store.queue_exceptions(merged.exceptions, now)
                store.insert_new_rows(merged.new_rows)
                store.save_rows(merged.changed_rows)
                store.full_done({item[0]: full[item[0]] for item in chunk if item[0] in full})
                changed_total += len(merged.new_rows) + len(merged.changed_rows)
                rerated.update(_store_rating(store, states, rating))
        except _BindingsChanged:
            return False
        chunk.clear()
        chunk_readings = 0
        return True

    def rewind() -> int:
        """After `flush` found the bindings changed: read them again (generation first), with what edits also
        change (exchange reads, rating states: re-bound accounts are stale), drop the chunk and return the
        position of its first meter, from which the run derives again."""
        nonlocal generation, bindings, exchanges_of, states, n_meters, n_readings, chunk_readings
        generation = store.bindings_generation()
        bindings = store.bindings()
        exchanges_of = store.all_exchange_reads()
        states = store.rating_states()
        n_meters -= len(chunk)
        n_readings -= chunk_readings
        chunk.clear()
        chunk_readings = 0
        return chunk_at

    def incremental(meter_id: str) -> bool:        # derived from where new readings arrived, not whole
        return not exchanges_of.get(meter_id) and all(t is not None for t in work[meter_id].values())

    order = sorted(work)
    at = chunk_at = 0                              # chunk_at: where in `order` the chunk's first meter is
    while True:
        if at == len(order):
            if flush(final=True):
                break
            at = rewind()                          # the last chunk was bound with replaced bindings
        group = order[at:at + 1]                   # meters read together: incremental ones, up to READ_GROUP_METERS
        while incremental(group[0]) and len(group) < READ_GROUP_METERS and at + len(group) < len(order) \
                and incremental(order[at + len(group)]):
            group.append(order[at + len(group)])
        at += len(group)
        meta, asks = {}, {}
        for meter_id in group:
            config = vee_config(bindings, markets, meter_id)
            exchanges = exchanges_of.get(meter_id, [])
            meta[meter_id] = (config, exchanges, int(config.interval.total_seconds() * 1000))
        usual = [m for m in group if not meta[m][1] and m not in released_meters]
        # the usual case with a snapshot the database filters: where to start and what is there, in one query
        one = store.plain_windows({m: work[m] for m in usual}, snapshot) \
            if usual and (snapshot is None or len(snapshot) <= 32) else {}
        for meter_id in group:
            if meter_id not in one and not meta[meter_id][1]:
                asks.update({(meter_id, o): t for o, t in work[meter_id].items() if t is not None})
        befores = store.instants_before_all(asks, snapshot=snapshot) if asks else {}
        starts_of: dict[str, dict[str, int | None]] = {}
        windows_of: dict[str, dict[str, datetime | None]] = {}
        for meter_id in group:
            step_ms = meta[meter_id][2]
            starts, windows = starts_of[meter_id], windows_of[meter_id] = {}, {}
            for obis in ("1.8.0", "2.8.0"):
                if obis not in work[meter_id]:
                    continue
                if meter_id in one:
                    since = one[meter_id][obis][0]
                else:
                    before = befores.get((meter_id, obis), ())
                    since = before[1] if len(before) == 2 else None
                starts[obis] = since
                windows[obis] = None if since is None else from_ms(_grid_ceil_ms(since, step_ms))
        rest = {m: starts_of[m] for m in usual if m not in one}
        plain = store.plain_columns(rest, snapshot) if rest else {}
        for meter_id, regs in one.items():
            plain[meter_id] = {o: (times, values) for o, (_, times, values) in regs.items() if times}
        regular_of: dict[str, tuple[dict, int]] = {}
        for meter_id in usual:
            columns = plain.get(meter_id, {})
            regular = _regular_registers(columns, meta[meter_id][2], meta[meter_id][0].max_power_w)
            if regular is not None:                # the usual case, derived on columns (same intervals)
                regular_of[meter_id] = (regular, sum(len(c[0]) for c in columns.values()))
        general = {m: starts_of[m] for m in group if m not in regular_of}
        columns_of = store.snapshot_columns(general, snapshot) if general else {}
        for i, meter_id in enumerate(group):
            if not chunk:
                chunk_at = at - len(group) + i
            config, exchanges, step_ms = meta[meter_id]
            windows = windows_of[meter_id]
            if meter_id in regular_of:
                regular, count = regular_of[meter_id]
                chunk.append((meter_id, windows, None, regular, None))
            else:
                columns = columns_of.get(meter_id, {})
                count = sum(len(rows) for rows in columns.values())
                result = derive_intervals(_stored_readings(meter_id, columns), config, exchanges)
                fresh = [r for r in bind_intervals(result.intervals, bindings)
                         if r.obis in windows and (windows[r.obis] is None or r.start >= windows[r.obis])]
                released = released_keys(fresh, [e for e in released_from if e.meter_id == meter_id])
                chunk.append((meter_id, windows, result, fresh, released))
            n_readings += count
            chunk_readings += count
            n_meters += 1
            if (len(chunk) >= PROCESS_CHUNK_METERS or chunk_readings >= PROCESS_CHUNK_READINGS) and not flush():
                at = rewind()                      # derive the chunk again, with the bindings as they are now
                break
    return ProcessResult(n_meters, changed_total, queued, n_readings, len(rerated))


def _collect(rows: Iterable[tuple], got: dict[int, tuple[list[int], list]], offset: int) -> None:
    """(key, instant, value) rows -> got[offset + key] = (instants, values), in the order read."""
    key = times = values = None
    for k, t, v in rows:
        if k != key:
            key = k
            pair = got.get(offset + k)
            if pair is None:
                pair = got[offset + k] = ([], [])
            times, values = pair
        times.append(t)
        values.append(v)


def _stored_readings(meter_id: str, columns: Mapping[str, list[tuple[int, int, str, int]]]) -> list[_StoredReading]:
    """`snapshot_columns` rows as the readings `derive_intervals` takes (what `snapshot_readings` returns)."""
    cache = _READ_INSTANTS
    if len(cache) > 500_000:
        cache.clear()
    out = []
    for obis, rows in columns.items():
        for t, v, u, q in rows:
            at = cache.get(t)
            if at is None:
                at = cache[t] = _EPOCH + t * _ONE_MS
            out.append(_StoredReading(meter_id, obis, at, v, u, q))
    return out


def _regular_registers(columns: Mapping[str, tuple[list[int], list]], step_ms: int,
                       max_power_w: int | None) -> dict[str, tuple[list[int], list[int]]] | None:
    """obis -> (boundary instants ms, register values) when every register of the meter is the usual case
    (`plain_columns` found only plain energy readings and `vee.regular_intervals` takes them: one reading per
    boundary, rising plausibly), else None."""
    out = {}
    for obis, (times, values) in columns.items():
        if None in values:
            return None
        got = regular_intervals(times, values, step_ms, max_power_w)
        if got is None:
            return None
        out[obis] = got
    return out


def _ms_ceil(t: datetime) -> int:
    """The first whole millisecond at or after `t` (binding instants may carry microseconds)."""
    return -(-((t - _EPOCH) // timedelta(microseconds=1)) // 1000)


def _merge_regular(meter_id: str, windows: Mapping[str, datetime | None],
                   regular: Mapping[str, tuple[list[int], list[int]]], stored: Mapping[RowKey, UsageRow],
                   bindings: Bindings, plain: dict[str, list]) -> tuple[dict[RowKey, UsageRow], list[tuple]]:
    """The usual case of `bind_intervals` + `merge_rows` on columns: intervals between consecutive boundary
    readings, each bound to the account of the binding span holding its start. Intervals that have a stored
    row (the start of the window) go through `merge_rows` (-> changed rows, keyed); the others are new rows,
    returned as insert tuples (meter, obis, start_ms, end_ms, wh, account), and those that count as pending
    usage (bound, wh != 0) are added to `plain` (account -> [(meter, obis, starts ms, wh)])."""
    spans = None
    stored_starts = {(k[1], to_ms(k[2])) for k in stored}
    fresh: list[UsageRow] = []
    new: list[tuple] = []
    for obis, (bounds, marks) in regular.items():
        if obis not in windows:
            continue
        w = windows[obis]
        lo = 0 if w is None else bisect_left(bounds, to_ms(w))
        n = len(bounds) - 1
        if lo >= n:
            continue
        if spans is None:
            spans = [(_ms_ceil(s.start), None if s.end is None else _ms_ceil(s.end), s.account_id)
                     for s in bindings.spans(meter_id)]
        accounts: list[str | None] = [None] * (n - lo)
        for a, b, account in spans:
            if account is None:
                continue
            i = max(lo, bisect_left(bounds, a, lo, n))
            j = n if b is None else min(n, bisect_left(bounds, b, lo, n))
            if i < j:                              # spans are disjoint: at most one holds a start
                accounts[i - lo:j - lo] = [account] * (j - i)
        by_account: dict[str, tuple[list[int], list[int]]] = {}
        for k in range(lo, n):
            start, wh, account = bounds[k], marks[k + 1] - marks[k], accounts[k - lo]
            if stored_starts and (obis, start) in stored_starts:
                fresh.append(UsageRow(meter_id, obis, from_ms(start), from_ms(bounds[k + 1]), wh, False,
                                      frozenset(), account))
                continue
            new.append((meter_id, obis, start, bounds[k + 1], wh, account))
            if account is not None and wh:
                cols = by_account.get(account)
                if cols is None:
                    cols = by_account[account] = ([], [])
                cols[0].append(start)
                cols[1].append(wh)
        for account, (starts, whs) in by_account.items():
            plain.setdefault(account, []).append((meter_id, obis, starts, whs))
    return merge_rows(stored, fresh), new


def _account_tariff(bindings: Bindings, markets: Mapping[str, Market], tariffs: Mapping[str, Tariff] | None,
                    account: str) -> tuple[Tariff, ZoneInfo] | None:
    if tariffs is None or account not in bindings.accounts:
        return None
    market = markets.get(bindings.market_of_account(account))
    if market is None:
        return None
    tariff = tariffs.get(bindings.accounts[account].tariff_id or market.default_tariff)
    return None if tariff is None else (tariff, ZoneInfo(market.timezone))


class _MergedChunk(NamedTuple):
    """A chunk of meters' derived intervals merged with their stored rows (`_merge_chunk`): what to store."""
    pairs: list               # (old, new) row changes, rated per account
    plain: dict               # account -> new plain rows as columns [(meter, obis, starts ms, wh)]
    new_rows: list            # insert tuples of the new plain rows
    changed_rows: list        # UsageRows to upsert
    exceptions: list          # VEE exceptions to queue


def _merge_chunk(chunk: Sequence[tuple], stored_of: Mapping[str, Mapping[RowKey, UsageRow]],
                 bindings: Bindings) -> _MergedChunk:
    """`process`' chunk (meter, windows, VEE result or None, fresh rows or regular registers, released keys)
    merged with the stored rows `stored_of` (`rows_since` of its windows); no I/O."""
    out = _MergedChunk([], {}, [], [], [])
    for meter_id, windows, result, fresh, released in chunk:
        stored = stored_of.get(meter_id, {})
        if result is None:                 # the usual case: `fresh` holds the registers' boundaries
            changed, new = _merge_regular(meter_id, windows, fresh, stored, bindings, out.plain)
            out.new_rows.extend(new)
        else:
            changed = merge_rows(stored, fresh, released)
            out.exceptions.extend(result.exceptions)
        out.changed_rows.extend(changed.values())
        out.pairs.extend((stored.get(k), r) for k, r in changed.items())
    return out


class _RatingDeltas(NamedTuple):
    """`_rating_deltas`' answer: what `_store_rating` writes."""
    deltas: dict              # account -> (aggregate deltas, usage deltas), added to the stored ones
    found: dict               # account -> (tariff, zone) of every account rated
    fresh: dict               # account -> new rows, for accounts never rated (their deltas may be the scratch)
    rerate: list              # accounts rated from scratch from their rows (stale, or another tariff)
    stale: list               # accounts without a loaded tariff: marked stale


def _rating_deltas(bindings: Bindings, markets: Mapping[str, Market], tariffs: Mapping[str, Tariff] | None,
                   states: Mapping[str, tuple[str, str, bool]], changes: list,
                   plain: Mapping[str, list] | None = None) -> _RatingDeltas:
    """Rate (old, new) row changes into pending-aggregate deltas, per account; no I/O (`states`: the accounts'
    rating states as stored). `plain`: account -> new plain rows as columns [(meter, obis, starts ms, wh)]
    (`_merge_regular`), rated as (None, row) changes would be (`rating.rate_starts`)."""
    out = _RatingDeltas({}, {}, {}, [], [])
    by_account = split_by_account(changes)
    plain = plain or {}
    for account in [*by_account, *(a for a in plain if a not in by_account)]:
        pairs = by_account.get(account, [])
        columns = plain.get(account, ())
        found = _account_tariff(bindings, markets, tariffs, account)
        if found is None:
            out.stale.append(account)
            continue
        tariff, zone = found
        out.found[account] = found
        state = states.get(account)
        if state is not None and (state[2] or state[1] != tariff_digest(tariff)):
            out.rerate.append(account)                  # rows saved first, then rated from scratch
            continue
        if state is None:
            out.fresh[account] = sum(1 for old, _ in pairs if old is None) + sum(len(c[2]) for c in columns)
        aggs, usage = pending_contributions(pairs, tariff, zone)
        if columns:
            aggs, usage = _add_plain(aggs, usage, columns, tariff, zone, account)
        out.deltas[account] = (aggs, usage)
    return out


def _store_rating(store: BillingStore, states: dict, rating: _RatingDeltas) -> set[str]:
    """Write `_rating_deltas`' answer (inside the transaction that saved the rows): add the deltas to the
    pending aggregates, rate from scratch where they cannot be added; returns the accounts re-rated."""
    rerated = set()
    if rating.stale:
        store.mark_stale(rating.stale)
        states.update({a: ("", "", True) for a in rating.stale})
    deltas = dict(rating.deltas)
    rerate = list(rating.rerate)
    for account, new_rows in rating.fresh.items():
        tariff = rating.found[account][0]
        if store.unbilled_rows(account) == new_rows:
            store._rated_with(account, tariff)       # never rated and all its unbilled rows are new here:
            states[account] = (tariff.id, tariff_digest(tariff), False)   # the deltas are the scratch
        else:
            del deltas[account]
            rerate.append(account)
    for account in rerate:
        tariff, zone = rating.found[account]
        store.rerate_pending(account, tariff, zone)              # rows already saved: from scratch
        states[account] = (tariff.id, tariff_digest(tariff), False)
        rerated.add(account)
    for account in store.add_pending_many(deltas):              # stored with another unit price
        store.rerate_pending(account, *rating.found[account])
        rerated.add(account)
    return rerated


def _add_plain(aggs: dict, usage: dict, columns: Sequence[tuple], tariff: Tariff, zone: ZoneInfo,
               account: str) -> tuple[dict, dict]:
    """`aggs`/`usage` (pending_contributions' deltas) plus the new plain rows `columns` of `account`."""
    parts = [aggs]
    usage = dict(usage)
    for meter_id, obis, starts, whs in columns:
        got = rate_starts(tariff, zone, account, meter_id, obis, starts, whs)
        if got is None:                      # an export without an export rate: the general way raises it
            pending_contributions([(None, UsageRow(meter_id, obis, from_ms(t), from_ms(t + 1), wh, account_id=account))
                                   for t, wh in zip(starts, whs)], tariff, zone)
            raise AssertionError(f"meter {meter_id} {obis}: rate_starts refused what rate_intervals rated")
        parts.append(got[0])
        for k, wh in got[1].items():
            usage[k] = usage.get(k, 0) + wh
    merged = merge_aggregates(*parts)
    return ({k: a for k, a in merged.items() if a.wh or a.amount_dec or a.days},
            {k: wh for k, wh in usage.items() if wh})


def run_billing(store: BillingStore, period: str, *, markets: Mapping[str, Market], tariffs: Mapping[str, Tariff],
                vat: VatTable, issue_date: date, now: datetime, adjustments: Sequence[Adjustment] = (),
                accounts: Iterable[str] | None = None, promotions: Mapping[str, Sequence] | None = None) -> BillRun:
    """Bill `period` for every account not yet billed for it, from the STORED pending aggregates (a
    summation, no rating), and store items and invoices; all in one transaction.

    Accounts whose pending aggregates are stale or were rated with another tariff are rated again from
    their rows first. Billing an account drops its pending aggregates dated before the period's end and
    marks those rows billed. Catch-up is priced as if it had arrived on time: blocks (tiers) count what the
    rows of the same months already billed (`BillingStore.billed_import`), and supply days since the first
    billed period that no item charged yet (a back-dated supply) get their standing charges, and charged
    days no supply covers any more (a back-dated move-out) are credited (`standing_charged`). `promotions`: account id -> accepted rating Promotions
    (cli_insights.accepted_rating_promotions).
    """
    start, end = parse_period(period)
    with store.db.tx(exclusive=True):
        bindings = store.bindings()
        first = store.first_billed_period()
        since = min(parse_period(first)[0], start) if first else start
        done = store.billed_accounts(period)
        states = store.rating_states()
        todo, skipped = [], []
        for account_id in sorted(accounts if accounts is not None else bindings.accounts):
            if account_id in done:
                skipped.append(account_id)
                continue
            if account_id not in bindings.accounts:
                raise ValidationError(f"unknown account {account_id}")
            market = markets[bindings.market_of_account(account_id)]
            tariff_id = bindings.accounts[account_id].tariff_id or market.default_tariff
            if tariff_id not in tariffs:
                raise ValidationError(f"account {account_id}: tariff {tariff_id!r} is not loaded "
                                      f"(known: {', '.join(sorted(tariffs))})")
            tariff = tariffs[tariff_id]
            state = states.get(account_id)
            if state is None or state[2] or state[1] != tariff_digest(tariff):
                store.rerate_pending(account_id, tariff, ZoneInfo(market.timezone))
            todo.append((account_id, market, tariff))
        bills = []
        aggs = usage = charged = {}
        for n, (account_id, market, tariff) in enumerate(todo):
            if n % BILL_CHUNK == 0:                   # the stored aggregates of the next chunk of accounts
                chunk = [t[0] for t in todo[n:n + BILL_CHUNK]]
                aggs = store.pending_aggregates(before=end, among=chunk)
                usage = store.pending_usage(through=period, among=chunk)
                charged = store.standing_ranges(among=chunk)
            mine = aggs.get(account_id, {})
            billed = None
            if has_tiers(tariff):
                energy = [a.local_date for a in mine.values() if a.kind == "energy"]
                if energy:
                    zone = ZoneInfo(market.timezone)
                    billed = store.billed_import(account_id, local_midnight(min(energy).replace(day=1), zone),
                                                 local_midnight(end, zone), zone)
            item = item_from_pending(account_id, period, bindings=bindings, market=market, tariff=tariff, vat=vat,
                                     aggregates=mine.values(), usage=usage.get(account_id, {}),
                                     promotions=(promotions or {}).get(account_id, ()), adjustments=adjustments,
                                     supplies=bindings.supplies_of_account(account_id), billed_import=billed,
                                     standing_charged=charged.get(account_id, ()), standing_since=since)
            if item is not None:
                bills.append(AccountBill(item, None))       # None: summed, rows marked by consume_pending
        run = BillRun(period, tuple(bills), tuple(skipped))
        store.store_bill_run(run, bindings, markets, issue_date, now, _in_tx=True)
    return run


def reconcile_period(repo, store: BillingStore, period: str, *, markets: Mapping[str, Market],
                     default_market: str, strict: bool = False):
    """Gather what `reconcile.reconcile` compares for `period` (each meter in its market's zone).

    Chain gaps come from the chain store (`BillingStore.chain_gaps`): the gateway chains hold events
    (credit, relay) as well as readings, so the reading repository's own gaps would list every event's
    seq as missing."""
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
    gaps = store.chain_gaps()
    return reconcile(period, *default, fresh=fresh, rows=rows_by, billed=billed, readings=readings_by,
                     items=[d for _, d in store.items(period=period)], chain_gaps=gaps,
                     open_exceptions=store.exceptions(status="open"), strict=strict, bounds=bounds)
