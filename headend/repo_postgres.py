"""PostgreSQL implementation (psycopg 3) of the head-end repository contract (store.ReadingRepository); SQL only, no business rules.

Production backend: several stateless head-end replicas share one database. Exactly-once ingest
under concurrency rests on two things:
  * the primary key (gateway_id, seq) with ``INSERT ... ON CONFLICT DO NOTHING``: a record is
    stored once whoever inserts it first;
  * the gateway's ``gateway_sync`` row, locked as the FIRST statement of every ingest transaction
    (an upsert that takes the row lock). Ingests of one gateway therefore run one at a time across
    all replicas, and, because PostgreSQL's READ COMMITTED takes a fresh snapshot per statement,
    every statement after the lock sees everything the previous holder committed: the ack is
    computed over the complete set of rows. Different gateways never wait for each other.
    (A row lock rather than an advisory lock keeps this portable to PostgreSQL-compatible
    distributed engines.)
One ingest is one transaction of three round trips: lock + duplicate probe (pipelined), a binary
COPY of the new records, and the ack update + commit.
"""

from __future__ import annotations

import re
import struct
import threading
from contextlib import contextmanager
from operator import attrgetter
from datetime import datetime
from typing import Iterator

import psycopg
from psycopg.pq import TransactionStatus

from meterlink.chain import ReadingColumns
from meterlink.clock import Clock, SystemClock, to_ms
from meterlink.errors import ConfigError
from meterlink.readings import Reading

from .migrations import ADVISORY_LOCK_KEY, SCHEMA_MIGRATIONS_DDL, Migration, load_migrations, plan
from .store import (ACK_WINDOW, IngestResult, StoredRecord, check_batch, epoch_ms, fire_hooks, gaps_from_islands,
                    readings_from_rows)

# Creates the gateway's row or locks it; returns the ack before this batch.
LOCK_GATEWAY = ("INSERT INTO gateway_sync AS s (gateway_id, acked_seq) VALUES (%s, 0) ON CONFLICT (gateway_id) "
                "DO UPDATE SET acked_seq = s.acked_seq RETURNING acked_seq")
# Which seqs of the batch's range are held already (under the gateway lock nobody else adds any).
HELD_IN_RANGE = "SELECT seq FROM gateway_record WHERE gateway_id = %s AND seq BETWEEN %s AND %s"
COPY_RECORDS = ("COPY gateway_record (gateway_id, seq, prev_hash, meter_id, obis, taken_at_ms, value, unit, quality, "
                "received_at_ms) FROM STDIN (FORMAT BINARY)")
COPY_TYPES = ["text", "int8", "bytea", "text", "text", "int8", "int8", "text", "int4", "int8"]
# Islands over the primary key (see repo_sqlite): the run of consecutive seqs right after the ack,
# looked for only if the next seq is held (one probe for a gateway with a gap), at most %s rows ahead.
ADVANCE_ACK = (
    "UPDATE gateway_sync AS s SET acked_seq = s.acked_seq + CASE WHEN EXISTS (SELECT 1 FROM gateway_record n"
    " WHERE n.gateway_id = s.gateway_id AND n.seq = s.acked_seq + 1) THEN ("
    " SELECT COUNT(*) FROM (SELECT r.seq - ROW_NUMBER() OVER (ORDER BY r.seq) AS grp FROM gateway_record r"
    " WHERE r.gateway_id = s.gateway_id AND r.seq > s.acked_seq AND r.seq <= s.acked_seq + %s) AS t"
    " WHERE t.grp = s.acked_seq) ELSE 0 END"
    " WHERE s.gateway_id = %s RETURNING s.acked_seq")
ISLANDS = ("SELECT MIN(seq), MAX(seq) FROM (SELECT seq, seq - ROW_NUMBER() OVER (ORDER BY seq) AS grp "
           "FROM gateway_record WHERE gateway_id = %s AND seq > %s) AS t GROUP BY grp ORDER BY 1")


# Binary COPY (https://www.postgresql.org/docs/current/sql-copy.html, "Binary Format") of gateway_record
# rows, encoded with one struct per (text lengths) shape instead of psycopg's per-value dumpers.
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
_ROW_STRUCTS: dict[tuple[int, int, int, int, int], struct.Struct] = {}


