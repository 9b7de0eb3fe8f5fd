"""SQLite implementation of the head-end repository contract (store.ReadingRepository); SQL only, no business rules.

The embedded default: one file, WAL journal, ``synchronous=FULL`` (an ack is only sent for data that
survives a power cut, because the gateway prunes what is acked). One connection per repository,
guarded by a lock (gRPC serves from a thread pool); several processes may share the file: every
write transaction is ``BEGIN IMMEDIATE``, so ingest and migrations of different processes serialise
on SQLite's write lock and the ack is computed under it. Ingest commits first queue with the billing
store's transactions (serve's rating process) on ``<file>-writers.lock`` (headend/writerqueue.py).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from meterlink.chain import ReadingColumns
from meterlink.clock import Clock, SystemClock, to_ms
from meterlink.errors import MeterlinkError
from meterlink.readings import Reading

from .migrations import SCHEMA_MIGRATIONS_DDL, Migration, load_migrations, plan
from .store import (ACK_WINDOW, IngestResult, StoredRecord, check_batch, epoch_ms, fire_hooks, gaps_from_islands,
                    readings_from_rows)
from .writerqueue import writer_queue

# ON CONFLICT on the key only: "INSERT OR IGNORE" would also silently drop a row that breaks NOT NULL.
INSERT_RECORD = "INSERT INTO gateway_record VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (gateway_id, seq) DO NOTHING"

# Islands over the primary key: among the rows after the ack, seq - row_number() is constant on each
# run of consecutive seqs, and equals the ack exactly on the run that starts right after it.
ISLANDS = ("SELECT MIN(seq), MAX(seq) FROM (SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp "
           "FROM gateway_record WHERE gateway_id = ? AND seq > ?) GROUP BY grp ORDER BY 1")
RUN_AFTER_ACK = ("SELECT COUNT(*) FROM (SELECT seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp "
                 "FROM gateway_record WHERE gateway_id = ? AND seq > ? AND seq <= ?) WHERE grp = ?")
NEXT_HELD = "SELECT 1 FROM gateway_record WHERE gateway_id = ? AND seq = ?"


# Speed only, durability unchanged (WAL + synchronous=FULL stay): a page cache large enough for the
# (meter_id, obis, taken_at_ms) index of a few million readings (catch-up inserts touch its leaves all
# over, ~1000 meters per batch), the file mapped instead of read() page by page, and fewer, larger
# WAL checkpoints (a leaf rewritten by several commits is copied back once; the WAL file is cut back
# to journal_size_limit after a checkpoint).
TUNING = ("PRAGMA cache_size=-65536", "PRAGMA mmap_size=268435456", "PRAGMA temp_store=MEMORY",
          "PRAGMA wal_autocheckpoint=16384", "PRAGMA journal_size_limit=67108864")


def tune(db: sqlite3.Connection) -> None:
    """Apply TUNING to a connection (the repository's and the chain store's, same file)."""
    for pragma in TUNING:
        db.execute(pragma)


def record_rows(gateway_id: str, records: list[StoredRecord], received_at_ms: int) -> list[tuple]:
    """gateway_record rows of a batch; a poll's readings share one datetime, converted to ms once."""
    rows, ms_of = [], {}
    append, get = rows.append, ms_of.get
    for r in records:
        rd = r.reading
        t = rd.taken_at
        ms = get(id(t))
        if ms is None:
            ms = ms_of[id(t)] = epoch_ms(t)
        append((gateway_id, r.seq, r.prev_hash, rd.meter_id, rd.obis, ms, rd.value, rd.unit, rd.quality,
                received_at_ms))
    return rows


def chain_rows(gateway_id: str, new: list, received_at_ms: int) -> list[tuple]:
    """gateway_record rows straight from verified chain records (its Reading bodies; events and tombstones
    are the chain store's), without building StoredRecords first: the chain store's one-transaction path.
    From ReadingColumns (the catch-up batch, all readings) the rows are its columns zipped, no per-record Python."""
    if type(new) is ReadingColumns:
        n = len(new)
        return list(zip([gateway_id] * n, new.seqs, new.prevs, new.meters, new.obis, new.taken_at_ms, new.values,
                        new.units, new.qualities, [received_at_ms] * n))
    rows, ms_of = [], {}
    append, get = rows.append, ms_of.get
    for r in new:
        rd = r.body
        if not isinstance(rd, Reading):
            continue
        t = rd.taken_at
        ms = get(id(t))
        if ms is None:
            ms = ms_of[id(t)] = epoch_ms(t)
        append((gateway_id, r.seq, r.prev_hash, rd.meter_id, rd.obis, ms, rd.value, rd.unit, rd.quality,
                received_at_ms))
    return rows


