"""The head-end's gateway registry: enrolment codes (hashed), certificates, revocation, meters provisioned to each gateway, and the configuration change log; SQL only, no key material.

Tables (created if missing, in the head-end's own database; SQLite or PostgreSQL):
  * ``pki_gateway``: one row per gateway name: the SHA-256 of its one-time enrolment code, when
    the code expires and when it was used, the serial of the current client certificate, the
    gateway's Ed25519 record-signing public key, and when it was revoked.
  * ``pki_gateway_meter``: meter id -> the one gateway it is provisioned to.
  * ``pki_config_change``: the configuration change log; ``version`` is one global ascending
    number, ``target`` is a gateway name or ``*`` (every gateway). Config pull serves from it.

The plain enrolment code is returned once by `add` / `new_code` and never stored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from meterlink.clock import from_ms, to_ms
from meterlink.errors import ConfigError, ValidationError

CODE_TTL = timedelta(hours=24)
_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"   # no 0/O, 1/I: read aloud or typed by a field engineer
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class RegistryError(ValidationError):
    """An operator or enrolment action the registry refuses (the message names the gateway or meter)."""


class EnrolmentRefused(RegistryError):
    """An enrolment code that is unknown, already used or expired."""


@dataclass(frozen=True)
class GatewayRecord:
    name: str
    created_at: datetime
    code_expires_at: datetime | None
    code_used_at: datetime | None
    enrolled_at: datetime | None
    cert_serial: str | None          # hex, of the current client certificate
    signing_public_key: bytes | None  # Ed25519, 32 raw bytes
    revoked_at: datetime | None
    meters: tuple[str, ...] = ()

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def status(self) -> str:
        if self.revoked:
            return "revoked"
        return "enrolled" if self.cert_serial else "awaiting enrolment"


@dataclass(frozen=True)
class ConfigChange:
    version: int
    target: str
    kind: str
    body: dict


def normalise_code(code: str) -> str:
    return "".join(c for c in code.upper() if c.isalnum())


def hash_code(code: str) -> str:
    return hashlib.sha256(normalise_code(code).encode()).hexdigest()


def new_code() -> str:
    """A fresh one-time code: 20 characters (100 bits) in groups of four, e.g. 'K7QM-2XWD-...'."""
    raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(20))
    return "-".join(raw[i:i + 4] for i in range(0, 20, 4))


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= _NAME_OK:
        raise RegistryError(f"gateway name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
    return name


_DDL = {
    "sqlite": [
        """CREATE TABLE IF NOT EXISTS pki_gateway (
            name TEXT PRIMARY KEY, created_at_ms INTEGER NOT NULL, code_hash TEXT, code_expires_at_ms INTEGER,
            code_used_at_ms INTEGER, enrolled_at_ms INTEGER, cert_serial TEXT, signing_public_key BLOB,
            revoked_at_ms INTEGER)""",
        "CREATE UNIQUE INDEX IF NOT EXISTS pki_gateway_code ON pki_gateway (code_hash)",
        """CREATE TABLE IF NOT EXISTS pki_gateway_meter (
            meter_id TEXT PRIMARY KEY, gateway TEXT NOT NULL REFERENCES pki_gateway (name))""",
        """CREATE TABLE IF NOT EXISTS pki_config_change (
            version INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, kind TEXT NOT NULL,
            body TEXT NOT NULL, created_at_ms INTEGER NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS pki_config_change_target ON pki_config_change (target, version)",
    ],
    "postgres": [
        """CREATE TABLE IF NOT EXISTS pki_gateway (
            name TEXT PRIMARY KEY, created_at_ms BIGINT NOT NULL, code_hash TEXT, code_expires_at_ms BIGINT,
            code_used_at_ms BIGINT, enrolled_at_ms BIGINT, cert_serial TEXT, signing_public_key BYTEA,
            revoked_at_ms BIGINT)""",
        "CREATE UNIQUE INDEX IF NOT EXISTS pki_gateway_code ON pki_gateway (code_hash)",
        """CREATE TABLE IF NOT EXISTS pki_gateway_meter (
            meter_id TEXT PRIMARY KEY, gateway TEXT NOT NULL REFERENCES pki_gateway (name))""",
        """CREATE TABLE IF NOT EXISTS pki_config_change (
            version BIGSERIAL PRIMARY KEY, target TEXT NOT NULL, kind TEXT NOT NULL,
            body TEXT NOT NULL, created_at_ms BIGINT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS pki_config_change_target ON pki_config_change (target, version)",
    ],
}

_COLS = ("name, created_at_ms, code_expires_at_ms, code_used_at_ms, enrolled_at_ms, cert_serial, "
         "signing_public_key, revoked_at_ms")


def _ms(v):
    return None if v is None else from_ms(v)


class GatewayRegistry:
    """The registry over one database connection (thread-safe by one lock; calls are short)."""

    def __init__(self, conn, dialect: str, url: str) -> None:
        self._conn, self.dialect, self.url = conn, dialect, url
        self._lock = threading.RLock()
        with self._tx() as cur:
            for stmt in _DDL[dialect]:
                cur.execute(stmt)

    # --------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        self._conn.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    class _Tx:
        def __init__(self, reg: "GatewayRegistry") -> None:
            self.reg = reg

        def __enter__(self):
            self.reg._lock.acquire()
            if self.reg.dialect == "sqlite":
                self.reg._conn.execute("BEGIN IMMEDIATE")
            self.cur = self.reg._conn.cursor()
            return self

        def execute(self, sql: str, params=()):
            self.cur.execute(self.reg._sql(sql), params)
            return self.cur

        def __exit__(self, exc_type, exc, tb):
            try:
                if exc_type is None:
                    self.reg._conn.commit()
                else:
                    self.reg._conn.rollback()
            finally:
                self.reg._lock.release()
            return False

    def _tx(self) -> "_Tx":
        return GatewayRegistry._Tx(self)

    # --------------------------------------------------------------------------- gateways
    def add(self, name: str, now: datetime, ttl: timedelta = CODE_TTL) -> str:
        """Register a new gateway; returns its one-time enrolment code (shown once, stored hashed)."""
        check_name(name)
        code = new_code()
        with self._tx() as tx:
            if tx.execute("SELECT 1 FROM pki_gateway WHERE name = ?", (name,)).fetchone():
                raise RegistryError(f"gateway {name} is already registered (a new code for re-enrolment: "
                                    f"gateways code {name})")
            tx.execute("INSERT INTO pki_gateway (name, created_at_ms, code_hash, code_expires_at_ms) "
                       "VALUES (?, ?, ?, ?)", (name, to_ms(now), hash_code(code), to_ms(now + ttl)))
        return code

    def new_code(self, name: str, now: datetime, ttl: timedelta = CODE_TTL) -> str:
        """A fresh one-time code for an existing, unrevoked gateway (replaced hardware, lost key)."""
        code = new_code()
        with self._tx() as tx:
            row = tx.execute("SELECT revoked_at_ms FROM pki_gateway WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise RegistryError(f"gateway {name} is not registered")
            if row[0] is not None:
                raise RegistryError(f"gateway {name} is revoked; register the replacement under a new name")
            tx.execute("UPDATE pki_gateway SET code_hash = ?, code_expires_at_ms = ?, code_used_at_ms = NULL "
                       "WHERE name = ?", (hash_code(code), to_ms(now + ttl), name))
        return code

    def enrol(self, code: str, now: datetime, issue: Callable[[str], tuple[str, bytes, object]]) -> tuple[str, object]:
        """Consume `code` and record the certificate `issue(name)` makes -> (name, whatever issue returned).

        `issue(name)` returns ``(cert_serial_hex, signing_public_key, result)``; the code is marked
        used only if it succeeds, all in one transaction, so two racing calls cannot both win.
        """
        digest = hash_code(code)
        with self._tx() as tx:
            lock = " FOR UPDATE" if self.dialect == "postgres" else ""   # SQLite: BEGIN IMMEDIATE already
            row = tx.execute("SELECT name, code_expires_at_ms, code_used_at_ms, revoked_at_ms FROM pki_gateway "
                             "WHERE code_hash = ?" + lock, (digest,)).fetchone()
            if row is None:
                raise EnrolmentRefused("enrolment code is not known (check it, or ask for a new one)")
            name, expires, used, revoked = row
            if revoked is not None:
                raise EnrolmentRefused(f"gateway {name} is revoked")
            if used is not None:
                raise EnrolmentRefused(f"enrolment code for gateway {name} was already used at "
                                       f"{from_ms(used).isoformat()}")
            if to_ms(now) > expires:
                raise EnrolmentRefused(f"enrolment code for gateway {name} expired at {from_ms(expires).isoformat()}")
            serial, signing_pub, result = issue(name)
            tx.execute("UPDATE pki_gateway SET code_used_at_ms = ?, enrolled_at_ms = ?, cert_serial = ?, "
                       "signing_public_key = ? WHERE name = ?",
                       (to_ms(now), to_ms(now), serial, signing_pub, name))
        return name, result

    def revoke(self, name: str, now: datetime) -> None:
        with self._tx() as tx:
            row = tx.execute("SELECT revoked_at_ms FROM pki_gateway WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise RegistryError(f"gateway {name} is not registered")
            if row[0] is None:
                tx.execute("UPDATE pki_gateway SET revoked_at_ms = ?, code_hash = NULL WHERE name = ?",
                           (to_ms(now), name))

    def get(self, name: str) -> GatewayRecord | None:
        with self._tx() as tx:
            row = tx.execute(f"SELECT {_COLS} FROM pki_gateway WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            meters = [r[0] for r in tx.execute("SELECT meter_id FROM pki_gateway_meter WHERE gateway = ? "
                                               "ORDER BY meter_id", (name,)).fetchall()]
        return self._record(row, meters)

    def access_record(self, name: str, meter_ids: list[str]) -> GatewayRecord | None:
        """`get` for a per-call access check (`gatewayauth.authorise`): a plain read that takes no
        write lock (unlike `get`'s BEGIN IMMEDIATE), and whose `meters` are only those of
        `meter_ids` provisioned to the gateway (not all of them). Two reads without a write lock, each
        of the latest committed state."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                row = cur.execute(self._sql(f"SELECT {_COLS} FROM pki_gateway WHERE name = ?"), (name,)).fetchone()
                meters: list[str] = []
                if row is not None and meter_ids:
                    marks = ", ".join("?" * len(meter_ids))
                    meters = [r[0] for r in cur.execute(self._sql(
                        f"SELECT meter_id FROM pki_gateway_meter WHERE gateway = ? AND meter_id IN ({marks})"),
                        (name, *meter_ids)).fetchall()]
            finally:
                self._conn.commit()
        return None if row is None else self._record(row, meters)

    def list(self) -> list[GatewayRecord]:
        with self._tx() as tx:
            rows = tx.execute(f"SELECT {_COLS} FROM pki_gateway ORDER BY name").fetchall()
            meters: dict[str, list[str]] = {}
            for m, g in tx.execute("SELECT meter_id, gateway FROM pki_gateway_meter ORDER BY meter_id").fetchall():
                meters.setdefault(g, []).append(m)
        return [self._record(r, meters.get(r[0], [])) for r in rows]

    @staticmethod
    def _record(row, meters) -> GatewayRecord:
        name, created, expires, used, enrolled, serial, signing, revoked = row
        return GatewayRecord(name, from_ms(created), _ms(expires), _ms(used), _ms(enrolled), serial,
                             bytes(signing) if signing is not None else None, _ms(revoked), tuple(meters))

    def signing_public_key(self, name: str) -> bytes | None:
        """The Ed25519 key gateway `name` enrolled with (for verifying its signed chain heads)."""
        rec = self.get(name)
        return rec.signing_public_key if rec else None

    # --------------------------------------------------------------------------- meters
    def provision(self, name: str, add: list[str], remove: list[str], now: datetime) -> tuple[str, ...]:
        """Provision meters to / withdraw them from a gateway; each change enters the config log.

        A meter belongs to at most one gateway: adding a meter held by another gateway is refused
        (withdraw it there first). Returns the gateway's meters afterwards.
        """
        with self._tx() as tx:
            if tx.execute("SELECT 1 FROM pki_gateway WHERE name = ?", (name,)).fetchone() is None:
                raise RegistryError(f"gateway {name} is not registered")
            for meter in add:
                if not meter:
                    raise RegistryError(f"gateway {name}: empty meter id")
                row = tx.execute("SELECT gateway FROM pki_gateway_meter WHERE meter_id = ?", (meter,)).fetchone()
                if row is not None and row[0] != name:
                    raise RegistryError(f"meter {meter} is provisioned to gateway {row[0]}; remove it there first")
                if row is None:
                    tx.execute("INSERT INTO pki_gateway_meter (meter_id, gateway) VALUES (?, ?)", (meter, name))
                    self._log(tx, name, "meter.add", {"meter": meter}, now)
            for meter in remove:
                row = tx.execute("SELECT gateway FROM pki_gateway_meter WHERE meter_id = ?", (meter,)).fetchone()
                if row is None or row[0] != name:
                    raise RegistryError(f"meter {meter} is not provisioned to gateway {name}")
                tx.execute("DELETE FROM pki_gateway_meter WHERE meter_id = ?", (meter,))
                self._log(tx, name, "meter.remove", {"meter": meter}, now)
            return tuple(r[0] for r in tx.execute("SELECT meter_id FROM pki_gateway_meter WHERE gateway = ? "
                                                  "ORDER BY meter_id", (name,)).fetchall())

    def meters_of(self, name: str) -> frozenset[str]:
        with self._tx() as tx:
            return frozenset(r[0] for r in tx.execute("SELECT meter_id FROM pki_gateway_meter WHERE gateway = ?",
                                                      (name,)).fetchall())

    # --------------------------------------------------------------------------- config log
    def _log(self, tx, target: str, kind: str, body: dict, now: datetime) -> None:
        tx.execute("INSERT INTO pki_config_change (target, kind, body, created_at_ms) VALUES (?, ?, ?, ?)",
                   (target, kind, json.dumps(body, sort_keys=True, separators=(",", ":")), to_ms(now)))

    def publish(self, target: str, kind: str, body: dict, now: datetime) -> int:
        """Append a configuration change for gateway `target` (or '*': all) -> its version."""
        with self._tx() as tx:
            if target != "*" and tx.execute("SELECT 1 FROM pki_gateway WHERE name = ?",
                                            (target,)).fetchone() is None:
                raise RegistryError(f"gateway {target} is not registered")
            self._log(tx, target, kind, body, now)
            return int(tx.execute("SELECT MAX(version) FROM pki_config_change").fetchone()[0])

    def changes_since(self, name: str, since: int) -> tuple[int, list[ConfigChange]]:
        """(latest version of the whole log, changes for `name` or '*' with version > since, ascending)."""
        with self._tx() as tx:
            latest = tx.execute("SELECT COALESCE(MAX(version), 0) FROM pki_config_change").fetchone()[0]
            rows = tx.execute("SELECT version, target, kind, body FROM pki_config_change "
                              "WHERE version > ? AND (target = ? OR target = '*') ORDER BY version",
                              (since, name)).fetchall()
        return int(latest), [ConfigChange(int(v), t, k, json.loads(b)) for v, t, k, b in rows]


def open_registry(url: str | Path) -> GatewayRegistry:
    """Open the registry in the head-end database named by `url` (sqlite:///PATH, a path, or postgresql://...)."""
    url = str(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        import psycopg
        if not urlsplit(url).path.strip("/"):
            raise ConfigError(f"database URL {url!r}: no database name")
        return GatewayRegistry(psycopg.connect(url), "postgres", url)
    from .store import sqlite_path
    path = sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    if path != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return GatewayRegistry(conn, "sqlite", url)
