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
    """URL of an empty database of the parametrised backend (PostgreSQL: a fresh schema)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'headend.db'}"
    return fresh_schema_url()


@pytest.fixture
def repo(repo_url):
    from meterlink.headend.store import open_repository

    r = open_repository(repo_url, migrate=True)
    yield r
    r.close()
