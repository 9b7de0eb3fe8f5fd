"""Reading meters: execute a profile's read plan on a bus and decode it into readings.

The timestamp of each reading is the instant the meter answered its block, from the injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from meterlink import modbus
from meterlink.clock import Clock
from meterlink.readings import Reading

from .profiles import Profile, decode
from .readplan import Block, gap_worth_reading, plan_reads


@dataclass
class MeterRead:
    readings: list[Reading]
    requests: int
    refused: frozenset[int]   # addresses the meter answered "illegal data address" for


def default_max_gap(master, profile: Profile) -> int:
    baud = getattr(master, "baud", None)
    if baud is None:          # Modbus TCP: a request costs a round trip, registers are nearly free
        return 64
    return gap_worth_reading(modbus.char_time_s(baud, master.parity, master.stopbits),
                             modbus.interframe_gap_s(baud, master.parity, master.stopbits),
                             profile.response_delay_ms / 1000)


def read_meter(master, unit: int, profile: Profile, meter_id: str, clock: Clock,
               *, blocks: list[Block] | None = None) -> MeterRead:
    """Read every quantity of `profile` from `unit`; exceptions from the master propagate."""
    if blocks is None:
        blocks = plan_reads(profile, max_gap=default_max_gap(master, profile))
    out: list[Reading] = []
    for block in blocks:
        words = master.execute(modbus.read_request(unit, block.function, block.address, block.count))
        at = clock.now()
        for q in block.quantities:
            off = q.address - block.address
            value = decode(q, words[off:off + q.count], profile.no_value)
            if value is not None:
                out.append(Reading(meter_id, q.obis, at, value, q.unit))
    return MeterRead(out, len(blocks), frozenset())
