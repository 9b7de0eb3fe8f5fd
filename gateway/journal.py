"""The gateway's local journal (SQLite): every record is committed and hash-chained here before anything acts on it.

WAL with synchronous=FULL: a commit is on flash before the function returns, so a power cut
after it loses nothing (NORMAL could lose the last transactions in WAL mode). Each record gets a
gap-free seq and prev_hash = hash of the record before (common/chain.py), computed inside the same
transaction that stores it; the chain head (seq, hash) and the acknowledged seq live in the one-row
table `chain`, so the chain continues after acked records are pruned. Nothing unacknowledged is
deleted, except under disk pressure: runs of unacked instantaneous readings are collapsed into
tombstones that keep the chain verifiable (billing registers and events never are).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from meterlink.chain import (GENESIS, ChainRecord, Event, Tombstone, hash_of, is_prunable, prune_run,
                             reading_record_bytes, wire_bytes)
from meterlink.clock import from_ms, to_ms
from meterlink.errors import ConfigError
from meterlink.readings import BILLING_OBIS, Reading

log = logging.getLogger("meterlink.gateway.journal")

KIND_READING, KIND_EVENT, KIND_TOMBSTONE = 1, 2, 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq         INTEGER PRIMARY KEY,  -- for a tombstone: the last seq of the pruned run
    prev_hash   BLOB    NOT NULL,
    hash        BLOB    NOT NULL,     -- SHA-256 of the canonical bytes (a tombstone: of the run's last record)
    kind        INTEGER NOT NULL,     -- 1 reading, 2 event, 3 tombstone
    meter_id    TEXT    NOT NULL DEFAULT '',
    obis        TEXT    NOT NULL DEFAULT '',   -- reading: OBIS code; event: event kind
    taken_at_ms INTEGER NOT NULL DEFAULT 0,    -- reading: taken_at; event: at; tombstone: first seq of the run
    value       INTEGER,
    unit        TEXT,
    quality     INTEGER,
    payload     BLOB
);
CREATE TABLE IF NOT EXISTS chain (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    head_seq    INTEGER NOT NULL,
    head_hash   BLOB    NOT NULL,
    acked_seq   INTEGER NOT NULL,
    billing_only INTEGER NOT NULL DEFAULT 0   -- set by the disk-pressure policy, read by the daemon
);
INSERT OR IGNORE INTO chain VALUES (1, 0, zeroblob(32), 0, 0);
"""


@dataclass(frozen=True)
class JournalRecord:
    """A journaled record: a chain record plus the hash the journal stored for it."""

    seq: int
    prev_hash: bytes
    body: Reading | Event | Tombstone
    hash: bytes = b""

    @property
    def reading(self) -> Reading:
        if not isinstance(self.body, Reading):
            raise TypeError(f"journal record seq {self.seq} is a {type(self.body).__name__}, not a reading")
        return self.body

    def chain_record(self) -> ChainRecord:
        return ChainRecord(self.seq, self.prev_hash, self.body)


def _row(r: ChainRecord, h: bytes) -> tuple:
    b = r.body
    if isinstance(b, Reading):
        return (r.seq, r.prev_hash, h, KIND_READING, b.meter_id, b.obis, to_ms(b.taken_at), b.value, b.unit,
                b.quality, None)
    if isinstance(b, Event):
        return (r.seq, r.prev_hash, h, KIND_EVENT, b.meter_id, b.kind, to_ms(b.at), None, None, None, b.payload)
    return (r.seq, r.prev_hash, h, KIND_TOMBSTONE, "", "", b.first_seq, None, None, None, None)


def _record(row, instants: dict | None = None) -> JournalRecord:
    """A row as a record; `instants` caches ms -> datetime across one read (a poll shares one instant)."""
    seq, prev, h, kind, meter, obis, t, value, unit, quality, payload = row
    if kind != KIND_TOMBSTONE:
        at = instants.get(t) if instants is not None else None
        if at is None:
            at = from_ms(t)
            if instants is not None:
                instants[t] = at
    if kind == KIND_READING:
        body = Reading(meter, obis, at, value, unit, quality)
    elif kind == KIND_EVENT:
        body = Event(obis, meter, at, bytes(payload or b""))
    else:
        body = Tombstone(t, bytes(h))
    return JournalRecord(seq, bytes(prev), body, bytes(h))


