"""One scheduler per physical bus: which meter job runs next and when; the core never touches a wire.

A bus is one serial port (or one Modbus TCP endpoint): its meters share it and are read one
request at a time. `BusSchedule` is the pure core: given `now` it hands out the next job in
priority order — relay commands first, then billing registers, then instantaneous values — and
records outcomes. A meter that fails is retried with exponential backoff plus jitter (the random
source is injected), and while it backs off it is not polled on the grid, so a dead or slow
meter costs the others at most one timeout per retry. Start times can be staggered across the
meters of a bus. `BusWorker` is the thin shell: one thread per bus that sleeps on the injected
clock, executes jobs on the bus master and hands readings to a callback.

With a `SimClock` several bus threads advance simulated time in lock step (`LockstepSleeper`):
the clock jumps to the earliest wake-up only when every bus thread is waiting, so simulated
polls are exact and reproducible. Other clocks sleep in real time (scaled by `speed`).
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any, Callable, Iterable

from meterlink import modbus
from meterlink.clock import Clock, SimClock, from_ms, to_ms
from meterlink.errors import DeviceError, ProtocolError

log = logging.getLogger("meterlink.gateway.scheduler")


class Priority(IntEnum):
    RELAY = 0        # connect/disconnect commands (PAYG): never wait behind reads
    BILLING = 1      # cumulative registers that are billed (1.8.x, 2.8.x)
    INSTANT = 2      # power, voltage, current, frequency


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before retry n (1-based): min(max_s, base_s * 2**(n-1)), minus up to `jitter` of it."""

    base_s: float = 2.0
    max_s: float = 900.0
    jitter: float = 0.5          # fraction of the delay drawn away at random ("equal jitter" at 0.5)

    def delay_s(self, failures: int, rng: random.Random) -> float:
        if failures <= 0:
            return 0.0
        full = min(self.max_s, self.base_s * 2 ** min(failures - 1, 60))
        return full * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True)
class Job:
    priority: Priority
    meter_id: str
    due: datetime
    order: int                   # the meter's place on the bus (stagger order)
    retry: bool = False          # the meter is backing off: healthy meters go first
    token: Any = None            # relay: opaque handle of the command (the shell's Future)
    closed: bool | None = None   # relay: True connects, False disconnects; None with a callable token: an action
    attempt: int = 1
    merged: bool = False         # BILLING job that also reads the instantaneous values (one merged plan)

    def sort_key(self) -> tuple:
        return (self.priority, self.retry, self.due, self.order)


@dataclass
class MeterSlot:
    meter_id: str
    order: int
    offset: timedelta            # stagger offset from the interval grid
    next_poll: datetime          # next grid instant this meter is due
    has_billing: bool = True
    has_instant: bool = True
    failures: int = 0            # consecutive failed polls
    retry_at: datetime | None = None
    busy: bool = False           # jobs of this meter are pending or running
    polls_ok: int = 0
    polls_failed: int = 0
    missed: int = 0              # grid instants skipped because the bus was behind or the meter backing off
    last_ok: datetime | None = None
    last_error: str = ""


def stagger_offsets(meter_ids: Iterable[str], stagger_s: float) -> dict[str, timedelta]:
    """Spread the meters' start times evenly over the first `stagger_s` seconds of each interval."""
    ids = list(meter_ids)
    if not ids or stagger_s <= 0:
        return {m: timedelta(0) for m in ids}
    step_ms = int(stagger_s * 1000) // len(ids)
    return {m: timedelta(milliseconds=i * step_ms) for i, m in enumerate(ids)}


