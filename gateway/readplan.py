"""Read merging: turn a profile's quantities into as few register reads as the model allows; pure.

Adjacent and nearly adjacent quantities share one request when reading the gap costs less wire
time than a separate request would, and no block exceeds the model's `max_block`. Registers a
meter refused with "illegal data address" are excluded from later plans for that meter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import Profile, Quantity


@dataclass(frozen=True)
class Block:
    function: int
    address: int
    count: int
    quantities: tuple[Quantity, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


def plan_reads(profile: Profile, *, max_gap: int = 0, skip: frozenset[int] = frozenset(),
               only: frozenset[str] | None = None) -> list[Block]:
    """Group quantities into blocks (billing registers first).

    `max_gap` is the largest run of unused registers worth reading through rather than paying for
    another request (see `gap_worth_reading`); `skip` holds addresses the meter refused.
    """
    chosen = [q for q in profile.quantities
              if q.address not in skip and (only is None or q.obis in only)]
    blocks: list[Block] = []
    for fc in sorted({q.function for q in chosen}):
        qs = sorted((q for q in chosen if q.function == fc), key=lambda q: q.address)
        cur: list[Quantity] = []
        start = end = 0
        for q in qs:
            if cur and q.address - end <= max_gap and q.address + q.count - start <= profile.max_block:
                cur.append(q)
                end = max(end, q.address + q.count)
                continue
            if cur:
                blocks.append(Block(fc, start, end - start, tuple(cur)))
            cur, start, end = [q], q.address, q.address + q.count
        if cur:
            blocks.append(Block(fc, start, end - start, tuple(cur)))
    blocks.sort(key=lambda b: (not any(q.billing for q in b.quantities), b.function, b.address))
    return blocks


def gap_worth_reading(char_time_s: float, gap_s: float, response_delay_s: float) -> int:
    """Largest number of unused registers cheaper to read through than a separate request.

    A separate request costs its 8 request bytes + 5 response overhead bytes, two inter-frame gaps
    and the meter's response delay; reading through costs 2 bytes per register.
    """
    request_overhead = 13 * char_time_s + 2 * gap_s + response_delay_s
    return int(request_overhead // (2 * char_time_s))
