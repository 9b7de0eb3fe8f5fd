"""Credit control after RFC 4006 (Diameter Gy): reserve/update/terminate sessions, grant sizing and over-usage; never does I/O, reads a clock, or grants more than the balance.

Words as in RFC 4006: a *session* (Session-Id) carries numbered *requests* (CC-Request-Type
INITIAL / UPDATE / TERMINATION, CC-Request-Number 0, 1, 2, ...). The head-end answers with a
*result code* and, on success, *granted service units* (here: an amount of money in minor units,
and the same in Wh when a price is known), a *validity time*, and a *final-unit action* when the
grant is the last one the balance allows. UPDATE and TERMINATION report the *used service units*
of the grant being replaced.

Rules
-----
* Idempotent on (session_id, request_number): a repeated request (same content) returns the
  identical stored answer, books nothing, raises no event. The same number with other content is
  refused (5004 INVALID_AVP_VALUE); a number that is not the next one is refused
  (5012 UNABLE_TO_COMPLY); the session is unchanged by a refusal.
* Usage within the grant is charged to the customer's prepaid credit (one ledger transaction,
  key ``cc:{session}:{n}:usage``). Usage beyond the grant is **over-usage**: detected in the same
  request, booked to the customer's debt (key ``cc:{session}:{n}:over-usage``) and returned as an
  `OverUsage` event.
* Daily standing charges the gateway charged (`standing_minor`, apart from `used_minor`) are
  booked to ``revenue:standing`` + VAT like consumption's parts: from the window Dr prepaid
  (``…:standing``), from emergency credit Dr emergency-credit (``…:standing-emergency``), to debt
  Dr debt (``…:standing-debt``); a window overspend is taken from consumption first.
* An account's standing charge for a local day is booked at most once, whatever session or
  gateway reports it (a gateway restored from an old backup or with a new SD card, two gateways
  for one account): the store keeps the last day booked per account (`StandingBook`). A report
  whose days overlap it books only the new days: the part not booked is the reported amount ×
  days already booked / days reported, rounded with the market's rounding mode (`vat.rounding`);
  it is taken off the window part first; what the gateway took from emergency credit or debt is
  booked as the gateway holds it (so both sides keep the same registers) and the rest of the
  part not booked is credited back to prepaid (``…:standing-refund``, Dr revenue:standing + VAT).
  Days inside the span whose gateway skipped some days are counted as the already booked ones
  (never booked twice). The answer's balance is the ledger's, so the gateway's view follows; a
  `StandingNotBooked` event names the account, days and amount.
* A meter's consumption is booked at most once, whatever session or gateway reports it (a gateway
  whose state file was restored from an old backup charges and reports again the kWh since the
  backup): a report may carry the 1.8.0 import register range its consumption covers
  (`import_wh_from`..`import_wh_to`, ``used_wh == to − from``), and the store keeps the highest
  register value booked per meter (`ImportBook`). A range starting below it books only the new
  part: the part not booked is ``used_minor × overlapping Wh / reported Wh`` rounded with the
  market's rounding mode (`vat.rounding`), taken off the window part first; what the gateway took
  from emergency credit or debt is booked as it holds it and the rest of the part not booked is
  credited back to prepaid (``…:usage-refund``, Dr revenue:energy + VAT); a `ConsumptionNotBooked`
  event names meter, Wh and amount. A range ending below the booked value (meter reset or
  exchanged under the same meter id) is booked as reported and raises `ImportRegisterBelowBooked`
  (never under-billed silently); the booked value then follows the new register. Reports without
  a range (older gateways) are booked as reported.
* Open grants are reservations: a grant is never larger than
  ``available = prepaid credit − grants held open by the account's other sessions``, so the sum of
  open grants never exceeds the balance. A grant stays reserved until its usage is reported
  (UPDATE/TERMINATION), even after its validity time: an offline gateway may be using it.

Grant sizing (`size_grant`)
--------------------------
::

    burn      = consumption minor units / hours covered + standing minor units per day reported / 24 h,
                over the usage reports of the last `burn_rate_window` (no hours covered yet:
                `initial_burn_rate_minor_per_h`); standing charges count one day per 24 h, so
                a catch-up of several days in one report does not inflate the rate
    target    = ceil(burn × validity_hours × headroom)
    bounded   = min(max(target, min_grant_minor), max_grant_minor)
    available = prepaid credit − other sessions' open grants
    available ≤ 0          → 4012 CREDIT_LIMIT_REACHED, no grant, final-unit action
    grant     = min(bounded, available);  bounded ≥ available → the grant is final (FUA set)
    grant_wh  = floor(grant × 1000 / price_minor_per_kwh)   (when a price is configured)

`min_grant_minor` stops a meter flooding the head-end with tiny grants; the burn-rate target and
`max_grant_minor` stop it holding more than it needs for one validity period.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import IntEnum
from typing import Callable, Iterable, Iterator, Protocol

from meterlink.errors import ValidationError
from meterlink.money import round_minor, to_decimal

from . import ledger as L

# --------------------------------------------------------------------------- RFC 4006 vocabulary


class RequestType(IntEnum):
    """CC-Request-Type AVP values."""

    INITIAL_REQUEST = 1
    UPDATE_REQUEST = 2
    TERMINATION_REQUEST = 3


class ResultCode(IntEnum):
    """Result-Code values (RFC 6733 / RFC 4006) used by the head-end."""

    SUCCESS = 2001
    END_USER_SERVICE_DENIED = 4010
    CREDIT_CONTROL_NOT_APPLICABLE = 4011
    CREDIT_LIMIT_REACHED = 4012
    UNKNOWN_SESSION_ID = 5002
    INVALID_AVP_VALUE = 5004
    UNABLE_TO_COMPLY = 5012          # used for an out-of-order CC-Request-Number


class FinalUnitAction(IntEnum):
    """Final-Unit-Action AVP values: what the gateway does when the final grant is used up."""

    TERMINATE = 0
    REDIRECT = 1
    RESTRICT_ACCESS = 2


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class GrantPolicy:
    """How big grants are and how long they live (per market or per tariff)."""

    validity: timedelta = timedelta(hours=6)
    min_grant_minor: int = 100
    max_grant_minor: int = 5_000
    headroom: Decimal = Decimal("1.25")
    initial_burn_rate_minor_per_h: Decimal = Decimal(20)
    burn_rate_window: timedelta = timedelta(hours=24)
    final_unit_action: FinalUnitAction = FinalUnitAction.TERMINATE
    price_minor_per_kwh: Decimal | None = None      # gross; when set, grants also carry Wh
    answers_kept: int = 16                           # stored answers per session (retransmissions)
    usage_kept: int = 32                             # usage reports kept per session (burn rate)

    def __post_init__(self) -> None:
        for name in ("headroom", "initial_burn_rate_minor_per_h"):
            object.__setattr__(self, name, to_decimal(getattr(self, name)))
        if self.price_minor_per_kwh is not None:
            object.__setattr__(self, "price_minor_per_kwh", to_decimal(self.price_minor_per_kwh))
            if self.price_minor_per_kwh <= 0:
                raise ValidationError(f"grant policy: price_minor_per_kwh {self.price_minor_per_kwh} must be > 0")
        if not 0 < self.min_grant_minor <= self.max_grant_minor:
            raise ValidationError(f"grant policy: need 0 < min_grant_minor ({self.min_grant_minor}) "
                                  f"<= max_grant_minor ({self.max_grant_minor})")
        if self.validity <= timedelta(0) or self.burn_rate_window <= timedelta(0):
            raise ValidationError("grant policy: validity and burn_rate_window must be positive")
        if self.headroom < 1:
            raise ValidationError(f"grant policy: headroom {self.headroom} must be >= 1")


@dataclass(frozen=True)
class Grant:
    """Granted-Service-Unit with its Validity-Time and, when final, its Final-Unit-Action."""

    amount_minor: int
    wh: int | None
    validity_time: int                  # seconds (Validity-Time AVP)
    issued_at: datetime
    expires_at: datetime
    final_unit_action: FinalUnitAction | None = None

    @property
    def is_final(self) -> bool:
        return self.final_unit_action is not None


@dataclass(frozen=True)
class CreditControlRequest:
    """A CCR: which session, which request, and the used service units since the last grant."""

    session_id: str
    request_type: RequestType
    request_number: int
    account_id: str
    meter_id: str
    currency: str
    used_minor: int = 0
    used_wh: int = 0
    # the gateway's breakdown (gateway/credit.py Usage): used_minor == from credit window
    # + from_emergency_minor + to_debt_minor; repayments and arrears recovered left the window too
    from_emergency_minor: int = 0
    to_debt_minor: int = 0
    repaid_debt_minor: int = 0
    repaid_emergency_minor: int = 0
    recovered_arrears_minor: int = 0
    tokens: tuple[tuple[str, int], ...] = ()     # (reference, amount) of top-ups applied at the meter
    # daily standing charges charged at the gateway (gross), apart from used_minor: standing_minor ==
    # from the window + standing_from_emergency_minor + standing_to_debt_minor, for standing_days
    # local days standing_first_day..standing_last_day (ISO dates, informational)
    standing_minor: int = 0
    standing_days: int = 0
    standing_from_emergency_minor: int = 0
    standing_to_debt_minor: int = 0
    standing_first_day: str = ""
    standing_last_day: str = ""
    # the 1.8.0 import register range (Wh) the consumption covers, both or neither (older gateways):
    # used_wh == import_wh_to - import_wh_from
    import_wh_from: int | None = None
    import_wh_to: int | None = None

    @property
    def from_window_minor(self) -> int:
        return self.used_minor - self.from_emergency_minor - self.to_debt_minor

    @property
    def standing_from_window_minor(self) -> int:
        return self.standing_minor - self.standing_from_emergency_minor - self.standing_to_debt_minor

    @property
    def window_spend_minor(self) -> int:
        return (self.from_window_minor + self.standing_from_window_minor + self.repaid_debt_minor
                + self.repaid_emergency_minor + self.recovered_arrears_minor)

    def fingerprint(self) -> tuple:
        fp = (int(self.request_type), self.account_id, self.meter_id, self.currency, self.used_minor, self.used_wh,
              self.from_emergency_minor, self.to_debt_minor, self.repaid_debt_minor, self.repaid_emergency_minor,
              self.recovered_arrears_minor, tuple(self.tokens))
        if self.standing_minor or self.standing_days:     # (requests without: the fingerprint stored before)
            fp += (self.standing_minor, self.standing_days, self.standing_from_emergency_minor,
                   self.standing_to_debt_minor, self.standing_first_day, self.standing_last_day)
        if self.import_wh_from is not None or self.import_wh_to is not None:
            fp += (("import_wh", self.import_wh_from, self.import_wh_to),)
        return fp


def initial(session_id: str, account_id: str, meter_id: str, currency: str) -> CreditControlRequest:
    """A CCR-Initial (request number 0)."""
    return CreditControlRequest(session_id, RequestType.INITIAL_REQUEST, 0, account_id, meter_id, currency)


@dataclass(frozen=True)
class CreditControlAnswer:
    """A CCA; stored per request number and returned unchanged for a retransmission."""

    session_id: str
    request_type: RequestType
    request_number: int
    result_code: ResultCode
    grant: Grant | None = None
    final_unit_action: FinalUnitAction | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result_code == ResultCode.SUCCESS


@dataclass(frozen=True)
class UsageReport:
    """Used service units for the interval [since, at), kept for the burn rate: consumption
    (`used_minor`; reports stored before the standing fields include their standing charges) and
    the standing charges reported apart (`standing_minor` for `standing_days` days)."""

    since: datetime
    at: datetime
    used_minor: int
    used_wh: int
    standing_minor: int = 0
    standing_days: int = 0


@dataclass(frozen=True)
class OverUsage:
    """Event: usage reported beyond the grant; `over_minor` was booked as debt under `business_key`."""

    session_id: str
    account_id: str
    meter_id: str
    request_number: int
    at: datetime
    granted_minor: int
    used_minor: int
    over_minor: int
    granted_wh: int | None
    used_wh: int
    over_wh: int | None
    business_key: str
    kind: str = "over-usage"


@dataclass(frozen=True)
class StandingNotBooked:
    """Event: a report's standing-charge days the account already had booked (another session or
    gateway reported them): `days_not_booked` of the reported `days` (`first_day`..`last_day`,
    booked through `booked_through` before), `amount_minor` of the reported amount not booked, of
    which `refunded_minor` was credited back to prepaid under `business_key` (the rest was simply
    not taken from the window)."""

    session_id: str
    account_id: str
    meter_id: str
    request_number: int
    at: datetime
    first_day: str
    last_day: str
    days: int
    days_not_booked: int
    booked_through: str
    amount_minor: int
    refunded_minor: int
    business_key: str
    kind: str = "standing-not-booked"


@dataclass(frozen=True)
class ConsumptionNotBooked:
    """Event: a report's consumption the meter already had booked (the register range
    `import_wh_from`..`import_wh_to` starts below `booked_wh`, the highest register value booked
    before): `wh_not_booked` of the reported `used_wh`, `amount_minor` of the reported `used_minor`
    not booked, of which `refunded_minor` was credited back to prepaid under `business_key` (the
    rest was simply not taken from the window)."""

    session_id: str
    account_id: str
    meter_id: str
    request_number: int
    at: datetime
    import_wh_from: int
    import_wh_to: int
    booked_wh: int
    used_wh: int
    wh_not_booked: int
    used_minor: int
    amount_minor: int
    refunded_minor: int
    business_key: str
    kind: str = "consumption-not-booked"


@dataclass(frozen=True)
class ImportRegisterBelowBooked:
    """Event: a report's register range ends below the highest value booked for the meter (a
    meter reset or exchanged under the same meter id): booked as reported, the booked value set to
    `import_wh_to`."""

    session_id: str
    account_id: str
    meter_id: str
    request_number: int
    at: datetime
    import_wh_from: int
    import_wh_to: int
    booked_wh: int
    used_wh: int
    used_minor: int
    kind: str = "import-register-below-booked"


@dataclass(frozen=True)
class Session:
    """A credit-control session's state; `grant` is its open reservation."""

    session_id: str
    account_id: str
    meter_id: str
    currency: str
    opened_at: datetime
    last_request_number: int = 0
    terminated: bool = False
    grant: Grant | None = None
    used_minor_total: int = 0
    used_wh_total: int = 0
    over_usage_minor_total: int = 0
    usage: tuple[UsageReport, ...] = ()
    answers: tuple[tuple[int, tuple, CreditControlAnswer], ...] = ()

    @property
    def reserved_minor(self) -> int:
        """Money this session holds open (0 once terminated)."""
        return 0 if self.terminated or self.grant is None else self.grant.amount_minor

    def stored_answer(self, request_number: int) -> tuple[tuple, CreditControlAnswer] | None:
        for n, fp, ans in self.answers:
            if n == request_number:
                return fp, ans
        return None


