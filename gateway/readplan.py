"""Read merging and the bus wire-time model: as few register reads as the model allows; pure.

`plan_reads` groups a profile's quantities into blocks: adjacent and nearly adjacent quantities
share one request when reading the gap costs less wire time than a separate request would, no
block exceeds the model's `max_block`, and no block touches a register the meter refused
("illegal data address"; the poller remembers those per meter). The grouping is an exact
dynamic programme over the sorted quantities, so the block limit never strands a quantity in an
extra request that a different cut would have saved.

The wire-time model prices a plan on a serial line: bytes per request and response, characters
incl. start/parity/stop bits, the 3.5-character silence that ends every frame and each meter's
response delay. `check_bus_plan` refuses a bus whose sweep does not fit in the poll interval.
Nothing here opens a port or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from meterlink.errors import ConfigError
from meterlink.modbus import SerialLine

from .profiles import Profile, Quantity

REQUEST_BYTES = 8            # unit, function, address(2), count(2), CRC(2)
RESPONSE_OVERHEAD_BYTES = 5  # unit, function, byte count, CRC(2); plus 2 bytes per register


@dataclass(frozen=True)
class Block:
    function: int
    address: int
    count: int
    quantities: tuple[Quantity, ...]

    @property
    def end(self) -> int:
        return self.address + self.count

    @property
    def request_bytes(self) -> int:
        return REQUEST_BYTES

    @property
    def response_bytes(self) -> int:
        return RESPONSE_OVERHEAD_BYTES + 2 * self.count


def block_of(quantities: Sequence[Quantity]) -> Block:
    """The tightest block covering `quantities` (all of one function code)."""
    qs = tuple(sorted(quantities, key=lambda q: q.address))
    start, end = qs[0].address, max(q.end for q in qs)
    return Block(qs[0].function, start, end - start, qs)


def _cut(qs: list[Quantity], max_block: int, skip: frozenset[int], request_cost: float) -> list[Block]:
    """Optimal partition of address-sorted quantities into consecutive blocks (cost in registers)."""
    n = len(qs)
    inf = float("inf")
    best = [0.0] + [inf] * n         # best[j]: cost of reading qs[:j]
    choice = [0] * (n + 1)
    for j in range(1, n + 1):
        end = qs[j - 1].end
        for i in range(j - 1, -1, -1):
            start = qs[i].address
            if end - start > max_block:
                break
            if i < j - 1 and any(start <= a < end for a in skip):
                break  # never read through a register the meter refused
            cost = best[i] + request_cost + (end - start)
            if cost < best[j] or (cost == best[j] and i < choice[j]):
                best[j], choice[j] = cost, i
    blocks = []
    j = n
    while j > 0:
        i = choice[j]
        blocks.append(block_of(qs[i:j]))
        j = i
    return blocks[::-1]


def plan_reads(profile: Profile, *, max_gap: int = 0, skip: frozenset[int] = frozenset(),
               only: frozenset[str] | None = None, max_block: int | None = None) -> list[Block]:
    """Group quantities into blocks (blocks holding billing registers first).

    `max_gap` is the largest run of unused registers worth reading through rather than paying for
    another request (see `gap_worth_reading`); `skip` holds register addresses the meter refused:
    quantities touching them are left out and no block reads across them.
    """
    limit = min(profile.max_block, max_block or profile.max_block)
    chosen = [q for q in profile.quantities
              if not any(a in skip for a in q.registers) and (only is None or q.obis in only)]
    blocks: list[Block] = []
    for fc in sorted({q.function for q in chosen}):
        qs = sorted((q for q in chosen if q.function == fc), key=lambda q: q.address)
        blocks.extend(_cut(qs, limit, skip, max_gap + 0.5))
    blocks.sort(key=lambda b: (not any(q.billing for q in b.quantities), b.function, b.address))
    return blocks


def split_block(block: Block) -> tuple[Block, Block]:
    """Bisect a block by its quantities (used after "illegal data address"); needs >= 2 quantities."""
    qs = block.quantities
    if len(qs) < 2:
        raise ValueError("a block of one quantity cannot be split")
    mid = len(qs) // 2
    return block_of(qs[:mid]), block_of(qs[mid:])


def gap_worth_reading(char_time_s: float, gap_s: float, response_delay_s: float) -> int:
    """Largest number of unused registers cheaper to read through than a separate request.

    A separate request costs its 8 request bytes + 5 response overhead bytes, two inter-frame gaps
    and the meter's response delay; reading through costs 2 bytes per register.
    """
    request_overhead = (REQUEST_BYTES + RESPONSE_OVERHEAD_BYTES) * char_time_s + 2 * gap_s + response_delay_s
    return int(request_overhead // (2 * char_time_s))


def max_gap_for(line: SerialLine | None, profile: Profile) -> int:
    """`max_gap` for a profile on a line; None means Modbus TCP (a round trip costs more than registers)."""
    if line is None:
        return 64
    return gap_worth_reading(line.char_time_s, line.gap_s, profile.response_delay_ms / 1000)


# ---- wire-time model ---------------------------------------------------------------------------

def exchange_time_s(line: SerialLine, request_bytes: int, response_bytes: int, response_delay_s: float) -> float:
    """One request/response on the wire: both frames' characters, the t3.5 silence after each frame
    and the meter's response delay."""
    return (request_bytes + response_bytes) * line.char_time_s + 2 * line.gap_s + response_delay_s


