"""Rating as readings arrive: a background thread of `meterlink-headend serve` that runs the incremental `process` (billing_store.process_readings) after commits; never blocks a push's ack and holds no rules.

How it runs:
  * the repository calls `RatingWorker.notify` after every commit that stored readings
    (``repo.commit_hooks``); notify only sets a flag, so the ack to the gateway never waits for rating;
  * the worker thread wakes on that flag (or every `poll_s` seconds, for readings another process
    stored: file imports, another replica's pushes it did not rate yet), clears it and runs ONE
    incremental `process` over everything not yet rated. Commits that land during a run set the flag
    again, so a burst of pushes costs one run per run-time, not one run per push (coalescing);
  * replicas on one database rate one at a time: the run holds a cross-process lock (PostgreSQL: a
    session advisory lock keyed by database schema; SQLite: an flock on ``<file>-rating.lock``).
    A replica that finds the lock held waits for it and then runs itself, so readings it committed
    while the other replica was already running are still rated. `process` is incremental and
    idempotent (rows are merged with their stored state; an unchanged interval is not rated twice),
    and serialised runs always start from what the previous run left;
  * a failing run is logged and retried with a growing pause (at most `max_backoff_s`).

Reference data (markets, tariffs) is loaded once at start (``--markets``/``--tariff-dir`` of serve, the
bundled files by default); bindings are read at each run (an edit takes effect at the next run).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from meterlink.clock import Clock
from meterlink.errors import ConfigError

from .store import is_postgres_url, sqlite_path

log = logging.getLogger("meterlink.headend.rating")


@dataclass
class RatingStats:
    runs: int = 0                 # completed process runs
    readings: int = 0             # readings derived over all runs
    rows_changed: int = 0         # intervals new or changed (and rated) over all runs
    failures: int = 0
    last_error: str = ""
    busy_s: float = 0.0           # wall seconds spent in runs (lock waits excluded)


class _PostgresRunLock:
    """A session advisory lock (own connection) held for the length of one run; keyed by the schema, so
    replicas of one deployment share it and tests in other schemas of the same database do not."""

    def __init__(self, url: str) -> None:
        import psycopg
        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        schema = self._conn.execute("SELECT current_schema()").fetchone()[0] or ""
        digest = hashlib.sha256(f"meterlink.headend.rating:{schema}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big") >> 1

    def try_acquire(self) -> bool:
        return bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])

    def release(self) -> None:
        self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,)).fetchall()

    def close(self) -> None:
        self._conn.close()


class _FileRunLock:
    """flock on a file beside the SQLite database (released by the kernel if the process dies)."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}-rating.lock"
        self._f = open(self.path, "a+b")      # noqa: SIM115 - held for the worker's life

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        self._f.close()


def run_lock_for(url: str):
    if is_postgres_url(url):
        return _PostgresRunLock(url)
    path = sqlite_path(url)
    if path == ":memory:":
        raise ConfigError("rating needs a database file (sqlite:///PATH), not an in-memory database")
    return _FileRunLock(str(Path(path)))


