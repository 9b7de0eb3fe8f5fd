"""Test helpers for the PAYG store's concurrency: hold its write transaction from another thread,
or make its next COMMIT fail (importable from any test directory: tests/ is put on sys.path by
the conftest files that need it)."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager


@contextmanager
def store_held(store):
    """Another thread holds `store.transaction()` open for the `with` block: writers queue behind it."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with store.transaction():
            held.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    try:
        yield
    finally:
        release.set()
        holder.join(5)


@contextmanager
def failing_commit(store):
    """The store's connection for the `with` block, except that its next COMMIT fails (as on a full disk)."""
    real = store._db

    class FailingCommit:
        postgres = real.postgres
        armed = True

        def execute(self, sql, params=()):
            if sql == "COMMIT" and FailingCommit.armed:
                FailingCommit.armed = False
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, params)

        def executemany(self, sql, rows):
            return real.executemany(sql, rows)

    store._db = FailingCommit()
    try:
        yield
    finally:
        store._db = real
