"""Versioned schema migrations on both backends: fresh, re-run, altered, newer, failed, concurrent, adopted."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from storage_records import batch

from meterlink.headend import migrations as mig
from meterlink.headend.migrations import Migration, SchemaError, load_migrations, split_statements
from meterlink.headend.store import open_repository

DIALECT = {"sqlite": "sqlite", "postgres": "postgres"}


def _set_checksum(repo, backend: str, sql: str, args: tuple) -> None:
    if backend == "sqlite":
        repo._db.execute(sql.replace("%s", "?"), args)
    else:
        with repo._pool.connection() as conn:
            conn.execute(sql, args)


def test_fresh_database_is_brought_to_the_latest_version_in_one_go(repo_url, backend):
    repo = open_repository(repo_url, migrate=False)
    try:
        assert repo.schema_version() == 0
        applied = repo.migrate()
        latest = len(load_migrations(DIALECT[backend]))
        assert [m.version for m in applied] == list(range(1, latest + 1))
        assert repo.schema_version() == latest and repo.pending_migrations() == []
        assert repo.ingest("gw-1", batch("gw-1", 1, 3), 1).acked_seq == 3      # the schema works
    finally:
        repo.close()


@pytest.fixture
def fresh(repo_url):
    """A repository migrated from empty in this test (tests here edit schema_migrations)."""
    r = open_repository(repo_url, migrate=True)
    yield r
    r.close()


def test_re_running_migrate_is_a_no_op(fresh):
    repo = fresh
    version = repo.schema_version()
    assert repo.migrate() == []
    assert repo.migrate() == []
    assert repo.schema_version() == version


def test_migration_altered_after_it_was_applied_is_refused_naming_it(fresh, repo_url, backend):
    repo = fresh
    _set_checksum(repo, backend, "UPDATE schema_migrations SET checksum = %s WHERE version = %s", ("0123456789abcdef", 1))
    with pytest.raises(SchemaError, match=r"migration 0001_readings \(\w+\) was changed after it was applied"):
        open_repository(repo_url)
    with pytest.raises(SchemaError, match="0001_readings"):
        repo.migrate()


def test_database_newer_than_this_build_is_refused(fresh, repo_url, backend):
    repo = fresh
    _set_checksum(repo, backend, "INSERT INTO schema_migrations VALUES (%s, %s, %s, %s)", (999, "future", "x", 0))
    with pytest.raises(SchemaError, match="schema version 999 is newer than this build"):
        open_repository(repo_url)


def test_failing_migration_leaves_the_previous_version_intact(repo_url, backend, monkeypatch):
    real = load_migrations(DIALECT[backend])
    broken = Migration(len(real) + 1, "broken", DIALECT[backend],
                       "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);\n")
    repo = open_repository(repo_url, migrate=True)
    try:
        module = f"meterlink.headend.repo_{'sqlite' if backend == 'sqlite' else 'postgres'}"
        monkeypatch.setattr(f"{module}.load_migrations", lambda dialect: real + [broken])
        with pytest.raises(Exception, match="no_such_table"):
            repo.migrate()
        assert repo.schema_version() == len(real)
        monkeypatch.undo()
        assert repo.pending_migrations() == []
        with pytest.raises(Exception):                     # half_done was rolled back with the rest
            _select(repo, backend, "SELECT * FROM half_done")
    finally:
        repo.close()


def _select(repo, backend, sql):
    if backend == "sqlite":
        return repo._db.execute(sql).fetchall()
    with repo._pool.connection() as conn:
        return conn.execute(sql).fetchall()


def test_replicas_migrating_at_the_same_moment_apply_each_migration_once(repo_url, backend):
    barrier, applied, errors = threading.Barrier(3), [], []

    def run():
        try:
            r = open_repository(repo_url, migrate=False)
            barrier.wait()
            applied.append([m.version for m in r.migrate()])
            r.close()
        except Exception as exc:          # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    latest = len(load_migrations(DIALECT[backend]))
    assert sorted(applied, key=len) == [[], [], list(range(1, latest + 1))]


def test_postgres_database_with_pending_migrations_is_refused_until_migrate_runs(backend, repo_url):
    if backend != "postgres":
        pytest.skip("SQLite, the embedded default, applies pending migrations when opened")
    with pytest.raises(SchemaError, match="pending schema migration.*run: meterlink-headend migrate --database"):
        open_repository(repo_url)
    open_repository(repo_url, migrate=True).close()
    open_repository(repo_url).close()


def test_sqlite_database_of_the_walking_skeleton_is_adopted_with_its_readings(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE gateway_record (gateway_id TEXT NOT NULL, seq INTEGER NOT NULL, prev_hash BLOB NOT NULL,
            meter_id TEXT NOT NULL, obis TEXT NOT NULL, taken_at_ms INTEGER NOT NULL, value INTEGER NOT NULL,
            unit TEXT NOT NULL, quality INTEGER NOT NULL, received_at_ms INTEGER NOT NULL,
            PRIMARY KEY (gateway_id, seq)) WITHOUT ROWID;
        CREATE TABLE gateway_sync (gateway_id TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL);
        INSERT INTO gateway_record VALUES ('gw-1', 1, x'00', 'MTR-0001', '1.8.0', 0, 42, 'Wh', 0, 0);
        INSERT INTO gateway_sync VALUES ('gw-1', 1);
    """)
    db.commit()
    db.close()
    repo = open_repository(path)
    try:
        assert repo.schema_version() == len(load_migrations("sqlite"))
        assert [r.value for r in repo.readings("MTR-0001")] == [42] and repo.acked_seq("gw-1") == 1
    finally:
        repo.close()


def test_both_dialects_have_the_same_migrations():
    assert [m.label for m in load_migrations("sqlite")] == [m.label for m in load_migrations("postgres")]


def test_statement_splitter_respects_strings_and_comments():
    sql = ("-- a comment; with a semicolon\nCREATE TABLE a (x TEXT DEFAULT 'a;b');  -- trailing; comment\n"
           "INSERT INTO a VALUES ('line;\nbreak');\n/* block; */\n")
    stmts = split_statements(sql)
    assert stmts == ["-- a comment; with a semicolon\nCREATE TABLE a (x TEXT DEFAULT 'a;b');  -- trailing; comment",
                     "INSERT INTO a VALUES ('line;\nbreak');"]
    db = sqlite3.connect(":memory:")
    for s in stmts:
        db.execute(s)
    assert db.execute("SELECT x FROM a").fetchall() == [("line;\nbreak",)]


def test_migration_files_misnumbered_are_refused(monkeypatch, tmp_path):
    class Entry:
        def __init__(self, name):
            self.name = name

        def read_text(self, encoding):
            return "SELECT 1;"

    class Dir:
        def joinpath(self, _):
            return self

        def iterdir(self):
            return [Entry("0001_a.sqlite.sql"), Entry("0003_c.sqlite.sql")]

    monkeypatch.setattr(mig.resources, "files", lambda _pkg: Dir())
    with pytest.raises(SchemaError, match=r"not numbered 1..N without gaps: \[1, 3\]"):
        load_migrations("sqlite")
