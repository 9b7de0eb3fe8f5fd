"""PAYG persistence in the head-end SQLite database (own `payg_*` tables): ledger, cards, blacklist, vendors, sales, CRM events; SQL only, every decision is made by the pure cores.

Tables are created with ``CREATE TABLE IF NOT EXISTS`` when the store is opened, so they live
next to the readings tables of the same file without touching them. Each authorisation and each
reversal runs in ONE write transaction that holds the store's write lock (SQLite: ``BEGIN
IMMEDIATE``, the database-wide write lock; PostgreSQL: ``pg_advisory_xact_lock`` on one key), so the
blacklist, velocity and balance it reads cannot change before its postings are written: a card
blacklisted at 12:00:00.000 is refused by any sale that starts after the blacklist commit.

Durability: a write transaction returns only after a durable COMMIT (SQLite: WAL with
``synchronous=FULL``, the WAL is fsynced at every commit, so an answer given survives a power
loss, not only a process crash; PostgreSQL: its own synchronous commit). Concurrent transactions
are group-committed (`PaygStore.transaction`): one COMMIT, one fsync, for all the requests queued
behind one another, each in its own savepoint.

The same SQL runs on SQLite (``sqlite:///PATH``) and PostgreSQL (``postgresql://USER@HOST/DB``,
psycopg 3): statements are written with ``?`` placeholders and converted for psycopg.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import sqlite3
import zlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Sequence

from meterlink.clock import from_ms, to_ms
from meterlink.errors import ConfigError, ValidationError

from . import ledger as L
from .store import is_postgres_url, sqlite_path
from . import vendors as V

log = logging.getLogger("meterlink.headend.payg")

SCHEMA = """
CREATE TABLE IF NOT EXISTS payg_txn (
    business_key TEXT PRIMARY KEY, at_ms BIGINT NOT NULL, kind TEXT NOT NULL, memo TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS payg_posting (
    business_key TEXT NOT NULL REFERENCES payg_txn(business_key), account TEXT NOT NULL,
    amount_minor BIGINT NOT NULL, currency TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS payg_posting_account ON payg_posting(account, currency);
CREATE INDEX IF NOT EXISTS payg_posting_key ON payg_posting(business_key);
CREATE TABLE IF NOT EXISTS payg_account (
    account_id TEXT PRIMARY KEY, currency TEXT NOT NULL, active BIGINT NOT NULL DEFAULT 1,
    max_balance_minor BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS payg_card (
    card_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, public_key TEXT NOT NULL,
    active BIGINT NOT NULL DEFAULT 1, registered_at_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS payg_card_account ON payg_card(account_id);
CREATE TABLE IF NOT EXISTS payg_blacklist (
    card_id TEXT NOT NULL, effective_at_ms BIGINT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    lifted_at_ms BIGINT, PRIMARY KEY (card_id, effective_at_ms));
CREATE TABLE IF NOT EXISTS payg_vendor (
    vendor_id TEXT PRIMARY KEY, currency TEXT NOT NULL, commission_percent TEXT NOT NULL,
    commission_fixed_minor BIGINT NOT NULL, vat_rate_on_commission TEXT NOT NULL, rounding TEXT NOT NULL,
    contract_id TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS payg_vendor_cert (
    vendor_id TEXT PRIMARY KEY, cert_serial TEXT NOT NULL, issued_at_ms BIGINT NOT NULL, revoked_at_ms BIGINT);
CREATE TABLE IF NOT EXISTS payg_challenge (
    challenge TEXT PRIMARY KEY, issued_at_ms BIGINT NOT NULL, used_at_ms BIGINT);
CREATE TABLE IF NOT EXISTS payg_sale (
    vendor_id TEXT NOT NULL, sale_id TEXT NOT NULL, card_id TEXT NOT NULL, account_id TEXT NOT NULL,
    amount_minor BIGINT NOT NULL, currency TEXT NOT NULL, at_ms BIGINT NOT NULL,
    commission_minor BIGINT NOT NULL, vat_on_commission_minor BIGINT NOT NULL,
    PRIMARY KEY (vendor_id, sale_id));
CREATE INDEX IF NOT EXISTS payg_sale_card ON payg_sale(card_id, at_ms);
CREATE INDEX IF NOT EXISTS payg_sale_account ON payg_sale(account_id, at_ms);
CREATE TABLE IF NOT EXISTS payg_refusal (
    id {SERIAL}, vendor_id TEXT NOT NULL, sale_id TEXT NOT NULL, card_id TEXT NOT NULL,
    account_id TEXT NOT NULL, amount_minor BIGINT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
    at_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS payg_reversal (
    reversal_id TEXT PRIMARY KEY, vendor_id TEXT NOT NULL, sale_id TEXT NOT NULL, at_ms BIGINT NOT NULL,
    reason TEXT NOT NULL, UNIQUE (vendor_id, sale_id));
CREATE TABLE IF NOT EXISTS payg_token (
    token_id TEXT PRIMARY KEY, reference TEXT NOT NULL UNIQUE, meter_id TEXT NOT NULL, counter BIGINT NOT NULL,
    account_id TEXT NOT NULL, amount_minor BIGINT NOT NULL, currency TEXT NOT NULL, issued_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL, applied_at_ms BIGINT, UNIQUE (meter_id, counter));
CREATE INDEX IF NOT EXISTS payg_token_account ON payg_token(account_id);
CREATE TABLE IF NOT EXISTS payg_cc_session (
    session_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, open BIGINT NOT NULL, reserved_minor BIGINT NOT NULL,
    version BIGINT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS payg_cc_session_account ON payg_cc_session(account_id, open);
CREATE TABLE IF NOT EXISTS payg_meter (
    meter_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, bound_at_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS payg_event (
    seq {SERIAL}, at_ms BIGINT NOT NULL, kind TEXT NOT NULL, account_id TEXT NOT NULL,
    payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payg_balance (
    account TEXT NOT NULL, currency TEXT NOT NULL, balance_minor BIGINT NOT NULL, postings BIGINT NOT NULL,
    PRIMARY KEY (account, currency));
CREATE TABLE IF NOT EXISTS payg_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payg_standing_booked (
    account_id TEXT PRIMARY KEY, through_day TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payg_import_booked (
    meter_id TEXT PRIMARY KEY, through_wh BIGINT NOT NULL);
"""

# Running balances (`payg_balance`) are kept for the customer accounts only (``customer:…``: the
# balances every credit-control request and authorisation reads); other accounts (revenue, VAT,
# vendors) are summed from their postings when asked, so no row is written by every transaction.
CHECKPOINTED_PREFIX = "customer:"
_CHECKPOINT_MARK = "balance_checkpoint"


@dataclass(frozen=True)
class BalanceMismatch:
    """A running balance that does not equal the sum of its account's postings."""
    account: str
    currency: str
    checkpoint_minor: int | None       # None: no running balance row although postings exist
    postings_minor: int
    checkpoint_postings: int | None
    postings: int

CHALLENGE_TTL = timedelta(minutes=5)


_PG_LOCK_KEY = zlib.crc32(b"meterlink-payg")        # the advisory lock that serialises PAYG writes


class _Conn:
    """One connection behind `?` placeholders: SQLite natively, converted to `%s` for psycopg."""

    def __init__(self, raw, postgres: bool) -> None:
        self.raw, self.postgres = raw, postgres

    def execute(self, sql: str, params: Sequence = ()):
        if self.postgres:
            return self.raw.execute(sql.replace("?", "%s"), tuple(params))
        return self.raw.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        if self.postgres:
            with self.raw.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        else:
            self.raw.executemany(sql, rows)

    def close(self) -> None:
        self.raw.close()


@dataclass(frozen=True)
class CrmEvent:
    """One row of the CRM export (`seq` is the export cursor)."""

    seq: int
    at: datetime
    kind: str
    account_id: str
    payload: dict


class StoreCommitError(ConfigError):
    """The durable COMMIT of a group of PAYG transactions failed: none of them happened."""


class _Batch:
    """One group commit: its members wait on `done`; `error` is set when the COMMIT failed."""

    __slots__ = ("done", "error", "size", "opened")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.size = 0
        self.opened = time.monotonic()


class _Reading:
    """`PaygStore._read()`: holds the connection's lock for a read; outside a transaction, commits
    an open group first (`_commit_batch` never raises: a failed COMMIT is reported to its members)."""

    __slots__ = ("store",)

    def __init__(self, store: "PaygStore") -> None:
        self.store = store

    def __enter__(self) -> _Conn:
        st = self.store
        st._lock.acquire()
        if st._batch is not None and st._owner != threading.get_ident():
            st._commit_batch()
        return st._db

    def __exit__(self, *exc) -> bool:
        self.store._lock.release()
        return False


class PaygStore:
    """The head-end's PAYG tables; also the SQLite `LedgerStore` of the credit-control core."""

    def __init__(self, database: str | Path, *, vat: L.PrepaidVat | None = None,
                 velocity_limits: Sequence[V.VelocityLimit] = V.DEFAULT_VELOCITY) -> None:
        self.vat = vat or L.PrepaidVat(Decimal("0.05"), "consumption")
        self.velocity_limits = tuple(velocity_limits)
        self._lock = threading.RLock()        # the connection: one user at a time
        self._owner: int | None = None          # thread running a transaction body (nested calls join)
        self._batch: _Batch | None = None       # the open group commit, if any
        self._waiting = 0                       # threads queued for a transaction (guarded by _wlock)
        self._wlock = threading.Lock()
        self._reading = _Reading(self)
        self.commits = 0                        # durable COMMITs, and the transactions they carried
        self.committed_transactions = 0
        self._xlock: int | None = None          # SQLite file: fd of the PAYG write lock shared by processes
        self._xheld = False
        if is_postgres_url(database):
            import psycopg
            self.path = str(database)
            try:
                raw = psycopg.connect(self.path, autocommit=True)
            except psycopg.OperationalError as exc:
                raise ConfigError(f"database {self.path}: {str(exc).strip()}") from None
            self._db = _Conn(raw, postgres=True)
            self._integrity_errors = (psycopg.errors.IntegrityError,)
            with self.transaction() as db:
                for stmt in SCHEMA.replace("{SERIAL}", "BIGSERIAL PRIMARY KEY").split(";"):
                    if stmt.strip():
                        db.execute(stmt)
        else:
            path = sqlite_path(str(database))
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.path = path
            raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            raw.execute("PRAGMA journal_mode=WAL" if path != ":memory:" else "PRAGMA journal_mode=MEMORY")
            raw.execute("PRAGMA synchronous=FULL")      # WAL fsynced at every commit: durable before the answer
            raw.executescript(SCHEMA.replace("{SERIAL}", "INTEGER PRIMARY KEY AUTOINCREMENT"))
            self._db = _Conn(raw, postgres=False)
            if path != ":memory:":
                self._xlock = os.open(path + "-payglock", os.O_RDWR | os.O_CREAT, 0o600)
            self._integrity_errors = (sqlite3.IntegrityError,)
        self._adopt_balances()

    def close(self) -> None:
        self._db.close()
        if self._xlock is not None:
            os.close(self._xlock)
            self._xlock = None

    # ------------------------------------------------------------------ running balances

    _RECOMPUTE = ("SELECT account, currency, SUM(amount_minor), COUNT(*) FROM payg_posting "
                  "WHERE substr(account, 1, 9) = ? GROUP BY account, currency")

    def _adopt_balances(self) -> None:
        """A database written before running balances existed gets them once, derived from its postings."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM payg_meta WHERE key = ?", (_CHECKPOINT_MARK,)).fetchone() is None:
                self._rebuild(db)
                db.execute("INSERT INTO payg_meta VALUES (?, ?)", (_CHECKPOINT_MARK, "1"))

    def _rebuild(self, db) -> None:
        db.execute("DELETE FROM payg_balance")
        rows = db.execute(self._RECOMPUTE, (CHECKPOINTED_PREFIX,)).fetchall()
        if rows:
            db.executemany("INSERT INTO payg_balance VALUES (?, ?, ?, ?)",
                           [(a, c, int(b), int(n)) for a, c, b, n in rows])

    def verify_balances(self) -> list[BalanceMismatch]:
        """Recompute every running balance from the postings and compare (empty list: all agree).
        Reads committed state in one statement per table."""
        with self._read():
            booked = {(a, c): (int(b), int(n)) for a, c, b, n in self._db.execute(
                "SELECT account, currency, balance_minor, postings FROM payg_balance").fetchall()}
            summed = {(a, c): (int(b), int(n)) for a, c, b, n in self._db.execute(
                self._RECOMPUTE, (CHECKPOINTED_PREFIX,)).fetchall()}
        out = []
        for key in sorted(set(booked) | set(summed)):
            b, s = booked.get(key), summed.get(key, (0, 0))
            if b != s:
                out.append(BalanceMismatch(key[0], key[1], None if b is None else b[0], s[0],
                                           None if b is None else b[1], s[1]))
        return out

    def rebuild_balances(self) -> int:
        """Derive every running balance from the postings again (after `verify_balances` found a
        mismatch, e.g. postings written by a build without running balances); returns the rows."""
        with self.transaction() as db:
            self._rebuild(db)
            return int(db.execute("SELECT COUNT(*) FROM payg_balance").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[_Conn]:
        """One write transaction (nested calls join the outer one), durable when the block exits.

        Group commit: concurrent transactions share one database transaction and one durable
        COMMIT (one WAL fsync on SQLite), each after the first in its own SAVEPOINT, so a failing
        block rolls back only its own writes. Blocks run one at a time on the connection, in arrival order, each
        seeing the writes of those before it. The block that ends while no other transaction is
        queued (or when the group is full or `GROUP_COMMIT_WINDOW_S` old) commits the group;
        every block returns (or raises) only after that COMMIT, so no caller ever answers from
        writes that are not durable, and an exception from COMMIT reaches every caller of the
        group."""
        me = threading.get_ident()
        if self._owner == me:
            yield self._db
            return
        with self._wlock:
            self._waiting += 1
        self._lock.acquire()
        with self._wlock:
            self._waiting -= 1
        failed: BaseException | None = None
        try:
            try:
                first = self._batch is None       # alone in the group: no savepoint needed
                if first:
                    self._begin()
                batch = self._batch
                if not first:
                    self._db.execute("SAVEPOINT payg_request")
            except BaseException as exc:
                self._abort_batch(exc)
                raise
            self._owner = me
            try:
                yield self._db
            except BaseException as exc:
                failed = exc
            finally:
                self._owner = None
            if first and failed is not None:      # nothing else in the group: roll it all back
                self._abort_batch()
                raise failed
            try:
                if failed is not None:
                    self._db.execute("ROLLBACK TO payg_request")
                if not first:
                    self._db.execute("RELEASE payg_request")
            except BaseException as exc:          # the connection failed: the whole group is lost
                self._abort_batch(exc)
                raise failed or exc
            batch.size += 1
            if (self._waiting == 0 or batch.size >= self.GROUP_COMMIT_MAX
                    or time.monotonic() - batch.opened >= self.GROUP_COMMIT_WINDOW_S):
                self._commit_batch()
        finally:
            self._lock.release()
        self._await(batch)
        if failed is not None:
            raise failed
        if batch.error is not None:
            raise StoreCommitError(f"database {self.path}: commit failed: {batch.error}") from batch.error

    GROUP_COMMIT_MAX = 32                # transactions per durable commit at most
    GROUP_COMMIT_WINDOW_S = 0.002        # a group older than this commits even if more are queued

    def _begin(self) -> None:
        if self._db.postgres:
            self._db.execute("BEGIN")
            try:
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK_KEY,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        else:
            # Several processes writing one SQLite file (`serve --processes N`) queue on an flock of
            # ``PATH-payglock`` first: a blocked flock wakes as soon as the holder's COMMIT is done,
            # where SQLite's busy handler, polling BEGIN IMMEDIATE, sleeps 1, 2, 5, 10... ms.
            if self._xlock is not None:
                fcntl.flock(self._xlock, fcntl.LOCK_EX)
                self._xheld = True
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._unlock()
                raise
        self._batch = _Batch()

    def _unlock(self) -> None:
        """Release the processes' write lock (after COMMIT or ROLLBACK), if held."""
        if self._xheld:
            self._xheld = False
            fcntl.flock(self._xlock, fcntl.LOCK_UN)

    def _commit_batch(self) -> None:
        """COMMIT the open group (caller holds `_lock`) and wake its members."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._db.execute("COMMIT")
            self.commits += 1
            self.committed_transactions += batch.size
        except BaseException as exc:
            batch.error = exc
            try:
                self._db.execute("ROLLBACK")
            except Exception:
                pass
        finally:
            self._unlock()
            batch.done.set()

    def _abort_batch(self, exc: BaseException | None = None) -> None:
        """Roll the open group back; `exc` reaches the members waiting for its COMMIT (None: a group whose
        only member failed, nobody waits for it)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if exc is not None:
            batch.error = exc
        try:
            self._db.execute("ROLLBACK")
        except Exception:
            pass
        self._unlock()
        batch.done.set()

    def _await(self, batch: "_Batch") -> None:
        """Wait for the group's COMMIT; if its last member vanished, commit it ourselves."""
        while not batch.done.wait(0.05):
            with self._lock:
                if self._batch is batch:
                    self._commit_batch()

    def _read(self) -> "_Reading":
        """The connection for reads (a context manager): inside a transaction its own uncommitted
        state; outside, committed state only (an open group is committed first, never read dirty)."""
        return self._reading

    # ------------------------------------------------------------------ LedgerStore

    def _load(self, key: str) -> L.Transaction | None:
        row = self._db.execute("SELECT at_ms, kind, memo FROM payg_txn WHERE business_key = ?", (key,)).fetchone()
        if row is None:
            return None
        legs = self._db.execute("SELECT account, amount_minor, currency FROM payg_posting WHERE business_key = ?",
                                (key,)).fetchall()
        return L.Transaction(key, from_ms(row[0]), tuple(L.Posting(*leg) for leg in legs), row[1], row[2])

    def append(self, transactions: Sequence[L.Transaction]) -> tuple[L.Transaction, ...]:
        with self.transaction() as db:
            existing = {}
            keys = list(dict.fromkeys(t.business_key for t in transactions))
            booked = [] if not keys else db.execute(
                f"SELECT business_key FROM payg_txn WHERE business_key IN ({', '.join('?' * len(keys))})",
                keys).fetchall()
            for (key,) in booked:                  # replays (or conflicts): compare with what is booked
                existing[key] = self._load(key)
            fresh = L.merge(existing, list(transactions))
            for t in fresh:
                if t.at.microsecond % 1000:
                    raise L.LedgerError(f"transaction {t.business_key!r}: instant {t.at.isoformat()} "
                                        f"is finer than a millisecond (the store keeps milliseconds)")
            if fresh:
                db.executemany("INSERT INTO payg_txn VALUES (?, ?, ?, ?)",
                               [(t.business_key, to_ms(t.at), t.kind, t.memo) for t in fresh])
                db.executemany("INSERT INTO payg_posting VALUES (?, ?, ?, ?)",
                               [(t.business_key, p.account, p.amount_minor, p.currency)
                                for t in fresh for p in t.postings])
                # the running balances move in the same transaction as the postings they sum
                delta: dict[tuple[str, str], list[int]] = {}
                for t in fresh:
                    for p in t.postings:
                        if p.account.startswith(CHECKPOINTED_PREFIX):
                            d = delta.setdefault((p.account, p.currency), [0, 0])
                            d[0] += p.amount_minor
                            d[1] += 1
                if delta:
                    db.executemany("INSERT INTO payg_balance VALUES (?, ?, ?, ?) ON CONFLICT (account, currency) "
                                   "DO UPDATE SET balance_minor = payg_balance.balance_minor + "
                                   "excluded.balance_minor, postings = payg_balance.postings + excluded.postings",
                                   [(a, c, b, n) for (a, c), (b, n) in sorted(delta.items())])
            return fresh

    def exists(self, business_key: str) -> bool:
        with self._read():
            return self._db.execute("SELECT 1 FROM payg_txn WHERE business_key = ?", (business_key,)).fetchone() \
                is not None

    def get(self, business_key: str) -> L.Transaction | None:
        with self._read():
            return self._load(business_key)

    def balance(self, account: str, currency: str | None = None) -> int:
        """The account's balance: its running balance (one indexed row) for customer accounts, the
        sum of its postings for the others. Both always equal the sum (`verify_balances`)."""
        with self._read():
            if account.startswith(CHECKPOINTED_PREFIX):
                if currency is None:
                    row = self._db.execute("SELECT COALESCE(SUM(balance_minor), 0) FROM payg_balance "
                                           "WHERE account = ?", (account,)).fetchone()
                else:
                    row = self._db.execute("SELECT balance_minor FROM payg_balance WHERE account = ? AND currency = ?",
                                           (account, currency)).fetchone()
                return int(row[0]) if row else 0
            if currency is None:
                row = self._db.execute("SELECT COALESCE(SUM(amount_minor), 0) FROM payg_posting WHERE account = ?",
                                       (account,)).fetchone()
            else:
                row = self._db.execute("SELECT COALESCE(SUM(amount_minor), 0) FROM payg_posting "
                                       "WHERE account = ? AND currency = ?", (account, currency)).fetchone()
            return int(row[0])

    def balances(self, accounts: Sequence[str], currency: str) -> dict[str, int]:
        """The balances of several customer accounts (``customer:...``, running balances) in `currency`,
        in one read: {account: balance}, 0 for an account without postings."""
        if not all(a.startswith(CHECKPOINTED_PREFIX) for a in accounts):
            return {a: self.balance(a, currency) for a in accounts}
        out = dict.fromkeys(accounts, 0)
        with self._read():
            for account, value in self._db.execute(
                    f"SELECT account, balance_minor FROM payg_balance WHERE currency = ? AND account IN "
                    f"({', '.join('?' * len(out))})", (currency, *out)).fetchall():
                out[account] = int(value)
        return out

    def credit_inputs(self, account_id: str, currency: str, session_id: str, exclude_tokens: Sequence[str] = (),
                      now: datetime | None = None) -> tuple[int, int, int, int]:
        """What credit control needs about an account, in one read: (prepaid credit = −balance of
        ``customer:{a}:prepaid``, arrears = balance of ``customer:{a}:arrears``, open grants of the
        account's sessions other than `session_id` (`SqlSessionStore.reserved_by_others`), issued
        tokens not applied and unexpired at `now`, other than `exclude_tokens`
        (`StoreTokenReservations.outstanding_minor`))."""
        not_in = f" AND token_id NOT IN ({', '.join('?' * len(exclude_tokens))})" if exclude_tokens else ""
        with self._read():
            row = self._db.execute(
                "SELECT (SELECT balance_minor FROM payg_balance WHERE account = ? AND currency = ?), "
                "(SELECT balance_minor FROM payg_balance WHERE account = ? AND currency = ?), "
                "(SELECT COALESCE(SUM(reserved_minor), 0) FROM payg_cc_session WHERE account_id = ? AND open = 1 "
                "AND session_id <> ?), "
                "(SELECT COALESCE(SUM(amount_minor), 0) FROM payg_token WHERE account_id = ? AND applied_at_ms IS NULL "
                f"AND expires_at_ms > ?{not_in})",
                (L.prepaid(account_id), currency, L.arrears_account(account_id), currency, account_id, session_id,
                 account_id, to_ms(now) if now is not None else -1, *exclude_tokens)).fetchone()
        return -int(row[0] or 0), int(row[1] or 0), int(row[2]), int(row[3])

    def transactions(self, start: datetime | None = None, end: datetime | None = None) -> Iterator[L.Transaction]:
        """All transactions (or those with start <= at < end), in instant order."""
        with self._read():
            lo = to_ms(start) if start else -(2 ** 62)
            hi = to_ms(end) if end else 2 ** 62
            rows = self._db.execute("SELECT t.business_key, t.at_ms, t.kind, t.memo, p.account, p.amount_minor, "
                                    "p.currency FROM payg_txn t JOIN payg_posting p USING (business_key) "
                                    "WHERE t.at_ms >= ? AND t.at_ms < ? ORDER BY t.at_ms, t.business_key",
                                    (lo, hi)).fetchall()
        out: list[L.Transaction] = []
        cur: list = []
        for row in rows + [None]:
            if cur and (row is None or row[0] != cur[0][0]):
                k, at, kind, memo = cur[0][:4]
                out.append(L.Transaction(k, from_ms(at), tuple(L.Posting(r[4], r[5], r[6]) for r in cur), kind, memo))
                cur = []
            if row is not None:
                cur.append(row)
        return iter(out)

    # ------------------------------------------------------------------ standing days booked

    def standing_booked_through(self, account_id: str) -> date | None:
        """The last local day (ISO date in `payg_standing_booked`) whose standing charge credit control
        booked for the account, whatever session reported it; None: none since this table exists."""
        with self._read():
            row = self._db.execute("SELECT through_day FROM payg_standing_booked WHERE account_id = ?",
                                   (account_id,)).fetchone()
        return None if row is None else date.fromisoformat(row[0])

    def book_standing_through(self, account_id: str, day: date) -> None:
        """Record the account's standing charges booked through `day` (never moves back); run it in
        the transaction that books them (`creditcontrol.CreditControl.handle` does)."""
        with self.transaction() as db:
            db.execute("INSERT INTO payg_standing_booked VALUES (?, ?) ON CONFLICT (account_id) DO UPDATE SET "
                       "through_day = CASE WHEN excluded.through_day > payg_standing_booked.through_day "
                       "THEN excluded.through_day ELSE payg_standing_booked.through_day END",
                       (account_id, day.isoformat()))

    # ------------------------------------------------------------------ consumption booked per meter

    def import_booked_wh(self, meter_id: str) -> int | None:
        """The highest 1.8.0 import register value (Wh, `payg_import_booked`) whose consumption credit
        control booked for the meter, whatever session reported it; None: no report with a register
        range since this table exists."""
        with self._read():
            row = self._db.execute("SELECT through_wh FROM payg_import_booked WHERE meter_id = ?",
                                   (meter_id,)).fetchone()
        return None if row is None else int(row[0])

    def book_import_wh(self, meter_id: str, wh: int) -> None:
        """Record the meter's consumption booked through register value `wh` (as credit control
        decided it: it moves back only after a meter reset); run it in the transaction that books
        the consumption (`creditcontrol.CreditControl.handle` does)."""
        with self.transaction() as db:
            db.execute("INSERT INTO payg_import_booked VALUES (?, ?) ON CONFLICT (meter_id) DO UPDATE SET "
                       "through_wh = excluded.through_wh", (meter_id, int(wh)))

    # ------------------------------------------------------------------ registry

    def put_account(self, account_id: str, currency: str, *, max_balance_minor: int = 100_000,
                    active: bool = True) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO payg_account VALUES (?, ?, ?, ?) ON CONFLICT(account_id) DO UPDATE SET "
                       "currency = excluded.currency, active = excluded.active, "
                       "max_balance_minor = excluded.max_balance_minor",
                       (account_id, currency, int(active), max_balance_minor))

    def bind_meter(self, meter_id: str, account_id: str, now: datetime) -> None:
        """The PAYG meter `meter_id` supplies `account_id` (credit control refuses other accounts)."""
        with self.transaction() as db:
            row = db.execute("SELECT account_id FROM payg_meter WHERE meter_id = ?", (meter_id,)).fetchone()
            if row is not None and row[0] != account_id:
                raise ValidationError(f"meter {meter_id} is bound to account {row[0]}, not {account_id}")
            if row is None:
                db.execute("INSERT INTO payg_meter VALUES (?, ?, ?)", (meter_id, account_id, to_ms(now)))

    def meter_account(self, meter_id: str) -> str | None:
        with self._read():
            row = self._db.execute("SELECT account_id FROM payg_meter WHERE meter_id = ?", (meter_id,)).fetchone()
        return row[0] if row else None

    def meter_binding(self, meter_id: str) -> tuple[str, bool] | None:
        """(account, whether that account is active) of the PAYG meter `meter_id`, in one read; None if unbound."""
        with self._read():
            row = self._db.execute("SELECT m.account_id, a.active FROM payg_meter m LEFT JOIN payg_account a "
                                   "ON a.account_id = m.account_id WHERE m.meter_id = ?", (meter_id,)).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def account(self, account_id: str) -> V.AccountState | None:
        with self._read():
            row = self._db.execute("SELECT currency, active, max_balance_minor FROM payg_account "
                                   "WHERE account_id = ?", (account_id,)).fetchone()
        if row is None:
            return None
        credit = -self.balance(L.prepaid(account_id), row[0])
        return V.AccountState(account_id, row[0], bool(row[1]), credit, row[2])

    def account_active(self, account_id: str) -> bool:
        """The account exists here and is active (one indexed read; `account` also sums its balance)."""
        with self._read():
            row = self._db.execute("SELECT active FROM payg_account WHERE account_id = ?", (account_id,)).fetchone()
        return row is not None and bool(row[0])

    def register_arrears(self, account_id: str, reference: str, amount_minor: int, now: datetime,
                         reason: str) -> L.Transaction:
        """Register arrears the customer owes (debt from a previous supply, over-usage booked here):
        Dr ``customer:{c}:arrears`` / Cr ``adjustments``, key ``arrears:{account}:{reference}``
        (idempotent: the same reference with the same content books once; other content is a
        `BusinessKeyConflict`). The next credit-control answer to the account's gateway carries the
        outstanding arrears (`arrears_minor`); the gateway recovers them and reports each recovery."""
        acct = self.account(account_id)
        if acct is None:
            raise ValidationError(f"account {account_id} is not a PAYG account")
        txn = L.arrears_registered(f"arrears:{account_id}:{reference}", now, account_id, amount_minor,
                                   acct.currency, reason)
        with self.transaction() as db:
            if self.append([txn]):
                self._event(db, now, "arrears_registered", account_id,
                            {"reference": reference, "amount_minor": amount_minor, "reason": reason})
        return txn

    def arrears(self, account_id: str, currency: str) -> int:
        """Arrears registered for the account and not yet reported recovered (minor units, >= 0 normally)."""
        return self.balance(L.arrears_account(account_id), currency)

    def register_card(self, card_id: str, account_id: str, public_key: bytes, now: datetime) -> V.Card:
        if len(public_key) != 32:
            raise ValidationError(f"card {card_id}: an Ed25519 public key is 32 bytes, got {len(public_key)}")
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM payg_account WHERE account_id = ?", (account_id,)).fetchone() is None:
                raise ValidationError(f"card {card_id}: account {account_id} is not a PAYG account here")
            try:
                db.execute("INSERT INTO payg_card VALUES (?, ?, ?, 1, ?)",
                           (card_id, account_id, public_key.hex(), to_ms(now)))
            except self._integrity_errors:
                raise ValidationError(f"card {card_id} is already registered") from None
        return V.Card(card_id, account_id, public_key)

    def cards(self) -> dict[str, V.Card]:
        with self._read():
            rows = self._db.execute("SELECT card_id, account_id, public_key, active FROM payg_card").fetchall()
        return {r[0]: V.Card(r[0], r[1], bytes.fromhex(r[2]), bool(r[3])) for r in rows}

    def account_cards(self, account_id: str) -> list[V.Card]:
        """The account's registered cards, by card id."""
        with self._read():
            rows = self._db.execute("SELECT card_id, account_id, public_key, active FROM payg_card WHERE account_id = ? "
                                    "ORDER BY card_id", (account_id,)).fetchall()
        return [V.Card(r[0], r[1], bytes.fromhex(r[2]), bool(r[3])) for r in rows]

    def account_cards_blacklist(self, account_id: str) -> list[tuple[V.Card, tuple[V.BlacklistEntry, ...]]]:
        """The account's registered cards, by card id, each with its blacklist entries (one read)."""
        with self._read():
            rows = self._db.execute("SELECT c.card_id, c.account_id, c.public_key, c.active, b.effective_at_ms, "
                                    "b.reason, b.lifted_at_ms FROM payg_card c LEFT JOIN payg_blacklist b "
                                    "ON b.card_id = c.card_id WHERE c.account_id = ? "
                                    "ORDER BY c.card_id, b.effective_at_ms", (account_id,)).fetchall()
        out: dict[str, tuple[V.Card, list[V.BlacklistEntry]]] = {}
        for r in rows:
            card, entries = out.setdefault(r[0], (V.Card(r[0], r[1], bytes.fromhex(r[2]), bool(r[3])), []))
            if r[4] is not None:
                entries.append(V.BlacklistEntry(r[0], from_ms(r[4]), r[5], from_ms(r[6]) if r[6] is not None else None))
        return [(card, tuple(entries)) for card, entries in out.values()]

    def _card(self, card_id: str) -> dict[str, V.Card]:
        row = self._db.execute("SELECT card_id, account_id, public_key, active FROM payg_card WHERE card_id = ?",
                               (card_id,)).fetchone()
        return {} if row is None else {row[0]: V.Card(row[0], row[1], bytes.fromhex(row[2]), bool(row[3]))}

    def blacklist_card(self, card_id: str, effective_at: datetime, reason: str = "") -> V.BlacklistEntry:
        entry = V.BlacklistEntry(card_id, effective_at, reason)
        with self.transaction() as db:
            if not self._card(card_id):
                raise ValidationError(f"card {card_id} is not registered")
            db.execute("INSERT INTO payg_blacklist VALUES (?, ?, ?, NULL) ON CONFLICT DO NOTHING",
                       (card_id, to_ms(effective_at), reason))
        return entry

    def lift_blacklist(self, card_id: str, at: datetime) -> int:
        with self.transaction() as db:
            return db.execute("UPDATE payg_blacklist SET lifted_at_ms = ? WHERE card_id = ? AND lifted_at_ms IS NULL",
                              (to_ms(at), card_id)).rowcount

    def blacklist(self, card_id: str | None = None) -> list[V.BlacklistEntry]:
        with self._read():
            sql = "SELECT card_id, effective_at_ms, reason, lifted_at_ms FROM payg_blacklist"
            rows = self._db.execute(sql + (" WHERE card_id = ?" if card_id else ""),
                                    (card_id,) if card_id else ()).fetchall()
        return [V.BlacklistEntry(r[0], from_ms(r[1]), r[2], from_ms(r[3]) if r[3] is not None else None)
                for r in rows]

    def put_vendor(self, contract: V.VendorContract) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO payg_vendor VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(vendor_id) DO UPDATE SET "
                       "currency = excluded.currency, commission_percent = excluded.commission_percent, "
                       "commission_fixed_minor = excluded.commission_fixed_minor, "
                       "vat_rate_on_commission = excluded.vat_rate_on_commission, rounding = excluded.rounding, "
                       "contract_id = excluded.contract_id",
                       (contract.vendor_id, contract.currency, str(contract.commission_percent),
                        contract.commission_fixed_minor, str(contract.vat_rate_on_commission), contract.rounding,
                        contract.contract_id))

    def vendor(self, vendor_id: str) -> V.VendorContract | None:
        """One vendor's contract (None: no contract here)."""
        with self._read():
            r = self._db.execute("SELECT * FROM payg_vendor WHERE vendor_id = ?", (vendor_id,)).fetchone()
        return None if r is None else V.VendorContract(r[0], r[1], Decimal(r[2]), r[3], Decimal(r[4]), r[5], r[6])

    def vendors(self) -> dict[str, V.VendorContract]:
        with self._read():
            rows = self._db.execute("SELECT * FROM payg_vendor ORDER BY vendor_id").fetchall()
        return {r[0]: V.VendorContract(r[0], r[1], Decimal(r[2]), r[3], Decimal(r[4]), r[5], r[6]) for r in rows}

    def record_vendor_cert(self, vendor_id: str, cert_serial: str, now: datetime) -> None:
        """`cert_serial` (hex) is vendor `vendor_id`'s client certificate from now on; any earlier one
        is superseded and a revocation is lifted (a new certificate is a new decision)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM payg_vendor WHERE vendor_id = ?", (vendor_id,)).fetchone() is None:
                raise ValidationError(f"vendor {vendor_id} has no contract here (vendors add first)")
            db.execute("INSERT INTO payg_vendor_cert VALUES (?, ?, ?, NULL) ON CONFLICT(vendor_id) DO UPDATE SET "
                       "cert_serial = excluded.cert_serial, issued_at_ms = excluded.issued_at_ms, "
                       "revoked_at_ms = NULL", (vendor_id, cert_serial, to_ms(now)))

    def revoke_vendor_cert(self, vendor_id: str, now: datetime) -> None:
        """Vendor `vendor_id`'s certificate is refused from now on (Vending answers it with VENDOR_REVOKED)."""
        with self.transaction() as db:
            if db.execute("UPDATE payg_vendor_cert SET revoked_at_ms = ? WHERE vendor_id = ? AND revoked_at_ms IS NULL",
                          (to_ms(now), vendor_id)).rowcount == 0 and \
                    db.execute("SELECT 1 FROM payg_vendor_cert WHERE vendor_id = ?", (vendor_id,)).fetchone() is None:
                raise ValidationError(f"vendor {vendor_id} has no client certificate to revoke")

    def vendor_cert(self, vendor_id: str) -> tuple[str, datetime | None] | None:
        """(current certificate serial, revoked at or None) of a vendor, None if none was issued."""
        with self._read():
            row = self._db.execute("SELECT cert_serial, revoked_at_ms FROM payg_vendor_cert WHERE vendor_id = ?",
                                   (vendor_id,)).fetchone()
        return None if row is None else (row[0], from_ms(row[1]) if row[1] is not None else None)

    # ------------------------------------------------------------------ sales

    def issue_challenge(self, now: datetime) -> bytes:
        """A fresh single-use challenge for the card to sign (valid CHALLENGE_TTL)."""
        challenge = secrets.token_bytes(16)
        with self.transaction() as db:
            db.execute("INSERT INTO payg_challenge VALUES (?, ?, NULL)", (challenge.hex(), to_ms(now)))
        return challenge

    def _history(self, card_id: str, account_id: str, now: datetime) -> list[V.Sale]:
        window = max((lim.window for lim in self.velocity_limits), default=timedelta(0))
        rows = self._db.execute("SELECT * FROM payg_sale WHERE (card_id = ? OR account_id = ?) AND at_ms > ? "
                                "AND at_ms <= ?", (card_id, account_id, to_ms(now - window), to_ms(now))).fetchall()
        return [_sale(r) for r in rows]

    def _refuse(self, db, r: V.Refusal) -> V.Refusal:
        db.execute("INSERT INTO payg_refusal (vendor_id, sale_id, card_id, account_id, amount_minor, reason, detail, "
                   "at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (r.vendor_id, r.sale_id, r.card_id, r.account_id,
                                                               r.amount_minor, r.reason.value, r.detail, to_ms(r.at)))
        if r.reason is V.RefusalReason.CARD_BLACKLISTED:
            self._event(db, r.at, "blacklisted_card_attempt", r.account_id,
                        {"card_id": r.card_id, "vendor_id": r.vendor_id, "sale_id": r.sale_id,
                         "amount_minor": r.amount_minor, "channel": "vendor", "detail": r.detail})
        return r

    def authorise(self, request: V.SaleRequest, now: datetime) -> V.Authorisation | V.Refusal:
        """Authorise one sale in one transaction: challenge used once, then `vendors.authorise_sale`;
        an authorisation's ledger transactions and sale row are written in the same transaction."""
        with self.transaction() as db:
            prior = db.execute("SELECT * FROM payg_sale WHERE vendor_id = ? AND sale_id = ?",
                               (request.vendor_id, request.sale_id)).fetchone()
            if prior is not None:                       # a retransmitted, already authorised sale
                sale = _sale(prior)
                if (sale.card_id, sale.account_id, sale.amount_minor) != (request.card_id, request.account_id,
                                                                          request.amount_minor):
                    raise ValidationError(f"sale {request.vendor_id}/{request.sale_id} already authorised "
                                          f"with other content")
                return V.Authorisation(sale, V.sale_transactions(sale, self.vat))

            def refuse(detail: str) -> V.Refusal:
                return self._refuse(db, V.Refusal(V.RefusalReason.BAD_REQUEST, detail, request.sale_id,
                                                  request.vendor_id, request.card_id, request.account_id,
                                                  request.amount_minor, now))

            ch = db.execute("SELECT issued_at_ms, used_at_ms FROM payg_challenge WHERE challenge = ?",
                            (request.challenge.hex(),)).fetchone()
            if ch is None:
                return refuse(f"sale {request.sale_id}: challenge {request.challenge.hex()} was not issued here")
            if ch[1] is not None:
                return refuse(f"sale {request.sale_id}: challenge {request.challenge.hex()} was already used")
            db.execute("UPDATE payg_challenge SET used_at_ms = ? WHERE challenge = ?",
                       (to_ms(now), request.challenge.hex()))
            if to_ms(now) - ch[0] > CHALLENGE_TTL // timedelta(milliseconds=1):
                return refuse(f"sale {request.sale_id}: challenge {request.challenge.hex()} expired")
            contract = self.vendor(request.vendor_id)
            if contract is None:
                return refuse(f"sale {request.sale_id}: vendor {request.vendor_id} has no contract")
            account = self.account(request.account_id)
            if account is None:
                return refuse(f"sale {request.sale_id}: account {request.account_id} is not a PAYG account")
            result = V.authorise_sale(request, self._card(request.card_id), self.blacklist(request.card_id),
                                      self._history(request.card_id, request.account_id, now), account, now,
                                      contract=contract, vat=self.vat, velocity_limits=self.velocity_limits)
            if isinstance(result, V.Refusal):
                return self._refuse(db, result)
            self.append(result.transactions)
            s = result.sale
            db.execute("INSERT INTO payg_sale VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (s.vendor_id, s.sale_id, s.card_id, s.account_id, s.amount_minor, s.currency, to_ms(s.at),
                        s.commission_minor, s.vat_on_commission_minor))
            return result

    def reverse(self, vendor_id: str, sale_id: str, reversal_id: str, now: datetime, reason: str) -> V.Reversal | V.Refusal:
        with self.transaction() as db:
            row = db.execute("SELECT * FROM payg_sale WHERE vendor_id = ? AND sale_id = ?",
                             (vendor_id, sale_id)).fetchone()
            if row is None:
                raise ValidationError(f"reversal {reversal_id}: no sale {vendor_id}/{sale_id}")
            if db.execute("SELECT 1 FROM payg_reversal WHERE vendor_id = ? AND sale_id = ?",
                          (vendor_id, sale_id)).fetchone():
                raise ValidationError(f"reversal {reversal_id}: sale {vendor_id}/{sale_id} is already reversed")
            applied = db.execute("SELECT token_id FROM payg_token WHERE reference = ? AND applied_at_ms IS NOT NULL",
                                 (f"sale:{vendor_id}:{sale_id}",)).fetchone()
            if applied is not None:
                raise ValidationError(f"reversal {reversal_id}: sale {vendor_id}/{sale_id} reached the meter as "
                                      f"token {applied[0]} (reported applied); adjust instead of reversing")
            sale = _sale(row)
            result = V.reverse_sale(sale, reversal_id, now, reason, self.account(sale.account_id), self.vat)
            if isinstance(result, V.Refusal):
                return result
            self.append(result.transactions)
            db.execute("INSERT INTO payg_reversal VALUES (?, ?, ?, ?, ?)",
                       (reversal_id, vendor_id, sale_id, to_ms(now), reason))
            return result

    def sales(self, vendor_id: str, start: datetime, end: datetime) -> list[V.Sale]:
        with self._read():
            rows = self._db.execute("SELECT * FROM payg_sale WHERE vendor_id = ? AND at_ms >= ? AND at_ms < ? "
                                    "ORDER BY at_ms", (vendor_id, to_ms(start), to_ms(end))).fetchall()
        return [_sale(r) for r in rows]

    def refusals(self, vendor_id: str, start: datetime, end: datetime) -> list[V.Refusal]:
        with self._read():
            rows = self._db.execute("SELECT vendor_id, sale_id, card_id, account_id, amount_minor, reason, detail, "
                                    "at_ms FROM payg_refusal WHERE vendor_id = ? AND at_ms >= ? AND at_ms < ? "
                                    "ORDER BY id", (vendor_id, to_ms(start), to_ms(end))).fetchall()
        return [V.Refusal(V.RefusalReason(r[5]), r[6], r[1], r[0], r[2], r[3], r[4], from_ms(r[7])) for r in rows]

    def reversals(self, vendor_id: str, start: datetime, end: datetime) -> list[V.Reversal]:
        with self._read():
            rows = self._db.execute("SELECT r.reversal_id, r.at_ms, r.reason, s.* FROM payg_reversal r JOIN payg_sale s "
                                    "ON s.vendor_id = r.vendor_id AND s.sale_id = r.sale_id WHERE r.vendor_id = ? "
                                    "AND r.at_ms >= ? AND r.at_ms < ? ORDER BY r.at_ms",
                                    (vendor_id, to_ms(start), to_ms(end))).fetchall()
        out = []
        for r in rows:
            sale = _sale(r[3:])
            at = from_ms(r[1])
            originals = V.sale_transactions(sale, self.vat)
            keys = [f"sale:{sale.vendor_id}:{sale.sale_id}:{sfx}" for sfx in ("top-up-reversal", "commission-reversal")]
            txns = tuple(t for t in (self.get(k) for k in keys[:len(originals)]) if t is not None)
            out.append(V.Reversal(r[0], sale, at, r[2], txns))
        return out

    # ------------------------------------------------------------------ CRM events

    def _event(self, db, at: datetime, kind: str, account_id: str, payload: dict) -> None:
        db.execute("INSERT INTO payg_event (at_ms, kind, account_id, payload) VALUES (?, ?, ?, ?)",
                   (to_ms(at), kind, account_id, json.dumps(payload, sort_keys=True)))

    def record_event(self, at: datetime, kind: str, account_id: str, payload: dict) -> None:
        with self.transaction() as db:
            self._event(db, at, kind, account_id, payload)

    def events(self, after_seq: int = 0, limit: int = 1000) -> list[CrmEvent]:
        """CRM events after the export cursor `after_seq`, oldest first."""
        with self._read():
            rows = self._db.execute("SELECT seq, at_ms, kind, account_id, payload FROM payg_event WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        return [CrmEvent(r[0], from_ms(r[1]), r[2], r[3], json.loads(r[4])) for r in rows]


TOKEN_TTL = timedelta(days=30)


def issue_token(store: PaygStore, reference: str, meter_id: str, account_id: str, amount_minor: int, currency: str,
                head_end_key, now: datetime, ttl: timedelta = TOKEN_TTL):
    """The signed top-up token delivering `reference` (e.g. ``sale:SHOP1:S1``) to `meter_id`.

    Idempotent on `reference`: asking again returns the identical token (same id, counter and
    Ed25519 signature), so a lost delivery can be retried; each new reference takes the meter's
    next counter (the gateway's replay window)."""
    from meterlink.gateway.tokens import TopUpToken
    with store.transaction() as db:
        row = db.execute("SELECT token_id, meter_id, counter, account_id, amount_minor, currency, issued_at_ms, "
                         "expires_at_ms FROM payg_token WHERE reference = ?", (reference,)).fetchone()
        if row is not None:
            if (row[1], row[3], row[4], row[5]) != (meter_id, account_id, amount_minor, currency):
                raise ValidationError(f"token for {reference} was issued for meter {row[1]} account {row[3]} "
                                      f"{row[4]} {row[5]}, not {meter_id} {account_id} {amount_minor} {currency}")
            return TopUpToken(row[0], row[1], row[2], row[4], row[5], from_ms(row[6]),
                              from_ms(row[7])).signed(head_end_key)
        counter = db.execute("SELECT COALESCE(MAX(counter), 0) + 1 FROM payg_token WHERE meter_id = ?",
                             (meter_id,)).fetchone()[0]
        token = TopUpToken(f"{meter_id}-{counter:08d}", meter_id, counter, amount_minor, currency,
                           now.replace(microsecond=now.microsecond // 1000 * 1000),
                           (now + ttl).replace(microsecond=now.microsecond // 1000 * 1000))
        db.execute("INSERT INTO payg_token VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                   (token.token_id, reference, meter_id, counter, account_id, amount_minor, currency,
                    to_ms(token.issued_at), to_ms(token.expires_at)))
        return token.signed(head_end_key)


def token_for_sale(store: PaygStore, vendor_id: str, sale_id: str, meter_id: str, head_end_key,
                   now: datetime):
    """The token delivering an authorised (and not reversed) sale to the account's meter."""
    with store.transaction() as db:
        row = db.execute("SELECT * FROM payg_sale WHERE vendor_id = ? AND sale_id = ?", (vendor_id, sale_id)).fetchone()
        if row is None:
            raise ValidationError(f"no authorised sale {vendor_id}/{sale_id}")
        if db.execute("SELECT 1 FROM payg_reversal WHERE vendor_id = ? AND sale_id = ?",
                      (vendor_id, sale_id)).fetchone():
            raise ValidationError(f"sale {vendor_id}/{sale_id} was reversed: no token")
        sale = _sale(row)
        return issue_token(store, f"sale:{vendor_id}:{sale_id}", meter_id, sale.account_id, sale.amount_minor,
                           sale.currency, head_end_key, now)


def mark_tokens_applied(store: PaygStore, token_ids: Sequence[str], at: datetime) -> int:
    """Record the tokens a gateway reported applied (first report wins); returns how many were new."""
    with store.transaction() as db:
        return sum(db.execute("UPDATE payg_token SET applied_at_ms = ? WHERE token_id = ? AND applied_at_ms IS NULL",
                              (to_ms(at), t)).rowcount for t in token_ids)


def unapplied_tokens(store: PaygStore, meter_id: str) -> list[tuple[str, str, int]]:
    """(token id, reference, amount) of the meter's tokens no gateway has reported applied yet."""
    with store._read():
        return [tuple(r) for r in store._db.execute(
            "SELECT token_id, reference, amount_minor FROM payg_token WHERE meter_id = ? AND applied_at_ms IS NULL "
            "ORDER BY counter", (meter_id,)).fetchall()]


class SqlSessionStore:
    """`creditcontrol.SessionStore` in the `payg_cc_session` table (SQLite or PostgreSQL): sessions,
    their open grants and stored answers survive a head-end restart. Run `CreditControl.handle`
    inside `store.transaction()` so the session write commits with the postings.

    Parsed sessions are cached per process and revalidated by the row's random `version` on every
    read (one indexed lookup), so several head-end processes on one PostgreSQL database stay correct."""

    def __init__(self, store: PaygStore) -> None:
        self.store = store
        self._cache: dict[str, tuple[int, object]] = {}
        self._memo: dict[str, dict] = {}      # per session: its encoded reports/answers (`session_json_text`)

    def get(self, session_id: str):
        from .creditcontrol import session_from_json
        with self.store._read():
            row = self.store._db.execute("SELECT version FROM payg_cc_session WHERE session_id = ?",
                                         (session_id,)).fetchone()
            if row is None:
                return None
            cached = self._cache.get(session_id)
            if cached is not None and cached[0] == row[0]:
                return cached[1]
            row = self.store._db.execute("SELECT version, data FROM payg_cc_session WHERE session_id = ?",
                                         (session_id,)).fetchone()
        session = session_from_json(json.loads(row[1]))
        self._remember(session_id, row[0], session)
        return session

    def _remember(self, session_id: str, version: int, session) -> None:
        if len(self._cache) >= 100_000:
            self._cache.clear()
            self._memo.clear()
        self._cache[session_id] = (version, session)

    def put(self, session) -> None:
        from .creditcontrol import session_json_text
        data, memo = session_json_text(session, self._memo.get(session.session_id))
        with self.store.transaction() as db:
            version = secrets.randbits(62)    # random, not a counter: a rolled-back write can never alias
            db.execute("INSERT INTO payg_cc_session VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET "
                       "open = excluded.open, reserved_minor = excluded.reserved_minor, version = excluded.version, "
                       "data = excluded.data",
                       (session.session_id, session.account_id, int(not session.terminated), session.reserved_minor,
                        version, data))
        self._remember(session.session_id, version, session)
        self._memo[session.session_id] = memo

    def open_sessions(self, account_id: str):
        from .creditcontrol import session_from_json
        with self.store._read():
            rows = self.store._db.execute("SELECT data FROM payg_cc_session WHERE account_id = ? AND open = 1",
                                          (account_id,)).fetchall()
        return iter([session_from_json(json.loads(r[0])) for r in rows])

    def reserved_by_others(self, account_id: str, session_id: str) -> int:
        """Σ open grants of the account's other sessions (what `CreditControl` needs, without parsing them)."""
        with self.store._read():
            row = self.store._db.execute("SELECT COALESCE(SUM(reserved_minor), 0) FROM payg_cc_session "
                                         "WHERE account_id = ? AND open = 1 AND session_id <> ?",
                                         (account_id, session_id)).fetchone()
        return int(row[0])


class StoreTokenReservations:
    """`creditcontrol.TokenReservations` over `payg_token`: an issued, unapplied token reserves its
    amount of the account's prepaid credit; a reported token counts if it was issued for the
    meter (same amount) or is an offline card top-up already booked (``card-topup:{reference}``)."""

    def __init__(self, store: PaygStore) -> None:
        self.store = store

    def outstanding_minor(self, account_id: str, exclude: tuple[str, ...] = (), now: datetime | None = None) -> int:
        """Unexpired (at `now`) issued tokens not reported applied; an expired token frees its money."""
        horizon = to_ms(now) if now is not None else -1
        with self.store._read():
            rows = self.store._db.execute("SELECT token_id, amount_minor FROM payg_token WHERE account_id = ? "
                                          "AND applied_at_ms IS NULL AND expires_at_ms > ?",
                                          (account_id, horizon)).fetchall()
        return sum(a for t, a in rows if t not in exclude)

    def confirmed_minor(self, meter_id: str, tokens: tuple[tuple[str, int], ...]) -> int:
        total = 0
        for ref, amount in tokens:
            with self.store._read():
                row = self.store._db.execute("SELECT amount_minor FROM payg_token WHERE token_id = ? AND meter_id = ?",
                                             (ref, meter_id)).fetchone()
            if row is not None and row[0] == amount:
                total += amount
            elif row is None and ref.startswith("card:") and self.store.exists(f"card-topup:{ref}"):
                total += amount
        return total


@dataclass(frozen=True)
class OfflineCardTopUp:
    """A card top-up the gateway applied offline, as reported at sync (reference = card:{id}:{nonce})."""

    reference: str
    card_id: str
    account_id: str
    amount_minor: int
    currency: str
    at: datetime
    gateway_id: str = ""


CARD_CLEARING_VENDOR = "cards-offline"      # receivable of card top-ups taken offline at gateways


def reconcile_offline_card_topups(store: PaygStore, topups: Sequence[OfflineCardTopUp]) -> list[str]:
    """Book offline card top-ups once (business key ``card-topup:{reference}``) and raise a
    ``blacklisted_card_attempt`` CRM event for any card the head-end had blacklisted at the top-up's
    instant (blacklisted after the gateway's last sync). Returns the references caught that way.

    The credit was already given at the gateway, so it is booked either way; the event is how the
    CRM/fraud desk follows it up."""
    caught = []
    for t in topups:
        with store.transaction() as db:
            key = f"card-topup:{t.reference}"
            if store.exists(key):
                continue
            store.append([L.top_up(key, t.at, t.account_id, CARD_CLEARING_VENDOR, t.amount_minor, t.currency,
                                   store.vat)])
            entry = V.blacklisted(store.blacklist(t.card_id), t.card_id, t.at)
            if entry is not None:
                caught.append(t.reference)
                store._event(db, t.at, "blacklisted_card_attempt", t.account_id, {
                    "card_id": t.card_id, "reference": t.reference, "amount_minor": t.amount_minor,
                    "channel": "gateway_offline", "caught": "on_sync", "gateway": t.gateway_id,
                    "blacklisted_from": entry.effective_at.isoformat(timespec="milliseconds"),
                    "reason": entry.reason})
    return caught


def record_over_usage(store: PaygStore, event) -> None:
    """Put a credit-control event on the CRM export: `OverUsage` as ``over_usage``; a
    `StandingNotBooked` (standing days the account had booked already) as
    ``standing_charge_not_booked``, with a WARNING log line naming account, days and amount; a
    `ConsumptionNotBooked` (register range the meter had booked already) as
    ``consumption_not_booked`` and an `ImportRegisterBelowBooked` (meter reset?) as
    ``import_register_below_booked``, each with a WARNING log line naming meter, Wh and amount."""
    if getattr(event, "kind", "") == "standing-not-booked":
        log.warning("account %s meter %s: standing charge days %s..%s reported again by session %s request %d: "
                    "%d of %d day(s) already booked through %s, %d not booked (%d of it refunded to prepaid%s)",
                    event.account_id, event.meter_id, event.first_day, event.last_day, event.session_id,
                    event.request_number, event.days_not_booked, event.days, event.booked_through,
                    event.amount_minor, event.refunded_minor,
                    f", {event.business_key}" if event.business_key else "")
        store.record_event(event.at, "standing_charge_not_booked", event.account_id, {
            "meter": event.meter_id, "session_id": event.session_id, "request_number": event.request_number,
            "first_day": event.first_day, "last_day": event.last_day, "days": event.days,
            "days_not_booked": event.days_not_booked, "booked_through": event.booked_through,
            "amount_minor": event.amount_minor, "refunded_minor": event.refunded_minor,
            "business_key": event.business_key})
        return
    if getattr(event, "kind", "") == "consumption-not-booked":
        log.warning("account %s meter %s: consumption over import register %d..%d Wh reported again by session %s "
                    "request %d: %d of %d Wh already booked (through %d Wh), %d of %d not booked (%d of it "
                    "refunded to prepaid%s)", event.account_id, event.meter_id, event.import_wh_from,
                    event.import_wh_to, event.session_id, event.request_number, event.wh_not_booked, event.used_wh,
                    event.booked_wh, event.amount_minor, event.used_minor, event.refunded_minor,
                    f", {event.business_key}" if event.business_key else "")
        store.record_event(event.at, "consumption_not_booked", event.account_id, {
            "meter": event.meter_id, "session_id": event.session_id, "request_number": event.request_number,
            "import_wh_from": event.import_wh_from, "import_wh_to": event.import_wh_to,
            "booked_wh": event.booked_wh, "used_wh": event.used_wh, "wh_not_booked": event.wh_not_booked,
            "used_minor": event.used_minor, "amount_minor": event.amount_minor,
            "refunded_minor": event.refunded_minor, "business_key": event.business_key})
        return
    if getattr(event, "kind", "") == "import-register-below-booked":
        log.warning("account %s meter %s: import register range %d..%d Wh reported by session %s request %d is "
                    "below the %d Wh already booked (meter reset or exchanged under the same id?): %d Wh, %d "
                    "booked as reported", event.account_id, event.meter_id, event.import_wh_from, event.import_wh_to,
                    event.session_id, event.request_number, event.booked_wh, event.used_wh, event.used_minor)
        store.record_event(event.at, "import_register_below_booked", event.account_id, {
            "meter": event.meter_id, "session_id": event.session_id, "request_number": event.request_number,
            "import_wh_from": event.import_wh_from, "import_wh_to": event.import_wh_to,
            "booked_wh": event.booked_wh, "used_wh": event.used_wh, "used_minor": event.used_minor})
        return
    store.record_event(event.at, "over_usage", event.account_id, {
        "meter": event.meter_id, "session_id": event.session_id, "request_number": event.request_number,
        "granted_minor": event.granted_minor, "used_minor": event.used_minor, "amount_minor": event.over_minor,
        "wh": event.over_wh, "business_key": event.business_key})


CRM_TOPIC_PREFIX = "meterlink/v1/crm"


def export_events(store: PaygStore, publish, after_seq: int = 0, limit: int = 1000) -> int:
    """Publish CRM events after the cursor to ``meterlink/v1/crm/{kind}/{account}``; returns the new
    cursor (the last seq published). Stops at the first failure, so nothing is skipped."""
    cursor = after_seq
    for e in store.events(after_seq, limit):
        payload = {"event_id": f"headend-{e.seq}", "kind": e.kind, "account": e.account_id, "source": "headend",
                   "at": e.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **e.payload}
        publish(f"{CRM_TOPIC_PREFIX}/{e.kind}/{e.account_id}",
                json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        cursor = e.seq
    return cursor


def _sale(r: Sequence) -> V.Sale:
    return V.Sale(sale_id=r[1], vendor_id=r[0], card_id=r[2], account_id=r[3], amount_minor=r[4], currency=r[5],
                  at=from_ms(r[6]), commission_minor=r[7], vat_on_commission_minor=r[8])


__all__ = ["CARD_CLEARING_VENDOR", "CHALLENGE_TTL", "CRM_TOPIC_PREFIX", "CrmEvent", "OfflineCardTopUp", "PaygStore",
           "TOKEN_TTL", "export_events", "issue_token", "mark_tokens_applied", "reconcile_offline_card_topups",
           "record_over_usage", "sqlite_path", "token_for_sale", "unapplied_tokens"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meterlink.headend.payg_store verify-balances|rebuild-balances DATABASE``."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m meterlink.headend.payg_store",
                                 description="Check the PAYG running balances against the ledger's postings.")
    ap.add_argument("command", choices=["verify-balances", "rebuild-balances"],
                    help="verify-balances: recompute every customer account's balance from its postings and "
                         "compare with its running balance (exit 1 on any mismatch); rebuild-balances: derive "
                         "them all from the postings again")
    ap.add_argument("database", help="sqlite:///PATH or postgresql://USER@HOST/DB (the head-end database)")
    args = ap.parse_args(argv)
    store = PaygStore(args.database)
    try:
        return check_balances(store, rebuild=args.command == "rebuild-balances")
    finally:
        store.close()


def check_balances(store: PaygStore, rebuild: bool = False) -> int:
    """Print the running-balance check (or rebuild) for the CLI; exit status 1 on any mismatch."""
    if rebuild:
        print(f"{store.rebuild_balances()} running balances derived from the postings")
        return 0
    bad = store.verify_balances()
    for m in bad:
        print(f"MISMATCH {m.account} {m.currency}: running balance {m.checkpoint_minor} "
              f"({m.checkpoint_postings} postings), postings sum {m.postings_minor} ({m.postings} postings)")
    if not bad:
        with store._read():
            n = store._db.execute("SELECT COUNT(*) FROM payg_balance").fetchone()[0]
        print(f"{n} running balances, all equal to the sum of their postings")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
