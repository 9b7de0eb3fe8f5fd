"""The gateway's local journal (SQLite via sqlite-utils): every reading is committed here first.

WAL with synchronous=FULL: a commit is on flash before the function returns, so a power cut
after it loses nothing (NORMAL could lose the last transactions in WAL mode). Nothing is deleted
before the head-end acknowledged it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from meterlink.clock import from_ms, to_ms
from meterlink.readings import Reading


@dataclass(frozen=True)
class JournalRecord:
    seq: int
    prev_hash: bytes
    reading: Reading


class Journal:
    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self.db = sqlite_utils.Database(conn)
        if "record" not in self.db.table_names():
            self.db["record"].create({
                "seq": int, "prev_hash": bytes, "meter_id": str, "obis": str, "taken_at_ms": int,
                "value": int, "unit": str, "quality": int, "acked": int,
            }, pk="seq", not_null={"meter_id", "obis", "taken_at_ms", "value", "unit", "quality", "acked"})
            self.db["record"].create_index(["acked", "seq"])
        self._conn = conn

    def close(self) -> None:
        self._conn.close()

    def last_seq(self) -> int:
        row = self._conn.execute("SELECT MAX(seq) FROM record").fetchone()
        return row[0] or 0

    def append(self, readings: list[Reading]) -> list[JournalRecord]:
        """Commit readings in one transaction with consecutive seq numbers; returns the records."""
        if not readings:
            return []
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")  # one transaction: all readings of a poll, or none
        try:
            seq = self.last_seq()
            rows, out = [], []
            for r in readings:
                seq += 1
                rows.append((seq, b"", r.meter_id, r.obis, to_ms(r.taken_at), r.value, r.unit, r.quality, 0))
                out.append(JournalRecord(seq, b"", r))
            conn.executemany("INSERT INTO record (seq, prev_hash, meter_id, obis, taken_at_ms, value, unit, "
                             "quality, acked) VALUES (?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def unacked(self, limit: int) -> list[JournalRecord]:
        cur = self._conn.execute(
            "SELECT seq, prev_hash, meter_id, obis, taken_at_ms, value, unit, quality FROM record "
            "WHERE acked = 0 ORDER BY seq LIMIT ?", (limit,))
        return [JournalRecord(s, ph or b"", Reading(m, o, from_ms(t), v, u, q)) for s, ph, m, o, t, v, u, q in cur]

    def unacked_count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM record WHERE acked = 0").fetchone()[0]

    def mark_acked(self, up_to_seq: int) -> int:
        cur = self._conn.execute("UPDATE record SET acked = 1 WHERE acked = 0 AND seq <= ?", (up_to_seq,))
        return cur.rowcount
