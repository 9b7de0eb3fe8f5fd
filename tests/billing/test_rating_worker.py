"""Rating as readings arrive (headend/rating_worker.py): commits wake the worker, which rates everything not yet
rated into the pending day-band aggregates without anyone running `process`; two replicas' workers on one
database rate each interval once; and a real `meterlink-headend serve` does it after real pushes."""

import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from meterlink.clock import SimClock
from meterlink.headend.billing import pending_contributions
from meterlink.headend.billing_store import BillingStore
from meterlink.headend.binding import ServicePoint
from meterlink.headend.rating_worker import RatingWorker, run_lock_for
from meterlink.headend.store import StoredRecord, open_repository

from billing_helpers import MARKETS, TARIFFS, VAT, gb_bindings, hourly_readings, utc

GB = ZoneInfo("Europe/London")
NOW = utc(2026, 12, 2, 6)
BIN = Path(sys.executable).parent


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/headend.db"
    from pgserver import PG_UNAVAILABLE, fresh_schema_url
    if PG_UNAVAILABLE:
        pytest.skip(PG_UNAVAILABLE)
    return fresh_schema_url()


def _bound(url, accounts=("A1",)):
    repo = open_repository(url, migrate=True)
    store = BillingStore(url)
    b = gb_bindings(accounts=accounts).move_in("SP1", "A1", utc(2026, 10, 1))
    if "A2" in accounts:
        b = replace(b, service_points={**b.service_points, "SP2": ServicePoint("SP2", "GB")})
        b = b.install("M2", "SP2", utc(2026, 10, 1)).move_in("SP2", "A2", utc(2026, 10, 1))
    store.import_bindings(b, MARKETS, VAT)
    return repo, store


def _scratch(store, account):
    rows = store.rows(account=account, unbilled=True).values()
    return pending_contributions(((None, r) for r in rows), TARIFFS["gb-economy7"], GB)


def _batches(meter, gateway, hours, size, base=1_000_000):
    rs = hourly_readings(meter, utc(2026, 10, 31, 20), hours, wh_per_hour=417, base=base)
    recs = [StoredRecord(gateway, i + 1, b"\0" * 32, r) for i, r in enumerate(rs)]
    return [recs[i:i + size] for i in range(0, len(recs), size)]


@pytest.mark.parametrize("separate_process", [False, True], ids=["thread", "process"])
def test_commits_wake_the_worker_and_everything_is_rated_without_running_process(url, separate_process):
    repo, store = _bound(url)
    worker = RatingWorker(url, MARKETS, TARIFFS, SimClock(NOW), poll_s=3600, separate_process=separate_process)
    repo.commit_hooks.append(worker.notify)
    worker.start()
    try:
        assert worker.wait_idle(30)                      # the start-up run: nothing to rate yet
        assert store.pending_aggregates() == {}
        for batch in _batches("M1", "GW1", 24 * 5, 20):
            repo.ingest("GW1", batch, 0)                 # returns at once: notify only sets a flag
        assert worker.wait_idle(60), worker.stats
        aggs, usage = _scratch(store, "A1")
        assert aggs and store.pending_aggregates()["A1"] == aggs and store.pending_usage()["A1"] == usage
        assert sum(u for u in usage.values()) == 24 * 5 * 417
        # coalescing: 7 commits did not cost 7 runs of the whole backlog, and nothing failed
        assert worker.stats.failures == 0 and worker.stats.runs <= 1 + 7
        runs = worker.stats.runs
        repo.ingest("GW1", _batches("M1", "GW1", 24 * 5, 20)[0], 0)    # a re-sent batch: no new readings
        time.sleep(0.05)
        assert worker.wait_idle(30) and worker.stats.runs == runs       # a duplicate commit wakes nobody
    finally:
        worker.stop()
        store.close()
        repo.close()


def test_a_hook_that_raises_does_not_fail_the_committed_ingest(url):
    repo = open_repository(url, migrate=True)
    try:
        def broken(*_):
            raise RuntimeError("hook broken")
        repo.commit_hooks.append(broken)
        res = repo.ingest("GW1", _batches("M1", "GW1", 3, 10)[0], 0)
        assert res.accepted == 4 and repo.acked_seq("GW1") == 4
    finally:
        repo.close()


