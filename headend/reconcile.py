"""Revenue assurance: per meter, register and period, register difference == billed + parked + held + pending Wh, exactly, plus the money checks of the period's items; pure, never fixes anything it finds.

Inputs are gathered by the shell (billing_store) and compared here:
  * ``register``: the Wh of a FRESH VEE derivation over the raw readings, for the intervals whose
    start lies in the period (by construction the register difference between the period's grid
    boundaries, rollover and exchange corrected). Where real readings sit exactly on both period
    boundaries and no rollover/exchange lies between, it is also checked against the plain
    difference of those two register values;
  * ``billed``: the Wh that issued billable items say they billed for that meter and period
    (``billed_usage``, written with the items, independent of the interval rows);
  * from the stored interval rows: ``parked`` (no binding), ``held`` (VEE exception open),
    ``estimated_pending`` and ``pending`` (bound, not yet billed; estimated or measured),
    and ``billed_rows`` (what the rows say is billed, which must equal ``billed``).
A line reconciles when register == billed + parked + held + estimated_pending + pending and the
stored rows equal the fresh derivation (nothing arrived unprocessed). Items reconcile when their
lines add up to the net, the VAT breakdown to the VAT and net + VAT to the gross.
Chain gaps, parked usage and open exceptions are listed; they are explained, not errors, unless
`strict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Mapping, Sequence

from meterlink.readings import Reading

from .billing import UsageRow
from .exceptions import QueuedException
from .vee import METER_EXCHANGE, ROLLOVER, Interval


@dataclass(frozen=True)
class MeterLine:
    meter_id: str
    obis: str
    register_wh: int
    billed_wh: int
    parked_wh: int
    held_wh: int
    estimated_pending_wh: int
    pending_wh: int
    stored_wh: int
    billed_rows_wh: int
    boundary_check: str = ""          # "" = not applicable / ok, else the mismatch

    @property
    def difference_wh(self) -> int:
        return self.register_wh - (self.billed_wh + self.parked_wh + self.held_wh + self.estimated_pending_wh
                                   + self.pending_wh)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.difference_wh:
            out.append(f"register {self.register_wh} Wh != billed {self.billed_wh} + parked {self.parked_wh} + held "
                       f"{self.held_wh} + estimated-pending {self.estimated_pending_wh} + pending {self.pending_wh} "
                       f"(difference {self.difference_wh} Wh)")
        if self.stored_wh != self.register_wh:
            out.append(f"stored intervals hold {self.stored_wh} Wh but the readings give {self.register_wh} Wh "
                       f"(readings not processed yet: run bill or process)")
        if self.billed_rows_wh != self.billed_wh:
            out.append(f"billable items billed {self.billed_wh} Wh but the interval rows say {self.billed_rows_wh} Wh")
        if self.boundary_check:
            out.append(self.boundary_check)
        return out

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class ItemCheck:
    account_id: str
    period: str
    problems: tuple[str, ...]


@dataclass(frozen=True)
class ReconcileReport:
    period: str
    lines: tuple[MeterLine, ...]
    items: tuple[ItemCheck, ...]
    chain_gaps: tuple[tuple[str, int, int], ...] = ()          # gateway, first missing seq, last
    parked: tuple[tuple[str, str, int], ...] = ()              # meter, obis, Wh
    open_exceptions: tuple[QueuedException, ...] = ()
    strict: bool = False

    @property
    def ok(self) -> bool:
        if any(not line.ok for line in self.lines) or any(i.problems for i in self.items):
            return False
        if self.strict and (self.chain_gaps or self.parked or self.open_exceptions):
            return False
        return True

    def to_dict(self) -> dict:
        return {
            "period": self.period, "ok": self.ok,
            "meters": [{"meter_id": m.meter_id, "obis": m.obis, "register_wh": m.register_wh, "billed_wh": m.billed_wh,
                        "parked_wh": m.parked_wh, "held_wh": m.held_wh,
                        "estimated_pending_wh": m.estimated_pending_wh, "pending_wh": m.pending_wh,
                        "difference_wh": m.difference_wh, "problems": m.problems} for m in self.lines],
            "items": [{"account_id": i.account_id, "problems": list(i.problems)} for i in self.items],
            "chain_gaps": [{"gateway_id": g, "from_seq": a, "to_seq": b} for g, a, b in self.chain_gaps],
            "parked": [{"meter_id": m, "obis": o, "wh": wh} for m, o, wh in self.parked],
            "open_exceptions": [{"id": e.id, "meter_id": e.meter_id, "obis": e.obis, "kind": e.kind,
                                 "at": e.at.isoformat(), "detail": e.detail} for e in self.open_exceptions],
        }

    def format(self) -> str:
        out = [f"reconciliation {self.period}: {'OK' if self.ok else 'DOES NOT RECONCILE'}",
               f"{'meter':14} {'reg':6} {'register Wh':>12} {'billed':>10} {'parked':>9} {'held':>8} "
               f"{'est.pend':>9} {'pending':>9} {'diff':>6}"]
        for m in self.lines:
            out.append(f"{m.meter_id:14} {m.obis:6} {m.register_wh:>12} {m.billed_wh:>10} {m.parked_wh:>9} "
                       f"{m.held_wh:>8} {m.estimated_pending_wh:>9} {m.pending_wh:>9} {m.difference_wh:>6}"
                       + ("" if m.ok else "  <-- " + "; ".join(m.problems)))
        for i in self.items:
            if i.problems:
                out.append(f"item {i.account_id} {i.period}: " + "; ".join(i.problems))
        for g, a, b in self.chain_gaps:
            out.append(f"chain gap: gateway {g} is missing seq {a}..{b}")
        for m, o, wh in self.parked:
            out.append(f"unbound usage: meter {m} {o} {wh} Wh parked (add or back-date a binding)")
        for e in self.open_exceptions:
            out.append(f"open exception {e.id}: meter {e.meter_id} {e.obis} {e.kind} at "
                       f"{e.at.isoformat().replace('+00:00', 'Z')}: {e.detail}")
        return "\n".join(out)


def _boundary_check(readings: Sequence[Reading], start: datetime, end: datetime, fresh: Sequence[Interval],
                    register_wh: int) -> str:
    at = {r.taken_at: r.value for r in readings}
    if start not in at or end not in at or not fresh:
        return ""
    if any(iv.flags & {ROLLOVER, METER_EXCHANGE} for iv in fresh):
        return ""
    if fresh[0].start != start or fresh[-1].end != end:
        return ""
    raw = at[end] - at[start]
    if raw != register_wh:
        return f"register reads {at[start]} Wh at the period start and {at[end]} Wh at its end ({raw} Wh) " \
               f"but the intervals sum to {register_wh} Wh"
    return ""


def reconcile_meter(meter_id: str, obis: str, start: datetime, end: datetime, *, fresh: Sequence[Interval],
                    rows: Iterable[UsageRow], billed_wh: int, readings: Sequence[Reading] = ()) -> MeterLine:
    fresh = sorted((iv for iv in fresh if start <= iv.start < end), key=lambda iv: iv.start)
    register = sum(iv.wh for iv in fresh)
    parked = held = est = pending = stored = billed_rows = 0
    for r in rows:
        if not (start <= r.start < end):
            continue
        stored += r.wh
        billed_rows += r.billed_wh
        rest = r.unbilled_wh
        if r.held:
            held += rest
        elif r.account_id is None:
            parked += rest
        elif r.estimated:
            est += rest
        else:
            pending += rest
    return MeterLine(meter_id, obis, register, billed_wh, parked, held, est, pending, stored, billed_rows,
                     _boundary_check(readings, start, end, fresh, register))


def check_item(doc: Mapping) -> ItemCheck:
    problems = []
    lines = sum(line["net_minor"] for line in doc["lines"])
    if lines != doc["net_minor"]:
        problems.append(f"lines sum to {lines}, net is {doc['net_minor']}")
    vat = sum(b["vat_minor"] for b in doc["vat_breakdown"])
    if vat != doc["vat_minor"]:
        problems.append(f"VAT breakdown sums to {vat}, VAT is {doc['vat_minor']}")
    if doc["net_minor"] + doc["vat_minor"] != doc["gross_minor"]:
        problems.append("net + VAT != gross")
    taxable = sum(b["taxable_minor"] for b in doc["vat_breakdown"])
    if taxable != doc["net_minor"]:
        problems.append(f"taxable amounts sum to {taxable}, net is {doc['net_minor']}")
    from decimal import Decimal
    if Decimal(doc["exact_total"]) + Decimal(doc["residue"]) != doc["net_minor"]:
        problems.append("exact total + rounding residue != net")
    return ItemCheck(doc["account_id"], doc["period"], tuple(problems))


def reconcile(period: str, start: datetime, end: datetime, *,
              fresh: Mapping[tuple[str, str], Sequence[Interval]],
              rows: Mapping[tuple[str, str], Sequence[UsageRow]],
              billed: Mapping[tuple[str, str], int],
              readings: Mapping[tuple[str, str], Sequence[Reading]] | None = None,
              items: Iterable[Mapping] = (), chain_gaps: Iterable[tuple[str, int, int]] = (),
              open_exceptions: Iterable[QueuedException] = (), strict: bool = False,
              bounds: Mapping[str, tuple[datetime, datetime]] | None = None) -> ReconcileReport:
    """The period's report; keys are (meter, obis). UTC [start, end) is the period in the market's zone;
    `bounds` gives other UTC bounds per meter (meters of markets in other zones)."""
    keys = sorted(set(fresh) | set(rows) | set(billed))
    bounds = bounds or {}
    lines = tuple(reconcile_meter(m, o, *bounds.get(m, (start, end)), fresh=fresh.get((m, o), ()), rows=rows.get((m, o), ()),
                                  billed_wh=billed.get((m, o), 0), readings=(readings or {}).get((m, o), ()))
                  for m, o in keys)
    parked = tuple((line.meter_id, line.obis, line.parked_wh) for line in lines if line.parked_wh)
    return ReconcileReport(period, lines, tuple(check_item(d) for d in items), tuple(chain_gaps), parked,
                           tuple(open_exceptions), strict)


__all__ = ["reconcile", "reconcile_meter", "ReconcileReport", "MeterLine", "check_item"]
