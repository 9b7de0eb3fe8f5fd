"""Rating as readings arrive: a background worker of `meterlink-headend serve` that runs the incremental `process` (billing_store.process_readings) after commits; never blocks a push's ack and holds no rules.

How it runs:
  * the repository calls `RatingWorker.notify` after every commit that stored readings
    (``repo.commit_hooks``); notify only sets a flag, so the ack to the gateway never waits for rating;
  * the worker thread wakes on that flag (or every `poll_s` seconds, for readings another process
    stored: file imports), clears it and runs ONE incremental `process` over everything not yet
    rated. Commits that land during a run set the flag again, so a burst of pushes costs one run per
    run-time, not one run per push (coalescing), and runs start at most every `min_interval_s` (0.2 s:
    a run's fixed cost per meter and gateway is then paid a few times a second, not after every
    commit; rating lags ingest by that much at most); a run derives only the snapshot it took at its start
    (per gateway, seq <= its cursor), so what lands during it is derived once, by the next run;
  * replicas on one database rate one at a time: the run holds a cross-process lock (PostgreSQL: a
    session advisory lock keyed by database schema; SQLite: an flock on ``<file>-rating.lock``).
    A replica that finds the lock held waits for it and then runs itself, so readings it committed
    while the other replica was already running are still rated. `process` is incremental and
    idempotent (rows are merged with their stored state; an unchanged interval is not rated twice),
    and serialised runs always start from what the previous run left; `process`/`bill` by hand take
    the same lock (`holding_run_lock`);
  * a failing run is logged and retried with a growing pause (at most `max_backoff_s`);
  * where the runs happen: by default (serve) in a separate rating process (multiprocessing, spawn) that
    holds the run lock and its own connections, so rating uses the machine's other core instead of
    competing with the gRPC threads for serve's GIL; ``--rating-in-thread`` runs them in the thread.

Reference data (markets, tariffs) is loaded once at start (``--markets``/``--tariff-dir`` of serve, the
bundled files by default); bindings are read at each run, and again by a run a binding edit lands in (the chunk it
was about to write is derived anew: billing_store.process_readings).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

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


class _Rater:
    """One run of `process` under the cross-replica run lock, on its own connections; used by the worker
    thread itself or, with ``separate_process``, by the rating process (so the lock dies with the runner)."""

    def __init__(self, url: str, markets: Mapping, tariffs: Mapping) -> None:
        from .billing_store import BillingStore
        from .store import open_repository
        self.markets, self.tariffs = markets, tariffs
        # own connections: reading a meter's history never waits for (or holds up) the ingest path's lock
        self.repo = open_repository(url, migrate=False)
        try:
            self.store = BillingStore(url, migrate=False, durable=False)   # derived data: redone after a crash
            self.lock = run_lock_for(url)
        except BaseException:
            self.repo.close()
            raise

    def run(self, now, stopping, retry_s: float):
        """(ProcessResult, seconds) of one run, or None when `stopping()` turned true while waiting for the lock."""
        from .billing_store import process_readings
        while not self.lock.try_acquire():
            if stopping():
                return None
            time.sleep(retry_s)
        try:
            t0 = time.monotonic()
            res = process_readings(self.repo, self.store, self.markets, now, tariffs=self.tariffs)
            return res, time.monotonic() - t0
        finally:
            self.lock.release()

    def close(self) -> None:
        for c in (self.lock, self.store, self.repo):
            try:
                c.close()
            except Exception:                       # noqa: BLE001 - closing on the way out
                pass


def _rating_process_main(conn, url: str, markets: Mapping, tariffs: Mapping, retry_s: float) -> None:
    """The rating process: one run per `now` received, the outcome sent back; exits on None or when the
    serve process is gone (EOF on the pipe)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # serve's Ctrl-C stops serve, which then stops this
    rater = _Rater(url, markets, tariffs)
    try:
        while True:
            try:
                now = conn.recv()
            except (EOFError, OSError):
                return
            if now is None:
                return
            try:
                conn.send(("ok", rater.run(now, lambda: False, retry_s)))
            except Exception as exc:               # noqa: BLE001 - reported to the worker thread
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        rater.close()


@contextmanager
def holding_run_lock(url: str, retry_s: float = 0.05) -> Iterator[None]:
    """Hold the rating run lock of the database at `url` (waiting for it): `process` and `bill` run by hand
    take it, so they never derive and rate concurrently with a serve replica's rating."""
    lock = run_lock_for(url)
    try:
        while not lock.try_acquire():
            time.sleep(retry_s)
        try:
            yield
        finally:
            lock.release()
    finally:
        lock.close()


