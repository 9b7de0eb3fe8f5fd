"""Fixtures for the PAYG store tests: `payg_url` and `store` parametrised over SQLite and PostgreSQL (the server
on 127.0.0.1:5432 or a private one, an empty schema per test: tests/pgserver.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: pgserver
from pgserver import PG_UNAVAILABLE, fresh_schema_url  # noqa: E402

from meterlink.headend import payg_store as S  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def payg_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/headend.db"
    if PG_UNAVAILABLE:
        pytest.skip(PG_UNAVAILABLE)
    return fresh_schema_url()


@pytest.fixture
def store(payg_url):
    st = S.PaygStore(payg_url)
    yield st
    st.close()