def copy_data(gateway_id: str, records: list, received_at_ms: int, body: str = "reading") -> bytes | None:
    """The complete binary COPY stream for `records` (StoredRecords, or with body="body" verified ChainRecords
    whose bodies are Readings), or None when a value does not fit the fast path (e.g. a NULL or non-bytes
    prev_hash, an integer outside its column's range): the caller then uses psycopg's row-by-row COPY,
    which sends or refuses it exactly as before."""
    get = attrgetter(body)
    try:
        gw = gateway_id.encode()
        parts, ms_of, structs = [COPY_SIGNATURE], {}, _ROW_STRUCTS
        append = parts.append
        for r in records:
            rd = get(r)
            t = rd.taken_at
            ms = ms_of.get(id(t))
            if ms is None:
                ms = ms_of[id(t)] = epoch_ms(t)
            m, o, u, prev = rd.meter_id.encode(), rd.obis.encode(), rd.unit.encode(), r.prev_hash
            if type(prev) is not bytes or type(r.seq) is not int or type(rd.value) is not int:
                return None
            key = (len(gw), len(prev), len(m), len(o), len(u))
            st = structs.get(key)
            if st is None:
                st = structs[key] = struct.Struct(f">hi{key[0]}siqi{key[1]}si{key[2]}si{key[3]}siqiqi{key[4]}siiiq")
            append(st.pack(10, key[0], gw, 8, r.seq, key[1], prev, key[2], m, key[3], o, 8, ms, 8, rd.value,
                           key[4], u, 4, int(rd.quality), 8, received_at_ms))
        append(COPY_TRAILER)
        return b"".join(parts)
    except (struct.error, UnicodeEncodeError, AttributeError, TypeError, OverflowError):
        return None


def copy_columns(gateway_id: str, cols: ReadingColumns, received_at_ms: int, keep: list[int] | None = None) -> bytes | None:
    """`copy_data` for a batch of readings as columns (chain.ReadingColumns), only the rows at indexes `keep`
    (all when None): one struct per (meter, obis, unit), strings encoded once. None when a value does not
    fit (the caller then takes the row-by-row COPY)."""
    try:
        gw = gateway_id.encode()
        shapes = {}
        for k in set(zip(cols.meters, cols.obis, cols.units)):
            m, o, u = (x.encode() for x in k)
            st = _ROW_STRUCTS.get((len(gw), 32, len(m), len(o), len(u)))
            if st is None:
                st = _ROW_STRUCTS[(len(gw), 32, len(m), len(o), len(u))] = struct.Struct(
                    f">hi{len(gw)}siqi32si{len(m)}si{len(o)}siqiqi{len(u)}siiiq")
            shapes[k] = (st.pack, len(m), m, len(o), o, len(u), u)
        rows = zip(zip(cols.meters, cols.obis, cols.units), cols.seqs, cols.prevs, cols.taken_at_ms, cols.values,
                   cols.qualities)
        if keep is not None:
            rows = [r for i, r in enumerate(rows) if i in keep]
        lg = len(gw)
        parts = [COPY_SIGNATURE]
        append = parts.append
        for k, seq, prev, ms, value, quality in rows:
            pack, lm, m, lo, o, lu, u = shapes[k]
            if len(prev) != 32:
                return None
            append(pack(10, lg, gw, 8, seq, 32, prev, lm, m, lo, o, 8, ms, 8, value, lu, u, 4, quality, 8,
                        received_at_ms))
        append(COPY_TRAILER)
        return b"".join(parts)
    except (struct.error, UnicodeEncodeError, TypeError, OverflowError):
        return None


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    return re.sub(r"(password=)[^&\s]*", r"\1***", re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url))


class _Pool:
    """A minimal thread-safe pool: at most `size` connections, created on demand, autocommit."""

    def __init__(self, conninfo: str, size: int, display: str) -> None:
        self._conninfo, self._display = conninfo, display
        self._idle: list[psycopg.Connection] = []
        self._all: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"cannot connect to PostgreSQL database {self._display}: {reason}") from None
        with self._lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        self._slots.acquire()
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed or conn.broken:
                conn = self._connect()
            try:
                yield conn
            finally:
                if conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.close()
                else:
                    with self._lock:
                        self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            conns, self._all, self._idle = self._all, [], []
        for c in conns:
            c.close()