class RatingWorker:
    """One background thread rating what arrived (see the module docstring)."""

    def __init__(self, url: str, markets: Mapping, tariffs: Mapping, clock: Clock, *, poll_s: float = 30.0,
                 lock_retry_s: float = 0.05, max_backoff_s: float = 30.0) -> None:
        from .billing_store import BillingStore
        from .store import open_repository
        self.url, self.markets, self.tariffs, self.clock = url, markets, tariffs, clock
        self.poll_s, self.lock_retry_s, self.max_backoff_s = poll_s, lock_retry_s, max_backoff_s
        self.stats = RatingStats()
        # own connections: reading a meter's history never waits for (or holds up) the ingest path's lock
        self._repo = open_repository(url, migrate=False)
        try:
            self._store = BillingStore(url, migrate=False)
            self._lock = run_lock_for(url)
        except BaseException:
            self._repo.close()
            raise
        self._cond = threading.Condition()
        self._wanted = True                      # rate once at start: what arrived while nobody rated
        self._stopping = False
        self._idle = True
        self._thread = threading.Thread(target=self._loop, name="rating-worker", daemon=True)

    # -- wiring ------------------------------------------------------------------------------
    def notify(self, *_args) -> None:
        """New readings were committed: rate them soon. Cheap and non-blocking (a commit hook)."""
        with self._cond:
            self._wanted = True
            self._idle = False
            self._cond.notify()

    def start(self) -> RatingWorker:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop after the meter it is on, wait up to `timeout_s`, close its connections."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("rating worker still busy after %.0f s; leaving it (the next run redoes its work)", timeout_s)
            return
        self._close()

    def _close(self) -> None:
        for c in (self._lock, self._store, self._repo):
            try:
                c.close()
            except Exception:                       # noqa: BLE001 - closing on the way out
                pass

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every notified commit has been rated (tests, benchmarks); True if it got there."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not (self._idle and not self._wanted):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    # -- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        backoff = 0.0
        while True:
            with self._cond:
                if not self._wanted and not self._stopping:
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait(self.poll_s if backoff == 0 else backoff)
                    if not self._wanted and not self._stopping:
                        self._wanted = True              # poll: readings stored by others
                if self._stopping:
                    self._idle = True
                    self._cond.notify_all()
                    return
                self._wanted, self._idle = False, False
            try:
                if not self._run_locked():
                    return                               # stopping while waiting for the lock
                backoff = 0.0
            except Exception as exc:                    # noqa: BLE001 - logged, retried
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                backoff = min(self.max_backoff_s, max(0.5, backoff * 2))
                log.exception("rating run failed; retrying in %.1f s", backoff)
                with self._cond:
                    self._wanted = True

    def _run_locked(self) -> bool:
        while not self._lock.try_acquire():
            with self._cond:
                if self._stopping:
                    return False
                self._cond.wait(self.lock_retry_s)
        try:
            self.run_once()
        finally:
            self._lock.release()
        return True

    def run_once(self):
        """One incremental `process` over everything not yet rated (the caller holds the run lock)."""
        from .billing_store import process_readings
        t0 = time.monotonic()
        res = process_readings(self._repo, self._store, self.markets, self.clock.now(), tariffs=self.tariffs)
        took = time.monotonic() - t0
        s = self.stats
        s.runs += 1
        s.readings += res.readings
        s.rows_changed += res.rows_changed
        s.busy_s += took
        if res.meters:
            log.info("rated: %d meter(s), %d reading(s), %d interval(s) new or changed, %d exception(s) queued "
                     "in %.2f s", res.meters, res.readings, res.rows_changed, res.exceptions_queued, took)
        return res


def load_reference(markets_path: str | None = None, tariff_dir: str | None = None) -> tuple[dict, dict]:
    """Markets and tariffs as `process` uses them (the bundled files unless paths are given)."""
    from .tariff import bundled_tariffs, load_tariff
    from .vat import load_markets
    markets = load_markets(markets_path) if markets_path else load_markets()
    paths = sorted(Path(tariff_dir).glob("tariff_*.toml")) if tariff_dir else bundled_tariffs()
    return markets, {t.id: t for t in (load_tariff(p) for p in paths)}


def add_serve_arguments(p) -> None:
    """serve's options for the rating worker."""
    p.add_argument("--no-rating", action="store_true",
                   help="do not rate readings as they arrive (then run `meterlink-headend process` yourself)")
    p.add_argument("--markets", help="markets TOML for rating (default: bundled headend/data/markets.toml)")
    p.add_argument("--tariff-dir", help="directory of tariff_*.toml files for rating (default: the bundled tariffs)")
    p.add_argument("--rating-poll-s", type=float, default=30.0,
                   help="also rate at least this often, for readings stored by other processes (default 30)")


def start_for_serve(args, url: str, clock: Clock, repo) -> RatingWorker | None:
    """Start the worker for `serve` (unless --no-rating) and hook it to the repository's commits."""
    if getattr(args, "no_rating", False):
        return None
    if not is_postgres_url(url) and sqlite_path(url) == ":memory:":
        log.warning("no rating as readings arrive: the database is in memory")
        return None
    markets, tariffs = load_reference(getattr(args, "markets", None), getattr(args, "tariff_dir", None))
    worker = RatingWorker(url, markets, tariffs, clock, poll_s=getattr(args, "rating_poll_s", 30.0))
    hooks = getattr(repo, "commit_hooks", None)
    if hooks is not None:
        hooks.append(worker.notify)
    return worker.start()