@dataclass(frozen=True)
class Outcome:
    """What `decide` concluded: the answer, the session state to store (None: store nothing),
    the ledger transactions to append with it, and events to raise."""

    answer: CreditControlAnswer
    session: Session | None = None
    transactions: tuple[L.Transaction, ...] = ()
    events: tuple[OverUsage | StandingNotBooked | ConsumptionNotBooked | ImportRegisterBelowBooked, ...] = ()
    replayed: bool = False
    standing_booked_through: date | None = None     # the account's last standing day booked now (None: unchanged)
    import_booked_wh: int | None = None              # the meter's highest register booked now (None: unchanged)


# --------------------------------------------------------------------------- pure functions


def _hours(delta: timedelta) -> Decimal:
    micro = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return Decimal(micro) / Decimal(3_600_000_000)


def burn_rate(usage: Iterable[UsageReport], now: datetime, window: timedelta, default: Decimal) -> Decimal:
    """Recent spending in minor units per hour over the reports ending inside the window:
    consumption / hours covered, plus the standing charge per day reported / 24 (one day's standing
    charge per day, however many days one report caught up); `default` when no hours are covered."""
    start = now - window
    used, hours, standing, days = 0, Decimal(0), 0, 0
    for r in usage:
        if r.at > start and r.at <= now:
            used += r.used_minor
            hours += _hours(r.at - r.since)
            standing += r.standing_minor
            days += r.standing_days
    if hours <= 0:
        return to_decimal(default)
    rate = Decimal(used) / hours
    if days > 0:
        rate += Decimal(standing) / days / 24
    return rate