class PostgresReadingRepository:
    """Readings in a PostgreSQL database; safe to share between processes and replicas."""

    dialect = "postgres"

    def __init__(self, url: str, *, migrate: bool = False, clock: Clock | None = None, pool_size: int = 8) -> None:
        self.url, self.display_url = url, redact(url)
        self._clock = clock or SystemClock()
        self._pool = _Pool(url, pool_size, self.display_url)
        self.commit_hooks: list = []     # hook(gateway_id, result) after a commit that stored readings (store.fire_hooks)
        with self._pool.connection():
            pass                      # fail now, with the URL in the message, if the server is unreachable
        if migrate:
            self.migrate()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresReadingRepository:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------------
    @staticmethod
    def _applied(conn: psycopg.Connection) -> dict[int, str]:
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
            return {}
        return dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())

    def pending_migrations(self) -> list[Migration]:
        with self._pool.connection() as conn:
            return plan(load_migrations(self.dialect), self._applied(conn))

    def schema_version(self) -> int:
        with self._pool.connection() as conn:
            return max(self._applied(conn), default=0)

    def migrate(self) -> list[Migration]:
        """Apply every pending migration in one transaction, serialised across replicas by an advisory lock."""
        migrations = load_migrations(self.dialect)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            conn.execute(SCHEMA_MIGRATIONS_DDL)
            todo = plan(migrations, self._applied(conn))
            now_ms = to_ms(self._clock.now())
            for m in todo:
                try:
                    conn.execute(m.sql.encode(), prepare=False)    # whole file: simple query protocol
                except psycopg.Error as exc:
                    raise ConfigError(f"migration {m.label} (postgres) failed: {' '.join(str(exc).split())}") from exc
                conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s, %s)",
                             (m.version, m.name, m.checksum, now_ms))
        return todo

    # -- ingest ---------------------------------------------------------------------------------
    def acked_seq(self, gateway_id: str) -> int:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT acked_seq FROM gateway_sync WHERE gateway_id = %s", (gateway_id,)).fetchone()
        return row[0] if row else 0

    def ingest(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int) -> IngestResult:
        """Commit a batch in one transaction; records already held are counted, not duplicated.

        Lock the gateway row, find which of the batch's seqs are held, COPY (binary) the others
        straight into the table, advance the ack, commit. Plain COPY is safe because every writer
        of a gateway's records holds that gateway's lock; should one not, the primary key still
        refuses the duplicate and the whole batch rolls back (nothing is stored twice).
        """
        return self.ingest_then(gateway_id, records, received_at_ms, None)

    def ingest_then(self, gateway_id: str, records: list[StoredRecord], received_at_ms: int, then) -> IngestResult:
        """`ingest`, and `then(connection)` (if given) inside the same transaction, after the readings
        and the ack, before COMMIT; if it raises, the batch stores nothing. The chain store
        (`PostgresChainStore.commit_with_readings`) writes the batch's hashes and head this way."""
        check_batch(gateway_id, records)
        return self._ingest(gateway_id, records, received_at_ms, then, "reading")

    def ingest_chain_then(self, gateway_id: str, new: list, received_at_ms: int, then) -> IngestResult:
        """`ingest_then` straight from verified chain records (their Reading bodies; events and tombstones
        are the chain store's), without building StoredRecords first: the chain store's one-transaction
        path (`PostgresChainStore.commit_with_readings`). The verifier guarantees the seqs."""
        if type(new) is ReadingColumns:       # readings only, as columns (the usual batch)
            return self._ingest(gateway_id, new, received_at_ms, then, "columns")
        return self._ingest(gateway_id, [r for r in new if type(r.body) is Reading], received_at_ms, then, "body")

    def _ingest(self, gateway_id: str, records: list, received_at_ms: int, then, body: str) -> IngestResult:
        get = attrgetter(body)
        if not records:
            if then is None:
                return IngestResult(self.acked_seq(gateway_id), 0, 0)
            with self._pool.connection() as conn, conn.transaction():
                row = conn.execute("SELECT acked_seq FROM gateway_sync WHERE gateway_id = %s",
                                   (gateway_id,)).fetchone()
                then(conn)
            return IngestResult(row[0] if row else 0, 0, 0)
        cols = records if body == "columns" else None     # chain.ReadingColumns: verified, distinct seqs
        seqs = cols.seqs if cols is not None else [r.seq for r in records]
        with self._pool.connection() as conn, conn.transaction():
            with conn.pipeline():
                lock = conn.execute(LOCK_GATEWAY, (gateway_id,))
                held_cur = conn.execute(HELD_IN_RANGE, (gateway_id, min(seqs), max(seqs)))
            acked = lock.fetchone()[0]
            held = {row[0] for row in held_cur}
            if cols is not None:
                keep = None if not held else [i for i, seq in enumerate(seqs) if seq not in held]
                accepted = len(seqs) if keep is None else len(keep)
                data = copy_columns(gateway_id, cols, received_at_ms, None if keep is None else set(keep))
                get = attrgetter("body")
            else:
                fresh = []
                for r in records:
                    if r.seq not in held:
                        held.add(r.seq)                   # a seq repeated inside the batch goes in once
                        fresh.append(r)
                accepted = len(fresh)
                data = copy_data(gateway_id, fresh, received_at_ms, body)
            cur = conn.cursor()
            with cur.copy(COPY_RECORDS) as copy:
                if data is not None:
                    copy.write(data)                      # the whole batch, pre-encoded, in one buffer
                else:                                     # a value the fast encoder refuses: row by row,
                    copy.set_types(COPY_TYPES)            # psycopg then sends (or rejects) it exactly
                    if cols is not None:
                        fresh = cols.records() if keep is None else [cols.records()[i] for i in keep]
                    for r in fresh:
                        rd = get(r)
                        copy.write_row((gateway_id, r.seq, r.prev_hash, rd.meter_id, rd.obis,
                                        epoch_ms(rd.taken_at), rd.value, rd.unit, int(rd.quality), received_at_ms))
            first, last = seqs[0], seqs[-1]
            if first <= acked + 1 <= last and last - first + 1 == len(seqs) and seqs == list(range(first, last + 1)):
                # every seq of the batch is held now and they run on from the ack: no need to count them
                cur.execute("UPDATE gateway_sync SET acked_seq = %s WHERE gateway_id = %s", (last, gateway_id))
                acked = last
            while True:
                new = cur.execute(ADVANCE_ACK, (ACK_WINDOW, gateway_id)).fetchone()[0]
                if new - acked < ACK_WINDOW:
                    break
                acked = new
            if then is not None:
                then(conn)
        result = IngestResult(new, accepted, len(records) - accepted)
        if accepted and self.commit_hooks:
            fire_hooks(self.commit_hooks, gateway_id, result)
        return result

    def gaps(self, gateway_id: str) -> list[tuple[int, int]]:
        """Missing seq ranges [first, last] between the ack and the highest seq held."""
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute("SELECT acked_seq FROM gateway_sync WHERE gateway_id = %s", (gateway_id,)).fetchone()
            acked = row[0] if row else 0
            islands = conn.execute(ISLANDS, (gateway_id, acked)).fetchall()
        return gaps_from_islands(acked, islands)

    # -- queries --------------------------------------------------------------------------------
    def readings(self, meter_id: str, obis: str | None = None, *, start: datetime | None = None,
                 end: datetime | None = None) -> list[Reading]:
        sql = "SELECT meter_id, obis, taken_at_ms, value, unit, quality FROM gateway_record WHERE meter_id = %s"
        args: list = [meter_id]
        if obis:
            sql += " AND obis = %s"
            args.append(obis)
        if start is not None:
            sql += " AND taken_at_ms >= %s"
            args.append(to_ms(start))
        if end is not None:
            sql += " AND taken_at_ms < %s"
            args.append(to_ms(end))
        sql += ' ORDER BY taken_at_ms, obis COLLATE "C", gateway_id COLLATE "C", seq'
        with self._pool.connection() as conn:
            rows = conn.execute(sql, args).fetchall()
        return readings_from_rows(rows)

    def meters(self) -> list[str]:
        with self._pool.connection() as conn:
            return [r[0] for r in conn.execute('SELECT DISTINCT meter_id COLLATE "C" FROM gateway_record ORDER BY 1')]
