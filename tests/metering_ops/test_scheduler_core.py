"""The pure bus scheduler: priorities, stagger, backoff with jitter, and a dead meter's bounded cost."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from meterlink.gateway.scheduler import BackoffPolicy, BusSchedule, Priority, grid_after, stagger_offsets

T0 = datetime(2026, 11, 24, tzinfo=timezone.utc)


def five_meters():
    return [(f"M{i}", True, True) for i in range(1, 6)]


def drain(schedule: BusSchedule, now: datetime) -> list:
    jobs = []
    while (job := schedule.next_job(now)) is not None:
        jobs.append(job)
        schedule.succeeded(job, now)
    return jobs


def test_relay_commands_go_first_then_every_billing_register_then_instantaneous_values():
    s = BusSchedule(five_meters(), 900, T0)
    s.submit_relay("M4", False, T0)
    jobs = drain(s, T0)
    assert [(j.priority, j.meter_id) for j in jobs] == (
        [(Priority.RELAY, "M4")]
        + [(Priority.BILLING, f"M{i}") for i in range(1, 6)]
        + [(Priority.INSTANT, f"M{i}") for i in range(1, 6)])


def test_a_relay_command_submitted_mid_sweep_overtakes_the_reads_still_waiting():
    s = BusSchedule(five_meters(), 900, T0)
    first = s.next_job(T0)
    s.succeeded(first, T0)
    s.submit_relay("M5", True, T0)
    assert s.next_job(T0).priority == Priority.RELAY


def test_stagger_spreads_start_times_evenly_inside_the_window():
    offsets = stagger_offsets(["a", "b", "c", "d"], 60)
    assert [o.total_seconds() for o in offsets.values()] == [0, 15, 30, 45]
    s = BusSchedule([("a", True, False), ("b", True, False)], 900, T0, stagger_s=10)
    assert [j.meter_id for j in drain(s, T0)] == ["a"]
    assert s.wakeup() == T0 + timedelta(seconds=5)
    assert [j.meter_id for j in drain(s, T0 + timedelta(seconds=5))] == ["b"]
    assert s.wakeup() == T0 + timedelta(seconds=900)


def test_grid_skips_instants_that_already_passed():
    assert grid_after(T0 + timedelta(seconds=1901), T0, 900, timedelta(0)) == T0 + timedelta(seconds=2700)
    assert grid_after(T0 - timedelta(seconds=5), T0, 900, timedelta(seconds=3)) == T0 + timedelta(seconds=3)


def test_backoff_doubles_up_to_its_cap_and_jitter_only_shortens_it():
    policy = BackoffPolicy(base_s=2, max_s=60, jitter=0.5)
    rng = random.Random(7)
    for n, full in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (30, 60)]:
        for _ in range(50):
            d = policy.delay_s(n, rng)
            assert full / 2 <= d <= full, (n, d)
    # the same seed gives the same delays: the random source is injected
    assert [policy.delay_s(3, random.Random(1)) for _ in range(2)] == [policy.delay_s(3, random.Random(1))] * 2


def test_a_failing_meter_backs_off_exponentially_and_resets_when_it_answers_again():
    s = BusSchedule([("dead", True, True), ("ok", True, False)], 900, T0,
                    backoff=BackoffPolicy(base_s=2, max_s=900, jitter=0.5), rng=random.Random(3))
    now = T0
    delays = []
    job = s.next_job(now)
    assert job.meter_id == "dead"
    delays.append(s.failed(job, now, "timeout"))
    for _ in range(5):
        drain_others = [j for j in iter(lambda: s.next_job(now), None)]
        for j in drain_others:
            s.succeeded(j, now)
        now = s.slots["dead"].retry_at
        job = s.next_job(now)
        assert job.meter_id == "dead" and job.retry
        delays.append(s.failed(job, now, "timeout"))
    assert s.slots["dead"].failures == 6
    for n, d in enumerate(delays, start=1):
        full = 2 * 2 ** (n - 1)
        assert full / 2 <= d <= full
    assert delays[-1] > delays[0] * 4            # it grew
    # the meter comes back: its retry succeeds, the backoff resets and it rejoins the grid
    now = s.slots["dead"].retry_at
    for j in drain(s, now):
        assert j.meter_id == "dead"
    slot = s.slots["dead"]
    assert (slot.failures, slot.retry_at, slot.last_ok) == (0, None, now)
    assert slot.next_poll == T0 + timedelta(seconds=900)


def test_a_failed_billing_read_cancels_that_meters_instantaneous_read_this_round():
    s = BusSchedule([("a", True, True), ("b", True, True)], 900, T0)
    job = s.next_job(T0)
    s.failed(job, T0, "timeout")
    rest = drain(s, T0)
    assert [(j.meter_id, j.priority) for j in rest] == [("b", Priority.BILLING), ("b", Priority.INSTANT)]


def test_healthy_meters_go_before_a_meter_that_is_backing_off_when_both_are_due():
    s = BusSchedule([("dead", True, False), ("ok", True, False)], 900, T0,
                    backoff=BackoffPolicy(base_s=900, max_s=900, jitter=0.0))
    s.failed(s.next_job(T0), T0, "timeout")     # retry exactly at the next grid instant
    drain(s, T0)
    t1 = T0 + timedelta(seconds=900)
    order = [j.meter_id for j in drain(s, t1)]
    assert order == ["ok", "dead"]


@pytest.mark.parametrize("timeout_s", [1.0, 3.0])
def test_one_dead_meter_of_five_never_delays_the_others_beyond_its_own_timeout(timeout_s):
    """Discrete-event run of a bus: each live read costs 50 ms, the dead meter a full timeout."""
    interval, read_s = 60, 0.05
    s = BusSchedule(five_meters(), interval, T0, backoff=BackoffPolicy(base_s=2, max_s=interval),
                    rng=random.Random(11))
    now = T0
    starts: dict[str, list[datetime]] = {}
    end = T0 + timedelta(hours=2)
    while now < end:
        job = s.next_job(now)
        if job is None:
            now = s.wakeup()
            continue
        if job.meter_id == "M3":
            now += timedelta(seconds=timeout_s)
            s.failed(job, now, "timeout")
            continue
        if job.priority == Priority.BILLING:
            starts.setdefault(job.meter_id, []).append(now)
        now += timedelta(seconds=read_s)
        s.succeeded(job, now)
    polls = 2 * 3600 // interval
    for meter in ("M1", "M2", "M4", "M5"):
        got = starts[meter]
        assert len(got) == polls, meter                      # every interval, none skipped
        for k, at in enumerate(got):
            boundary = T0 + timedelta(seconds=k * interval)
            # before it: at most the other live meters' billing reads and ONE timeout of the dead one
            assert boundary <= at <= boundary + timedelta(seconds=timeout_s + 4 * read_s), (meter, k, at)
    assert s.slots["M3"].polls_ok == 0 and s.slots["M3"].failures > 5
    assert s.slots["M3"].missed > 0                          # grid polls it sat out while backing off
    assert all(s.slots[m].missed == 0 for m in ("M1", "M2", "M4", "M5"))


def test_instants_missed_at_startup_are_caught_up_once_each_but_later_misses_are_skipped():
    s = BusSchedule([("a", True, False)], 900, T0, catch_up_before=T0 + timedelta(seconds=2000))
    late = T0 + timedelta(seconds=2000)
    assert [j.due for j in drain(s, late)] == [T0, T0 + timedelta(seconds=900), T0 + timedelta(seconds=1800)]
    # a bus that falls behind later does not replay what it missed
    much_later = T0 + timedelta(seconds=2700 + 3 * 900 + 5)
    assert [j.due for j in drain(s, much_later)] == [T0 + timedelta(seconds=2700)]
    assert s.slots["a"].missed == 3
    assert s.wakeup() == T0 + timedelta(seconds=2700 + 4 * 900)
