"""Database URLs (good ones open the right backend, bad ones say what is wrong) and `meterlink-headend migrate`."""

from __future__ import annotations

import pytest

from meterlink.errors import ConfigError
from meterlink.headend.cli import main
from meterlink.headend.migrations import load_migrations
from meterlink.headend.store import open_repository


@pytest.mark.parametrize("url, problem", [
    ("", "database URL is empty"),
    ("mysql://root@localhost/meters", "unsupported scheme 'mysql'"),
    ("sqlite://var/headend.db", "three slashes"),
    ("postgresql://postgres@127.0.0.1:5432", "no database name"),
    ("postgresql://postgres@127.0.0.1:1/meterlink", r"cannot connect to PostgreSQL database postgresql://postgres@127\.0\.0\.1:1/meterlink"),
    ("postgresql://postgres:s3cret@127.0.0.1:1/meterlink", r"postgres:\*\*\*@127\.0\.0\.1:1"),
    ("postgresql://postgres@127.0.0.1:1/meterlink?password=s3cret", r"password=\*\*\*"),
])
def test_bad_database_url_is_refused_naming_the_problem(url, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        open_repository(url)
    assert "s3cret" not in str(err.value)


def test_sqlite_urls_and_bare_paths_open_the_same_file(tmp_path):
    path = tmp_path / "sub" / "headend.db"
    for url in (f"sqlite:///{path}", str(path), path):
        repo = open_repository(url)
        assert repo.dialect == "sqlite" and repo.path == str(path)
        repo.close()
    mem = open_repository("sqlite://")
    assert mem.path == ":memory:" and mem.schema_version() == len(load_migrations("sqlite"))
    mem.close()


def test_migrate_command_applies_then_reports_up_to_date(repo_url, backend, capsys):
    assert main(["migrate", "--database", repo_url, "--check"]) == 1
    assert "pending 0001_readings" in capsys.readouterr().out
    assert main(["migrate", "--database", repo_url]) == 0
    out = capsys.readouterr().out
    assert "applied 0001_readings" in out and f"schema version {len(load_migrations(backend))}" in out
    assert main(["migrate", "--database", repo_url]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert main(["migrate", "--database", repo_url, "--check"]) == 0


def test_migrate_command_with_a_bad_url_exits_2_with_the_reason(capsys):
    assert main(["migrate", "--database", "oracle://db/x"]) == 2
    assert "unsupported scheme 'oracle'" in capsys.readouterr().err


def test_both_repositories_implement_the_contract_with_the_same_signatures():
    import inspect

    from meterlink.headend.repo_postgres import PostgresReadingRepository
    from meterlink.headend.repo_sqlite import SqliteReadingRepository
    from meterlink.headend.store import ReadingRepository

    contract = {n for n, f in vars(ReadingRepository).items() if callable(f) and not n.startswith("_")}
    assert {"ingest", "acked_seq", "gaps", "readings", "meters", "migrate", "close"} <= contract
    for cls in (SqliteReadingRepository, PostgresReadingRepository):
        assert {n: str(inspect.signature(getattr(cls, n))) for n in contract} == \
               {n: str(inspect.signature(getattr(ReadingRepository, n))) for n in contract}, cls.__name__
