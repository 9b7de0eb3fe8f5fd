"""The supervisor of `serve --processes N`'s further processes, with a fake clock and fake processes: exits are
restarted after a bounded exponential backoff (a process failing at start is not restarted in a spin), the
backoff resets after a long run, and nothing is restarted once the head-end is stopping."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from meterlink.headend.supervise import Backoff, Supervisor, describe_exit


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeProc:
    """Runs `runs_for` fake seconds from when it is waited on, then exits with `code`; `ready`: whether it
    printed its address before exiting."""

    def __init__(self, pid: int, clock: FakeClock, runs_for: float, code: int, ready: bool = True,
                 on_exit=None) -> None:
        self.pid, self.clock, self.runs_for, self.code, self.ready = pid, clock, runs_for, code, ready
        self.on_exit = on_exit

    def wait(self) -> int:
        self.clock.t += self.runs_for
        if self.on_exit:
            self.on_exit()
        return self.code


class Harness:
    def __init__(self, first: FakeProc, plan: list, sleeps_allowed: int, backoff: Backoff = Backoff()) -> None:
        self.clock = first.clock
        self.plan = list(plan)          # (runs_for, code, ready) of each process spawned, in order
        self.spawned: list[tuple[float, FakeProc]] = []
        self.sleeps: list[tuple[float, float]] = []    # (fake time the wait began, seconds)
        self.sleeps_allowed = sleeps_allowed
        self.registry = CollectorRegistry()
        self.sup = Supervisor([first], self.spawn, lambda p: p.ready, backoff=backoff, clock=self.clock,
                              sleep=self.sleep, registry=self.registry)

    def spawn(self) -> FakeProc:
        runs_for, code, ready = self.plan.pop(0)
        proc = FakeProc(100 + len(self.spawned), self.clock, runs_for, code, ready)
        self.spawned.append((self.clock.t, proc))
        return proc

    def sleep(self, seconds: float) -> bool:
        if len(self.sleeps) == self.sleeps_allowed:
            self.sup.stop()             # the head-end is told to stop during this backoff
            return True
        self.sleeps.append((self.clock.t, seconds))
        self.clock.t += seconds
        return False

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0


def test_a_process_failing_at_start_is_retried_with_doubling_delays_capped_at_60_s_not_in_a_spin(caplog):
    clock = FakeClock()
    h = Harness(FakeProc(7, clock, runs_for=0.5, code=1), [(0.2, 2, False)] * 20, sleeps_allowed=9)
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.supervise"):
        h.sup.watch(0)
    assert [s for _, s in h.sleeps] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert len(h.spawned) == 9                               # one attempt after each backoff wait
    gaps = [b[0] - a[0] for a, b in zip(h.spawned, h.spawned[1:])]
    assert gaps == pytest.approx([d + 0.2 for d in (2, 4, 8, 16, 32, 60, 60, 60)])    # never a spin
    assert h.sup.restarts == 0 and h.sup.exits == 10
    assert h.metric("meterlink_headend_process_exits_total") == 10
    assert h.metric("meterlink_headend_process_restarts_total") == 0
    assert "further serve process 7 exited with status 1 after 0.5 s; restarting it in 1 s" in caplog.text
    assert "further serve process 100 did not start: it exited with status 2; next attempt in 2 s" in caplog.text


def test_a_killed_process_is_restarted_and_the_backoff_resets_after_a_long_run(caplog):
    clock = FakeClock()
    h = Harness(FakeProc(7, clock, runs_for=10, code=-9),
                [(5, -9, True), (120, 3, True), (1, -11, True), (1, 0, True)], sleeps_allowed=4)
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.supervise"):
        h.sup.watch(0)
    # 10 s then killed: 1 s; served 5 s and killed again: 2 s; served 120 s (>= 60 s): back to 1 s; then 2 s
    assert [s for _, s in h.sleeps] == [1, 2, 1, 2]
    assert h.sup.restarts == 4 and h.metric("meterlink_headend_process_restarts_total") == 4
    assert h.sup.exits == 5 and h.metric("meterlink_headend_process_exits_total") == 5
    assert h.sup.processes() == [h.spawned[-1][1]]          # the newest one is the one stop() hands over
    assert "further serve process 7 was killed by signal 9 (SIGKILL) after 10.0 s; restarting it in 1 s" in caplog.text
    assert "further serve process 101 exited with status 3 after 120.0 s; restarting it in 1 s" in caplog.text
    assert "further serve process restarted: pid 100 (restart 1)" in caplog.text


def test_a_process_that_exits_during_shutdown_is_not_restarted(caplog):
    clock = FakeClock()
    stopped = []
    first = FakeProc(7, clock, runs_for=3, code=0, on_exit=lambda: stopped.append(h.sup.stop()))
    h = Harness(first, [(1, 0, True)], sleeps_allowed=5)
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.supervise"):
        h.sup.watch(0)
    assert stopped == [[first]] and h.spawned == [] and h.sleeps == [] and h.sup.exits == 0
    assert caplog.text == ""


def test_an_exit_after_the_stop_signal_is_not_taken_for_a_crash():
    clock = FakeClock()
    signalled = threading.Event()
    first = FakeProc(7, clock, runs_for=3, code=0, on_exit=signalled.set)   # SIGTERM to the whole group
    spawned = []
    sup = Supervisor([first], lambda: spawned.append(1), lambda p: True, clock=clock, stopping=signalled.is_set)
    sup.watch(0)
    assert spawned == [] and sup.exits == 0


def test_stop_interrupts_the_backoff_at_once_and_nothing_is_started_afterwards():
    exited = threading.Event()

    class BlockingProc:
        pid = 9

        def wait(self) -> int:
            exited.wait()
            return -9

    spawned = []
    sup = Supervisor([BlockingProc()], lambda: spawned.append(1), lambda p: True,
                     backoff=Backoff(first_s=30)).start()        # real threads, the real stop event
    exited.set()                                                  # killed: the supervisor waits 30 s to restart
    time.sleep(0.05)
    t0 = time.monotonic()
    assert len(sup.stop()) == 1
    sup.join(timeout=5)
    assert time.monotonic() - t0 < 2 and not any(t.is_alive() for t in sup._threads)
    assert spawned == [] and sup.exits == 1


def test_backoff_and_exit_descriptions():
    b = Backoff()
    assert [b.delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert b.delay(10_000) == 60
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with status 3"


def test_a_spawn_that_raises_is_retried_with_backoff_not_the_end_of_supervision(caplog):
    clock = FakeClock()
    h = Harness(FakeProc(7, clock, runs_for=100, code=-9), [(1, 0, True)], sleeps_allowed=3)
    calls = []
    real_spawn = h.spawn

    def flaky_spawn():
        calls.append(clock.t)
        if len(calls) < 3:
            raise OSError(24, "Too many open files")
        return real_spawn()
    h.sup._spawn = flaky_spawn
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.supervise"):
        h.sup.watch(0)
    assert [s for _, s in h.sleeps] == [1, 2, 4] and len(calls) == 3 and h.sup.restarts == 1
    assert "could not be started (OSError(24, 'Too many open files')); next attempt in 2 s" in caplog.text


def test_a_process_whose_readiness_cannot_be_read_is_killed_and_retried(caplog):
    clock = FakeClock()
    killed = []

    class Unreadable(FakeProc):
        def kill(self) -> None:
            killed.append(self.pid)

    h = Harness(FakeProc(7, clock, runs_for=100, code=-9), [], sleeps_allowed=2)
    h.sup._spawn = lambda: Unreadable(50, clock, runs_for=0, code=-9)

    def ready(proc):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    h.sup._ready = ready
    with caplog.at_level(logging.WARNING, logger="meterlink.headend.supervise"):
        h.sup.watch(0)
    assert killed == [50, 50] and h.sup.restarts == 0 and h.sup.exits == 3
    assert "further serve process 50 did not start: it was killed by signal 9 (SIGKILL)" in caplog.text
