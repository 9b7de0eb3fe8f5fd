"""Binding: customers, accounts, service points, meters and the effective-dated links meter -> service point -> account; pure, never stores or bills.

Two relations, each a set of half-open UTC intervals [valid_from, valid_to) (valid_to None = open):
  * `Installation`: meter <-> service point. A meter exchange closes the old meter's installation
    and opens the new meter's at the same instant and service point.
  * `Supply`: service point <-> account. Move-in opens one, move-out closes it.
A meter's usage at instant t belongs to the account supplied at the service point the meter is
installed at, at t; with no such chain the usage is *parked* (account None) and re-bound when a
binding is later added or back-dated over it. Overlaps (one meter at two service points, one
service point with two accounts or two meters on the same register at once) are refused with
errors naming both records. Every editing function returns a new `Bindings`.
"""

from __future__ import annotations

import csv
import gc
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

from meterlink.config import Section, load_toml
from meterlink.errors import ConfigError, ValidationError

UTC = timezone.utc
PAYMENT_MODES = ("prepaid", "postpaid")


@dataclass(frozen=True)
class Customer:
    id: str
    market: str
    name: str = ""
    email: str = ""


@dataclass(frozen=True)
class Account:
    id: str
    customer_id: str
    payment: str = "postpaid"      # prepaid | postpaid
    tariff_id: str = ""            # "" = the market's default tariff


@dataclass(frozen=True)
class ServicePoint:
    id: str
    market: str
    address: str = ""
    external_id: str = ""          # MPAN / EAN / POD / CUPS


@dataclass(frozen=True)
class Meter:
    id: str
    serial: str = ""
    register_max: int | None = None
    max_power_w: int | None = None


@dataclass(frozen=True)
class Installation:
    meter_id: str
    service_point_id: str
    valid_from: datetime
    valid_to: datetime | None = None
    reason: str = "install"

    def covers(self, t: datetime) -> bool:
        return self.valid_from <= t and (self.valid_to is None or t < self.valid_to)


@dataclass(frozen=True)
class Supply:
    service_point_id: str
    account_id: str
    valid_from: datetime
    valid_to: datetime | None = None
    reason: str = "move_in"

    def covers(self, t: datetime) -> bool:
        return self.valid_from <= t and (self.valid_to is None or t < self.valid_to)


@dataclass(frozen=True)
class Span:
    """A stretch [start, end) of one meter's time with one binding outcome (account None = parked)."""

    meter_id: str
    start: datetime
    end: datetime | None
    service_point_id: str | None
    account_id: str | None


