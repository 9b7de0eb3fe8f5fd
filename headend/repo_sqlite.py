"""SQLite implementation of the head-end repository contract (store.ReadingRepository); SQL only, no business rules.

The embedded default: one file, WAL journal, ``synchronous=FULL`` (an ack is only sent for data that
survives a power cut, because the gateway prunes what is acked). One connection per repository,
guarded by a lock (gRPC serves from a thread pool); several processes may share the file: every
write transaction is ``BEGIN IMMEDIATE``, so ingest and migrations of different processes serialise
on SQLite's write lock and the ack is computed under it.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from pathlib import Path

from meterlink.clock import Clock, SystemClock, from_ms, to_ms
from meterlink.readings import Reading

from .migrations import SCHEMA_MIGRATIONS_DDL, Migration, load_migrations, plan
from .store import IngestResult, StoredRecord, check_batch, gaps_from_islands

INSERT_RECORD = "INSERT OR IGNORE INTO gateway_record VALUES (?,?,?,?,?,?,?,?,?,?)"

# Islands over the primary key: among the rows after the ack, seq - row_number() is constant on each
# run of consecutive seqs, and equals the ack exactly on the run that starts right after it.
ISLANDS = ("SELECT MIN(seq), MAX(seq) FROM (SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp "
           "FROM gateway_record WHERE gateway_id = ? AND seq > ?) GROUP BY grp ORDER BY 1")
RUN_AFTER_ACK = ("SELECT COUNT(*) FROM (SELECT seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp "
                 "FROM gateway_record WHERE gateway_id = ? AND seq > ?) WHERE grp = ?")


class SqliteReadingRepository:
    """Readings in one SQLite file (or ``:memory:``)."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, migrate: bool = True, clock: Clock | None = None,
                 busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self.url = "sqlite://" if self.path == ":memory:" else f"sqlite:///{self.path}"
        self._clock = clock or SystemClock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        if migrate:
            self.migrate()

    def close(self) -> None:
        self._db.close()

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
        """Commit a batch in one transaction; records already held are counted, not duplicated."""
        check_batch(gateway_id, records)
        rows = [(gateway_id, r.seq, r.prev_hash, rd.meter_id, rd.obis, to_ms(rd.taken_at), rd.value, rd.unit,
                 rd.quality, received_at_ms) for r in records for rd in (r.reading,)]
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany(INSERT_RECORD, rows)
                accepted = db.total_changes - before
                acked = self._advance_ack(gateway_id)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return IngestResult(acked, accepted, len(records) - accepted)

    def _advance_ack(self, gateway_id: str) -> int:
        """Move the ack over the run of consecutive seqs held right after it (inside the write lock)."""
        acked = self._acked(gateway_id)
        run = self._db.execute(RUN_AFTER_ACK, (gateway_id, acked, acked)).fetchone()[0]
        if run:
            self._db.execute("INSERT INTO gateway_sync VALUES (?, ?) ON CONFLICT(gateway_id) DO UPDATE SET "
                             "acked_seq = excluded.acked_seq", (gateway_id, acked + run))
        return acked + run

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
        return [Reading(m, o, from_ms(t), v, u, q) for m, o, t, v, u, q in rows]

    def meters(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT meter_id FROM gateway_record ORDER BY 1")]