def size_grant(available_minor: int, burn_minor_per_h: Decimal, policy: GrantPolicy,
               now: datetime) -> Grant | None:
    """The grant for `available_minor` of unreserved credit (None when nothing is available); see module doc."""
    if available_minor <= 0:
        return None
    target = round_minor(to_decimal(burn_minor_per_h) * _hours(policy.validity) * policy.headroom, "ceiling")
    bounded = min(max(target, policy.min_grant_minor), policy.max_grant_minor)
    amount = min(bounded, available_minor)
    final = policy.final_unit_action if bounded >= available_minor else None
    wh = None
    if policy.price_minor_per_kwh is not None:
        wh = round_minor(Decimal(amount) * 1000 / policy.price_minor_per_kwh, "floor")
    seconds = policy.validity.days * 86_400 + policy.validity.seconds
    return Grant(amount, wh, seconds, now, now + policy.validity, final)


def _answer(req: CreditControlRequest, code: ResultCode, grant: Grant | None = None,
            fua: FinalUnitAction | None = None, detail: str = "") -> CreditControlAnswer:
    if grant is not None and fua is None:
        fua = grant.final_unit_action
    return CreditControlAnswer(req.session_id, req.request_type, req.request_number, code, grant, fua, detail)


def _refuse(req: CreditControlRequest, code: ResultCode, detail: str) -> Outcome:
    return Outcome(_answer(req, code, detail=detail))


def _grant_answer(req: CreditControlRequest, available: int, burn: Decimal, policy: GrantPolicy,
                  now: datetime) -> CreditControlAnswer:
    grant = size_grant(available, burn, policy, now)
    if grant is None:
        return _answer(req, ResultCode.CREDIT_LIMIT_REACHED, fua=policy.final_unit_action,
                       detail=f"account {req.account_id}: no unreserved credit ({available} {req.currency})")
    return _answer(req, ResultCode.SUCCESS, grant)