@dataclass(frozen=True)
class Bindings:
    customers: dict[str, Customer] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    service_points: dict[str, ServicePoint] = field(default_factory=dict)
    meters: dict[str, Meter] = field(default_factory=dict)
    installations: tuple[Installation, ...] = ()
    supplies: tuple[Supply, ...] = ()

    # ------------------------------------------------------------------ queries
    @cached_property
    def _index(self) -> "_Index":
        """Per meter / service point / account, the records sorted by valid_from (built once per `Bindings`,
        on first use; every editing function returns a new `Bindings`, so the index never goes stale)."""
        enabled = gc.isenabled()
        gc.disable()               # hundreds of thousands of small lists: the collector would dominate the build
        try:
            return _Index(self.installations, self.supplies)
        finally:
            if enabled:
                gc.enable()

    def account_at(self, meter_id: str, t: datetime) -> str | None:
        inst = _at(self._index.by_meter.get(meter_id), t)
        if inst is None:
            return None
        sup = _at(self._index.by_service_point.get(inst.service_point_id), t)
        return None if sup is None else sup.account_id

    def spans(self, meter_id: str) -> list[Span]:
        """The meter's timeline cut at every binding change, in order, including parked stretches."""
        cuts: set[datetime] = set()
        insts = self._index.by_meter.get(meter_id, _EMPTY)[1]
        for inst in insts:
            cuts.update(t for t in (inst.valid_from, inst.valid_to) if t is not None)
            for sup in self._index.by_service_point.get(inst.service_point_id, _EMPTY)[1]:
                cuts.update(t for t in (sup.valid_from, sup.valid_to) if t is not None)
        points = sorted(cuts)
        out = []
        for a, b in zip(points, [*points[1:], None]):
            sp = next((i.service_point_id for i in insts if i.covers(a)), None)
            acct = self.account_at(meter_id, a) if sp else None
            if out and out[-1].service_point_id == sp and out[-1].account_id == acct:
                out[-1] = replace(out[-1], end=b)
            else:
                out.append(Span(meter_id, a, b, sp, acct))
        return out

    def market_of_meter(self, meter_id: str, t: datetime | None = None) -> str | None:
        """The market of the service point the meter is installed at at `t` (None: its first installation)."""
        for inst in self._index.by_meter.get(meter_id, _EMPTY)[1]:
            if t is None or inst.covers(t):
                sp = self.service_points.get(inst.service_point_id)
                if sp:
                    return sp.market
        return None

    def market_of_account(self, account_id: str) -> str:
        acct = self.accounts[account_id]
        return self.customers[acct.customer_id].market

    def meters_of_account(self, account_id: str) -> list[str]:
        sps = {s.service_point_id for s in self._index.by_account.get(account_id, ())}
        return sorted({i.meter_id for sp in sps for i in self._index.by_service_point_inst.get(sp, ())})

    def supplies_of_account(self, account_id: str) -> tuple[Supply, ...]:
        """The account's supplies, by valid_from."""
        return self._index.by_account.get(account_id, ())

    def supplied_between(self, account_id: str, start: datetime, end: datetime) -> list[Supply]:
        return [s for s in self._index.by_account.get(account_id, ()) if s.valid_from < end
                and (s.valid_to is None or s.valid_to > start)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Bindings":
        problems = []
        for inst in self.installations:
            if inst.meter_id not in self.meters:
                problems.append(f"installation of unknown meter {inst.meter_id}")
            if inst.service_point_id not in self.service_points:
                problems.append(f"installation of meter {inst.meter_id} at unknown service point {inst.service_point_id}")
        for sup in self.supplies:
            if sup.account_id not in self.accounts:
                problems.append(f"supply of service point {sup.service_point_id} to unknown account {sup.account_id}")
            if sup.service_point_id not in self.service_points:
                problems.append(f"supply of unknown service point {sup.service_point_id}")
        for acct in self.accounts.values():
            if acct.customer_id not in self.customers:
                problems.append(f"account {acct.id} of unknown customer {acct.customer_id}")
            if acct.payment not in PAYMENT_MODES:
                problems.append(f"account {acct.id}: payment {acct.payment!r} is not prepaid or postpaid")
        for rec in (*self.installations, *self.supplies):
            if rec.valid_to is not None and rec.valid_to <= rec.valid_from:
                problems.append(f"{_describe(rec)} ends before it starts")
            for t in (rec.valid_from, rec.valid_to):
                if t is not None and t.tzinfo is None:
                    problems.append(f"{_describe(rec)}: {t} is not an aware UTC instant")
        problems += _overlaps(self.installations, lambda i: i.meter_id, "meter")
        problems += _overlaps(self.installations, lambda i: i.service_point_id, "service point")
        problems += _overlaps(self.supplies, lambda s: s.service_point_id, "service point")
        if problems:
            raise ValidationError("bindings are inconsistent: " + "; ".join(problems))
        return self

    # ------------------------------------------------------------------ editing
    def install(self, meter_id: str, service_point_id: str, at: datetime, until: datetime | None = None,
                reason: str = "install") -> "Bindings":
        return replace(self, installations=(*self.installations,
                                            Installation(meter_id, service_point_id, _utc(at), _utc(until), reason))
                       ).validate()

    def remove_meter(self, meter_id: str, at: datetime) -> "Bindings":
        return replace(self, installations=_end(self.installations, lambda i: i.meter_id == meter_id, _utc(at),
                                                f"meter {meter_id}")).validate()

    def exchange_meter(self, old_meter_id: str, new_meter_id: str, at: datetime) -> "Bindings":
        """Close the old meter's installation at `at` and install the new one at the same service point."""
        at = _utc(at)
        current = [i for i in self.installations if i.meter_id == old_meter_id and i.covers(at)]
        if not current:
            raise ValidationError(f"meter {old_meter_id} is not installed anywhere at {at.isoformat()}")
        inst = current[0]
        ended = _end(self.installations, lambda i: i is inst, at, f"meter {old_meter_id}")
        return replace(self, installations=(*ended, Installation(new_meter_id, inst.service_point_id, at,
                                                                 inst.valid_to, "exchange"))).validate()

    def move_in(self, service_point_id: str, account_id: str, at: datetime, until: datetime | None = None) -> "Bindings":
        return replace(self, supplies=(*self.supplies, Supply(service_point_id, account_id, _utc(at), _utc(until))
                                       )).validate()

    def move_out(self, service_point_id: str, at: datetime) -> "Bindings":
        return replace(self, supplies=_end(self.supplies, lambda s: s.service_point_id == service_point_id,
                                           _utc(at), f"service point {service_point_id}")).validate()


_EMPTY: tuple = ((), ())


class _Index:
    """Records grouped by key and sorted by valid_from, with the valid_from list beside them for bisect."""

    def __init__(self, installations: Sequence[Installation], supplies: Sequence[Supply]) -> None:
        self.by_meter = _group(installations, lambda i: i.meter_id)
        self.by_service_point = _group(supplies, lambda s: s.service_point_id)
        self.by_service_point_inst: dict[str, list[Installation]] = {}
        for i in installations:
            self.by_service_point_inst.setdefault(i.service_point_id, []).append(i)
        by_account: dict[str, list[Supply]] = {}
        for s in sorted(supplies, key=lambda s: s.valid_from):
            by_account.setdefault(s.account_id, []).append(s)
        self.by_account = {a: tuple(ss) for a, ss in by_account.items()}


def _group(records: Sequence, key) -> dict[str, tuple[list[datetime], list]]:
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(key(r), []).append(r)
    out = {}
    for k, rs in by.items():
        rs.sort(key=lambda r: r.valid_from)
        out[k] = ([r.valid_from for r in rs], rs)
    return out


def _at(entry: tuple[list[datetime], list] | None, t: datetime):
    """The record of `entry` (non-overlapping, sorted) covering instant t, or None: a bisect, not a scan."""
    if entry is None:
        return None
    starts, recs = entry
    i = bisect_right(starts, t) - 1
    if i < 0:
        return None
    if recs[i].covers(t):
        return recs[i]
    # validated records never overlap, so none before i covers t either; unvalidated ones may (scan the key's few)
    return next((r for r in recs[:i] if r.covers(t)), None)


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    if t.tzinfo is None:
        raise ValidationError(f"binding instant {t.isoformat()} has no time zone; give UTC (…Z)")
    return t.astimezone(UTC)


def _describe(rec) -> str:
    to = rec.valid_to.isoformat() if rec.valid_to else "open"
    if isinstance(rec, Installation):
        return f"installation meter {rec.meter_id} at {rec.service_point_id} [{rec.valid_from.isoformat()}, {to})"
    return f"supply {rec.service_point_id} -> account {rec.account_id} [{rec.valid_from.isoformat()}, {to})"


def _overlaps(records: Sequence, key, what: str) -> list[str]:
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(key(r), []).append(r)
    out = []
    for k, rs in by.items():
        rs = sorted(rs, key=lambda r: r.valid_from)
        for a, b in zip(rs, rs[1:]):
            if a.valid_to is None or a.valid_to > b.valid_from:
                out.append(f"{what} {k}: {_describe(a)} overlaps {_describe(b)}")
    return out


def _end(records: tuple, match, at: datetime, what: str) -> tuple:
    """Close the record matching `match` that is open at `at` (covers it, or is open-ended after it)."""
    out, done = [], False
    for r in records:
        if not done and match(r) and r.covers(at) and r.valid_from < at:
            out.append(replace(r, valid_to=at))
            done = True
        else:
            out.append(r)
    if not done:
        raise ValidationError(f"{what} has no binding in force at {at.isoformat()} to end")
    return tuple(out)


# --------------------------------------------------------------------------- loading

def parse_instant(text: str, where: str = "") -> datetime:
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"{where}bad instant {text!r} (want ISO 8601 UTC, e.g. 2026-11-01T00:00:00Z)") from None
    if t.tzinfo is None:
        raise ValidationError(f"{where}instant {text!r} has no time zone (append Z for UTC)")
    return t.astimezone(UTC)