COLUMNS = "seq, prev_hash, hash, kind, meter_id, obis, taken_at_ms, value, unit, quality, payload"


@dataclass(frozen=True)
class WireBatch:
    """Consecutive journal records ready to send: each as its wire bytes (meterlink.chain.wire_bytes)."""

    records: list[bytes]
    last_seq: int
    last_hash: bytes        # the journal's stored hash of the last record (the chain head to sign)


@dataclass(frozen=True)
class PressureReport:
    acked_deleted: int
    pruned: int            # unacked instantaneous readings collapsed into tombstones
    tombstones: int        # tombstone rows after the pass
    billing_only: bool


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "record" in tables and "journal" not in tables:
            conn.close()
            raise ConfigError(f"journal {self.path} was written by a build without the hash chain; "
                              f"deliver its records with that build, then move the file aside")
        conn.executescript(SCHEMA)
        self._conn = conn
        self._lock = threading.RLock()   # the daemon's pusher and poller may share one journal

    def close(self) -> None:
        self._conn.close()

    # -- state ---------------------------------------------------------------------------------
    def head(self) -> tuple[int, bytes]:
        """(seq, hash) of the last record ever journaled; (0, GENESIS) for a new journal."""
        with self._lock:
            s, h = self._conn.execute("SELECT head_seq, head_hash FROM chain").fetchone()
        return s, (bytes(h) if s else GENESIS)

    def last_seq(self) -> int:
        return self.head()[0]

    def acked_seq(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT acked_seq FROM chain").fetchone()[0]

    @property
    def billing_only(self) -> bool:
        """True after the disk-pressure policy ran out of room: poll billing registers only."""
        with self._lock:
            return bool(self._conn.execute("SELECT billing_only FROM chain").fetchone()[0])

    def set_billing_only(self, on: bool) -> None:
        with self._lock:
            self._conn.execute("UPDATE chain SET billing_only=?", (int(on),))

    # -- writing -------------------------------------------------------------------------------
    def append(self, bodies: list[Reading | Event]) -> list[JournalRecord]:
        """Commit records in one transaction: consecutive seq, each chained to the one before; returns them."""
        if not bodies:
            return []
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")  # one transaction: all records of a poll, or none
            try:
                seq, prev = conn.execute("SELECT head_seq, head_hash FROM chain").fetchone()
                prev = bytes(prev) if seq else GENESIS
                rows, out = [], []
                for b in bodies:
                    seq += 1
                    rec = ChainRecord(seq, prev, b)
                    h = hash_of(rec)
                    rows.append(_row(rec, h))
                    out.append(JournalRecord(seq, prev, b, h))
                    prev = h
                conn.executemany(f"INSERT INTO journal ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                conn.execute("UPDATE chain SET head_seq=?, head_hash=?", (seq, prev))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return out

    def mark_acked(self, up_to_seq: int) -> int:
        """Record the head-end's ack (never backwards, never beyond the head); returns how many records it newly covers."""
        with self._lock:
            head, acked = self._conn.execute("SELECT head_seq, acked_seq FROM chain").fetchone()
            new = min(up_to_seq, head)
            if new <= acked:
                return 0
            self._conn.execute("UPDATE chain SET acked_seq=?", (new,))
            return new - acked

    # -- reading -------------------------------------------------------------------------------
    def unacked(self, limit: int) -> list[JournalRecord]:
        with self._lock:
            acked = self._conn.execute("SELECT acked_seq FROM chain").fetchone()[0]
            cur = self._conn.execute(f"SELECT {COLUMNS} FROM journal WHERE seq > ? ORDER BY seq LIMIT ?",
                                     (acked, limit))
            instants: dict = {}
            return [_record(row, instants) for row in cur]

    def records_after(self, seq: int, limit: int) -> list[JournalRecord]:
        """Up to `limit` records with seq > `seq`, in order (the next batch while one is in flight)."""
        with self._lock:
            cur = self._conn.execute(f"SELECT {COLUMNS} FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
            instants: dict = {}
            return [_record(row, instants) for row in cur]

    def wire_batch(self, after_seq: int, limit: int) -> WireBatch | None:
        """Up to `limit` records with seq > `after_seq` as wire bytes, in order (one query); None when there are none.

        Reading rows are encoded straight from their columns (no Reading objects); events and tombstones
        go through `JournalRecord` -> `wire_bytes`. The bytes carry the journal's stored prev_hash, so a
        record altered in the database still arrives as it is stored and the head-end refuses it.
        """
        out: list[bytes] = []
        append = out.append
        row = None
        with self._lock:     # rows are encoded as they are read: only the bytes are kept
            for row in self._conn.execute(f"SELECT {COLUMNS} FROM journal WHERE seq > ? ORDER BY seq LIMIT ?",
                                          (after_seq, limit)):
                b = (reading_record_bytes(row[0], row[1], row[4], row[5], row[6], row[7], row[8], row[9])
                     if row[3] == KIND_READING else None)
                if b is None:
                    b = wire_bytes(_record(row).chain_record())
                append(b)
        if row is None:
            return None
        return WireBatch(out, row[0], bytes(row[2]))

    def records(self, first: int = 1, last: int | None = None) -> list[JournalRecord]:
        """Every record still held with first <= seq <= last, in order."""
        with self._lock:
            cur = self._conn.execute(f"SELECT {COLUMNS} FROM journal WHERE seq >= ? AND seq <= ? ORDER BY seq",
                                     (first, last if last is not None else 2 ** 63 - 1))
            return [_record(row) for row in cur]

    def unacked_count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM journal WHERE seq > (SELECT acked_seq FROM chain)"
                                      ).fetchone()[0]

    def depth(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0]

    # -- retention -----------------------------------------------------------------------------
    def prune_acked(self, older_than_ms: int | None = None) -> int:
        """Delete acknowledged records (taken/occurred before `older_than_ms`, or all); the chain head stays."""
        with self._lock:
            sql = "DELETE FROM journal WHERE seq <= (SELECT acked_seq FROM chain)"
            args: tuple = ()
            if older_than_ms is not None:
                sql += " AND (kind = 3 OR taken_at_ms < ?)"
                args = (older_than_ms,)
            return self._conn.execute(sql, args).rowcount

    def relieve_pressure(self) -> PressureReport:
        """Disk nearly full: delete every acked record, then collapse runs of unacked instantaneous
        readings into tombstones (one transaction); billing registers and events are never touched.
        Sets `billing_only` so the daemon polls billing registers only until the pressure is gone."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute("DELETE FROM journal WHERE seq <= (SELECT acked_seq FROM chain)").rowcount
                rows = [_record(r) for r in conn.execute(f"SELECT {COLUMNS} FROM journal ORDER BY seq")]
                runs, run = [], []
                for r in rows:
                    prunable = is_prunable(r.body)
                    if prunable and run and (r.body.first_seq if isinstance(r.body, Tombstone) else r.seq) \
                            == run[-1].seq + 1:
                        run.append(r)
                        continue
                    if len(run) > 1 or (run and not isinstance(run[0].body, Tombstone)):
                        runs.append(run)
                    run = [r] if prunable else []
                if len(run) > 1 or (run and not isinstance(run[0].body, Tombstone)):
                    runs.append(run)
                pruned = 0
                for run in runs:
                    tomb = prune_run([r.chain_record() for r in run])
                    pruned += sum(1 for r in run if isinstance(r.body, Reading))
                    conn.execute("DELETE FROM journal WHERE seq >= ? AND seq <= ?", (run[0].seq, run[-1].seq))
                    conn.execute(f"INSERT INTO journal ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                 _row(tomb, tomb.body.record_hash))
                conn.execute("UPDATE chain SET billing_only=1")
                tombs = conn.execute("SELECT COUNT(*) FROM journal WHERE kind=3").fetchone()[0]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if pruned:
            log.error("journal %s: disk nearly full: dropped %d acked records and %d unacked instantaneous "
                      "readings (kept as %d tombstones); polling billing registers only", self.path, deleted,
                      pruned, tombs)
        return PressureReport(deleted, pruned, tombs, True)

    def vacuum(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.execute("VACUUM")


def disk_pressure(free_bytes: int, total_bytes: int, min_free_ratio_permille: int = 50) -> bool:
    """True when free space is below the threshold (default 5 %); pure, the caller measures the disk."""
    return free_bytes * 1000 < total_bytes * min_free_ratio_permille


def billing_only_readings(readings: list[Reading]) -> list[Reading]:
    """What a poll keeps in billing-only mode: the billing registers (meterlink.readings.BILLING_OBIS)."""
    return [r for r in readings if r.obis in BILLING_OBIS]