def decide(session: Session | None, request: CreditControlRequest, *, credit_minor: int,
           reserved_by_others_minor: int, policy: GrantPolicy, vat: L.PrepaidVat, now: datetime,
           account_active: bool = True, outstanding_tokens_minor: int = 0,
           reported_tokens_minor: int | None = None, arrears_minor: int | None = None,
           standing_booked_through: date | None = None, import_booked_wh: int | None = None) -> Outcome:
    """Answer one CCR from the session's state and the account's credit; the whole credit-control core.

    `credit_minor` is the account's prepaid credit now (customer view), `reserved_by_others_minor`
    the open grants of the account's *other* sessions, `outstanding_tokens_minor` the top-up
    tokens issued for the account and not yet reported applied (excluding this request's): a
    token is a reservation like a grant, its money already in the prepaid credit since the sale.
    `reported_tokens_minor` is how much of this request's reported tokens the store confirms
    (None: trust the request); it extends the grant the usage is measured against. `arrears_minor` is
    the account's head-end arrears outstanding before this request (None: no cap): reported
    arrears recoveries are booked against it (``{key}:arrears-recovered``, Dr prepaid / Cr arrears)
    up to what is outstanding; a recovery beyond it (arrears lowered at the head-end meanwhile) is
    not booked and stays in the prepaid balance. `standing_booked_through` is the last local day
    whose standing charge the account has booked (None: none yet): reported days up to it are not
    booked again (module doc); `Outcome.standing_booked_through` is the day to store after.
    `import_booked_wh` is the highest 1.8.0 register value (Wh) the meter has booked (None: none
    yet): a reported register range below it is not booked again (module doc);
    `Outcome.import_booked_wh` is the value to store after.
    Nothing is stored here: the caller appends `transactions`, stores `session`, the day and the
    register value together (one database transaction).
    """
    req = request
    if not isinstance(req.request_type, RequestType):
        try:
            req = replace(req, request_type=RequestType(req.request_type))
        except ValueError:
            return _refuse(req, ResultCode.INVALID_AVP_VALUE, f"session {req.session_id}: "
                           f"unknown CC-Request-Type {req.request_type!r}")
    if (req.request_number < 0 or req.used_minor < 0 or req.used_wh < 0 or req.from_window_minor < 0
            or min(req.from_emergency_minor, req.to_debt_minor, req.repaid_debt_minor, req.repaid_emergency_minor,
                   req.recovered_arrears_minor, req.standing_days, req.standing_from_emergency_minor,
                   req.standing_to_debt_minor, req.standing_from_window_minor) < 0
            or any(a <= 0 for _, a in req.tokens)):
        return _refuse(req, ResultCode.INVALID_AVP_VALUE, f"session {req.session_id} request {req.request_number}: "
                       f"negative {', '.join(_negative_fields(req))}")

    problem = _standing_problem(req) or _import_range_problem(req)
    if problem:
        return _refuse(req, ResultCode.INVALID_AVP_VALUE, f"session {req.session_id} request {req.request_number}: "
                       f"{problem}")

    if session is None:
        if req.request_type != RequestType.INITIAL_REQUEST:
            return _refuse(req, ResultCode.UNKNOWN_SESSION_ID, f"unknown session {req.session_id}")
        if req.request_number != 0:
            return _refuse(req, ResultCode.UNABLE_TO_COMPLY,
                           f"session {req.session_id}: CCR-Initial must be request number 0, got {req.request_number}")
        if not account_active:
            return _refuse(req, ResultCode.END_USER_SERVICE_DENIED, f"account {req.account_id} is not active")
        if req.used_minor or req.used_wh or req.window_spend_minor or req.tokens or req.standing_minor:
            # a deviation from RFC 4006: the gateway reports what happened before any session
            # (tokens typed in, emergency credit, debt) against an empty grant, so nothing is lost
            session = Session(req.session_id, req.account_id, req.meter_id, req.currency, now, -1)
            return _book_and_grant(session, req, credit_minor=credit_minor,
                                   reserved_by_others_minor=reserved_by_others_minor, policy=policy, vat=vat,
                                   now=now, account_active=account_active,
                                   outstanding_tokens_minor=outstanding_tokens_minor,
                                   reported_tokens_minor=reported_tokens_minor, arrears_minor=arrears_minor,
                                   standing_booked_through=standing_booked_through,
                                   import_booked_wh=import_booked_wh)
        burn = to_decimal(policy.initial_burn_rate_minor_per_h)
        answer = _grant_answer(req, credit_minor - reserved_by_others_minor - outstanding_tokens_minor, burn,
                               policy, now)
        if not answer.ok:
            return Outcome(answer)          # no session is opened without a grant
        new = Session(req.session_id, req.account_id, req.meter_id, req.currency, now, 0, False, answer.grant,
                      answers=((0, req.fingerprint(), answer),))
        return Outcome(answer, new)

    stored = session.stored_answer(req.request_number)
    if stored is not None:
        fingerprint, answer = stored
        if fingerprint == req.fingerprint():
            return Outcome(answer, replayed=True)
        return _refuse(req, ResultCode.INVALID_AVP_VALUE,
                       f"session {req.session_id} request {req.request_number} repeated with different content")
    if (req.account_id, req.meter_id, req.currency) != (session.account_id, session.meter_id, session.currency):
        return _refuse(req, ResultCode.INVALID_AVP_VALUE,
                       f"session {req.session_id} belongs to account {session.account_id} meter {session.meter_id} "
                       f"({session.currency}), not {req.account_id}/{req.meter_id} ({req.currency})")
    if session.terminated:
        return _refuse(req, ResultCode.UNKNOWN_SESSION_ID, f"session {req.session_id} is terminated")
    if req.request_number != session.last_request_number + 1:
        return _refuse(req, ResultCode.UNABLE_TO_COMPLY,
                       f"session {req.session_id}: request number {req.request_number} out of order "
                       f"(expected {session.last_request_number + 1})")
    if req.request_type == RequestType.INITIAL_REQUEST:
        return _refuse(req, ResultCode.INVALID_AVP_VALUE, f"session {req.session_id} already initialised")
    return _book_and_grant(session, req, credit_minor=credit_minor, reserved_by_others_minor=reserved_by_others_minor,
                           policy=policy, vat=vat, now=now, account_active=account_active,
                           outstanding_tokens_minor=outstanding_tokens_minor,
                           reported_tokens_minor=reported_tokens_minor, arrears_minor=arrears_minor,
                           standing_booked_through=standing_booked_through, import_booked_wh=import_booked_wh)


def _standing_problem(req: CreditControlRequest) -> str | None:
    """Why the standing-charge part of a report is inconsistent, or None: an amount needs at least one
    day, and reported days need their first and last local day (ISO dates, first <= last) spanning at
    least that many days (days the gateway skipped, e.g. on its fallback price, make the span longer)."""
    if not (req.standing_minor or req.standing_days or req.standing_first_day or req.standing_last_day):
        return None
    if req.standing_days < 1:
        return f"standing charge {req.standing_minor} for {req.standing_days} day(s): at least one day is needed"
    try:
        first, last = date.fromisoformat(req.standing_first_day), date.fromisoformat(req.standing_last_day)
    except ValueError:
        return (f"standing charge days {req.standing_first_day!r}..{req.standing_last_day!r} are not "
                f"ISO dates (YYYY-MM-DD)")
    if last < first or (last - first).days + 1 < req.standing_days:
        return (f"standing charge of {req.standing_days} day(s) does not fit between its first day {first} "
                f"and last day {last}")
    return None