class RatingWorker:
    """One background thread rating what arrived (see the module docstring).

    `separate_process`: the runs happen in a child process (multiprocessing, spawn) instead of this
    thread, so rating uses another core instead of competing with the gRPC threads for this
    interpreter's GIL; the thread only coalesces wake-ups and waits for the child's answer."""

    def __init__(self, url: str, markets: Mapping, tariffs: Mapping, clock: Clock, *, poll_s: float = 300.0,
                 lock_retry_s: float = 0.05, max_backoff_s: float = 30.0, separate_process: bool = False,
                 min_interval_s: float = 0.2) -> None:
        self.url, self.markets, self.tariffs, self.clock = url, markets, tariffs, clock
        self.poll_s, self.lock_retry_s, self.max_backoff_s = poll_s, lock_retry_s, max_backoff_s
        self.min_interval_s = min_interval_s
        self.separate_process = separate_process
        self.stats = RatingStats()
        self._rater = None if separate_process else _Rater(url, markets, tariffs)
        self._proc = self._conn = None
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
        if self.separate_process:
            self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")      # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_rating_process_main, name="meterlink-rating", daemon=True,
                                 args=(child, self.url, self.markets, self.tariffs, self.lock_retry_s))
        self._proc.start()
        child.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop, wait up to `timeout_s` for a run in progress (a rating process is then
        terminated: its transaction rolls back and the next run redoes the work), close connections."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._proc is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(1.0)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5.0)
            self._conn.close()
        if self._thread.is_alive():
            log.warning("rating worker still busy after %.0f s; leaving it (the next run redoes its work)", timeout_s)
            return
        if self._rater is not None:
            self._rater.close()

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
        started = None
        retry_at = None                                  # after a failed run: no new run before this
        while True:
            with self._cond:
                if not self._wanted and not self._stopping:
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait(self.poll_s)
                    if not self._wanted and not self._stopping:
                        self._wanted = True              # poll: readings stored by others
                # a failed run is retried after its pause, however many commits arrive meanwhile (a database
                # that is down would fail every run: no run per commit, no log line per commit)
                while retry_at is not None and not self._stopping and time.monotonic() < retry_at:
                    self._cond.wait(retry_at - time.monotonic())
                # at most one run per min_interval_s: a burst of commits is rated in fewer, larger runs (each
                # run has a fixed cost per meter and gateway: reading bindings, cursors, a commit)
                while started is not None and not self._stopping and \
                        time.monotonic() - started < self.min_interval_s:
                    self._cond.wait(self.min_interval_s - (time.monotonic() - started))
                if self._stopping:
                    self._idle = True
                    self._cond.notify_all()
                    return
                self._wanted, self._idle = False, False
            started = time.monotonic()
            try:
                if self.run_once() is None:
                    return                               # stopping while waiting for the lock
                backoff, retry_at = 0.0, None
            except Exception as exc:                    # noqa: BLE001 - logged, retried
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                backoff = min(self.max_backoff_s, max(0.5, backoff * 2))
                retry_at = time.monotonic() + backoff
                log.error("rating run failed (%s); retrying in %.1f s", self.stats.last_error, backoff)
                with self._cond:
                    self._wanted = True

    def _stopping_now(self) -> bool:
        return self._stopping

    def run_once(self):
        """One incremental `process` over everything not yet rated, under the run lock; the ProcessResult,
        or None when stopping while waiting for the lock."""
        now = self.clock.now()
        if self._rater is not None:
            out = self._rater.run(now, self._stopping_now, self.lock_retry_s)
        else:
            out = self._run_in_process(now)
        if out is None:
            return None
        res, took = out
        s = self.stats
        s.runs += 1
        s.readings += res.readings
        s.rows_changed += res.rows_changed
        s.busy_s += took
        if res.meters:
            log.info("rated: %d meter(s), %d reading(s), %d interval(s) new or changed, %d exception(s) queued "
                     "in %.2f s", res.meters, res.readings, res.rows_changed, res.exceptions_queued, took)
        return res

    def _run_in_process(self, now):
        if self._proc is None or not self._proc.is_alive():
            code = None if self._proc is None else self._proc.exitcode
            self._spawn()
            if code is not None:
                raise RuntimeError(f"the rating process had exited (code {code}); started a new one")
        self._conn.send(now)
        while not self._conn.poll(0.2):
            if self._stopping:
                return None
            if not self._proc.is_alive():
                raise RuntimeError(f"the rating process died during a run (exit code {self._proc.exitcode})")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value


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
    p.add_argument("--rating-poll-s", type=float, default=300.0,
                   help="also rate at least this often, for readings stored by other processes, e.g. file imports "
                        "(default 300; each run reads all bindings, ~0.3 s CPU per 20k accounts)")
    p.add_argument("--rating-in-thread", action="store_true",
                   help="rate in a thread of serve instead of a separate rating process (which uses another core)")


def start_for_serve(args, url: str, clock: Clock, repo) -> RatingWorker | None:
    """Start the worker for `serve` (unless --no-rating) and hook it to the repository's commits."""
    if getattr(args, "no_rating", False):
        return None
    if not is_postgres_url(url) and sqlite_path(url) == ":memory:":
        log.warning("no rating as readings arrive: the database is in memory")
        return None
    markets, tariffs = load_reference(getattr(args, "markets", None), getattr(args, "tariff_dir", None))
    worker = RatingWorker(url, markets, tariffs, clock, poll_s=getattr(args, "rating_poll_s", 300.0),
                          separate_process=not getattr(args, "rating_in_thread", False))
    hooks = getattr(repo, "commit_hooks", None)
    if hooks is not None:
        hooks.append(worker.notify)
    return worker.start()