def _opt(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


def bindings_from_toml(data: dict, text: str = "", path: str = "<bindings>") -> Bindings:
    """Entities (and optionally bindings) from one TOML document."""
    root = Section(data, path, text)
    root.check_known({"customer", "account", "service_point", "meter", "installation", "supply"})
    customers, accounts, sps, meters = {}, {}, {}, {}
    for sec in root.sections("customer"):
        sec.check_known({"id", "market", "name", "email"})
        c = Customer(sec.get("id", str), sec.get("market", str), sec.get("name", str, ""), sec.get("email", str, ""))
        customers[c.id] = c
    for sec in root.sections("account"):
        sec.check_known({"id", "customer", "payment", "tariff"})
        payment = sec.get("payment", str, "postpaid")
        if payment not in PAYMENT_MODES:
            raise sec.error("payment", f"must be prepaid or postpaid, got {payment!r}")
        a = Account(sec.get("id", str), sec.get("customer", str), payment, sec.get("tariff", str, ""))
        accounts[a.id] = a
    for sec in root.sections("service_point"):
        sec.check_known({"id", "market", "address", "external_id"})
        s = ServicePoint(sec.get("id", str), sec.get("market", str), sec.get("address", str, ""),
                         sec.get("external_id", str, ""))
        sps[s.id] = s
    for sec in root.sections("meter"):
        sec.check_known({"id", "serial", "register_max", "max_power_w"})
        m = Meter(sec.get("id", str), sec.get("serial", str, ""), sec.get("register_max", int, None),
                  sec.get("max_power_w", int, None))
        meters[m.id] = m
    insts, sups = [], []
    for sec in root.sections("installation"):
        sec.check_known({"meter", "service_point", "from", "to", "reason"})
        where = f"{path} installation: "
        insts.append(Installation(sec.get("meter", str), sec.get("service_point", str),
                                  parse_instant(sec.get("from", str), where),
                                  parse_instant(sec.get("to", str), where) if "to" in sec.data else None,
                                  sec.get("reason", str, "install")))
    for sec in root.sections("supply"):
        sec.check_known({"service_point", "account", "from", "to", "reason"})
        where = f"{path} supply: "
        sups.append(Supply(sec.get("service_point", str), sec.get("account", str),
                           parse_instant(sec.get("from", str), where),
                           parse_instant(sec.get("to", str), where) if "to" in sec.data else None,
                           sec.get("reason", str, "move_in")))
    return Bindings(customers, accounts, sps, meters, tuple(insts), tuple(sups))


def bindings_from_csv(bindings: Bindings, path: str | Path) -> Bindings:
    """Add the rows of a bindings CSV: kind,meter_or_service_point,target,from,to,reason.

    kind "installation": meter, service point; kind "supply": service point, account.
    """
    path = Path(path)
    insts, sups = list(bindings.installations), list(bindings.supplies)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"kind", "subject", "target", "from", "to"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ConfigError(f"header must have columns {', '.join(sorted(need))}", path=str(path), line=1)
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}: "
            kind = row["kind"].strip()
            start = parse_instant(row["from"], where)
            end = parse_instant(row["to"], where) if _opt(row["to"]) else None
            reason = _opt(row.get("reason"))
            if kind == "installation":
                insts.append(Installation(row["subject"].strip(), row["target"].strip(), start, end, reason or "install"))
            elif kind == "supply":
                sups.append(Supply(row["subject"].strip(), row["target"].strip(), start, end, reason or "move_in"))
            else:
                raise ConfigError(f"kind must be installation or supply, got {kind!r}", path=str(path), line=line)
    return replace(bindings, installations=tuple(insts), supplies=tuple(sups))


def load_bindings(toml_path: str | Path, csv_paths: Iterable[str | Path] = ()) -> Bindings:
    data, text = load_toml(toml_path)
    b = bindings_from_toml(data, text, str(toml_path))
    for p in csv_paths:
        b = bindings_from_csv(b, p)
    try:
        return b.validate()
    except ValidationError as exc:
        raise ConfigError(str(exc), path=str(toml_path)) from None


DEMO_TOML = Path(__file__).parent / "data" / "bindings_demo.toml"
DEMO_CSV = Path(__file__).parent / "data" / "bindings_demo.csv"


def load_demo_bindings() -> Bindings:
    return load_bindings(DEMO_TOML, [DEMO_CSV])
