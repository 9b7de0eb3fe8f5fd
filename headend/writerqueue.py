"""The SQLite writers' queue: an flock of ``<database>-writers.lock`` that serve's ingest and the rating process take around each write transaction; never the lock that keeps data correct (SQLite's write lock stays that).

Why: SQLite's busy handler polls a held write lock, sleeping 1, 2, 5, 10, 15, 20, 25 ... 100 ms between tries,
so two processes that both write often (serve's ingest commits and its rating process's short write
transactions) wait for each other longer than the other holds the lock. A writer waiting here looks again
every half millisecond, so it starts within about that of the holder's COMMIT or ROLLBACK. Writers that do
not queue here (other tools, the PAYG store with its own queue) still meet SQLite's lock and its busy
handler, as before. The flock is taken before BEGIN IMMEDIATE and never while holding SQLite's lock, and a
writer that has waited `timeout_s` (the connection's busy timeout) goes on without it, to SQLite's lock and
its busy timeout: a stuck holder makes a write fail as it did before, it never hangs it.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from typing import Iterator

POLL_S = 0.0005          # a waiting writer looks again this often


class WriterQueue:
    """The queue of one database file; one per connection (an flock belongs to its open file)."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}-writers.lock"
        self._f = open(self.path, "a+b")      # noqa: SIM115 - held for the connection's life

    @contextmanager
    def turn(self, timeout_s: float = 30.0) -> Iterator[None]:
        """Wait for this writer's turn (at most `timeout_s`) and hold it for the block: BEGIN IMMEDIATE ... COMMIT."""
        held = self._take(timeout_s)
        try:
            yield
        finally:
            if held:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)

    def _take(self, timeout_s: float) -> bool:
        fd, deadline = self._f.fileno(), None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                deadline = deadline or now + timeout_s
                if now >= deadline:
                    return False
                time.sleep(POLL_S)

    def close(self) -> None:
        self._f.close()


def writer_queue(db_path: str) -> WriterQueue | None:
    """The queue beside the SQLite file `db_path`; None for an in-memory database (one connection, no peers)."""
    if not db_path or db_path == ":memory:" or db_path.startswith("file:"):
        return None
    return WriterQueue(db_path)