class _Job:
    """One caller's batch waiting for (or done by) a group commit."""

    __slots__ = ("gateway_id", "rows", "result", "error", "done", "then")

    def __init__(self, gateway_id: str, rows: list[tuple], then=None) -> None:
        self.gateway_id, self.rows, self.then = gateway_id, rows, then
        self.result: IngestResult | None = None
        self.error: BaseException | None = None
        self.done = False


class SqliteReadingRepository:
    """Readings in one SQLite file (or ``:memory:``)."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, migrate: bool = True, clock: Clock | None = None,
                 busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self.url = self.display_url = "sqlite://" if self.path == ":memory:" else f"sqlite:///{self.path}"
        self._clock = clock or SystemClock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout_s)
        self._writers, self._busy_timeout_s = writer_queue(self.path), busy_timeout_s   # queue with the rating process
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        tune(self._db)
        self._lock = threading.RLock()
        self._pending_lock = threading.Lock()
        self._pending: list[_Job] = []
        # called as hook(gateway_id, result) after a commit that stored readings (e.g. the rating worker's
        # notify); must be cheap and never raise: the caller's ack waits for them
        self.commit_hooks: list = []
        if migrate:
            self.migrate()

    def close(self) -> None:
        self._db.close()
        if self._writers is not None:
            self._writers.close()

    def __enter__(self) -> SqliteReadingRepository:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------------
    def _applied(self) -> dict[int, str]:
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'").fetchone()
        if not exists:
            return {}
        return dict(self._db.execute("SELECT version, checksum FROM schema_migrations"))

    def pending_migrations(self) -> list[Migration]:
        with self._lock:
            return plan(load_migrations(self.dialect), self._applied())

    def schema_version(self) -> int:
        with self._lock:
            return max(self._applied(), default=0)

    def migrate(self) -> list[Migration]:
        """Apply every pending migration in one IMMEDIATE transaction (other processes wait)."""
        migrations = load_migrations(self.dialect)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(SCHEMA_MIGRATIONS_DDL)
                todo = plan(migrations, self._applied())
                now_ms = to_ms(self._clock.now())
                for m in todo:
                    for stmt in m.statements():
                        db.execute(stmt)
                    db.execute("INSERT INTO schema_migrations VALUES (?,?,?,?)",
                               (m.version, m.name, m.checksum, now_ms))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return todo

    # -- ingest ---------------------------------------------------------------------------------
    def acked_seq(self, gateway_id: str) -> int:
        with self._lock:
            return self._acked(gateway_id)

    def _acked(self, gateway_id: str) -> int:
        row = self._db.execute("SELECT acked_seq FROM gateway_sync WHERE gateway_id=?", (gateway_id,)).fetchone()
        return row[0] if row else 0

    def ingest(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int) -> IngestResult:
        """Commit a batch atomically; records already held are counted, not duplicated.

        Group commit: batches that arrive while another commit is in progress (the gRPC thread pool)
        are committed together by the next writer in one IMMEDIATE transaction and one fsync, each
        batch inside its own savepoint, so each is still all-or-nothing and gets its own result.
        """
        return self.ingest_then(gateway_id, records, received_at_ms, None)

    def ingest_then(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int, then) -> IngestResult:
        """`ingest`, and `then(connection)` (if given) inside the same transaction, after the readings.

        The chain store (headend/chainstore.py `commit_with_readings`) writes the batch's hashes and the
        new chain head this way when it shares the file: one transaction, one fsync per batch. If
        `then` raises, the batch stores nothing and the exception reaches the caller.
        """
        check_batch(gateway_id, records)
        return self.ingest_rows_then(gateway_id, record_rows(gateway_id, records, received_at_ms), then)

    def ingest_rows_then(self, gateway_id: str, rows: list[tuple], then) -> IngestResult:
        """`ingest_then` for rows already built (`record_rows`/`chain_rows`) and checked by the caller."""
        job = _Job(gateway_id, rows, then)
        with self._pending_lock:
            self._pending.append(job)
        with self._lock:
            if not job.done:
                with self._pending_lock:
                    jobs, self._pending = self._pending, []
                self._commit_group(jobs)
        if job.error is not None:
            raise job.error
        if job.result.accepted and self.commit_hooks:
            fire_hooks(self.commit_hooks, gateway_id, job.result)
        return job.result

    def _commit_group(self, jobs: list[_Job]) -> None:
        with self._writers.turn(self._busy_timeout_s) if self._writers is not None else nullcontext():
            self._commit_group_now(jobs)

    def _commit_group_now(self, jobs: list[_Job]) -> None:
        db, savepoints = self._db, len(jobs) > 1
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for job in jobs:
                    if savepoints:
                        db.execute("SAVEPOINT batch")
                    try:
                        before = db.total_changes
                        db.executemany(INSERT_RECORD, job.rows)
                        accepted = db.total_changes - before
                        acked = self._advance_ack(job.gateway_id, job.rows)
                        job.result = IngestResult(acked, accepted, len(job.rows) - accepted)
                        if job.then is not None:
                            job.then(db)
                    except (sqlite3.Error, MeterlinkError) as exc:
                        if not savepoints:
                            raise
                        db.execute("ROLLBACK TO batch")       # this batch only; the others commit
                        job.result, job.error = None, exc
                    if savepoints:
                        db.execute("RELEASE batch")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except BaseException as exc:
            for job in jobs:
                job.result, job.error = None, job.error or exc
            raise
        finally:
            for job in jobs:
                job.done = True

    def _advance_ack(self, gateway_id: str, rows: list[tuple] = ()) -> int:
        """Move the ack over the run of consecutive seqs held right after it (inside the write lock).

        Costs one index probe when the next seq is missing (a gateway with a gap does not slow down)
        and O(rows passed) otherwise, in steps of at most ACK_WINDOW rows. `rows`: the batch just
        inserted; every one of its seqs is held now, so when they are the consecutive run
        first..last with first <= ack + 1 the ack moves to last without counting them (the usual case).
        """
        acked = start = self._acked(gateway_id)
        db = self._db
        if rows:
            first, last = rows[0][1], rows[-1][1]
            if first <= acked + 1 < last + 1 and last - first + 1 == len(rows) and \
                    [r[1] for r in rows] == list(range(first, last + 1)):
                acked = last
        while db.execute(NEXT_HELD, (gateway_id, acked + 1)).fetchone():
            run = db.execute(RUN_AFTER_ACK, (gateway_id, acked, acked + ACK_WINDOW, acked)).fetchone()[0]
            acked += run
            if run < ACK_WINDOW:
                break
        if acked != start:
            db.execute("INSERT INTO gateway_sync VALUES (?, ?) ON CONFLICT(gateway_id) DO UPDATE SET "
                       "acked_seq = excluded.acked_seq", (gateway_id, acked))
        return acked

    def gaps(self, gateway_id: str) -> list[tuple[int, int]]:
        """Missing seq ranges [first, last] between the ack and the highest seq held."""
        with self._lock:
            acked = self._acked(gateway_id)
            islands = self._db.execute(ISLANDS, (gateway_id, acked)).fetchall()
        return gaps_from_islands(acked, islands)

    # -- queries --------------------------------------------------------------------------------
    def readings(self, meter_id: str, obis: str | None = None, *, start: datetime | None = None,
                 end: datetime | None = None) -> list[Reading]:
        sql = "SELECT meter_id, obis, taken_at_ms, value, unit, quality FROM gateway_record WHERE meter_id=?"
        args: list = [meter_id]
        if obis:
            sql += " AND obis=?"
            args.append(obis)
        if start is not None:
            sql += " AND taken_at_ms >= ?"
            args.append(to_ms(start))
        if end is not None:
            sql += " AND taken_at_ms < ?"
            args.append(to_ms(end))
        sql += " ORDER BY taken_at_ms, obis, gateway_id, seq"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return readings_from_rows(rows)

    def meters(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT meter_id FROM gateway_record ORDER BY 1")]

