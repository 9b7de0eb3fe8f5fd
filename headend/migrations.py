"""Versioned schema migrations for the head-end database (files in headend/sql); never holds business rules or edits applied history.

A migration is the file ``sql/NNNN_name.<dialect>.sql`` (dialect ``sqlite`` or ``postgres``); the
two dialects share version numbers and names, so both databases always have the same schema version.
Applied versions are recorded in ``schema_migrations`` (version, name, checksum, applied_at_ms).

Rules the runners in `repo_sqlite` / `repo_postgres` follow:
  * all pending migrations are applied in one transaction (SQLite and PostgreSQL both have
    transactional DDL), so a failed migration leaves the previous version intact;
  * concurrent runners (several head-end replicas starting at once) are serialised: SQLite by
    ``BEGIN IMMEDIATE``, PostgreSQL by a transaction-scoped advisory lock (`ADVISORY_LOCK_KEY`);
  * a migration whose file changed after it was applied (checksum differs) and a database newer
    than this build are refused with `SchemaError`, naming the version.

This module is pure: it reads the packaged SQL files and decides; the repositories execute.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

from meterlink.errors import MeterlinkError

DIALECTS = ("sqlite", "postgres")
# pg_advisory_xact_lock key taken while migrating (a fixed signed 63-bit number).
ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"meterlink.headend.migrate").digest()[:8], "big") >> 1

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sqlite|postgres)\.sql$")

SCHEMA_MIGRATIONS_DDL = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                         "name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)")


class SchemaError(MeterlinkError):
    """The database schema cannot be brought to this build's version (the message names the version)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    dialect: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        """SHA-256 (hex, first 16 digits) of the file's exact text: any edit after applying is detected."""
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        return split_statements(self.sql)


def split_statements(sql: str) -> list[str]:
    """Split a SQL script into complete statements (string literals and comments are respected).

    Uses SQLite's own tokenizer test (`sqlite3.complete_statement`), which understands quotes and
    ``--``/``/* */`` comments; statements that are only comments are dropped.
    """
    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            stmt = buf.strip()
            if _has_code(stmt):
                out.append(stmt)
            buf = ""
    if _has_code(buf):
        out.append(buf.strip())
    return out


def _has_code(text: str) -> bool:
    body = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return any(line.split("--", 1)[0].strip(" \t;") for line in body.splitlines())


def load_migrations(dialect: str) -> list[Migration]:
    """Every migration of `dialect`, ascending by version; checks numbering is 1..N without gaps."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r} (known: {', '.join(DIALECTS)})")
    found: dict[int, Migration] = {}
    for entry in resources.files("meterlink.headend").joinpath("sql").iterdir():
        m = _NAME.match(entry.name)
        if not m or m.group(3) != dialect:
            continue
        version = int(m.group(1))
        if version in found:
            raise SchemaError(f"two {dialect} migrations numbered {version:04d}: {found[version].name}, {m.group(2)}")
        found[version] = Migration(version, m.group(2), dialect, entry.read_text(encoding="utf-8"))
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"{dialect} migrations in headend/sql are not numbered 1..N without gaps: {versions}")
    return [found[v] for v in versions]


def latest_version(dialect: str = "sqlite") -> int:
    return len(load_migrations(dialect))


def plan(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    """The migrations still to apply, given {version: checksum} already recorded in the database.

    Raises `SchemaError` if the database is newer than this build or an applied file was changed.
    """
    known = {m.version: m for m in migrations}
    newer = sorted(v for v in applied if v not in known)
    if newer:
        raise SchemaError(f"database schema version {max(applied)} is newer than this build "
                          f"(which knows up to {len(migrations)}); upgrade meterlink before using this database")
    for version, checksum in sorted(applied.items()):
        m = known[version]
        if checksum != m.checksum:
            raise SchemaError(f"migration {m.label} ({m.dialect}) was changed after it was applied "
                              f"(checksum {checksum} in the database, {m.checksum} in the file); "
                              f"add a new migration instead of editing an applied one")
    return [m for m in migrations if m.version not in applied]


def migrate(url: str) -> list[Migration]:
    """Bring the database at `url` to this build's schema version; returns the migrations applied."""
    from .store import open_repository

    repo = open_repository(url, migrate=False)
    try:
        return repo.migrate()
    finally:
        repo.close()
