"""Plausibility at the edge: flag readings that cannot be right; pure, never drops or "fixes" a value.

Rules (DESIGN.md "Readings and why nothing leaks"):
- a cumulative energy register (Wh, varh) never decreases            -> Quality.DECREASE
- it cannot rise faster than the meter's maximum power allows
  (rise > max_power_w x elapsed time + one register resolution)      -> Quality.IMPLAUSIBLE_JUMP
- a changed serial number means the meter was exchanged              -> Quality.METER_EXCHANGE on the
  whole poll; the new meter's registers become the new baseline (no DECREASE against the old meter)
- the gateway clock was not trusted when the meter answered          -> Quality.CLOCK_UNTRUSTED

Flagged readings are journaled, pushed and published like any other; the head-end's VEE decides.
The memo of what was last seen is returned, not stored: the caller keeps it per meter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from meterlink.clock import to_ms
from meterlink.readings import Quality, Reading

CUMULATIVE_UNITS = frozenset({"Wh", "varh"})
SERIAL_OBIS = frozenset({"0.0.96.1.0", "96.1.0", "0.0.96.1.1", "96.1.1"})  # COSEM device id / serial number


@dataclass(frozen=True)
class RegisterMemo:
    value: int
    taken_at: datetime


@dataclass(frozen=True)
class MeterMemo:
    """What a meter said last: its serial number and each cumulative register."""

    serial: int | None = None
    registers: dict[str, RegisterMemo] = field(default_factory=dict)


def serial_of(readings: list[Reading]) -> int | None:
    for r in readings:
        if r.obis in SERIAL_OBIS:
            return r.value
    return None


def max_rise_wh(max_power_w: int, elapsed_ms: int, resolution_wh: int = 1) -> int:
    """The largest rise of an energy register `max_power_w` can cause in `elapsed_ms`, in whole Wh,
    plus one register resolution (the register is quantised), rounded up (exact integers)."""
    return -(-max_power_w * elapsed_ms // 3_600_000) + resolution_wh


def check_readings(memo: MeterMemo | None, readings: list[Reading], *, max_power_w: int = 0,
                   resolution_wh: dict[str, int] | None = None, serial: int | None = None,
                   clock_trusted: bool = True) -> tuple[list[Reading], MeterMemo]:
    """Flag `readings` (one poll of one meter, any order) against `memo`; returns (readings, new memo).

    `max_power_w` 0 disables the rate check; `serial` defaults to a serial-number reading in the poll.
    Every reading comes back, in the same order, with flags OR-ed into its quality.
    """
    memo = memo or MeterMemo()
    resolution_wh = resolution_wh or {}
    if serial is None:
        serial = serial_of(readings)
    exchanged = serial is not None and memo.serial is not None and serial != memo.serial
    registers = {} if exchanged else dict(memo.registers)
    out = list(readings)
    for i in sorted(range(len(readings)), key=lambda i: readings[i].taken_at):
        r = readings[i]
        flags = Quality(r.quality)
        if exchanged:
            flags |= Quality.METER_EXCHANGE
        if not clock_trusted:
            flags |= Quality.CLOCK_UNTRUSTED
        if r.unit in CUMULATIVE_UNITS:
            prev = registers.get(r.obis)
            if prev is not None:
                if r.value < prev.value:
                    flags |= Quality.DECREASE
                elif max_power_w > 0:
                    elapsed = max(0, to_ms(r.taken_at) - to_ms(prev.taken_at))
                    if r.value - prev.value > max_rise_wh(max_power_w, elapsed, resolution_wh.get(r.obis, 1)):
                        flags |= Quality.IMPLAUSIBLE_JUMP
            # the register as read is the baseline for the next check, flagged or not: a meter
            # that really went backwards keeps counting from its new value
            registers[r.obis] = RegisterMemo(r.value, r.taken_at)
        if int(flags) != r.quality:
            out[i] = replace(r, quality=int(flags))
    return out, MeterMemo(serial if serial is not None else memo.serial, registers)


def flag_names(quality: int) -> list[str]:
    """Names of the flags set in `quality` (for JSON payloads and logs)."""
    return [f.name for f in Quality if f.value and quality & f.value]
