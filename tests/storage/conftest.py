"""Fixtures for the storage contract suite: one `repo_url` fixture parametrised over SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: pgserver
sys.path.insert(0, str(Path(__file__).resolve().parent))         # tests/storage: storage_records
from pgserver import PG_UNAVAILABLE, fresh_schema_url  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:
    if request.param == "postgres" and PG_UNAVAILABLE:
        pytest.skip(PG_UNAVAILABLE)
    return request.param


@pytest.fixture
def repo_url(backend, tmp_path) -> str:
    """URL of an EMPTY database of the parametrised backend (PostgreSQL: a fresh schema); for migration tests."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'headend.db'}"
    return fresh_schema_url()


_migrated_pg: dict[str, str] = {}


@pytest.fixture
def db_url(backend, tmp_path) -> str:
    """URL of a migrated database with no data in it. PostgreSQL: one schema migrated per session and
    emptied before each test, since migrating a fresh schema costs ~1 s of DDL."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'headend.db'}"
    import psycopg

    from meterlink.headend.store import open_repository

    if "url" not in _migrated_pg:
        url = fresh_schema_url()
        open_repository(url, migrate=True).close()
        _migrated_pg["url"] = url
    url = _migrated_pg["url"]
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("DELETE FROM gateway_record")       # the tables of the reading contract
        conn.execute("DELETE FROM gateway_sync")
    return url


@pytest.fixture
def repo(db_url):
    """An open repository on `db_url` (migrated, empty)."""
    from meterlink.headend.store import open_repository

    r = open_repository(db_url, migrate=True)
    yield r
    r.close()