def _import_range_problem(req: CreditControlRequest) -> str | None:
    """Why the report's import register range is inconsistent, or None: both ends or neither, not
    negative, and exactly `used_wh` wide."""
    f, t = req.import_wh_from, req.import_wh_to
    if f is None and t is None:
        return None
    if f is None or t is None:
        return f"import register range {f}..{t}: both ends are needed"
    if f < 0 or t - f != req.used_wh:
        return f"import register range {f}..{t} Wh does not cover the reported {req.used_wh} Wh"
    return None


def _negative_fields(req: CreditControlRequest) -> list[str]:
    """The request's fields that must not be negative but are (a refusal's detail names them)."""
    out = [name for name in ("request_number", "used_minor", "used_wh", "from_emergency_minor", "to_debt_minor",
                             "repaid_debt_minor", "repaid_emergency_minor", "recovered_arrears_minor",
                             "standing_days", "standing_from_emergency_minor", "standing_to_debt_minor")
           if getattr(req, name) < 0]
    if req.from_window_minor < 0:
        out.append(f"consumption from the window (used_minor {req.used_minor} - from_emergency_minor "
                   f"{req.from_emergency_minor} - to_debt_minor {req.to_debt_minor})")
    if req.standing_from_window_minor < 0:
        out.append(f"standing charge from the window (standing_minor {req.standing_minor} - "
                   f"standing_from_emergency_minor {req.standing_from_emergency_minor} - standing_to_debt_minor "
                   f"{req.standing_to_debt_minor})")
    out += [f"or zero top-up {ref} ({a})" for ref, a in req.tokens if a <= 0]
    return out


def _book_and_grant(session: Session, req: CreditControlRequest, *, credit_minor: int, reserved_by_others_minor: int,
                    policy: GrantPolicy, vat: L.PrepaidVat, now: datetime, account_active: bool,
                    outstanding_tokens_minor: int, reported_tokens_minor: int | None,
                    arrears_minor: int | None = None, standing_booked_through: date | None = None,
                    import_booked_wh: int | None = None) -> Outcome:
    """Book the used units of the grant being replaced, then answer with the next grant."""

    # --- usage of the grant being replaced (RFC 4006: the new grant replaces its unused rest)
    grant = session.grant
    granted = grant.amount_minor if grant else 0
    tokens_minor = sum(a for _, a in req.tokens) if reported_tokens_minor is None else reported_tokens_minor
    window = granted + tokens_minor                      # what the gateway was allowed to spend
    spend = req.window_spend_minor
    over_window = max(0, spend - window)                 # beyond the window: a gateway that overspent
    charged_from_window = req.from_window_minor + req.standing_from_window_minor
    if over_window > charged_from_window:
        return _refuse(req, ResultCode.INVALID_AVP_VALUE,
                       f"session {req.session_id} request {req.request_number}: repayments "
                       f"{spend - charged_from_window} exceed the window {window}")
    over_energy = min(over_window, req.from_window_minor)   # the overspend is consumption first, then standing
    from_window = req.from_window_minor - over_energy
    over = req.to_debt_minor + over_energy
    standing_from_window = req.standing_from_window_minor - (over_window - over_energy)
    standing_to_debt = req.standing_to_debt_minor + (over_window - over_energy)
    recovered = req.recovered_arrears_minor
    if arrears_minor is not None:
        recovered = min(recovered, max(0, arrears_minor))  # never more than is outstanding
    within = spend - over_window - (req.recovered_arrears_minor - recovered)   # what leaves the prepaid credit
    txns: list[L.Transaction] = []
    events: list[OverUsage | StandingNotBooked | ConsumptionNotBooked | ImportRegisterBelowBooked] = []
    base = f"cc:{req.session_id}:{req.request_number}"
    # consumption the meter has booked already (the register range starts below the highest value
    # booked: a gateway restored from an old backup): not booked again; off the window part first,
    # the rest (the gateway took it from EC or debt) credited back
    wh_done, energy_not_booked, below = consumption_already_booked(req, import_booked_wh, vat.rounding)
    from_window, energy_refund = _not_booked_off(energy_not_booked, from_window)
    within -= energy_not_booked
    usage_memo = ""
    if wh_done:
        usage_memo = (f"register {req.import_wh_from}..{req.import_wh_to} Wh: {wh_done} Wh already booked "
                      f"(through {import_booked_wh} Wh): {energy_not_booked} not booked")
    # standing days the account has booked already (another session or gateway): not booked again;
    # off the window part first, the rest (the gateway took it from EC or debt) credited back
    days_done, not_booked = standing_already_booked(req, standing_booked_through, vat.rounding)
    standing_from_window, refund = _not_booked_off(not_booked, standing_from_window)
    within -= not_booked
    if from_window:
        txns.append(L.consumption_charge(f"{base}:usage", now, req.account_id, req.currency, vat,
                                         gross_minor=from_window))
        if usage_memo:
            txns[-1] = replace(txns[-1], memo=usage_memo)
    if energy_refund:
        key = f"{base}:usage-refund"
        charge = L.consumption_charge(key, now, req.account_id, req.currency, vat, gross_minor=energy_refund)
        txns.append(replace(L.reverse(charge, key, now, kind="consumption-refund"), memo=usage_memo))
    if wh_done:
        events.append(ConsumptionNotBooked(req.session_id, req.account_id, req.meter_id, req.request_number, now,
                                           req.import_wh_from, req.import_wh_to, import_booked_wh, req.used_wh,
                                           wh_done, req.used_minor, energy_not_booked, energy_refund,
                                           f"{base}:usage-refund" if energy_refund else ""))
    if below:
        events.append(ImportRegisterBelowBooked(req.session_id, req.account_id, req.meter_id, req.request_number,
                                                now, req.import_wh_from, req.import_wh_to, import_booked_wh,
                                                req.used_wh, req.used_minor))
    if req.from_emergency_minor:
        txns.append(L.emergency_consumption_charge(f"{base}:emergency", now, req.account_id,
                                                   req.from_emergency_minor, req.currency, vat))
    if req.standing_minor:
        memo = f"{req.standing_days} day(s) {req.standing_first_day}..{req.standing_last_day}"
        if days_done:
            memo += f" ({days_done} already booked through {standing_booked_through}: {not_booked} not booked)"
        for suffix, paid_from, gross in ((":standing", "prepaid", standing_from_window),
                                         (":standing-emergency", "emergency-credit", req.standing_from_emergency_minor),
                                         (":standing-debt", "debt", standing_to_debt)):
            if gross:
                txns.append(L.standing_charge(base + suffix, now, req.account_id, req.currency, vat,
                                              gross_minor=gross, paid_from=paid_from, memo=memo))
        if refund:
            key = f"{base}:standing-refund"
            charge = L.standing_charge(key, now, req.account_id, req.currency, vat, gross_minor=refund)
            txns.append(replace(L.reverse(charge, key, now, kind="standing-charge-refund"), memo=memo))
    if days_done:
        events.append(StandingNotBooked(req.session_id, req.account_id, req.meter_id, req.request_number, now,
                                        req.standing_first_day, req.standing_last_day, req.standing_days, days_done,
                                        standing_booked_through.isoformat(), not_booked, refund,
                                        f"{base}:standing-refund" if refund else ""))
    if req.repaid_debt_minor:
        txns.append(L.debt_recovery(f"{base}:debt-repaid", now, req.account_id, req.repaid_debt_minor, req.currency))
    if recovered:
        txns.append(L.arrears_recovery(f"{base}:arrears-recovered", now, req.account_id, recovered, req.currency))
    if req.repaid_emergency_minor:
        txns.append(L.emergency_credit_repayment(f"{base}:emergency-repaid", now, req.account_id,
                                                 req.repaid_emergency_minor, req.currency))
    if over:
        key = f"{base}:over-usage"
        txns.append(L.over_usage_debt(key, now, req.account_id, over, req.currency, vat))
        granted_wh = grant.wh if grant else (0 if policy.price_minor_per_kwh is not None else None)
        events.append(OverUsage(req.session_id, req.account_id, req.meter_id, req.request_number, now, window,
                                req.used_minor, over, granted_wh, req.used_wh,
                                None if granted_wh is None else max(0, req.used_wh - granted_wh), key))
    since = grant.issued_at if grant else (session.usage[-1].at if session.usage else session.opened_at)
    # the burn rate and totals count the consumption booked (a restored gateway's catch-up of kWh
    # booked before does not inflate the grants)
    used_minor, used_wh = req.used_minor - energy_not_booked, req.used_wh - wh_done
    usage = (session.usage + (UsageReport(since, now, used_minor, used_wh, req.standing_minor,
                                          req.standing_days),))[-policy.usage_kept:]

    if req.request_type == RequestType.TERMINATION_REQUEST:
        answer = _answer(req, ResultCode.SUCCESS)
        terminated, new_grant = True, None
    else:
        burn = burn_rate(usage, now, policy.burn_rate_window, policy.initial_burn_rate_minor_per_h)
        if not account_active:
            answer = _answer(req, ResultCode.END_USER_SERVICE_DENIED, fua=policy.final_unit_action,
                             detail=f"account {req.account_id} is not active")
        else:
            answer = _grant_answer(req, credit_minor - within - reserved_by_others_minor - outstanding_tokens_minor,
                                   burn, policy, now)
        terminated, new_grant = False, answer.grant

    new = replace(session, last_request_number=req.request_number, terminated=terminated, grant=new_grant,
                  used_minor_total=session.used_minor_total + used_minor,
                  used_wh_total=session.used_wh_total + used_wh,
                  over_usage_minor_total=session.over_usage_minor_total + over, usage=usage,
                  answers=(session.answers + ((req.request_number, req.fingerprint(), answer),))[-policy.answers_kept:])
    through = None
    if req.standing_days:
        last = date.fromisoformat(req.standing_last_day)
        through = last if standing_booked_through is None else max(last, standing_booked_through)
    register = None
    if req.import_wh_to is not None:
        register = req.import_wh_to if import_booked_wh is None or below else max(req.import_wh_to, import_booked_wh)
    return Outcome(answer, new, tuple(txns), tuple(events), standing_booked_through=through,
                   import_booked_wh=register)


