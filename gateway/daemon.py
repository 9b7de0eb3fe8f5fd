"""The gateway daemon loop: poll on schedule, journal first, then push; the clock decides when.

`run` starts one scheduler thread per bus (gateway/scheduler.py): relay commands first, then
billing registers, then instantaneous values, per-meter backoff, optional stagger. Every poll's
readings are checked for plausibility (flagged, never dropped), journaled, published on MQTT when
configured, and pushed to the head-end by a separate sync thread so a slow head-end never delays
polling.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import shutil
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from meterlink.clock import Clock, to_ms, from_ms
from meterlink.errors import DeviceError, MeterlinkError, ProtocolError

from meterlink.clock import clock_trusted
from meterlink.readings import BILLING_OBIS

from . import scheduler as sched
from .config import GatewayConfig
from .health import ProgressMonitor, Watchdog
from .journal import Journal, billing_only_readings, disk_pressure
from .p1 import P1Reader, P1Worker
from .plausibility import MeterMemo, check_readings
from .poller import default_max_gap, read_meter
from .readplan import plan_reads
from .sync import Backoff, Pusher, Refused, load_or_create_key
from .transport import open_master

log = logging.getLogger("meterlink.gateway")


def next_boundary(now: datetime, interval_s: int) -> datetime:
    """The next poll instant aligned to the interval grid (e.g. :00, :15, :30, :45)."""
    ms = to_ms(now)
    step = interval_s * 1000
    return from_ms((ms // step + 1) * step)


@dataclass
class Stats:
    polls: int = 0
    readings: int = 0
    read_errors: int = 0
    pushed: int = 0
    push_errors: int = 0
    errors: list[str] = field(default_factory=list)
    flagged: int = 0          # readings that carry a plausibility flag
    config_pulls: int = 0     # signed configuration deltas pulled and applied (or already current)
    config_pull_errors: int = 0   # pulls that failed (unreachable) or were refused (forged, replayed)


class _LockedJournal:
    """The journal shared by the bus threads and the sync thread: one call at a time.

    Each call (an append's whole transaction, a query, an ack) holds the lock; a push's RPC
    between `unacked` and `mark_acked` does not, so a slow head-end never blocks polling.
    """

    def __init__(self, journal: Journal, lock: threading.RLock) -> None:
        self._journal, self._lock = journal, lock

    def __getattr__(self, name: str):
        attr = getattr(self._journal, name)
        if not callable(attr):
            return attr
        lock = self._lock

        def locked(*args, **kwargs):
            with lock:
                return attr(*args, **kwargs)
        return locked


def signing_key_path(config: GatewayConfig) -> Path:
    """The Ed25519 key that signs chain heads: `signing_key` if configured, else `signing.key` beside the journal."""
    explicit = getattr(config, "signing_key", None)
    if explicit:
        return Path(explicit)
    return Path(config.database).parent / "signing.key"


class Gateway:
    def __init__(self, config: GatewayConfig, clock: Clock, *, rng: random.Random | None = None,
                 publisher=None) -> None:
        self.config, self.clock = config, clock
        self._journal_lock = threading.RLock()
        self.journal = _LockedJournal(Journal(config.database), self._journal_lock)
        self.masters = [open_master(b.port, baud=b.baud, parity=b.parity, stopbits=b.stopbits, timeout=b.timeout_s)
                        for b in config.buses]
        self.p1_readers = [P1Reader(p.port, p.version, clock=clock) for p in getattr(config, "p1", ())]
        self.key = load_or_create_key(signing_key_path(config))
        self.pusher = None
        if config.headend:
            from .enrol import headend_credentials   # mutual TLS when [headend] pki_dir is set (enrolled)
            self.pusher = Pusher(config.id, config.headend, self.journal, config.push_batch, key=self.key,
                                 credentials=headend_credentials(config),
                                 server_name=getattr(config, "headend_server_name", None))
        self.stats = Stats()
        # sync back-off while the head-end is down or refusing: jittered, on the injected clock
        self.backoff = Backoff(base_s=float(getattr(config, "push_backoff_base_s", 5.0)),
                               cap_s=float(getattr(config, "push_backoff_max_s", 300.0)), rng=rng or random.Random())
        self.next_push_at: datetime | None = None
        # retention: acked records older than this are pruned; disk pressure below min free (permille)
        self.keep_acked_days = int(getattr(config, "keep_acked_days", 7))
        self.min_free_permille = int(getattr(config, "min_free_permille", 50))
        self.disk_usage = shutil.disk_usage   # injectable: (path) -> (total, used, free)
        self.disk_alarm = False
        self.metrics = None                   # meterlink.metrics.GatewayMetrics, when the daemon serves them
        # backoff jitter: seeded per gateway, so gateways desynchronise but a run is reproducible
        self.rng = rng if rng is not None else random.Random(
            int.from_bytes(hashlib.sha256(config.id.encode()).digest()[:8], "big"))
        # signed configuration deltas pulled periodically when enrolled ([headend] pki_dir); failures back off
        self.config_pull_s = float(getattr(config, "config_pull_s", None) or 3600.0)
        self.config_pull_backoff = Backoff(base_s=min(30.0, self.config_pull_s), cap_s=self.config_pull_s,
                                           rng=self.rng)
        self.next_config_pull: datetime | None = None
        self.config_version: int | None = None
        self._config_puller = None
        self._config_channel = None
        self.memos: dict[str, MeterMemo] = {}
        self.workers: list[sched.BusWorker] = []
        self._stats_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._plans: dict[tuple[str, object], list] = {}
        self._max_block: dict[str, int] = {}      # per meter: block limit learnt from exception 3
        self.serial_every = int(getattr(config, "serial_every", None) or 96)
        self._serial_age: dict[str, int] = {}     # per meter: billing reads since the serial was last read
        self._serial_wanted: set[str] = set()     # meters whose next read checks the serial (error, flags)
        self._refused: dict[str, frozenset[int]] = {}
        self.mqtt = publisher
        if self.mqtt is None and config.mqtt is not None:
            from .mqtt import MqttPublisher
            self.mqtt = MqttPublisher(config.id, config.mqtt.host, config.mqtt.port,
                                      topic_prefix=config.mqtt.topic_prefix,
                                      queue_size=config.mqtt.queue_size).start()
        from .payg_sync import hook_for_gateway   # [[payg]] meters: credit control + relay (docs/payg.md)
        self.payg = hook_for_gateway(self)

    def enable_metrics(self):
        """Count into a GatewayMetrics (created here unless set) and expose the parts' own counters
        at scrape time; returns it (serve it with meterlink.metrics.serve_metrics)."""
        from meterlink.metrics import GatewayMetrics
        if self.metrics is None:
            self.metrics = GatewayMetrics.create()
        self.metrics.watch(self.metrics_snapshot)
        if self.pusher is not None:
            self.pusher.metrics = self.metrics
        return self.metrics

    def metrics_snapshot(self):
        """The counters the transports, P1 readers, MQTT publisher and journal keep, at this instant."""
        from meterlink.metrics import GatewaySnapshot
        return GatewaySnapshot(
            buses=tuple((b.port, m.counters) for b, m in zip(self.config.buses, self.masters)),
            p1=tuple((p.port, r.counters) for p, r in zip(getattr(self.config, "p1", ()), self.p1_readers)),
            mqtt=getattr(self.mqtt, "stats", None), journal_records=self.journal.depth(),
            unacked_records=self.journal.unacked_count())

    def close(self) -> None:
        if getattr(self, "payg", None) is not None:   # PAYG card terminal sockets
            self.payg.close()
        for m in self.masters:
            m.close()
        for r in self.p1_readers:
            r.close()
        if self.pusher:
            self.pusher.close()
        if self._config_channel is not None:
            self._config_channel.close()
        if self.mqtt is not None:
            self.mqtt.close()
        self.journal.close()

    # -- one poll's readings: plausibility -> journal -> MQTT -----------------------------------
    def accept(self, meter, readings: list, serial: int | None = None) -> list:
        """Flag, journal (one commit) and publish one poll's readings of `meter`; returns them."""
        return self.commit([self.flag(meter, readings, serial)])

    def flag(self, meter, readings: list, serial: int | None = None, trusted: bool | None = None) -> list:
        """Plausibility flags for one poll of `meter` against what it said before (memo updated).

        `trusted`: the clock's trust state when the meter answered (default: now)."""
        if trusted is None:
            trusted = clock_trusted(self.clock)
        limit = meter.max_power_w if getattr(meter, "max_power_w", None) else meter.profile.max_power_w
        resolution = {q.obis: q.resolution for q in meter.profile.quantities}
        with self._stats_lock:
            flagged, self.memos[meter.id] = check_readings(
                self.memos.get(meter.id), readings, max_power_w=limit or 0, resolution_wh=resolution,
                serial=serial, clock_trusted=trusted)
            self.stats.flagged += sum(1 for r in flagged if r.quality)
        if any(r.quality for r in flagged):
            self._serial_wanted.add(meter.id)     # implausible values: was the meter exchanged?
        return flagged

    def commit(self, polls: list[list]) -> list:
        """Journal several polls' flagged readings in ONE transaction (one flash sync), then publish."""
        flagged = [r for poll in polls for r in poll]
        if self.journal.billing_only:   # disk nearly full: keep billing registers only
            flagged = billing_only_readings(flagged)
        self.journal.append(flagged)
        if self.mqtt is not None:
            self.mqtt.publish(flagged)
        return flagged

    def accept_p1(self, p1, got) -> list:
        """Flag, journal (the whole telegram in one commit) and publish one P1 telegram's readings."""
        by_meter: dict[str, list] = {}
        for r in got.readings:
            by_meter.setdefault(r.meter_id, []).append(r)
        flagged: list = []
        with self._stats_lock:
            for mid, readings in by_meter.items():
                serial = got.telegram.serial if mid == (p1.meter_id or got.telegram.serial) else None
                out, self.memos[mid] = check_readings(self.memos.get(mid), readings, serial=serial,
                                                      clock_trusted=clock_trusted(self.clock))
                flagged += out
            self.stats.flagged += sum(1 for r in flagged if r.quality)
            self.stats.readings += len(flagged)
        if self.metrics is not None:
            self.metrics.readings.labels(bus=p1.port).inc(len(flagged))
        if self.journal.billing_only:
            flagged = billing_only_readings(flagged)
        self.journal.append(flagged)
        if self.mqtt is not None:
            self.mqtt.publish(flagged)
        return flagged

    def _p1_error(self, message: str) -> None:
        with self._stats_lock:
            self.stats.read_errors += 1
        self._note(message)

    def _blocks(self, master, meter, priority: int, merged: bool = False) -> list:
        """The meter's read plan for a job: billing or instantaneous quantities, or (merged) all of
        them in one plan; within the block limit the meter really accepts (learnt from exception 3)."""
        key = (meter.id, "merged" if merged else priority)
        if key not in self._plans:
            billing = {q.obis for q in meter.profile.quantities
                       if getattr(q, "billing", q.obis in BILLING_OBIS)}
            every = {q.obis for q in meter.profile.quantities}
            only = every if merged else billing if priority == sched.Priority.BILLING else every - billing
            self._plans[key] = plan_reads(meter.profile, max_gap=default_max_gap(master, meter.profile),
                                          skip=self._refused.get(meter.id, frozenset()),
                                          only=frozenset(only), max_block=self._max_block.get(meter.id)) if only else []
        return self._plans[key]

    def _serial_due(self, meter_id: str) -> bool:
        """Read the serial number on the first poll, every `serial_every`th poll after it, and on the
        next poll after a failed read or a plausibility flag (a meter exchange is suspected)."""
        since = self._serial_age.get(meter_id)
        return since is None or meter_id in self._serial_wanted or since + 1 >= self.serial_every

    def _read_job(self, master, meter, job: sched.Job) -> tuple[list, int | None]:
        """Execute one scheduled read (billing, instantaneous, or both merged into one plan, of one meter)."""
        if job.priority == sched.Priority.INSTANT and self.journal.billing_only:
            return [], None           # disk nearly full: billing registers only
        merged = job.merged and not self.journal.billing_only
        blocks = self._blocks(master, meter, job.priority, merged)
        with_serial = job.priority == sched.Priority.BILLING and self._serial_due(meter.id)
        try:
            result = read_meter(master, meter.unit, meter.profile, meter.id, self.clock, blocks=blocks,
                                refused=self._refused.get(meter.id, frozenset()), with_serial=with_serial)
        except (DeviceError, ProtocolError):
            self._serial_wanted.add(meter.id)     # after any error: check the serial on the next read
            raise
        serial = result.serial
        if not with_serial and job.priority == sched.Priority.BILLING and self._register_fell(meter.id, result.readings):
            # a cumulative register went down: an exchanged meter or a fault? its serial number decides, now
            with_serial = True
            serial = read_meter(master, meter.unit, meter.profile, meter.id, self.clock, blocks=[],
                                refused=result.refused, with_serial=True).serial
        if with_serial:
            self._serial_age[meter.id] = 0
            self._serial_wanted.discard(meter.id)
        elif job.priority == sched.Priority.BILLING:
            self._serial_age[meter.id] = self._serial_age.get(meter.id, 0) + 1
        replan = False
        if result.newly_refused:  # remember what this meter refuses: re-plan without it
            self._refused[meter.id] = result.refused
            replan = True
        if result.max_block is not None and result.max_block < self._max_block.get(meter.id, meter.profile.max_block):
            self._max_block[meter.id] = result.max_block   # firmware accepts shorter reads than its profile says
            replan = True
        if replan:
            for k in [k for k in self._plans if k[0] == meter.id]:
                del self._plans[k]
        readings = result.readings
        if merged:   # the billing registers' block is read first; journal them first too
            billing = {q.obis for q in meter.profile.quantities if getattr(q, "billing", q.obis in BILLING_OBIS)}
            readings = sorted(readings, key=lambda r: r.obis not in billing)
        return readings, serial

    def _register_fell(self, meter_id: str, readings: list) -> bool:
        """Any cumulative register below what this meter said last (the memo the journal writer keeps)."""
        memo = self.memos.get(meter_id)
        if memo is None:
            return False
        return any(r.obis in memo.registers and r.value < memo.registers[r.obis].value for r in readings)

    def switch_relay(self, meter_id: str, closed: bool):
        """Queue a relay command on the meter's bus (ahead of every read); returns a Future.

        Only while `run` is polling; the Future resolves with the instant the meter confirmed it.
        """
        for worker in self.workers:
            if meter_id in worker.meters:
                return worker.switch_relay(meter_id, closed)
        raise KeyError(f"meter {meter_id} is not on any running bus")

    def schedule_for(self, bus, first: datetime, catch_up_before: datetime | None = None) -> sched.BusSchedule:
        interval = self.config.poll_interval_s
        backoff = sched.BackoffPolicy(base_s=bus.backoff_base_s if hasattr(bus, "backoff_base_s") else 2.0,
                                      max_s=getattr(bus, "backoff_max_s", None) or float(interval))
        meters = []
        for m in bus.meters:
            billing = any(getattr(q, "billing", q.obis in BILLING_OBIS) for q in m.profile.quantities)
            instant = any(not getattr(q, "billing", q.obis in BILLING_OBIS) for q in m.profile.quantities)
            meters.append((m.id, billing, instant))
        return sched.BusSchedule(meters, interval, first, stagger_s=getattr(bus, "stagger_s", 0.0),
                                 backoff=backoff, rng=self.rng, catch_up_before=catch_up_before,
                                 merge=True)   # billing + instantaneous due together: one merged plan

    def poll_once(self) -> int:
        """Read every configured meter once; each meter's readings are journaled in one commit."""
        n = 0
        for bus, master in zip(self.config.buses, self.masters):
            for meter in bus.meters:
                try:
                    result = read_meter(master, meter.unit, meter.profile, meter.id, self.clock,
                                        refused=self._refused.get(meter.id, frozenset()), with_serial=True)
                    serial = result.serial
                    if result.newly_refused:
                        self._refused[meter.id] = result.refused
                except (DeviceError, ProtocolError) as exc:
                    self.stats.read_errors += 1
                    self._note(f"meter {meter.id} (unit {meter.unit}) on {bus.port}: {exc}")
                    continue
                self.accept(meter, result.readings, serial)
                n += len(result.readings)
        self.stats.polls += 1
        self.stats.readings += n
        return n

    def sync_once(self, force: bool = False) -> int:
        """Drain the journal to the head-end unless backing off (resumes from the last ack); a failure
        or refusal schedules the next try after a jittered exponential back-off on the injected clock."""
        if self.pusher is None:
            return 0
        with self._sync_lock:
            now = self.clock.now()
            if not force and self.next_push_at is not None and now < self.next_push_at:
                return 0
            t0 = time.monotonic()
            try:
                sent = self.pusher.drain()
            except (DeviceError, Refused, ValueError, TypeError) as exc:   # unreachable, refused, corrupt row
                if self.metrics is not None:
                    self.metrics.push_latency.observe(time.monotonic() - t0)
                    if self.metrics.push_failures is not None:
                        self.metrics.push_failures.inc()
                self.stats.push_errors += 1
                self._note(str(exc))
                self.next_push_at = now + timedelta(seconds=self.backoff.next_delay())
                return 0
            if self.metrics is not None and sent:
                self.metrics.push_latency.observe(time.monotonic() - t0)
            self.backoff.reset()
            self.next_push_at = None
        self.stats.pushed += sent
        return sent

    def pull_config_once(self, force: bool = False) -> bool:
        """When enrolled and due: pull the head-end's signed configuration delta, verify and apply it
        (gateway/configpull.py). Never fatal: a failure (head-end unreachable, delta refused as forged or
        replayed) is counted, noted, and the next try waits a jittered back-off capped at `config_pull_s`."""
        pki_dir = getattr(self.config, "headend_pki_dir", None)
        if not pki_dir or not self.config.headend:
            return False
        now = self.clock.now()
        if not force and self.next_config_pull is not None and now < self.next_config_pull:
            return False
        from .configpull import ConfigDeltaRefused, ConfigPuller
        try:
            if self._config_puller is None:
                from .enrol import headend_channel, load_identity
                self._config_channel = headend_channel(self.config)
                self._config_puller = ConfigPuller.for_identity(self._config_channel, load_identity(pki_dir))
            state = self._config_puller.pull_once()
        except MeterlinkError as exc:
            result = "refused" if isinstance(exc, ConfigDeltaRefused) else "failed"
            with self._stats_lock:
                self.stats.config_pull_errors += 1
            if self.metrics is not None and getattr(self.metrics, "config_pulls", None) is not None:
                self.metrics.config_pulls.labels(result=result).inc()
            self._note(f"configuration pull from head-end {self.config.headend} {result}: {exc}")
            self.next_config_pull = now + timedelta(seconds=self.config_pull_backoff.next_delay())
            return False
        self.config_pull_backoff.reset()
        with self._stats_lock:
            self.stats.config_pulls += 1
        if self.metrics is not None and getattr(self.metrics, "config_pulls", None) is not None:
            self.metrics.config_pulls.labels(result="ok").inc()
        if state.version != self.config_version:
            log.info("gateway %s: configuration version %d applied", self.config.id, state.version)
        self.config_version = state.version
        self.next_config_pull = now + timedelta(seconds=self.config_pull_s)
        return True

    def push_due(self) -> bool:
        """A failed push is waiting and its back-off has expired."""
        return self.next_push_at is not None and self.clock.now() >= self.next_push_at

    def retention_once(self) -> None:
        """Prune acked records older than keep_acked_days; under disk pressure run the journal's pressure
        policy (drop acked, tombstone unacked instantaneous readings, billing-only polling) and raise the alarm."""
        now = self.clock.now()
        self.journal.prune_acked(to_ms(now - timedelta(days=self.keep_acked_days)))
        if self.config.database == ":memory:":
            return
        total, _used, free = self.disk_usage(str(Path(self.config.database).parent))
        if disk_pressure(free, total, self.min_free_permille):
            report = self.journal.relieve_pressure()
            if not self.disk_alarm:
                log.error("ALARM journal %s: disk nearly full (%d of %d bytes free): dropped %d acked records, "
                          "pruned %d unacked instantaneous readings; polling billing registers only",
                          self.config.database, free, total, report.acked_deleted, report.pruned)
                self._note(f"disk nearly full: journal {self.config.database} in billing-only mode")
            self.disk_alarm = True
            if self.metrics is not None and self.metrics.disk_alarm is not None:
                self.metrics.disk_alarm.set(1)
        elif self.journal.billing_only and not disk_pressure(free, total, 2 * self.min_free_permille):
            self.journal.set_billing_only(False)
            self.disk_alarm = False
            if self.metrics is not None and self.metrics.disk_alarm is not None:
                self.metrics.disk_alarm.set(0)
            log.warning("journal %s: disk pressure gone; polling every register again", self.config.database)

    @staticmethod
    def _watch_p1(worker, liveness) -> None:
        """A P1 port is busy while it waits for a telegram (at most its `wait_s`), idle between polls."""
        name = f"p1 {worker.reader.port}"
        poll = worker.poll_once

        def watched():
            liveness(name, True)
            got = poll()              # an exception leaves the port busy: the watchdog sees it
            liveness(name, False)
            return got
        worker.poll_once = watched
        liveness(name, False)

    def _note(self, message: str) -> None:
        log.warning(message)
        with self._stats_lock:
            self.stats.errors.append(message)
            del self.stats.errors[:-20]  # bounded

    def run(self, stop: threading.Event, until: datetime | None = None, first: datetime | None = None, *,
            notifier=None, watchdog_s: float | None = None, monotonic=time.monotonic) -> None:
        """Poll every bus on its own scheduler thread from `first` (default: the next interval
        boundary) until `stop` is set or the clock passes `until`; then push what is left.

        `notifier` (meterlink.sdnotify.Notifier): READY=1 once the first poll is journaled, STATUS=
        lines, and with `watchdog_s` (half of WatchdogSec) WATCHDOG=1 every `watchdog_s` only while
        every bus poller and the journal writer progress (gateway/health.py): a bus whose read hangs
        for longer than `stall_after_s` (default: WatchdogSec) stops the pings.
        """
        interval = self.config.poll_interval_s
        stall_s = float(getattr(self.config, "stall_after_s", None) or (2 * watchdog_s if watchdog_s else 120.0))
        self.progress = progress = ProgressMonitor(max_silence_s=stall_s)
        ready_sent = threading.Event()

        def liveness(name: str, busy: bool) -> None:
            (progress.busy if busy else progress.idle)(name, monotonic())

        def journaled() -> None:
            if notifier is not None and not ready_sent.is_set():
                ready_sent.set()          # journal writes work and polling runs
                notifier.ready(status_text())

        def accept_p1(p1, got) -> list:
            out = self.accept_p1(p1, got)
            journaled()
            return out
        # an explicit first poll in the past: every boundary since is polled once, at once (as before)
        catch_up_before = self.clock.now() if first is not None else None
        first = first or next_boundary(self.clock.now() - timedelta(milliseconds=1), interval)
        sleeper = sched.make_sleeper(self.clock)
        sync_wanted = threading.Event()
        done = threading.Event()

        # Bus threads hand each poll to the journal writer and go on polling: flash syncs (and
        # MQTT hand-off) never hold up the bus; polls waiting together share one commit.
        polls: queue.Queue = queue.Queue()
        writer_done = threading.Event()

        bus_of = {m.id: bus.port for bus in self.config.buses for m in bus.meters}

        def deliver(meter, outcome: sched.JobOutcome) -> None:
            if not outcome.ok:
                with self._stats_lock:
                    self.stats.read_errors += 1
                if self.metrics is not None:
                    self.metrics.bus_errors.labels(bus=bus_of[meter.id]).inc()
                self._note(outcome.error)
                return
            if self.metrics is not None:
                self.metrics.readings.labels(bus=bus_of[meter.id]).inc(len(outcome.readings[0]))
            polls.put((meter, outcome.readings, clock_trusted(self.clock)))
            if self.payg is not None:            # PAYG: charge 1.8.0, decide, relay (this bus thread)
                self.payg.on_poll(meter, outcome.readings[0])

        def writer() -> None:
            while True:
                try:
                    batch = [polls.get(timeout=0.1)]
                except queue.Empty:
                    if writer_done.is_set():
                        return
                    continue
                while True:
                    try:
                        batch.append(polls.get_nowait())
                    except queue.Empty:
                        break
                liveness("journal writer", True)
                flagged = [self.flag(meter, readings, serial, trusted)
                           for meter, (readings, serial), trusted in batch]
                try:
                    self.commit(flagged)
                except Exception as exc:  # noqa: BLE001 - a failed commit must not stop polling
                    log.exception("journal commit failed")
                    self._note(f"journal {self.config.database}: commit of {len(batch)} poll(s) failed: {exc}")
                    continue        # left busy: a journal that never commits again stops the watchdog
                liveness("journal writer", False)
                journaled()
                with self._stats_lock:
                    self.stats.readings += sum(len(p) for p in flagged)
                sync_wanted.set()

        def status_text() -> str:
            s = self.stats
            pushed = f", {s.pushed} pushed" if self.pusher is not None else ""
            return (f"polling {sum(len(w.meters) for w in self.workers)} meter(s) on {len(self.workers)} "
                    f"bus(es): {s.polls} polls, {s.readings} readings, {s.read_errors} read errors{pushed}")

        def round_done() -> None:
            with self._stats_lock:
                self.stats.polls += 1

        def syncer() -> None:
            while not done.is_set():
                self.pull_config_once()       # when enrolled and due (cheap otherwise)
                if sync_wanted.wait(0.2):
                    sync_wanted.clear()
                    self.sync_once()
                    self.retention_once()
                elif self.push_due():
                    self.sync_once()

        self.workers = []
        for bus, master in zip(self.config.buses, self.masters):
            meters = {m.id: m for m in bus.meters}
            if not meters:
                continue
            self.workers.append(sched.BusWorker(
                bus.port, master, meters, self.schedule_for(bus, first, catch_up_before), self.clock, sleeper,
                lambda master, meter, job: self._read_job(master, meter, job), deliver,
                stop=stop, until=until, on_round=round_done, progress=liveness))
            liveness(self.workers[-1].name, False)
        for p1, reader in zip(getattr(self.config, "p1", ()), self.p1_readers):   # DSMR P1 ports
            self.workers.append(P1Worker(p1, reader, self.clock, sleeper, interval, first, accept_p1,
                                         self._p1_error, stop=stop, until=until, on_round=round_done))
            self._watch_p1(self.workers[-1], liveness)
        sync_thread = threading.Thread(target=syncer, name="sync", daemon=True)
        writer_thread = threading.Thread(target=writer, name="journal writer", daemon=True)
        liveness("journal writer", False)
        watchdog = None
        if notifier is not None and watchdog_s:
            watchdog = Watchdog(notifier, progress, watchdog_s, monotonic, status_text).start()
        if self.payg is not None:                # PAYG: re-evaluate credit before the first poll
            self.payg.boot()
        writer_thread.start()
        if self.pusher is not None:
            sync_thread.start()
        for w in self.workers:
            w.start()
        try:
            for w in self.workers:
                while w.thread.is_alive():
                    w.thread.join(0.2)
                    if stop.is_set():
                        for other in self.workers:
                            other.wake.set()
        finally:
            if notifier is not None:
                notifier.stopping()
            if watchdog is not None:
                watchdog.stop()
            writer_done.set()
            writer_thread.join()        # every poll taken is journaled before run returns
            done.set()
            if sync_thread.is_alive():
                sync_thread.join()
        self.sync_once(force=True)
        for w in self.workers:
            if w.error is not None:
                raise w.error
