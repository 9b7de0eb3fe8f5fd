"""The rating worker starts runs at most every `min_interval_s`: a stream of commits is rated in a few larger
runs (each with its fixed cost), and what the last commit brought is still rated."""

import time

from meterlink.clock import SimClock
from meterlink.headend.billing_store import BillingStore, ProcessResult
from meterlink.headend.rating_worker import RatingWorker
from meterlink.headend.store import open_repository

from billing_helpers import MARKETS, TARIFFS, utc


def test_a_stream_of_commits_is_rated_in_runs_at_least_min_interval_apart(tmp_path):
    url = f"sqlite:///{tmp_path}/headend.db"
    open_repository(url, migrate=True).close()
    BillingStore(url).close()
    worker = RatingWorker(url, MARKETS, TARIFFS, SimClock(utc(2026, 12, 2)), poll_s=3600, min_interval_s=0.05)
    starts: list[float] = []

    def run(now, stopping, retry_s):                     # the run itself is not the point here: record when
        starts.append(time.monotonic())
        return ProcessResult(0, 0, 0), 0.0

    worker._rater.run = run
    worker.start()
    try:
        assert worker.wait_idle(10)
        for _ in range(30):                              # a commit every ~5 ms for ~0.15 s
            worker.notify()
            time.sleep(0.005)
        last = time.monotonic()
        worker.notify()
        assert worker.wait_idle(10)
    finally:
        worker.stop()
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.05 - 0.002                     # paced (monotonic clock, a little slack)
    assert len(starts) < 1 + 31 // 2                     # far fewer runs than commits
    assert starts[-1] >= last                            # the last commit was rated after it landed


def test_only_the_rating_workers_store_commits_without_waiting_for_disk(tmp_path):
    """The worker's store (derived rows, aggregates and cursors, redone after a crash) commits without an
    fsync in WAL mode; a store for bills and bindings keeps synchronous=FULL."""
    url = f"sqlite:///{tmp_path}/headend.db"
    open_repository(url, migrate=True).close()
    worker = RatingWorker(url, MARKETS, TARIFFS, SimClock(utc(2026, 12, 2)), poll_s=3600)
    plain = BillingStore(url)
    try:
        assert worker._rater.store.db.q("PRAGMA synchronous") == [(1,)]          # NORMAL
        assert plain.db.q("PRAGMA synchronous") == [(2,)]                         # FULL
    finally:
        plain.close()
        worker._rater.close()
