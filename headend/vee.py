"""Validation and estimation (VEE): cumulative register readings -> interval consumption; never does I/O or bills a flagged Wh silently.

A reading is a cumulative register snapshot (Wh). Interval consumption is the difference of the
register at two interval boundaries of a grid aligned in UTC (15 minutes by default, configurable
per market). A boundary with a real reading exactly on it uses that reading; any other boundary
value is *estimated* by apportioning the register difference of the surrounding pair of readings
over time, in integer Wh, with the largest-remainder (Hamilton) method:

    pieces of the gap cut by grid boundaries, durations d_j (microseconds), total T, difference D
    quota_j = D * d_j / T ;  piece_j = floor(quota_j)
    the D - sum(floor) Wh left over go, one each, to the pieces with the largest remainders
    (ties: earliest piece first)

so every piece is an integer, >= 0 when D >= 0, and the pieces sum to D exactly. Intervals with
an estimated boundary carry `estimated=True`; when a real reading arrives later, `derive_intervals`
over the new reading set and `diff_intervals(old, new)` say which intervals changed and by how many
Wh, so the caller books adjustments (issued bills are never edited).

Detected and flagged, with a `VeeException` for the operator's queue:
  * ``decrease``          register went backwards (no rollover explains it): intervals HELD
  * ``rollover``          register wrapped at its configured maximum: corrected, billable, reported
  * ``meter_exchange``    serial changed (reading quality METER_EXCHANGE) without an exchange event
                          giving final and initial reads: intervals HELD until the event is recorded
  * ``implausible_jump``  energy above max power x time: intervals HELD
  * ``conflicting_readings`` two different values at one instant: the first is kept, reported
Held intervals keep the raw register difference (so interval sums still equal register
differences) but `Interval.held` is true and rating refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

from meterlink.errors import ValidationError
from meterlink.readings import Quality, Reading

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Interval flags (strings so they read well in storage, CLIs and exception queues).
ESTIMATED = "estimated"
DECREASE = "decrease"
ROLLOVER = "rollover"
METER_EXCHANGE = "meter_exchange"             # exchange recorded with final/initial reads: billable
EXCHANGE_WITHOUT_READS = "exchange_without_reads"  # serial changed, reads unknown: held
IMPLAUSIBLE_JUMP = "implausible_jump"
HOLD_FLAGS = frozenset({DECREASE, EXCHANGE_WITHOUT_READS, IMPLAUSIBLE_JUMP})

ENERGY_UNITS = frozenset({"Wh", "varh"})


@dataclass(frozen=True)
class VeeConfig:
    """Per-market / per-meter VEE parameters."""

    interval: timedelta = timedelta(minutes=15)   # grid step, aligned to 00:00 UTC; must divide a day
    register_max: int | None = None               # highest register value; wraps to 0 after it
    max_power_w: int | None = None                # above max_power_w x time the rise is implausible

    def __post_init__(self) -> None:
        us = self.interval // _US
        if us <= 0 or (86_400_000_000 % us) != 0:
            raise ValueError(f"VEE interval {self.interval} must be positive and divide a day")
        if self.register_max is not None and self.register_max <= 0:
            raise ValueError(f"register_max {self.register_max} must be positive")
        if self.max_power_w is not None and self.max_power_w <= 0:
            raise ValueError(f"max_power_w {self.max_power_w} must be positive")


@dataclass(frozen=True)
class MeterExchange:
    """A meter exchange on one register: the old meter's final read and the new one's initial read at `at`."""

    meter_id: str
    obis: str
    at: datetime
    final_read: int       # old meter's register at removal (Wh)
    initial_read: int     # new meter's register at installation (Wh)
    old_serial: str = ""
    new_serial: str = ""


@dataclass(frozen=True, order=True)
class Interval:
    meter_id: str
    obis: str
    start: datetime       # aware UTC, on the grid
    end: datetime         # start + interval
    wh: int
    estimated: bool = False
    flags: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def held(self) -> bool:
        """True when a VEE flag forbids billing this interval until the exception is resolved."""
        return bool(self.flags & HOLD_FLAGS)


@dataclass(frozen=True)
class VeeException:
    meter_id: str
    obis: str
    kind: str             # decrease | rollover | meter_exchange | implausible_jump | conflicting_readings
    at: datetime          # instant of the reading at which it was detected
    detail: str


@dataclass(frozen=True)
class VeeResult:
    intervals: tuple[Interval, ...]
    exceptions: tuple[VeeException, ...]


@dataclass(frozen=True)
class IntervalChange:
    """One interval whose value or status differs between two derivations (old/new None = absent)."""

    meter_id: str
    obis: str
    start: datetime
    end: datetime
    old: Interval | None
    new: Interval | None

    @property
    def delta_wh(self) -> int:
        return (self.new.wh if self.new else 0) - (self.old.wh if self.old else 0)


# --------------------------------------------------------------------------- apportioning

def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split integer `total` over non-negative integer `weights` by largest remainder; sums to `total` exactly."""
    if not isinstance(total, int) or isinstance(total, bool):
        raise TypeError(f"apportion total must be int, got {total!r}")
    if any(w < 0 for w in weights):
        raise ValueError(f"apportion weights must be >= 0, got {list(weights)}")
    weight_sum = sum(weights)
    if not weights:
        raise ValueError("apportion needs at least one weight")
    if weight_sum == 0:
        raise ValueError("apportion weights sum to zero")
    sign = -1 if total < 0 else 1
    magnitude = abs(total)
    shares = [magnitude * w // weight_sum for w in weights]
    remainders = [magnitude * w % weight_sum for w in weights]
    left = magnitude - sum(shares)
    # largest remainder first; ties go to the earliest piece
    for j in sorted(range(len(weights)), key=lambda j: (-remainders[j], j))[:left]:
        shares[j] += 1
    return [sign * s for s in shares]


# --------------------------------------------------------------------------- derivation

@dataclass(slots=True)
class _Point:
    at: datetime
    value: int
    real: bool
    serial_changed: bool = False
    exchange: MeterExchange | None = None   # set on the two points an exchange contributes
    is_initial: bool = False


_ESTIMATED_Q = int(Quality.ESTIMATED)
_EXCHANGE_Q = int(Quality.METER_EXCHANGE)
_NO_FLAGS: frozenset[str] = frozenset()
_BOUNDARIES: dict[int, datetime] = {}    # grid boundary (us since the epoch) -> its datetime, shared by meters


def _where(a: _Point, b: _Point) -> str:
    return f"between {a.at.isoformat()} ({a.value} Wh) and {b.at.isoformat()} ({b.value} Wh)"


def _plausible(delta: int, duration: timedelta, max_power_w: int | None) -> bool:
    if max_power_w is None or delta <= 0:
        return True
    # delta Wh <= P W * seconds / 3600, in exact integers (microseconds)
    return delta * 3_600_000_000 <= max_power_w * (duration // _US)


def _points(meter_id: str, obis: str, readings: list[Reading], exchanges: list[MeterExchange],
            exceptions: list[VeeException]) -> list[_Point]:
    readings.sort(key=lambda r: r.taken_at)
    exchange_at = {e.at for e in exchanges}
    points: list[_Point] = []
    for r in readings:
        if r.unit not in ENERGY_UNITS:
            raise ValidationError(f"meter {meter_id} register {obis}: VEE needs a cumulative energy "
                                  f"register, got unit {r.unit!r}")
        if r.taken_at in exchange_at:
            continue    # the exchange event's final/initial reads are the readings at that instant
        if points and points[-1].at == r.taken_at:
            if points[-1].value != r.value:
                exceptions.append(VeeException(meter_id, obis, "conflicting_readings", r.taken_at,
                                               f"register read {points[-1].value} Wh and {r.value} Wh at "
                                               f"the same instant; kept {points[-1].value} Wh"))
            continue
        q = r.quality                 # plain int compares: IntFlag arithmetic is slow on this path
        if q:
            points.append(_Point(r.taken_at, r.value, not (q & _ESTIMATED_Q), bool(q & _EXCHANGE_Q)))
        else:
            points.append(_Point(r.taken_at, r.value, True))
    for e in sorted(exchanges, key=lambda e: e.at):
        points.append(_Point(e.at, e.final_read, True, exchange=e))
        points.append(_Point(e.at, e.initial_read, True, exchange=e, is_initial=True))
    points.sort(key=lambda p: (p.at, p.is_initial))
    return points


def _derive_one(meter_id: str, obis: str, readings: list[Reading], exchanges: list[MeterExchange],
                config: VeeConfig) -> tuple[list[Interval], list[VeeException]]:
    exceptions: list[VeeException] = []
    points = _points(meter_id, obis, readings, exchanges, exceptions)
    if len(points) < 2:
        return [], exceptions

    # knots on a continuous consumption axis (Wh since the first point), instants as integer microseconds
    # since the epoch (the grid is aligned to it): k_us[i], k_cum[i], k_real[i]
    epoch = EPOCH
    k_us = [(points[0].at - epoch) // _US]
    k_cum = [0]
    k_real = [points[0].real]
    seg_flags: list[frozenset[str]] = []      # flags of the segment knots[i] -> knots[i+1]
    max_power_w = config.max_power_w
    for a, b in zip(points, points[1:]):
        if b.is_initial:                      # old meter's final read -> new meter's initial read
            continue                          # same instant, no energy: the register base changes
        raw = b.value - a.value
        b_us = (b.at - epoch) // _US
        delta = raw
        if raw >= 0 and not b.serial_changed and a.exchange is None and b.exchange is None and \
                (max_power_w is None or delta == 0 or
                 delta * 3_600_000_000 <= max_power_w * (b_us - (a.at - epoch) // _US)):
            k_us.append(b_us)                 # the usual case: nothing to flag
            k_cum.append(k_cum[-1] + delta)
            k_real.append(b.real)
            seg_flags.append(_NO_FLAGS)
            continue
        duration = b.at - a.at
        flags: set[str] = set()
        where = _where(a, b)
        if a.exchange is not None or b.exchange is not None:
            flags.add(METER_EXCHANGE)
        if b.serial_changed and a.exchange is None and b.exchange is None:
            flags.add(EXCHANGE_WITHOUT_READS)
            exceptions.append(VeeException(meter_id, obis, "meter_exchange", b.at,
                                           f"serial changed {where} with no exchange event; record the "
                                           f"old meter's final read and the new meter's initial read"))
        elif raw < 0:
            wrapped = None
            if config.register_max is not None:
                candidate = raw + config.register_max + 1
                if 0 <= candidate < -raw and _plausible(candidate, duration, config.max_power_w):
                    wrapped = candidate
            if wrapped is not None:
                delta = wrapped
                flags.add(ROLLOVER)
                exceptions.append(VeeException(meter_id, obis, "rollover", b.at,
                                               f"register wrapped at {config.register_max} Wh {where}; "
                                               f"counted {wrapped} Wh"))
            else:
                flags.add(DECREASE)
                exceptions.append(VeeException(meter_id, obis, "decrease", b.at,
                                               f"register decreased by {-raw} Wh {where}"))
        if not (flags & {DECREASE, EXCHANGE_WITHOUT_READS}) and not _plausible(delta, duration, config.max_power_w):
            flags.add(IMPLAUSIBLE_JUMP)
            exceptions.append(VeeException(meter_id, obis, "implausible_jump", b.at,
                                           f"{delta} Wh in {duration.total_seconds():g} s exceeds max power "
                                           f"{config.max_power_w} W {where}"))
        k_us.append(b_us)
        k_cum.append(k_cum[-1] + delta)
        k_real.append(b.real)
        seg_flags.append(frozenset(flags))

    step_us = config.interval // _US
    first = -(-k_us[0] // step_us) * step_us
    # boundaries (us), their value on the consumption axis and whether both come from real readings
    v_us: list[int] = []
    v_cum: list[int] = []
    v_real: list[bool] = []
    for i in range(len(k_us) - 1):
        a0, a1 = k_us[i], k_us[i + 1]
        b = -(-a0 // step_us) * step_us
        if b < first:
            b = first
        if b == a0:
            v_us.append(b)
            v_cum.append(k_cum[i])
            v_real.append(k_real[i])
            b += step_us
        if b < a1:
            cuts = list(range(b, a1, step_us))
            edges = [a0, *cuts, a1]
            pieces = apportion(k_cum[i + 1] - k_cum[i], [e1 - e0 for e0, e1 in zip(edges, edges[1:])])
            running = k_cum[i]
            for cut, piece in zip(cuts, pieces):
                running += piece
                v_us.append(cut)
                v_cum.append(running)
                v_real.append(False)
    if k_us[-1] % step_us == 0:
        v_us.append(k_us[-1])
        v_cum.append(k_cum[-1])
        v_real.append(k_real[-1])

    intervals: list[Interval] = []
    append = intervals.append
    seg = 0
    n_seg = len(seg_flags)
    estimated_only = frozenset({ESTIMATED})
    cache = _BOUNDARIES
    if len(cache) > 200_000:
        cache.clear()
    end = None
    for n in range(len(v_us) - 1):
        b0, b1 = v_us[n], v_us[n + 1]
        found = _NO_FLAGS
        while k_us[seg + 1] <= b0:
            seg += 1
        j = seg
        while j < n_seg and k_us[j] < b1:
            if seg_flags[j]:
                found = found | seg_flags[j]
            j += 1
        estimated = not (v_real[n] and v_real[n + 1])
        if estimated:
            found = found | estimated_only if found else estimated_only
        start = end if end is not None else cache.get(b0) or cache.setdefault(b0, epoch + b0 * _US)
        end = cache.get(b1) or cache.setdefault(b1, epoch + b1 * _US)
        append(Interval(meter_id, obis, start, end, v_cum[n + 1] - v_cum[n], estimated, found))
    return intervals, exceptions


def regular_intervals(times_ms: Sequence[int], values: Sequence[int], step_ms: int,
                      max_power_w: int | None = None) -> tuple[list[int], list[int]] | None:
    """The usual case of one register, on columns: the grid boundaries (ms) and register values of the
    intervals `derive_intervals` gives, or None when the readings are not the usual case.

    `times_ms`/`values`: one register's real readings (quality 0, an energy unit, no exchange event), in
    the order `derive_intervals` takes them. The usual case: instants strictly increasing (no two readings
    at one instant), the register never going backwards, every rise plausible for `max_power_w`, and a
    reading on every grid boundary between the first and the last reading. Then every interval runs from
    one boundary reading to the next: not estimated, no flag, no exception, wh = the register difference,
    exactly as `derive_intervals` derives it (tests/rating/test_vee_regular.py compares both). Anything
    else (a gap, an estimate, a decrease, a conflict, ...) returns None and the caller derives the general way.
    """
    n = len(times_ms)
    if n != len(values):
        raise ValueError("times and values differ in length")
    if n < 2:
        return [], []
    starts: list[int] = []
    marks: list[int] = []
    prev_t, prev_v = times_ms[0], values[0]
    if prev_t % step_ms == 0:
        starts.append(prev_t)
        marks.append(prev_v)
    for i in range(1, n):
        t, v = times_ms[i], values[i]
        if t <= prev_t or v < prev_v:
            return None
        # plausible: Wh * 3.6e9 <= W * us, i.e. Wh * 3.6e6 <= W * ms (both sides of the same * 1000)
        if max_power_w is not None and v != prev_v and (v - prev_v) * 3_600_000 > max_power_w * (t - prev_t):
            return None
        if t % step_ms == 0:
            starts.append(t)
            marks.append(v)
        prev_t, prev_v = t, v
    first = -(-times_ms[0] // step_ms) * step_ms
    last = times_ms[-1] // step_ms * step_ms
    if first <= last and len(starts) != (last - first) // step_ms + 1:
        return None                               # a boundary without a reading: estimated, general way
    return starts, marks


def derive_intervals(readings: Iterable[Reading], config: VeeConfig = VeeConfig(),
                     exchanges: Iterable[MeterExchange] = ()) -> VeeResult:
    """Readings (any meters/registers, any order) -> whole grid intervals between each register's first and last point.

    Intervals cover [first grid boundary >= first reading, last grid boundary <= last reading];
    their sum equals the register difference between those boundaries exactly (rollover and
    exchange corrected). Deterministic: the same inputs always give the same intervals.
    """
    groups: dict[tuple[str, str], list[Reading]] = {}
    for r in readings:
        groups.setdefault((r.meter_id, r.obis), []).append(r)
    by_register: dict[tuple[str, str], list[MeterExchange]] = {}
    for e in exchanges:
        by_register.setdefault((e.meter_id, e.obis), []).append(e)
    intervals: list[Interval] = []
    exceptions: list[VeeException] = []
    for key in sorted(set(groups) | set(by_register)):
        ivs, exc = _derive_one(key[0], key[1], list(groups.get(key, [])), by_register.get(key, []), config)
        intervals.extend(ivs)
        exceptions.extend(exc)
    return VeeResult(tuple(intervals), tuple(exceptions))


def diff_intervals(old: Iterable[Interval], new: Iterable[Interval]) -> tuple[IntervalChange, ...]:
    """Intervals that differ (Wh, estimated, flags) between two derivations, for booking adjustments.

    `sum(c.delta_wh)` over the result equals `sum(new) - sum(old)` exactly.
    """
    before = {(i.meter_id, i.obis, i.start): i for i in old}
    after = {(i.meter_id, i.obis, i.start): i for i in new}
    changes = []
    for key in sorted(set(before) | set(after)):
        o, n = before.get(key), after.get(key)
        if o is not None and n is not None and (o.wh, o.estimated, o.flags, o.end) == (n.wh, n.estimated, n.flags, n.end):
            continue
        ref = n or o
        changes.append(IntervalChange(ref.meter_id, ref.obis, ref.start, ref.end, o, n))
    return tuple(changes)
