"""The operator's VEE exception queue: what an open exception is, which held intervals a release frees; pure, never stores (billing_store does).

VEE raises a `VeeException` for a register decrease, a rollover, a meter exchange without reads,
an implausible jump or conflicting readings. Each is queued once (unique on meter, register, kind
and instant) as ``open``. An operator resolves it with a note:
  * ``resolve`` (default): acknowledged; intervals VEE holds stay held until the data is
    corrected (e.g. the exchange reads are recorded, after which re-derivation no longer holds them);
  * ``release``: the operator accepts the usage as measured; the run of held intervals ending at
    the exception's instant becomes billable (it is billed by the next bill run).
Rollovers are corrected by VEE and billable anyway; their exceptions are informational.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Sequence

from .billing import RowKey, UsageRow

KINDS = ("decrease", "rollover", "meter_exchange", "implausible_jump", "conflicting_readings")
RESOLUTIONS = ("resolve", "release")


@dataclass(frozen=True)
class QueuedException:
    id: int
    meter_id: str
    obis: str
    kind: str
    at: datetime
    detail: str
    status: str                  # open | resolved
    raised_at: datetime
    resolved_at: datetime | None = None
    resolution: str = ""         # "<resolve|release>: note"

    @property
    def released(self) -> bool:
        return self.status == "resolved" and self.resolution.startswith("release")


def released_run(rows: Sequence[UsageRow], at: datetime) -> list[RowKey]:
    """Keys of the contiguous held intervals of one meter register ending with the one that contains `at`
    (or ends at it): the stretch a decrease/jump/exchange exception at `at` held."""
    ordered = sorted(rows, key=lambda r: r.start)
    last = None
    for i, r in enumerate(ordered):
        if r.start < at and r.held:
            last = i
        if r.start >= at:
            break
    if last is None:
        return []
    out = [ordered[last].key]
    j = last
    while j > 0 and ordered[j - 1].held and ordered[j - 1].end == ordered[j].start:
        j -= 1
        out.append(ordered[j].key)
    return out


def released_keys(rows: Iterable[UsageRow], exceptions: Iterable[QueuedException]) -> set[RowKey]:
    by_register: dict[tuple[str, str], list[UsageRow]] = {}
    for r in rows:
        by_register.setdefault((r.meter_id, r.obis), []).append(r)
    out: set[RowKey] = set()
    for exc in exceptions:
        if exc.released:
            out.update(released_run(by_register.get((exc.meter_id, exc.obis), []), exc.at))
    return out


def format_table(items: Sequence[QueuedException]) -> str:
    if not items:
        return "no exceptions"
    lines = [f"{'id':>5} {'status':8} {'meter':14} {'reg':6} {'kind':20} {'at (UTC)':21} detail"]
    for e in items:
        lines.append(f"{e.id:>5} {e.status:8} {e.meter_id:14} {e.obis:6} {e.kind:20} "
                     f"{e.at.isoformat().replace('+00:00', 'Z'):21} {e.detail}"
                     + (f"  [{e.resolution}]" if e.resolution else ""))
    return "\n".join(lines)