def grid_after(now: datetime, first: datetime, interval_s: int, offset: timedelta) -> datetime:
    """The first instant first + k*interval + offset (k >= 0) strictly after `now`."""
    base = to_ms(first) + int(offset / timedelta(milliseconds=1))
    step = interval_s * 1000
    t = to_ms(now)
    if t < base:
        return from_ms(base)
    return from_ms(base + ((t - base) // step + 1) * step)


class BusSchedule:
    """The pure scheduling core for one bus (no clock, no I/O: every method takes `now`)."""

    def __init__(self, meters: Iterable[tuple[str, bool, bool]], interval_s: int, first: datetime, *,
                 stagger_s: float = 0.0, backoff: BackoffPolicy | None = None,
                 rng: random.Random | None = None, relay_attempts: int = 5,
                 catch_up_before: datetime | None = None, merge: bool = False) -> None:
        """`meters`: (meter id, has billing quantities, has instantaneous quantities) in bus order.

        Grid instants that pass while a meter is busy or backing off are skipped (counted in
        `missed`): polling them late would only repeat the same values. The exception is a backlog
        the caller asked for: instants before `catch_up_before` (e.g. an explicit first poll in the
        past when the daemon starts) are each polled once, at once.

        `merge`: a meter whose billing and instantaneous reads fall due together gets ONE job
        (BILLING priority, `merged=True`) so the shell reads both in one merged plan (fewer
        requests); relay commands still go first. Reads due apart keep their own priorities.
        """
        meters = list(meters)
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s, self.first = interval_s, first
        self.backoff = backoff or BackoffPolicy(max_s=float(interval_s))
        self.rng = rng if rng is not None else random.Random(0)
        self.relay_attempts = relay_attempts
        self.catch_up_before = catch_up_before
        self.merge = merge
        offsets = stagger_offsets([m for m, _, _ in meters], stagger_s)
        self.slots: dict[str, MeterSlot] = {}
        for i, (mid, billing, instant) in enumerate(meters):
            self.slots[mid] = MeterSlot(mid, i, offsets[mid], first + offsets[mid],
                                        has_billing=billing, has_instant=instant)
        self.pending: list[Job] = []

    # -- handing out work -------------------------------------------------------------------
    def _release(self, now: datetime) -> None:
        for s in self.slots.values():
            if s.busy:
                continue
            if s.retry_at is not None:
                if s.retry_at > now:
                    continue
                due, retry = s.retry_at, True
            elif s.next_poll <= now:
                due, retry = s.next_poll, False
            else:
                continue
            if not retry and self.catch_up_before is not None and s.next_poll < self.catch_up_before:
                nxt = grid_after(s.next_poll, self.first, self.interval_s, s.offset)
            else:
                nxt = grid_after(now, self.first, self.interval_s, s.offset)
            if s.next_poll <= now:   # grid instants that passed without a poll of this meter
                s.missed += max(0, (to_ms(nxt) - to_ms(s.next_poll)) // (self.interval_s * 1000) - (0 if retry else 1))
            s.next_poll = nxt
            s.retry_at = None
            jobs = []
            if self.merge and s.has_billing and s.has_instant:
                jobs.append(Job(Priority.BILLING, s.meter_id, due, s.order, retry, merged=True))
            else:
                if s.has_billing:
                    jobs.append(Job(Priority.BILLING, s.meter_id, due, s.order, retry))
                if s.has_instant:
                    jobs.append(Job(Priority.INSTANT, s.meter_id, due, s.order, retry))
            if jobs:
                s.busy = True
                self.pending.extend(jobs)

    def next_job(self, now: datetime) -> Job | None:
        """Remove and return the most urgent job due at `now`, or None."""
        self._release(now)
        ready = [j for j in self.pending if j.due <= now]
        if not ready:
            return None
        job = min(ready, key=Job.sort_key)
        self.pending.remove(job)
        return job

    def wakeup(self) -> datetime | None:
        """The earliest instant at which a job becomes due (None: nothing will ever be due)."""
        times = [j.due for j in self.pending]
        for s in self.slots.values():
            if not s.busy:
                times.append(s.retry_at if s.retry_at is not None else s.next_poll)
        return min(times) if times else None

    def submit_relay(self, meter_id: str, closed: bool | None, now: datetime, token: Any = None) -> Job:
        if meter_id not in self.slots:
            raise KeyError(f"meter {meter_id} is not on this bus")
        job = Job(Priority.RELAY, meter_id, now, self.slots[meter_id].order, token=token, closed=closed)
        self.pending.append(job)
        return job

    # -- outcomes -------------------------------------------------------------------------------
    def _meter_done(self, s: MeterSlot) -> bool:
        return not any(j.meter_id == s.meter_id and j.priority != Priority.RELAY for j in self.pending)

    def succeeded(self, job: Job, now: datetime) -> None:
        s = self.slots[job.meter_id]
        if job.priority == Priority.RELAY:
            return
        if self._meter_done(s):
            s.busy = False
            s.failures, s.retry_at = 0, None
            s.polls_ok += 1
            s.last_ok = now
            s.last_error = ""

    def failed(self, job: Job, now: datetime, error: str = "") -> float:
        """Record a failure; returns the backoff delay (s) before the meter (or command) is tried again."""
        s = self.slots[job.meter_id]
        if job.priority == Priority.RELAY:
            if job.attempt >= self.relay_attempts:
                return -1.0                      # given up: the shell reports the command as failed
            delay = self.backoff.delay_s(job.attempt, self.rng)
            self.pending.append(Job(Priority.RELAY, job.meter_id, now + timedelta(seconds=delay), job.order,
                                    token=job.token, closed=job.closed, attempt=job.attempt + 1))
            return delay
        # the rest of this meter's poll is pointless now
        self.pending = [j for j in self.pending if j.meter_id != job.meter_id or j.priority == Priority.RELAY]
        s.busy = False
        s.failures += 1
        s.polls_failed += 1
        s.last_error = error
        delay = self.backoff.delay_s(s.failures, self.rng)
        s.retry_at = now + timedelta(seconds=delay)
        return delay


# -- the shell ----------------------------------------------------------------------------------

class RealSleeper:
    """Sleeps on a real or scaled clock; returns early when `wake` is set."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.speed = float(getattr(clock, "speed", 1.0))

    def join(self) -> None:
        pass

    def leave(self) -> None:
        pass

    def sleep_until(self, when: datetime, wake: threading.Event) -> None:
        while not wake.is_set():
            delay = (when - self.clock.now()).total_seconds() / self.speed
            if delay <= 0:
                return
            wake.wait(min(delay, 1.0))


class LockstepSleeper:
    """Discrete-event time for several threads on one SimClock.

    Each participant calls `sleep_until`; when all active participants are waiting, the clock
    jumps to the earliest requested instant and the threads due then are released. Setting a
    thread's `wake` event releases it at the current simulated instant.
    """

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.active = 0
        self._waiting: dict[int, datetime] = {}
        self._wakes: dict[int, threading.Event] = {}
        self._cond = threading.Condition()

    def join(self) -> None:
        with self._cond:
            self.active += 1

    def leave(self) -> None:
        with self._cond:
            self.active -= 1
            self._advance()

    def _advance(self) -> None:
        for k in [k for k in self._waiting if self._wakes.get(k) is not None and self._wakes[k].is_set()]:
            del self._waiting[k]            # woken (e.g. a relay job queued): no longer waiting
        if self._waiting and len(self._waiting) >= self.active:
            target = min(self._waiting.values())
            self.clock.sleep_until(target)
            now = self.clock.now()
            for k, t in list(self._waiting.items()):
                if t <= now:
                    del self._waiting[k]
            self._cond.notify_all()

    def sleep_until(self, when: datetime, wake: threading.Event) -> None:
        me = threading.get_ident()
        with self._cond:
            if when <= self.clock.now() or wake.is_set():
                return                      # due already: never wait for the others
            self._waiting[me] = when
            self._wakes[me] = wake
            self._advance()
            while me in self._waiting:
                if wake.is_set():
                    self._waiting.pop(me, None)
                    break
                self._cond.wait(0.05)
            self._wakes.pop(me, None)

    def poke(self) -> None:
        with self._cond:
            self._advance()                 # drops woken threads from the waiting set first
            self._cond.notify_all()


def make_sleeper(clock: Clock):
    return LockstepSleeper(clock) if isinstance(clock, SimClock) else RealSleeper(clock)


@dataclass
class JobOutcome:
    job: Job
    ok: bool
    readings: list = field(default_factory=list)
    error: str = ""


class BusWorker:
    """The thread that owns one bus: asks the core for the next job, runs it, sleeps otherwise.

    `read(master, meter, job)` returns readings for a BILLING/INSTANT job (raising DeviceError or
    ProtocolError on failure); `deliver(meter, outcome)` receives every outcome in the bus thread.
    """

    def __init__(self, name: str, master, meters: dict, schedule: BusSchedule, clock: Clock, sleeper,
                 read: Callable, deliver: Callable[[Any, JobOutcome], None], *,
                 stop: threading.Event, until: datetime | None = None, on_round: Callable[[], None] | None = None,
                 beat: Callable[[str], None] | None = None,
                 progress: Callable[[str, bool], None] | None = None) -> None:
        """`progress(name, busy)`: called with True before each job and False once it is done (the
        daemon's watchdog: a bus busy for too long is stuck; gateway/health.py)."""
        self.name, self.master, self.meters, self.schedule = name, master, meters, schedule
        self.clock, self.sleeper, self.read, self.deliver = clock, sleeper, read, deliver
        self.stop, self.until, self.on_round, self.beat = stop, until, on_round, beat
        self.progress = progress
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"bus {name}", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "BusWorker":
        self.sleeper.join()
        self.thread.start()
        return self

    def switch_relay(self, meter_id: str, closed: bool) -> Future:
        """Queue a relay command ahead of every read; the Future resolves when the meter echoed it."""
        fut: Future = Future()
        with self._lock:
            self.schedule.submit_relay(meter_id, closed, self.clock.now(), token=fut)
        self._wake_now()
        return fut

    def submit_relay_action(self, meter_id: str, action: Callable[[], None]) -> None:
        """Queue `action()` as a RELAY-priority job of `meter_id` (ahead of every read) and wake the
        bus at once: the action runs on this bus's thread, so it may use the bus master (PAYG: decide
        the supply after a new grant or a top-up and switch the relay). An action that raises is logged."""
        with self._lock:
            self.schedule.submit_relay(meter_id, None, self.clock.now(), token=action)
        self._wake_now()

    @property
    def running(self) -> bool:
        """Started and not finished: a queued job will be executed by this worker's thread."""
        return self.thread.ident is None or self.thread.is_alive()

    def _wake_now(self) -> None:
        self.wake.set()
        if isinstance(self.sleeper, LockstepSleeper):
            self.sleeper.poke()

    def _next(self) -> Job | None:
        with self._lock:
            return self.schedule.next_job(self.clock.now())

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported by the daemon, never silently lost
            self.error = exc
            log.exception("bus %s stopped", self.name)
        finally:
            self.sleeper.leave()

    def _loop(self) -> None:
        worked = False
        while True:
            job = self._next()
            if job is not None:
                if self.progress:
                    self.progress(self.name, True)
                self._execute(job)        # a job that raises leaves the bus busy: the watchdog sees it
                if self.progress:
                    self.progress(self.name, False)
                worked = True
                continue
            if worked and self.on_round:
                self.on_round()
                worked = False
            if self.stop.is_set():
                return
            self.wake.clear()             # before looking: a job queued from now on wakes the sleep below
            with self._lock:
                wake_at = self.schedule.wakeup()
            if wake_at is None or (self.until is not None and wake_at > self.until):
                return
            self.sleeper.sleep_until(wake_at, self.wake)
            if self.stop.is_set():
                return

    def _execute(self, job: Job) -> None:
        meter = self.meters[job.meter_id]
        if job.priority == Priority.RELAY:
            self._execute_relay(meter, job)
            return
        try:
            readings = self.read(self.master, meter, job)
        except (DeviceError, ProtocolError) as exc:
            with self._lock:
                delay = self.schedule.failed(job, self.clock.now(), str(exc))
            log.warning("meter %s (unit %s) on %s: %s; retry in %.1f s", meter.id, meter.unit, self.name, exc, delay)
            self.deliver(meter, JobOutcome(job, False, [], f"meter {meter.id} (unit {meter.unit}) on {self.name}: {exc}"))
            return
        with self._lock:
            self.schedule.succeeded(job, self.clock.now())
        if self.beat:
            self.beat(self.name)
        self.deliver(meter, JobOutcome(job, True, readings))

    def _execute_relay(self, meter, job: Job) -> None:
        if job.closed is None and callable(job.token):     # submit_relay_action
            try:
                job.token()
            except Exception:  # noqa: BLE001 - an action never stops the bus
                log.exception("relay action for meter %s on %s failed", meter.id, self.name)
            return
        fut: Future | None = job.token
        coil = meter.profile.relay_coil
        if coil is None:
            if fut is not None and not fut.done():
                fut.set_exception(DeviceError(f"meter {meter.id}: profile {meter.profile.name} has no relay coil"))
            return
        req = modbus.Request(meter.unit, modbus.WRITE_SINGLE_COIL, coil, value=0xFF00 if job.closed else 0x0000)
        try:
            self.master.execute(req)
        except (DeviceError, ProtocolError) as exc:
            with self._lock:
                delay = self.schedule.failed(job, self.clock.now(), str(exc))
            if delay < 0 and fut is not None and not fut.done():
                fut.set_exception(DeviceError(f"relay command to meter {meter.id} failed after "
                                              f"{job.attempt} attempts: {exc}"))
            return
        if fut is not None and not fut.done():
            fut.set_result(self.clock.now())
