"""Head-end storage of readings (SQLite, the embedded default); SQL only, no business rules.

The repository contract is `ReadingRepository`; issue 5 adds the PostgreSQL implementation and
runs one contract test suite against both. Ingest is idempotent on (gateway_id, seq).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from meterlink.clock import from_ms, to_ms
from meterlink.errors import ConfigError
from meterlink.readings import Reading


@dataclass(frozen=True)
class StoredRecord:
    gateway_id: str
    seq: int
    prev_hash: bytes
    reading: Reading


@dataclass(frozen=True)
class IngestResult:
    acked_seq: int
    accepted: int
    duplicates: int


class ReadingRepository(Protocol):
    def ingest(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int) -> IngestResult: ...
    def acked_seq(self, gateway_id: str) -> int: ...
    def readings(self, meter_id: str, obis: str | None = None) -> list[Reading]: ...
    def meters(self) -> list[str]: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_record (
    gateway_id   TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    prev_hash    BLOB    NOT NULL,
    meter_id     TEXT    NOT NULL,
    obis         TEXT    NOT NULL,
    taken_at_ms  INTEGER NOT NULL,
    value        INTEGER NOT NULL,
    unit         TEXT    NOT NULL,
    quality      INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gateway_record_meter ON gateway_record (meter_id, obis, taken_at_ms);
CREATE TABLE IF NOT EXISTS gateway_sync (
    gateway_id TEXT PRIMARY KEY,
    acked_seq  INTEGER NOT NULL
);
"""


class SqliteReadingRepository:
    """SQLite implementation; one connection guarded by a lock (gRPC serves from a thread pool)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def acked_seq(self, gateway_id: str) -> int:
        row = self._db.execute("SELECT acked_seq FROM gateway_sync WHERE gateway_id=?", (gateway_id,)).fetchone()
        return row[0] if row else 0

    def ingest(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int) -> IngestResult:
        """Commit a batch in one transaction; records already held are counted, not duplicated."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO gateway_record VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [(gateway_id, r.seq, r.prev_hash, r.reading.meter_id, r.reading.obis,
                      to_ms(r.reading.taken_at), r.reading.value, r.reading.unit, r.reading.quality,
                      received_at_ms) for r in records])
                accepted = db.total_changes - before
                acked = self._advance_ack(gateway_id)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return IngestResult(acked, accepted, len(records) - accepted)

    def _advance_ack(self, gateway_id: str) -> int:
        """Highest seq such that every seq from 1 up to it is held (the gap-free prefix)."""
        acked = self.acked_seq(gateway_id)
        # Islands and gaps: rows after `acked` whose seq - row_number == acked are the contiguous run.
        run = self._db.execute(
            "SELECT COUNT(*) FROM (SELECT seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp FROM gateway_record"
            " WHERE gateway_id = ? AND seq > ?) WHERE grp = ?", (gateway_id, acked, acked)).fetchone()[0]
        new = acked + run
        self._db.execute("INSERT INTO gateway_sync VALUES (?, ?) ON CONFLICT(gateway_id) DO UPDATE SET "
                         "acked_seq = excluded.acked_seq", (gateway_id, new))
        return new

    def readings(self, meter_id: str, obis: str | None = None) -> list[Reading]: ...
    def meters(self) -> list[str]: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_record (
    gateway_id   TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    prev_hash    BLOB    NOT NULL,
    meter_id     TEXT    NOT NULL,
    obis         TEXT    NOT NULL,
    taken_at_ms  INTEGER NOT NULL,
    value        INTEGER NOT NULL,
    unit         TEXT    NOT NULL,
    quality      INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gateway_record_meter ON gateway_record (meter_id, obis, taken_at_ms);
CREATE TABLE IF NOT EXISTS gateway_sync (
    gateway_id TEXT PRIMARY KEY,
    acked_seq  INTEGER NOT NULL
);
"""


class SqliteReadingRepository:
    """SQLite implementation; one connection guarded by a lock (gRPC serves from a thread pool)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def acked_seq(self, gateway_id: str) -> int:
        row = self._db.execute("SELECT acked_seq FROM gateway_sync WHERE gateway_id=?", (gateway_id,)).fetchone()
        return row[0] if row else 0

    def ingest(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int) -> IngestResult:
        """Commit a batch in one transaction; records already held are counted, not duplicated."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO gateway_record VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [(gateway_id, r.seq, r.prev_hash, r.reading.meter_id, r.reading.obis,
                      to_ms(r.reading.taken_at), r.reading.value, r.reading.unit, r.reading.quality,
                      received_at_ms) for r in records])
                accepted = db.total_changes - before
                acked = self._advance_ack(gateway_id)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return IngestResult(acked, accepted, len(records) - accepted)

    def _advance_ack(self, gateway_id: str) -> int:
        """Highest seq such that every seq from 1 up to it is held (gap-free prefix)."""
        acked = self.acked_seq(gateway_id)
        row = self._db.execute(
            # the first missing seq after `acked`: islands-and-gaps over the primary key
            "SELECT COALESCE(MIN(seq), ?) FROM ("
            "  SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp FROM gateway_record"
            "  WHERE gateway_id = ? AND seq > ?) WHERE grp = ? ",
            (acked, gateway_id, acked, acked)).fetchone()
        # rows whose seq - rownumber == acked form the contiguous run right after `acked`
        run = self._db.execute(
            "SELECT COUNT(*) FROM (SELECT seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp FROM gateway_record"
            " WHERE gateway_id = ? AND seq > ?) WHERE grp = ?", (gateway_id, acked, acked)).fetchone()[0]
        del row
        new = acked + run
        self._db.execute("INSERT INTO gateway_sync VALUES (?, ?) ON CONFLICT(gateway_id) DO UPDATE SET "
                         "acked_seq = excluded.acked_seq", (gateway_id, new))
        return new

    def readings(self, meter_id: str, obis: str | None = None) -> list[Reading]:
        sql = "SELECT meter_id, obis, taken_at_ms, value, unit, quality FROM gateway_record WHERE meter_id=?"
        args: list = [meter_id]
        if obis:
            sql += " AND obis=?"
            args.append(obis)
        sql += " ORDER BY taken_at_ms, obis"
        return [Reading(m, o, from_ms(t), v, u, q) for m, o, t, v, u, q in self._db.execute(sql, args)]

    def meters(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT meter_id FROM gateway_record ORDER BY 1")]


def open_repository(url: str) -> SqliteReadingRepository:
    """'sqlite:///path' or a plain path -> repository (PostgreSQL arrives with issue 5)."""
    if url.startswith("sqlite:///"):
        return SqliteReadingRepository(url[len("sqlite:///"):])
    if url.startswith("sqlite://"):
        return SqliteReadingRepository(url[len("sqlite://"):] or ":memory:")
    if "://" in url:
        raise ConfigError(f"unsupported database URL {url!r} (this build supports sqlite:///PATH)")
    return SqliteReadingRepository(url)