@dataclass(frozen=True)
class MeterPlan:
    """What one meter costs per sweep: its planned blocks and the floor any plan could reach."""

    meter_id: str
    blocks: tuple[Block, ...]
    response_delay_s: float
    useful_registers: int        # registers the quantities occupy (no gaps)
    min_requests: int            # fewest requests the block limit allows (gaps read through)
    quantity_count: int          # requests a one-request-per-value reader (mbmd) would send

    @property
    def requests(self) -> int:
        return len(self.blocks)

    def bytes_on_wire(self) -> int:
        return sum(b.request_bytes + b.response_bytes for b in self.blocks)

    def wire_time_s(self, line: SerialLine) -> float:
        return sum(exchange_time_s(line, b.request_bytes, b.response_bytes, self.response_delay_s)
                   for b in self.blocks)

    def min_wire_time_s(self, line: SerialLine) -> float:
        """Theoretical minimum: the fewest requests the block limit allows, carrying only the
        registers the quantities occupy (no gap registers)."""
        return (self.min_requests * exchange_time_s(line, REQUEST_BYTES, RESPONSE_OVERHEAD_BYTES,
                                                    self.response_delay_s)
                + 2 * self.useful_registers * line.char_time_s)

    def per_value_wire_time_s(self, line: SerialLine) -> float:
        """The one-request-per-value approach (mbmd): one exchange per quantity."""
        return (self.quantity_count * exchange_time_s(line, REQUEST_BYTES, RESPONSE_OVERHEAD_BYTES,
                                                      self.response_delay_s)
                + 2 * self.useful_registers * line.char_time_s)


def plan_meter(meter_id: str, profile: Profile, line: SerialLine | None, *,
               refused: frozenset[int] = frozenset(), with_serial: bool = False,
               split_priorities: bool = False) -> MeterPlan:
    """Plan one meter's sweep on `line` (None: Modbus TCP) and note its theoretical floor.

    `split_priorities` plans billing and instantaneous quantities as two separate reads (as a
    scheduler does that runs them as jobs of different priority); `with_serial` adds the
    serial-number read.
    """
    gap = max_gap_for(line, profile)
    if split_priorities:
        billing = frozenset(q.obis for q in profile.quantities if q.billing)
        others = frozenset(q.obis for q in profile.quantities) - billing
        blocks = [b for only in (billing, others) if only
                  for b in plan_reads(profile, max_gap=gap, skip=refused, only=only)]
    else:
        blocks = plan_reads(profile, max_gap=gap, skip=refused)
    chosen = [q for b in blocks for q in b.quantities]
    floor = plan_reads(profile, max_gap=MAX_GAP_ANY, skip=refused)
    if with_serial and profile.serial is not None and not any(a in refused for a in profile.serial.registers):
        blocks = [*blocks, block_of([profile.serial])]
        chosen.append(profile.serial)
        floor = [*floor, block_of([profile.serial])]
    return MeterPlan(meter_id, tuple(blocks), profile.response_delay_ms / 1000,
                     useful_registers=sum(q.count for q in chosen), min_requests=len(floor),
                     quantity_count=len(chosen))