def test_two_replicas_rating_the_same_database_at_once_rate_every_interval_once(url):
    """Two repositories (replicas) ingest interleaved batches of two gateways, each with its own worker (one
    rating in its thread, one in a rating process); the stored aggregates equal rating the rows from scratch
    (nothing rated twice or lost)."""
    repo1, store = _bound(url, accounts=("A1", "A2"))
    repo2 = open_repository(url, migrate=True)
    workers = [RatingWorker(url, MARKETS, TARIFFS, SimClock(NOW), poll_s=3600, lock_retry_s=0.01,
                            separate_process=sp) for sp in (False, True)]
    for repo, w in zip((repo1, repo2), workers):
        repo.commit_hooks.append(w.notify)
        w.start()
    try:
        b1 = _batches("M1", "GW1", 24 * 4, 16)
        b2 = _batches("M2", "GW2", 24 * 4, 16, base=5_000_000)

        def push(repo, batches, gw):
            for b in batches:
                repo.ingest(gw, b, 0)
        threads = [threading.Thread(target=push, args=(repo1, b1[0::2] + b1[1::2], "GW1")),
                   threading.Thread(target=push, args=(repo2, b1, "GW1")),      # the same batches from both
                   threading.Thread(target=push, args=(repo2, b2, "GW2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(w.wait_idle(60) for w in workers), [w.stats for w in workers]
        for w in workers:                    # a last run each, after both went idle: nothing left to change
            with w._cond:
                w._wanted = True
                w._idle = False
                w._cond.notify()
        assert all(w.wait_idle(60) for w in workers)
        assert sum(w.stats.failures for w in workers) == 0
        for account in ("A1", "A2"):
            aggs, usage = _scratch(store, account)
            assert store.pending_aggregates()[account] == aggs and store.pending_usage()[account] == usage
            assert sum(usage.values()) == 24 * 4 * 417
    finally:
        for w in workers:
            w.stop()
        store.close()
        repo1.close()
        repo2.close()


def test_only_one_replica_holds_the_run_lock(url):
    open_repository(url, migrate=True).close()
    a, b = run_lock_for(url), run_lock_for(url)
    try:
        assert a.try_acquire()
        assert not b.try_acquire()
        a.release()
        assert b.try_acquire()
        b.release()
    finally:
        a.close()
        b.close()


def _headend(*args):
    return subprocess.run([str(BIN / "meterlink-headend"), *args], capture_output=True, text=True, timeout=120)


def test_serve_rates_pushed_readings_without_process(url, tmp_path):
    """Real `serve`, real signed pushes over gRPC, then the aggregates are there (nobody ran `process`)."""
    from meterlink.gateway.journal import Journal
    from meterlink.gateway.sync import Pusher, load_or_create_key, write_public_key
    db = ("--database", url)
    assert _headend("migrate", *db).returncode == 0
    loaded = _headend("bindings", "load", *db, "--config", "/dev/null")
    assert loaded.returncode == 0, loaded.stderr
    key = load_or_create_key(tmp_path / "gw.key")
    write_public_key(key, tmp_path / "gw.pub")
    assert _headend("trust-gateway", "GW-R", "--public-key", str(tmp_path / "gw.pub"), *db).returncode == 0
    journal = Journal(tmp_path / "gw.db")
    start = utc(2026, 11, 1)
    journal.append([r for h in range(24 * 3 + 1) for r in
                    hourly_readings("MTR-RTU-01", start + timedelta(hours=h), 0, wh_per_hour=0, base=10_000 + 350 * h)])
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(BIN / "meterlink-headend"), "serve", "--listen", "127.0.0.1:0", *db,
                                 "--config", "/dev/null", "--clock", "sim:2026-11-05T00:00:00Z",
                                 "--rating-poll-s", "3600"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        addr = proc.stdout.readline().strip()
        assert addr, log.read_text()
        pusher = Pusher("GW-R", addr, journal, batch=20, key=key, timeout_s=30)
        try:
            while journal.unacked_count():
                pusher.push_once()
        finally:
            pusher.close()
        store = BillingStore(url, migrate=False)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                usage = store.pending_usage().get("A-GB-001", {})
                if sum(usage.values()) == 24 * 3 * 350:
                    break
                time.sleep(0.1)
            assert sum(usage.values()) == 24 * 3 * 350, (usage, log.read_text())
            assert store.pending_aggregates()["A-GB-001"] == _scratch(store, "A-GB-001")[0]
        finally:
            store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=45)
        proc.stdout.close()
    assert proc.returncode == 0, log.read_text()


def test_a_rating_process_that_dies_is_replaced_and_the_readings_are_still_rated(url):
    repo, store = _bound(url)
    worker = RatingWorker(url, MARKETS, TARIFFS, SimClock(NOW), poll_s=3600, max_backoff_s=0.5,
                          separate_process=True)
    repo.commit_hooks.append(worker.notify)
    worker.start()
    try:
        assert worker.wait_idle(60)
        first = worker._proc
        first.kill()                                      # the rating process dies (OOM killer, kill -9)
        first.join(10)
        for batch in _batches("M1", "GW1", 24 * 2, 20):
            repo.ingest("GW1", batch, 0)
        assert worker.wait_idle(60), worker.stats
        assert worker._proc is not first and worker._proc.is_alive()
        assert worker.stats.failures == 1 and "exited" in worker.stats.last_error
        aggs, usage = _scratch(store, "A1")
        assert store.pending_aggregates()["A1"] == aggs and sum(usage.values()) == 24 * 2 * 417
    finally:
        worker.stop()
        store.close()
        repo.close()
    assert not worker._proc.is_alive()


def test_process_by_hand_waits_for_a_replica_that_is_rating(url):
    from meterlink.headend.cli import main
    repo, store = _bound(url)
    store.close()
    for batch in _batches("M1", "GW1", 24, 25):
        repo.ingest("GW1", batch, 0)
    repo.close()
    lock = run_lock_for(url)
    assert lock.try_acquire()                             # a serve replica is rating
    codes = []
    t = threading.Thread(target=lambda: codes.append(main(["process", "--database", url, "--config", "/dev/null",
                                                          "--clock", "sim:2026-12-02T06:00:00Z"])))
    try:
        t.start()
        t.join(0.5)
        assert t.is_alive() and codes == []               # waiting for the run lock, nothing derived yet
        check = BillingStore(url, migrate=False)
        assert check.pending_usage() == {}
        check.close()
    finally:
        lock.release()
        lock.close()
    t.join(60)
    assert codes == [0]
    store = BillingStore(url, migrate=False)
    assert sum(store.pending_usage()["A1"].values()) == 24 * 417
    store.close()


def test_a_failing_run_is_retried_after_its_pause_not_at_every_commit(tmp_path, monkeypatch):
    """A run that fails (the database is down, say) is retried after a growing pause (0.5 s, then 1 s, ...),
    however many commits wake the worker meanwhile: no run and no error line per commit."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    open_repository(url).close()                          # the schema (SQLite migrates when opened)
    worker = RatingWorker(url, MARKETS, TARIFFS, SimClock(NOW), poll_s=3600, max_backoff_s=30.0,
                          min_interval_s=0.01)
    calls: list[float] = []

    def failing():
        calls.append(time.monotonic())
        raise RuntimeError("database is down")
    monkeypatch.setattr(worker, "run_once", failing)
    worker.start()
    try:
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:               # a commit every 20 ms
            worker.notify()
            time.sleep(0.02)
        # runs at about 0 s and 0.5 s; the third waits for 0.5 + 1.0 s, after the window
        assert len(calls) == 2, [round(c - calls[0], 3) for c in calls]
        assert calls[1] - calls[0] >= 0.5
        assert worker.stats.failures == 2 and "database is down" in worker.stats.last_error
    finally:
        worker.stop()