def consumption_already_booked(req: CreditControlRequest, booked_wh: int | None,
                               rounding: str = "half_up") -> tuple[int, int, bool]:
    """(Wh, minor units, register below) of the report's consumption the meter has booked already
    (register values booked up to `booked_wh`): the Wh of its register range below `booked_wh` and
    that share of `used_minor`, pro rata, rounded once by `rounding`. A range ending below
    `booked_wh` (a meter reset or exchanged under the same id) is booked as reported: (0, 0, True).
    No range (an older gateway) or nothing booked yet: (0, 0, False)."""
    f, t = req.import_wh_from, req.import_wh_to
    if booked_wh is None or f is None or t is None:
        return 0, 0, False
    if t < booked_wh:
        return 0, 0, True
    wh = max(0, booked_wh - f)
    if wh == 0:
        return 0, 0, False
    return wh, _pro_rata(req.used_minor, wh, t - f, rounding), False


def standing_already_booked(req: CreditControlRequest, booked_through: date | None,
                            rounding: str = "half_up") -> tuple[int, int]:
    """(days, minor units) of the report's standing charges the account has booked already (its
    days booked through `booked_through`): the span's days up to it, at most the days reported
    (a span longer than its days skipped some: those are counted among the booked ones, so no day
    is booked twice), and that share of `standing_minor`, pro rata, rounded by `rounding`."""
    if booked_through is None or not req.standing_days:
        return 0, 0
    first = date.fromisoformat(req.standing_first_day)
    days = min(req.standing_days, max(0, (booked_through - first).days + 1))
    return days, _pro_rata(req.standing_minor, days, req.standing_days, rounding)


def _pro_rata(amount_minor: int, part: int, whole: int, rounding: str) -> int:
    """`part`/`whole` of `amount_minor`, rounded once by `rounding` (all of it when part == whole)."""
    if part == whole:
        return amount_minor
    return round_minor(Decimal(amount_minor) * part / whole, rounding)


def _not_booked_off(not_booked_minor: int, from_window_minor: int) -> tuple[int, int]:
    """(window part left to book, refund): what a report charged that was booked already comes off the
    part the gateway took from its credit window first; the rest it took from emergency credit or
    debt, which are booked as the gateway holds them, so that rest is credited back to prepaid."""
    off_window = min(not_booked_minor, from_window_minor)
    return from_window_minor - off_window, not_booked_minor - off_window


# --------------------------------------------------------------------------- storage contract + service


class SessionStore(Protocol):
    """Where sessions live; the SQL implementations come with the head-end storage."""

    def get(self, session_id: str) -> Session | None: ...

    def put(self, session: Session) -> None: ...

    def open_sessions(self, account_id: str) -> Iterable[Session]: ...


class TokenReservations(Protocol):
    """Top-up tokens as credit-control sees them (implemented over the `payg_token` table)."""

    def outstanding_minor(self, account_id: str, exclude: tuple[str, ...] = (), now: datetime | None = None) -> int:
        """Tokens issued for the account, unexpired at `now` and not yet reported applied (a reservation)."""

    def confirmed_minor(self, meter_id: str, tokens: tuple[tuple[str, int], ...]) -> int:
        """How much of the reported (reference, amount) the head-end knows as issued for this meter."""


