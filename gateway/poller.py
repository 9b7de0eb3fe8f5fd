"""Reading meters: execute a profile's read plan on a bus and decode it into readings.

The timestamp of each reading is the instant the meter answered its block, from the injected clock.
A block the meter refuses with exception 2 (illegal data address) is bisected until the refused
registers are isolated; those are remembered for the meter (`MeterReader.refused`) and never asked
for again in this run, and every other quantity is still read. Exception 3 on a multi-quantity
block (firmware that accepts fewer registers than its profile says) splits it and lowers that
meter's block limit (`MeterReader.max_block`). Any other failure (timeout, bad
CRC, another exception code) propagates to the caller, which owns retries and backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meterlink import modbus
from meterlink.clock import Clock
from meterlink.readings import Reading

from .profiles import Profile, decode
from .readplan import Block, block_of, gap_worth_reading, plan_reads, split_block


@dataclass
class MeterRead:
    readings: list[Reading]
    requests: int
    refused: frozenset[int]    # every register address the meter has refused so far (this read included)
    serial: int | None = None  # the serial-number register, when asked for and the model has one
    newly_refused: frozenset[int] = frozenset()
    max_block: int | None = None  # a smaller block limit learnt from exception 3 (firmware below its datasheet)


def default_max_gap(master, profile: Profile) -> int:
    baud = getattr(master, "baud", None)
    if baud is None:          # Modbus TCP: a request costs a round trip, registers are nearly free
        return 64
    return gap_worth_reading(modbus.char_time_s(baud, master.parity, master.stopbits),
                             modbus.interframe_gap_s(baud, master.parity, master.stopbits),
                             profile.response_delay_ms / 1000)


class _Reader:
    """One read of one meter: executes blocks, bisects refused ones, collects readings."""

    def __init__(self, master, unit: int, profile: Profile, meter_id: str, clock: Clock,
                 refused: frozenset[int]) -> None:
        self.master, self.unit, self.profile, self.meter_id, self.clock = master, unit, profile, meter_id, clock
        self.refused = set(refused)
        self.requests = 0
        self.readings: list[Reading] = []
        self.words: dict[int, list[int]] = {}  # block address -> words (for the serial read)
        self.too_long: int | None = None   # smallest block answered with exception 3
        self.longest_ok = 0                # longest block answered normally

    @property
    def max_block(self) -> int | None:
        """The block limit learnt from exception 3: the longest read that worked, below the shortest refused."""
        if self.too_long is None:
            return None
        return self.longest_ok if 0 < self.longest_ok < self.too_long else max(1, self.too_long - 1)

    def block(self, block: Block) -> bool:
        """Read `block`; False if the meter refused (part of) it. Other errors propagate."""
        self.requests += 1
        try:
            words = self.master.execute(modbus.read_request(self.unit, block.function, block.address, block.count))
        except modbus.ModbusException as exc:
            if exc.code == 3 and len(block.quantities) > 1:
                # "illegal data value" for a long read: some firmware accepts fewer registers than
                # its datasheet says (SDM630: 50, not 80). Split, and remember the smaller limit.
                self.too_long = min(self.too_long or block.count, block.count)
                left, right = split_block(block)
                ok_left, ok_right = self.block(left), self.block(right)
                return ok_left and ok_right
            if exc.code != 2:
                raise
            if len(block.quantities) == 1:
                self.refused.update(block.quantities[0].registers)
                return False
            left, right = split_block(block)
            ok_left, ok_right = self.block(left), self.block(right)
            if ok_left and ok_right and left.end < right.address:
                # both halves answer, their union did not: the refused register is in the gap
                self.refused.update(range(left.end, right.address))
            return False
        at = self.clock.now()
        self.longest_ok = max(self.longest_ok, block.count)
        self.words[block.address] = words
        for q in block.quantities:
            if q.obis == "0.0.96.1.0":
                continue
            off = q.address - block.address
            value = decode(q, words[off:off + q.count], self.profile.no_value)
            if value is not None:
                self.readings.append(Reading(self.meter_id, q.obis, at, value, q.unit))
        return True


def read_meter(master, unit: int, profile: Profile, meter_id: str, clock: Clock,
               *, blocks: list[Block] | None = None, refused: frozenset[int] = frozenset(),
               with_serial: bool = False) -> MeterRead:
    """Read every quantity of `profile` from `unit` (skipping registers in `refused`).

    Exception 2 splits the block and is remembered in the result's `refused`; timeouts, CRC errors
    and other exception codes propagate (DeviceError / ProtocolError / ModbusException).
    """
    if blocks is None:
        blocks = plan_reads(profile, max_gap=default_max_gap(master, profile), skip=refused)
    r = _Reader(master, unit, profile, meter_id, clock, refused)
    for block in blocks:
        r.block(block)
    serial = None
    spec = profile.serial
    if with_serial and spec is not None and not any(a in r.refused for a in spec.registers):
        if r.block(block_of([spec])):
            serial = decode(spec, r.words[spec.address][:spec.count])
    return MeterRead(r.readings, r.requests, frozenset(r.refused), serial,
                     frozenset(r.refused) - frozenset(refused), r.max_block)


@dataclass
class MeterReader:
    """One meter on one bus for the life of the process: its plan and the registers it refused.

    The scheduler keeps one per configured meter and calls `read` each sweep; the plan is made once
    and re-made only when the meter refuses something new.
    """

    meter_id: str
    unit: int
    profile: Profile
    refused: frozenset[int] = frozenset()
    max_block: int | None = None
    last_serial: int | None = None
    _blocks: list[Block] | None = field(default=None, repr=False)
    _max_gap: int | None = field(default=None, repr=False)

    def plan(self, master) -> list[Block]:
        if self._blocks is None:
            self._max_gap = default_max_gap(master, self.profile)
            self._blocks = plan_reads(self.profile, max_gap=self._max_gap, skip=self.refused,
                                      max_block=self.max_block)
        return self._blocks

    def read(self, master, clock: Clock, *, with_serial: bool = False) -> MeterRead:
        result = read_meter(master, self.unit, self.profile, self.meter_id, clock,
                            blocks=self.plan(master), refused=self.refused, with_serial=with_serial)
        if result.newly_refused:
            self.refused = result.refused
            self._blocks = None   # re-plan without the refused registers
        if result.max_block is not None and result.max_block < (self.max_block or self.profile.max_block):
            self.max_block = result.max_block
            self._blocks = None   # re-plan within the limit the meter really accepts
        if result.serial is not None:
            self.last_serial = result.serial
        return result
