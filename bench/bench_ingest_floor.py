"""The floor under the ingest benchmark on this machine: what the parts that no head-end code can
avoid cost per reading, measured bare (no meterlink code in the loop), so the issue's goal
(≥ 200,000 readings/s verify + store + rate on SQLite, ≥ 100,000/s on PostgreSQL, 2 cores) can be
compared with what the machine gives at all.

* the INSERT of the rows into the product's `gateway_record` table (its schema, from
  headend/sql/0001_readings.sqlite.sql: the (gateway_id, seq) key and the (meter_id, obis,
  taken_at_ms) index), with Python's sqlite3 `executemany`, 5000 rows per transaction, WAL,
  synchronous=NORMAL (cheaper than the product's FULL): the cheapest way Python can store them there;
* the same number of rows into a table of three integers with no index (rowid): Python sqlite3's
  own floor per row, whatever the schema;
* SHA-256 of each record's wire bytes (`common/chain.py` `wire_bytes`: what the head-end hashes to
  verify the chain), hashlib in a list comprehension.

Readings/s bounds printed: one core doing only the gateway_record INSERT and the hash; the best
case of two cores with the store on one and everything else (decode, verify, rate) on the other
(bounded by the INSERT alone).

Usage: .venv/bin/python bench/bench_ingest_floor.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python bench/bench_ingest_floor.py --rows 200000")
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    from meterlink.chain import ChainRecord, GENESIS, hash_of, wire_bytes
    from meterlink.readings import Reading

    n = args.rows
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    registers = (("1.8.0", "Wh"), ("2.8.0", "Wh"), ("32.7.0", "mV"), ("1.7.0", "W"))
    records, prev = [], GENESIS
    for i in range(n):
        obis, unit = registers[i % 4]
        rec = ChainRecord(i + 1, prev, Reading(f"MTR-{i // 4 % 16:04d}", obis,
                                               t0 + timedelta(minutes=15 * (i // 64)), i * 7, unit, 0))
        records.append(rec)
        prev = hash_of(rec)
    blobs = [wire_bytes(r) for r in records]
    rows = [("GW-0001", r.seq, r.prev_hash, r.body.meter_id, r.body.obis,
             int(r.body.taken_at.timestamp() * 1000), r.body.value, r.body.unit, r.body.quality, 1_700_000_000_000)
            for r in records]
    bare = [(i, i, i) for i in range(n)]
    print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start; {n:,} rows")
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(str(Path(tmp) / "floor.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript((ROOT / "headend/sql/0001_readings.sqlite.sql").read_text())
        db.execute("CREATE TABLE bare (a INTEGER, b INTEGER, c INTEGER)")

        def insert(sql: str, data: list) -> float:
            c0 = time.process_time()
            for k in range(0, len(data), 5000):
                db.execute("BEGIN")
                db.executemany(sql, data[k:k + 5000])
                db.execute("COMMIT")
            return (time.process_time() - c0) / len(data)

        per_row = insert("INSERT INTO gateway_record VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        per_bare = insert("INSERT INTO bare VALUES (?, ?, ?)", bare)
        db.close()
    sha = hashlib.sha256
    c0 = time.process_time()
    hashes = [sha(b).digest() for b in blobs]
    per_hash = (time.process_time() - c0) / n
    assert len(hashes) == n
    print(f"INSERT into gateway_record (its key + meter index)   {1e6 * per_row:6.2f} us CPU/row "
          f"-> {1 / per_row:>9,.0f} rows per CPU-second")
    print(f"INSERT of 3 integers, no index (sqlite3 floor)      {1e6 * per_bare:6.2f} us CPU/row "
          f"-> {1 / per_bare:>9,.0f} rows per CPU-second")
    print(f"SHA-256 of each record's wire bytes                 {1e6 * per_hash:6.2f} us CPU/record "
          f"-> {1 / per_hash:>9,.0f} records per CPU-second")
    one = 1 / (per_row + per_hash)
    print(f"bound, one core storing and hashing only:          {one:>9,.0f} readings/s")
    print(f"bound, two cores, the store alone on one of them:  {1 / per_row:>9,.0f} readings/s "
          f"(SQLite has one writer)")
    print("goal (issue #5), SQLite:                               200,000 readings/s, verify + store + rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