class StandingBook(Protocol):
    """The last local day whose standing charge each account has booked (`PaygStore` implements it)."""

    def standing_booked_through(self, account_id: str) -> date | None: ...

    def book_standing_through(self, account_id: str, day: date) -> None: ...


class InMemoryStandingBook:
    """The reference `StandingBook` (tests, single process)."""

    def __init__(self) -> None:
        self._through: dict[str, date] = {}

    def standing_booked_through(self, account_id: str) -> date | None:
        return self._through.get(account_id)

    def book_standing_through(self, account_id: str, day: date) -> None:
        known = self._through.get(account_id)
        self._through[account_id] = day if known is None else max(known, day)


class ImportBook(Protocol):
    """The highest 1.8.0 import register value (Wh) each meter has booked (`PaygStore` implements it)."""

    def import_booked_wh(self, meter_id: str) -> int | None: ...

    def book_import_wh(self, meter_id: str, wh: int) -> None: ...


class InMemoryImportBook:
    """The reference `ImportBook` (tests, single process)."""

    def __init__(self) -> None:
        self._wh: dict[str, int] = {}

    def import_booked_wh(self, meter_id: str) -> int | None:
        return self._wh.get(meter_id)

    def book_import_wh(self, meter_id: str, wh: int) -> None:
        self._wh[meter_id] = wh