MAX_GAP_ANY = 1 << 16


@dataclass(frozen=True)
class SweepCost:
    """One sweep of every meter on a bus, in the wire-time model."""

    line: SerialLine
    meters: int
    requests: int
    bytes_on_wire: int
    wire_time_s: float
    min_requests: int
    min_wire_time_s: float          # theoretical minimum (see MeterPlan.min_wire_time_s)
    per_value_requests: int         # one request per value (mbmd)
    per_value_wire_time_s: float

    @property
    def efficiency(self) -> float:
        """Theoretical minimum / modelled wire time (1.0 = nothing wasted)."""
        return self.min_wire_time_s / self.wire_time_s if self.wire_time_s else 1.0


def sweep_cost(line: SerialLine, plans: Iterable[MeterPlan]) -> SweepCost:
    plans = list(plans)
    return SweepCost(
        line=line, meters=len(plans),
        requests=sum(p.requests for p in plans),
        bytes_on_wire=sum(p.bytes_on_wire() for p in plans),
        wire_time_s=sum(p.wire_time_s(line) for p in plans),
        min_requests=sum(p.min_requests for p in plans),
        min_wire_time_s=sum(p.min_wire_time_s(line) for p in plans),
        per_value_requests=sum(p.quantity_count for p in plans),
        per_value_wire_time_s=sum(p.per_value_wire_time_s(line) for p in plans),
    )


def check_bus_plan(bus: str, line: SerialLine, plans: Iterable[MeterPlan], poll_interval_s: float,
                   *, path: str | None = None) -> SweepCost:
    """Refuse a bus whose modelled sweep does not fit in the poll interval; return its cost.

    Raises ConfigError naming the bus (and `path`, the configuration file, when given), the
    modelled wire time, the interval and what would fix it.
    """
    cost = sweep_cost(line, plans)
    if cost.wire_time_s > poll_interval_s:
        raise ConfigError(
            f"bus {bus} ({line.describe()}): one sweep of {cost.meters} meter(s) needs "
            f"{cost.wire_time_s:.3f} s of wire time ({cost.requests} requests, {cost.bytes_on_wire} bytes), "
            f"more than the poll interval of {poll_interval_s:g} s; raise the baud rate, lengthen "
            f"poll_interval_s or move meters to another bus", path=path, key="bus")
    return cost


def check_bus(bus, poll_interval_s: float, *, path: str | None = None, with_serial: bool = True,
              split_priorities: bool = True) -> SweepCost | None:
    """`check_bus_plan` for a configured bus (duck-typed: .port .baud .parity .stopbits and
    .meters with .id .profile); None for Modbus TCP, where there is no serial wire to model.

    The defaults model billing and instantaneous values read as separate jobs, each sweep with the
    serial number (the daemon before merged reads; 4 requests per SDM630). The daemon now merges
    both reads when they fall due together and reads the serial every `serial_every`th poll, so
    the configuration check passes `split_priorities=False` (with the serial: its worst sweep);
    `split_priorities=False, with_serial=False` is its usual sweep (2 requests per SDM630).
    """
    if str(bus.port).startswith("tcp://"):
        return None
    line = SerialLine(bus.baud, bus.parity, bus.stopbits)
    plans = [plan_meter(m.id, m.profile, line, with_serial=with_serial, split_priorities=split_priorities)
             for m in bus.meters]
    return check_bus_plan(bus.port, line, plans, poll_interval_s, path=path)