class InMemorySessionStore:
    """The reference `SessionStore` (tests, single process)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def put(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def open_sessions(self, account_id: str) -> Iterator[Session]:
        return iter([s for s in self._sessions.values() if s.account_id == account_id and not s.terminated])


_EPOCH = datetime(1970, 1, 1).replace(tzinfo=__import__("datetime").timezone.utc)


def _ms(t: datetime) -> int:
    """Exact: microseconds since the Unix epoch (the name says what the wire uses; we keep µs)."""
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _instant(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _grant_json(g: Grant | None):
    if g is None:
        return None
    return [g.amount_minor, g.wh, g.validity_time, _ms(g.issued_at), _ms(g.expires_at),
            None if g.final_unit_action is None else int(g.final_unit_action)]


def _grant_from(d) -> Grant | None:
    if d is None:
        return None
    return Grant(d[0], d[1], d[2], _instant(d[3]), _instant(d[4]), None if d[5] is None else FinalUnitAction(d[5]))


def session_to_json(s: Session) -> dict:
    """A `Session` as JSON-able data (instants as integer microseconds since the epoch), for SQL session stores."""
    return {"session_id": s.session_id, "account_id": s.account_id, "meter_id": s.meter_id, "currency": s.currency,
            "opened_at": _ms(s.opened_at), "last": s.last_request_number, "terminated": s.terminated,
            "grant": _grant_json(s.grant), "used": [s.used_minor_total, s.used_wh_total, s.over_usage_minor_total],
            "usage": [_usage_json(u) for u in s.usage], "answers": [_stored_answer_json(e) for e in s.answers]}


def _usage_json(u: UsageReport) -> list:
    if u.standing_days:
        return [_ms(u.since), _ms(u.at), u.used_minor, u.used_wh, u.standing_minor, u.standing_days]
    return [_ms(u.since), _ms(u.at), u.used_minor, u.used_wh]


def _stored_answer_json(entry) -> list:
    n, fp, a = entry
    return [n, list(fp), [int(a.request_type), a.request_number, int(a.result_code), _grant_json(a.grant),
                          None if a.final_unit_action is None else int(a.final_unit_action), a.detail]]


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def session_json_text(s: Session, memo: dict | None = None) -> tuple[str, dict]:
    """``json.dumps(session_to_json(s), separators=(",", ":"))`` — the same text — and a memo for
    the next call on the same session: the encoded usage reports and stored answers by object
    identity (each kept with its object, so an id is never reused while in the memo). A session
    that grew by one report and one answer then encodes only those two, not its whole history."""
    old, new = memo or {}, {}

    def frag(obj, encode) -> str:
        hit = old.get(id(obj))
        text = hit[1] if hit is not None and hit[0] is obj else _compact(encode(obj))
        new[id(obj)] = (obj, text)
        return text

    head = _compact({"session_id": s.session_id, "account_id": s.account_id, "meter_id": s.meter_id,
                     "currency": s.currency, "opened_at": _ms(s.opened_at), "last": s.last_request_number,
                     "terminated": s.terminated, "grant": _grant_json(s.grant),
                     "used": [s.used_minor_total, s.used_wh_total, s.over_usage_minor_total]})
    usage = ",".join([frag(u, _usage_json) for u in s.usage])
    answers = ",".join([frag(e, _stored_answer_json) for e in s.answers])
    return f'{head[:-1]},"usage":[{usage}],"answers":[{answers}]}}', new


def session_from_json(d: dict) -> Session:
    answers = tuple((n, _tuplify(fp), CreditControlAnswer(d["session_id"], RequestType(a[0]), a[1], ResultCode(a[2]),
                                                         _grant_from(a[3]),
                                                         None if a[4] is None else FinalUnitAction(a[4]), a[5]))
                    for n, fp, a in d["answers"])
    return Session(d["session_id"], d["account_id"], d["meter_id"], d["currency"], _instant(d["opened_at"]),
                   d["last"], d["terminated"], _grant_from(d["grant"]), *d["used"],
                   usage=tuple(UsageReport(_instant(u[0]), _instant(u[1]), *u[2:]) for u in d["usage"]),
                   answers=answers)


class CreditControl:
    """Thin orchestration of `decide` over a `LedgerStore` and a `SessionStore`.

    A storage implementation must run each call in one database transaction (and serialise calls
    per account, e.g. `SELECT ... FOR UPDATE` on the account), so that the balance read, the
    postings and the session write are atomic.
    """

    def __init__(self, ledger: L.LedgerStore, sessions: SessionStore, policy: GrantPolicy, vat: L.PrepaidVat,
                 account_active: Callable[[str], bool] = lambda account_id: True,
                 tokens: "TokenReservations | None" = None, inputs: Callable | None = None,
                 standing: "StandingBook | None" = None, imports: "ImportBook | None" = None) -> None:
        self.ledger, self.sessions, self.policy, self.vat = ledger, sessions, policy, vat
        # the days booked per account: given, or the ledger's store where it keeps them (PaygStore);
        # without one, every reported standing day is booked (no cross-session check)
        if standing is None and hasattr(ledger, "standing_booked_through"):
            standing = ledger
        self.standing = standing
        # the register value booked per meter, likewise (without one: no cross-session check)
        if imports is None and hasattr(ledger, "import_booked_wh"):
            imports = ledger
        self.imports = imports
        self.account_active = account_active
        self.tokens = tokens
        # inputs(account, currency, session_id, reported token refs, now) -> (prepaid credit, arrears,
        # open grants of the account's other sessions, outstanding tokens): the four figures `decide`
        # needs in one read, equal to what the ledger, sessions and tokens give one by one
        self.inputs = inputs
        self._read = threading.local()      # .balances: (account, currency, credit, arrears) this thread's
                                            # last `handle` read (`read_balances`)

    def handle(self, request: CreditControlRequest, now: datetime) -> Outcome:
        session = self.sessions.get(request.session_id)
        account = session.account_id if session else request.account_id
        currency = session.currency if session else request.currency
        prepaid, arrears_acct = L.prepaid(account), L.arrears_account(account)
        refs = tuple(r for r, _ in request.tokens)
        if self.inputs is not None:                    # all four in one read where the store can
            credit, arrears, others, outstanding = self.inputs(account, currency, request.session_id, refs, now)
        else:
            if hasattr(self.ledger, "balances"):           # both in one read where the store can
                both = self.ledger.balances((prepaid, arrears_acct), currency)
                credit, arrears = -both[prepaid], both[arrears_acct]
            else:
                credit = -self.ledger.balance(prepaid, currency)
                arrears = self.ledger.balance(arrears_acct, currency)
            if hasattr(self.sessions, "reserved_by_others"):
                others = self.sessions.reserved_by_others(account, request.session_id)
            else:
                others = sum(s.reserved_minor for s in self.sessions.open_sessions(account)
                             if s.session_id != request.session_id)
            outstanding = self.tokens.outstanding_minor(account, exclude=refs, now=now) if self.tokens else 0
        self._read.balances = (account, currency, credit, arrears)
        confirmed = self.tokens.confirmed_minor(request.meter_id, request.tokens) if self.tokens else None
        through = None
        if self.standing is not None and request.standing_days:
            through = self.standing.standing_booked_through(account)
        register = None
        if self.imports is not None and request.import_wh_to is not None:
            register = self.imports.import_booked_wh(request.meter_id)
        outcome = decide(session, request, credit_minor=credit, reserved_by_others_minor=others, policy=self.policy,
                         vat=self.vat, now=now, account_active=self.account_active(account),
                         outstanding_tokens_minor=outstanding, reported_tokens_minor=confirmed,
                         arrears_minor=arrears, standing_booked_through=through, import_booked_wh=register)
        self._read.booked = ()
        if outcome.transactions:
            self._read.booked = self.ledger.append(outcome.transactions)
        if self.standing is not None and outcome.standing_booked_through is not None:
            self.standing.book_standing_through(account, outcome.standing_booked_through)
        if self.imports is not None and outcome.import_booked_wh is not None:
            self.imports.book_import_wh(request.meter_id, outcome.import_booked_wh)
        if outcome.session is not None:
            self.sessions.put(outcome.session)
        return outcome

    def balances_after(self, account_id: str, currency: str) -> tuple[int, int] | None:
        """(prepaid credit, arrears) of `account_id` after the calling thread's last `handle`, without
        reading them again: the balances it read plus the postings it booked (what the ledger's
        `append` returned as new). None when that call was for another account or currency, or the
        ledger does not say what it booked."""
        seen, booked = getattr(self._read, "balances", None), getattr(self._read, "booked", None)
        if seen is None or seen[:2] != (account_id, currency) or not isinstance(booked, (tuple, list)):
            return None
        credit, arrears = seen[2], seen[3]
        prepaid, arrears_acct = L.prepaid(account_id), L.arrears_account(account_id)
        for t in booked:
            for p in t.postings:
                if p.currency == currency:
                    if p.account == prepaid:
                        credit -= p.amount_minor
                    elif p.account == arrears_acct:
                        arrears += p.amount_minor
        return credit, arrears

    def _typed(self, request: CreditControlRequest, expected: RequestType, now: datetime) -> Outcome:
        if request.request_type != expected:
            raise ValidationError(f"session {request.session_id}: {expected.name} expected, "
                                  f"got {RequestType(request.request_type).name}")
        return self.handle(request, now)

    def reserve(self, request: CreditControlRequest, now: datetime) -> Outcome:
        """CCR-Initial: open the session and reserve its first grant."""
        return self._typed(request, RequestType.INITIAL_REQUEST, now)

    def update(self, request: CreditControlRequest, now: datetime) -> Outcome:
        """CCR-Update: book the used units and receive a new grant."""
        return self._typed(request, RequestType.UPDATE_REQUEST, now)

    def terminate(self, request: CreditControlRequest, now: datetime) -> Outcome:
        """CCR-Terminate: book the used units and release the reservation."""
        return self._typed(request, RequestType.TERMINATION_REQUEST, now)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class OverUsageRow:
    account_id: str
    meter_id: str
    currency: str
    events: int
    over_minor: int
    over_wh: int


def over_usage_report(events: Iterable[OverUsage], start: datetime, end: datetime,
                      currency_of: Callable[[str], str] | None = None) -> list[OverUsageRow]:
    """Over-usage events in [start, end) per (account, meter): count, money booked as debt, Wh."""
    acc: dict[tuple[str, str], list[int]] = {}
    for e in events:
        if start <= e.at < end:
            row = acc.setdefault((e.account_id, e.meter_id), [0, 0, 0])
            row[0] += 1
            row[1] += e.over_minor
            row[2] += e.over_wh or 0
    return [OverUsageRow(a, m, currency_of(a) if currency_of else "", n, minor, wh)
            for (a, m), (n, minor, wh) in sorted(acc.items())]


__all__ = [
    "ConsumptionNotBooked", "CreditControl", "CreditControlAnswer", "CreditControlRequest", "FinalUnitAction",
    "Grant", "GrantPolicy", "ImportBook", "ImportRegisterBelowBooked", "InMemoryImportBook", "InMemorySessionStore",
    "InMemoryStandingBook", "Outcome", "OverUsage", "OverUsageRow", "RequestType", "ResultCode", "Session",
    "SessionStore", "StandingBook", "StandingNotBooked", "TokenReservations", "UsageReport", "burn_rate",
    "consumption_already_booked", "decide", "initial", "over_usage_report", "session_from_json",
    "session_json_text", "session_to_json", "size_grant", "standing_already_booked",
]
