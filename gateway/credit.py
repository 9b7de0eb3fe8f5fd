"""Offline prepayment credit of one account (DLMS/COSEM Account, Credit, Charge): pure transitions; never reads a clock, never switches a relay, never does I/O.

The gateway keeps one immutable `AccountState` per PAYG meter. Every transition takes the state
and an instant and returns `(new_state, events)`; the events are plain frozen dataclasses the
shell journals (hash chain) and publishes. `decide_supply` returns a `Decision` naming the relay
position the shell must command (through the meter's Modbus coil) and why.

Money is integer minor units; Decimal only while pricing, rounded by `meterlink.money.round_minor`.
Sub-minor pricing residue is carried in the state (booked, not lost).

Where the money of one account sits (all int minor units, all >= 0):

* `credit_balance`         credit from head-end grants (amount) and top-ups (tokens, cards)
* `emergency_credit_used`  emergency credit consumed, owed back from the next top-up
* `accumulated_debt`       consumption charged while no credit was left (friendly periods,
                           the moments before disconnection, restrict-access grants)
* `arrears`                debt registered by the head-end, recovered by time-based and
                           payment-based debt recovery

Grants REPLACE, after RFC 4006: the head-end's prepaid account (its ledger) is the customer's
one balance; `credit_balance` is only the *window* of it the gateway may spend: the last grant,
plus tokens applied since, minus what was spent since. Each new grant replaces the unused rest
of the previous one, counted from the moment the usage report it answers was taken
(`begin_report`): ``credit_balance := grant + tokens since the report − window spending since
the report`` (then debt and emergency credit are repaid from it). Every report carries a `Usage`:
used units by source (credit window, emergency credit, accumulated debt), repayments of debt and
emergency credit, arrears recovered, and the tokens applied — so the head-end can book each of
them once (`headend/creditcontrol.py`) and both sides hold the same debt and emergency-credit
figures to the cent.

Low-balance warnings and the emergency-credit offer compare the CUSTOMER'S balance, not the
window: every answer carries the head-end's prepaid balance after booking the report it answers
(`Grant.balance_minor`, `acknowledge(..., balance_minor=)`), kept as `reported_balance`; the
gateway lowers it locally by what left the window since that report point and raises it by the
offline card top-ups not yet reported (the head-end books those at the next sync):
``balance_remaining = max(credit_balance, reported_balance + card top-ups − window spending since)``
(the window is part of the balance, so never less than it; no report yet: the window alone).

Daily standing charges (`charge_standing`, with a pulled tariff only): every local supply day
once, at its local midnight or the first evaluation after it (missed days too), drawn in the
same order as consumption and rounded with the same carried residue; reported apart in `Usage`.

Window identity (checked by a property test): at any instant
  credit_balance == last grant + Σ tokens since its report point − window spending since then
where window spending = consumption and standing charges from credit + debt/emergency repayments
+ arrears recovered.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Callable, Literal, Protocol, Union
from zoneinfo import ZoneInfo

from meterlink.clock import utc
from meterlink.errors import ValidationError
from meterlink.money import ROUNDING_MODES, round_minor, to_decimal

from .friendly import FriendlyConfig, friendly_period_end, in_friendly_period

Relay = Literal["closed", "open"]
PriceFn = Callable[[datetime], Decimal]


class IntervalPrice(Protocol):
    """Prices consumption over an interval (a pulled tariff: `gateway.pricing.TariffPrice`)."""

    def amount(self, wh: int, since: datetime | None, at: datetime) -> Decimal: ...


class StandingCharge(Protocol):
    """A daily standing charge (a pulled tariff: `gateway.pricing.TariffPrice`): the exact gross
    minor units of one local supply day in the zone `standing_zone`."""

    @property
    def standing_zone(self) -> str: ...

    def standing_gross(self, day: date) -> Decimal | None: ...   # None: no standing charge that day


Price = Union[Decimal, int, str, PriceFn, IntervalPrice]
FINAL_UNIT_ACTIONS = ("terminate", "restrict_access")
RECONNECT_MODES = ("automatic", "customer_confirms")
RECOVERY_PERIODS = ("day", "week", "month")
_DAY_US = Decimal(86_400_000_000)


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class PrepaymentConfig:
    """Market/account prepayment parameters (all amounts in minor units of `currency`)."""

    currency: str = "GBP"
    timezone: str = "UTC"                         # market IANA zone: debt-recovery periods are local
    rounding: str = "half_up"                     # mode name for round_minor
    low_credit_threshold: int = 500               # LowBalance raised when credit falls below
    emergency_credit_threshold: int = 100         # emergency credit offered when credit falls below
    emergency_credit_limit: int = 1000            # how much emergency credit may be used (0: none)
    disablement_threshold: int = 0                # supply disabled when available credit <= this
    max_credit_balance: int = 100_000             # a top-up that would leave more credit is refused whole
    payment_recovery_percent: Decimal = Decimal(0)  # share of each top-up taken for arrears
    payment_recovery_cap: int | None = None       # most taken by payment-based recovery per period
    recovery_period: str = "week"                 # "day" | "week" | "month", local time
    time_recovery_per_day: Decimal = Decimal(0)   # time-based recovery, minor units per day from credit
    reconnect: str = "automatic"                  # "automatic" | "customer_confirms"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING_MODES:
            raise ValidationError(f"prepayment config: unknown rounding mode {self.rounding!r}")
        if self.recovery_period not in RECOVERY_PERIODS:
            raise ValidationError(f"prepayment config: recovery_period {self.recovery_period!r} "
                                  f"not one of {', '.join(RECOVERY_PERIODS)}")
        if self.reconnect not in RECONNECT_MODES:
            raise ValidationError(f"prepayment config: reconnect {self.reconnect!r} "
                                  f"not one of {', '.join(RECONNECT_MODES)}")
        for name in ("low_credit_threshold", "emergency_credit_threshold", "emergency_credit_limit",
                     "max_credit_balance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValidationError(f"prepayment config: {name} must be a non-negative int, got {value!r}")
        object.__setattr__(self, "payment_recovery_percent", to_decimal(self.payment_recovery_percent))
        object.__setattr__(self, "time_recovery_per_day", to_decimal(self.time_recovery_per_day))
        if not Decimal(0) <= self.payment_recovery_percent <= Decimal(100):
            raise ValidationError(f"prepayment config: payment_recovery_percent "
                                  f"{self.payment_recovery_percent} not within 0..100")
        ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Usage:
    """Used service units and repayments since a report point (all int minor units / Wh, >= 0).

    used_minor == from_credit + from_emergency + to_debt (consumption). Standing charges are
    reported apart: `standing_minor` for `standing_days` local days (`standing_first_day` ..
    `standing_last_day`, ISO dates), of which `standing_from_emergency` and `standing_to_debt`;
    the rest (`standing_from_credit`) came from the window. Window spending (what left the grant
    window) == from_credit + standing_from_credit + repaid_debt + repaid_emergency +
    recovered_arrears. `tokens` are (reference, amount) of top-ups applied, in order.
    `import_wh_from`..`import_wh_to` is the 1.8.0 import register range (Wh, as read) the
    consumption covers, ``used_wh == import_wh_to − import_wh_from``; None when the consumption
    is not one contiguous range of readings (charged without registers, e.g. by a state file
    written before these fields): the head-end then books it as reported."""

    used_minor: int = 0
    used_wh: int = 0
    from_credit: int = 0
    from_emergency: int = 0
    to_debt: int = 0
    repaid_debt: int = 0
    repaid_emergency: int = 0
    recovered_arrears: int = 0
    tokens: tuple[tuple[str, int], ...] = ()
    standing_minor: int = 0
    standing_days: int = 0
    standing_from_emergency: int = 0
    standing_to_debt: int = 0
    standing_first_day: str | None = None
    standing_last_day: str | None = None
    import_wh_from: int | None = None
    import_wh_to: int | None = None

    @property
    def standing_from_credit(self) -> int:
        return self.standing_minor - self.standing_from_emergency - self.standing_to_debt

    @property
    def window_spend(self) -> int:
        return (self.from_credit + self.standing_from_credit + self.repaid_debt + self.repaid_emergency
                + self.recovered_arrears)

    @property
    def token_minor(self) -> int:
        return sum(a for _, a in self.tokens)

    @property
    def empty(self) -> bool:
        return self == Usage()

    def plus(self, other: "Usage") -> "Usage":
        days = [d for d in (self.standing_first_day, self.standing_last_day,
                            other.standing_first_day, other.standing_last_day) if d is not None]
        first, last = _register_range(self, other)
        return Usage(**{f: getattr(self, f) + getattr(other, f) for f in _USAGE_SUMS},
                     tokens=self.tokens + other.tokens,
                     standing_first_day=min(days) if days else None, standing_last_day=max(days) if days else None,
                     import_wh_from=first, import_wh_to=last)

    def add(self, **kw) -> "Usage":
        tokens = kw.pop("tokens", ())
        return replace(self, tokens=self.tokens + tuple(tokens), **{k: getattr(self, k) + v for k, v in kw.items()})


def _register_range(earlier: Usage, later: Usage) -> tuple[int | None, int | None]:
    """The register range of `earlier` then `later`: one contiguous range (the earlier one ends
    where the later one starts), or (None, None) when a part with consumption has no range or the
    two do not join."""
    ranges = []
    for u in (earlier, later):
        if u.import_wh_from is not None and u.import_wh_to is not None:
            ranges.append((u.import_wh_from, u.import_wh_to))
        elif u.used_wh:
            return None, None
    if not ranges:
        return None, None
    if len(ranges) == 2 and ranges[0][1] != ranges[1][0]:
        return None, None
    return ranges[0][0], ranges[-1][1]


_USAGE_SUMS = ("used_minor", "used_wh", "from_credit", "from_emergency", "to_debt", "repaid_debt", "repaid_emergency",
               "recovered_arrears", "standing_minor", "standing_days", "standing_from_emergency", "standing_to_debt")


@dataclass(frozen=True)
class Grant:
    """A head-end credit-control grant (RFC 4006 Granted-Service-Unit) as verified by the shell.

    Grants REPLACE: each (session, request_number) is applied once and sets the credit window to
    ``amount_minor + tokens since the report point − window spending since then`` (after repaying
    accumulated debt and emergency credit). `wh` likewise replaces the energy quota (a quota the
    head-end priced itself; the PAYG client sends 0 because it prices with the pulled tariff).
    """

    session_id: str
    request_number: int
    valid_until: datetime                         # Validity-Time as an instant: ask for an update by then
    amount_minor: int = 0
    wh: int = 0
    currency: str = "GBP"
    final_unit_action: str = "terminate"          # "terminate" | "restrict_access"
    balance_minor: int | None = None              # the customer's prepaid balance after the report (head-end)
    arrears_minor: int | None = None              # head-end arrears outstanding after the report (None: keep)


# --------------------------------------------------------------------------- events

@dataclass(frozen=True, kw_only=True)
class CreditEvent:
    account: str
    at: datetime

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, kw_only=True)
class Charged(CreditEvent):
    """Consumption priced locally and drawn: grant Wh first, then credit, emergency credit, debt."""
    wh: int
    wh_from_grant: int
    amount_minor: int
    from_credit: int
    from_emergency_credit: int
    to_accumulated_debt: int
    since: datetime | None = None                 # start of the priced consumption (previous reading)
    exact_minor: Decimal | None = None            # the exact gross price before rounding (residue carried)


@dataclass(frozen=True, kw_only=True)
class StandingCharged(CreditEvent):
    """One local supply day's standing charge, drawn at the first evaluation on or after the day's
    local midnight: credit, then accepted emergency credit, then accumulated debt."""
    day: date                                     # the local supply day charged (tariff zone)
    amount_minor: int
    from_credit: int
    from_emergency_credit: int
    to_accumulated_debt: int
    exact_minor: Decimal | None = None            # the exact gross day charge before rounding (residue carried)


@dataclass(frozen=True, kw_only=True)
class OverUsage(CreditEvent):
    """Consumption beyond grants, top-ups and emergency credit: booked as accumulated debt."""
    wh: int
    amount_minor: int
    relay: str                                    # "open" here means consumption through an open relay


@dataclass(frozen=True, kw_only=True)
class LowBalance(CreditEvent):
    credit_balance: int                           # the window
    threshold: int
    balance_minor: int = 0                        # the customer's remaining balance compared with threshold


@dataclass(frozen=True, kw_only=True)
class EmergencyCreditOffered(CreditEvent):
    amount_minor: int
    balance_minor: int = 0                        # the customer's remaining balance when offered


@dataclass(frozen=True, kw_only=True)
class EmergencyCreditTaken(CreditEvent):
    """The customer accepted (activated) emergency credit; it may now be used."""
    amount_minor: int


@dataclass(frozen=True, kw_only=True)
class EmergencyCreditRefused(CreditEvent):
    reason: str                                   # "not_offered" | "already_accepted"


@dataclass(frozen=True, kw_only=True)
class EmergencyCreditExhausted(CreditEvent):
    amount_minor: int


@dataclass(frozen=True, kw_only=True)
class DebtRecovered(CreditEvent):
    """Arrears recovered (ledger posting). For method "payment" it repeats TopUpApplied.to_debt_recovery."""
    amount_minor: int
    method: str                                   # "time" | "payment"
    arrears_after: int


@dataclass(frozen=True, kw_only=True)
class TopUpApplied(CreditEvent):
    reference: str                                # token id or card transaction id
    amount_minor: int
    to_debt_recovery: int
    to_accumulated_debt: int
    to_emergency_credit: int
    to_credit: int
    credit_balance: int


@dataclass(frozen=True, kw_only=True)
class TopUpRefused(CreditEvent):
    """A top-up that moved nothing: over_maximum_credit, not_positive, currency_mismatch,
    bad_signature, wrong_meter, expired, replay, blacklisted, unknown_card, card_list_unverified,
    blacklist_unverified."""
    reference: str
    amount_minor: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class GrantApplied(CreditEvent):
    session_id: str
    request_number: int
    amount_minor: int
    wh: int
    to_accumulated_debt: int
    to_emergency_credit: int
    to_credit: int
    valid_until: datetime


@dataclass(frozen=True, kw_only=True)
class GrantRefused(CreditEvent):
    session_id: str
    request_number: int
    reason: str                                   # "expired" | "replay" | "currency_mismatch" | "bad_grant"


@dataclass(frozen=True, kw_only=True)
class GrantValidityExpired(CreditEvent):
    """The grant's validity time passed: the shell should send a credit-control update."""
    session_id: str
    valid_until: datetime


@dataclass(frozen=True, kw_only=True)
class FriendlyPeriodWarning(CreditEvent):
    """Credit is exhausted inside a friendly period: supply stays on, debt accrues, and the
    supply may be disconnected at `period_end` if credit is still exhausted then."""
    period_end: datetime | None
    available_credit: int


@dataclass(frozen=True, kw_only=True)
class Disconnected(CreditEvent):
    reason: str


@dataclass(frozen=True, kw_only=True)
class Reconnected(CreditEvent):
    reason: str


@dataclass(frozen=True, kw_only=True)
class ReconnectArmed(CreditEvent):
    """Credit is restored but the supply waits for the customer to confirm (reconnect = customer_confirms)."""
    available_credit: int


# --------------------------------------------------------------------------- state

@dataclass(frozen=True)
class AccountState:
    """Everything the gateway knows about one prepayment account; replace, never mutate."""

    account: str                                  # meter / account id the events name
    cfg: PrepaymentConfig = field(default_factory=PrepaymentConfig)
    at: datetime | None = None                    # last instant processed (time never runs back)
    credit_balance: int = 0
    granted_wh: int = 0
    emergency_credit_offered: bool = False
    emergency_credit_accepted: bool = False
    emergency_credit_used: int = 0
    accumulated_debt: int = 0
    arrears: int = 0
    recovered_in_period: int = 0
    recovery_period_key: str | None = None
    time_recovery_residue: Decimal = Decimal(0)
    charge_residue: Decimal = Decimal(0)          # sub-minor pricing remainder carried forward
    grant_session: str | None = None
    grant_number: int = -1
    grant_valid_until: datetime | None = None
    grant_expiry_reported: bool = False
    final_unit_action: str = "terminate"
    relay: str = "closed"                         # last commanded (or read-back) relay position
    reconnect_confirmed: bool = False
    reconnect_armed: bool = False
    low_balance_warned: bool = False
    emergency_exhausted_reported: bool = False
    friendly_warning_until: datetime | None = None  # end of the friendly span already warned about
    unreported: Usage = Usage()                   # since the last report point (not yet sent)
    in_flight: Usage | None = None                # the report sent and not yet answered
    reported_balance: int | None = None           # head-end prepaid balance after the last answered report
    standing_charged_through: date | None = None  # last local day whose standing charge is settled
    standing_suspended: bool = False              # the flat fallback price was in force since then

    @property
    def balance_remaining(self) -> int:
        """The customer's balance as the gateway knows it: the head-end's last reported balance,
        minus window spending since that report point, plus offline card top-ups not yet
        booked there; never less than the window (which is part of it); the window alone before
        any report."""
        if self.reported_balance is None:
            return self.credit_balance
        pending = (self.in_flight or Usage()).plus(self.unreported)
        cards = sum(a for r, a in pending.tokens if r.startswith("card:"))
        return max(self.credit_balance, self.reported_balance + cards - pending.window_spend)

    @property
    def emergency_credit_available(self) -> int:
        if not self.emergency_credit_accepted:
            return 0
        return max(0, self.cfg.emergency_credit_limit - self.emergency_credit_used)

    @property
    def available_credit(self) -> int:
        """Credit the supply may still draw on (may be negative when debt has accrued)."""
        return self.credit_balance + self.emergency_credit_available - self.accumulated_debt

    @property
    def exhausted(self) -> bool:
        return self.granted_wh <= 0 and self.available_credit <= self.cfg.disablement_threshold


@dataclass(frozen=True)
class Decision:
    """What the shell must do with the relay, why, what to journal, and the state after."""

    relay: str                                    # "closed" | "open"
    reason: str
    events: tuple[CreditEvent, ...]
    state: AccountState

    @property
    def switch(self) -> bool:
        """True when the relay must be commanded (the position changes)."""
        return any(isinstance(e, (Disconnected, Reconnected)) for e in self.events)


Events = list[CreditEvent]


# --------------------------------------------------------------------------- helpers

def _amount(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be int minor units, got {type(value).__name__} {value!r}")
    return value


def _period_key(cfg: PrepaymentConfig, at: datetime) -> str:
    local = at.astimezone(ZoneInfo(cfg.timezone))
    if cfg.recovery_period == "day":
        return local.date().isoformat()
    if cfg.recovery_period == "month":
        return f"{local.year:04d}-{local.month:02d}"
    year, week, _ = local.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _advance(state: AccountState, at: datetime) -> tuple[AccountState, Events]:
    """Move the account to instant `at`: period roll-over, time-based debt recovery, grant validity."""
    at = utc(at)
    if state.at is not None and at < state.at:
        raise ValidationError(f"account {state.account}: instant {at.isoformat()} is before the last "
                              f"processed instant {state.at.isoformat()}")
    cfg, events = state.cfg, []
    key = _period_key(cfg, at)
    if key != state.recovery_period_key:
        state = replace(state, recovery_period_key=key, recovered_in_period=0)
    if state.at is not None and cfg.time_recovery_per_day > 0 and state.arrears > 0:
        elapsed_us = Decimal((at - state.at) // timedelta(microseconds=1))
        exact = cfg.time_recovery_per_day * elapsed_us / _DAY_US + state.time_recovery_residue
        due = round_minor(exact, "down")
        take = min(due, state.arrears, state.credit_balance)
        # what credit cannot cover now is not collected (recovery pauses; arrears stay)
        state = replace(state, time_recovery_residue=exact - due, arrears=state.arrears - take,
                        credit_balance=state.credit_balance - take,
                        unreported=state.unreported.add(recovered_arrears=take))
        if take:
            events.append(DebtRecovered(account=state.account, at=at, amount_minor=take, method="time",
                                        arrears_after=state.arrears))
    if (state.grant_valid_until is not None and not state.grant_expiry_reported
            and at >= state.grant_valid_until):
        events.append(GrantValidityExpired(account=state.account, at=at, session_id=state.grant_session or "",
                                           valid_until=state.grant_valid_until))
        state = replace(state, grant_expiry_reported=True)
    return replace(state, at=at), events


def _flags(state: AccountState, at: datetime, events: Events) -> AccountState:
    """Raise LowBalance / EmergencyCreditOffered / EmergencyCreditExhausted once per crossing."""
    cfg, acct = state.cfg, state.account
    balance = state.balance_remaining
    if balance < cfg.low_credit_threshold:
        if not state.low_balance_warned:
            events.append(LowBalance(account=acct, at=at, credit_balance=state.credit_balance,
                                     threshold=cfg.low_credit_threshold, balance_minor=balance))
            state = replace(state, low_balance_warned=True)
    elif state.low_balance_warned:
        state = replace(state, low_balance_warned=False)
    below_ec = balance < cfg.emergency_credit_threshold
    if (below_ec and cfg.emergency_credit_limit > 0 and not state.emergency_credit_offered
            and not state.emergency_credit_accepted):
        events.append(EmergencyCreditOffered(account=acct, at=at, amount_minor=cfg.emergency_credit_limit,
                                             balance_minor=balance))
        state = replace(state, emergency_credit_offered=True)
    if state.emergency_credit_accepted and state.emergency_credit_available == 0:
        if not state.emergency_exhausted_reported:
            events.append(EmergencyCreditExhausted(account=acct, at=at, amount_minor=state.emergency_credit_used))
            state = replace(state, emergency_exhausted_reported=True)
    if not below_ec and state.emergency_credit_used == 0 and (
            state.emergency_credit_offered or state.emergency_credit_accepted):
        # emergency credit repaid and no longer needed: withdraw the offer until next time
        state = replace(state, emergency_credit_offered=False, emergency_credit_accepted=False,
                        emergency_exhausted_reported=False)
    return state


def _repay(state: AccountState, money: int) -> tuple[int, int, int]:
    """Split money over accumulated debt, then emergency credit used; return (to_debt, to_ec, rest)."""
    to_debt = min(money, state.accumulated_debt)
    money -= to_debt
    to_ec = min(money, state.emergency_credit_used)
    return to_debt, to_ec, money - to_ec


def _unit_price(price: Price, at: datetime, account: str) -> Decimal:
    unit = price(at) if callable(price) else price
    unit = to_decimal(unit)
    if unit < 0:
        raise ValidationError(f"account {account}: negative unit price {unit} at {at.isoformat()}")
    return unit


# --------------------------------------------------------------------------- transitions

def charge(state: AccountState, wh: int, price: Price, at: datetime, *,
           since: datetime | None = None, register: tuple[int, int] | None = None) -> tuple[AccountState, Events]:
    """Price `wh` of consumption over ``[since, at)`` and draw it from the account.

    `price` is minor units per kWh (Decimal/str/int), a function `at -> Decimal` evaluated at
    `at`, or an interval price (an object with ``amount(wh, since, at) -> Decimal`` exact gross
    minor units, e.g. `gateway.pricing.TariffPrice`, which apportions the Wh over the tariff's
    bands as the head-end's rating does). Draw order: Wh grant, credit balance, emergency credit
    (only once accepted), then accumulated debt (raised as OverUsage).
    `register` is the 1.8.0 import register (from, to) in Wh the `wh` were read between; the
    unreported usage carries the range (`Usage.import_wh_from`..`import_wh_to`) so the head-end
    books consumption it has booked before only once.
    """
    _amount(wh, "wh")
    if wh < 0:
        raise ValidationError(f"account {state.account}: negative consumption {wh} Wh at {utc(at).isoformat()}")
    if register is not None and register[1] - register[0] != wh:
        raise ValidationError(f"account {state.account}: {wh} Wh charged for the import register range "
                              f"{register[0]}..{register[1]} Wh")
    if not wh:
        register = None                  # nothing consumed: the unreported range stays as it is
    state, events = _advance(state, at)
    at = state.at
    from_grant = min(wh, state.granted_wh)
    if hasattr(price, "amount"):
        priced = to_decimal(price.amount(wh, since, at)) if wh else Decimal(0)
        if priced < 0:
            raise ValidationError(f"account {state.account}: negative price {priced} for {wh} Wh at {at.isoformat()}")
        priced = priced * (wh - from_grant) / wh if from_grant else priced
    else:
        unit = _unit_price(price, at, state.account)
        priced = Decimal(wh - from_grant) * unit / 1000
    exact = priced + state.charge_residue
    amount = max(0, round_minor(exact, state.cfg.rounding))
    take_credit, take_ec, to_debt = _draw(state, amount)
    state = replace(state, granted_wh=state.granted_wh - from_grant, charge_residue=exact - amount,
                    credit_balance=state.credit_balance - take_credit,
                    emergency_credit_used=state.emergency_credit_used + take_ec,
                    accumulated_debt=state.accumulated_debt + to_debt,
                    unreported=state.unreported.plus(Usage(used_minor=amount, used_wh=wh, from_credit=take_credit,
                                                           from_emergency=take_ec, to_debt=to_debt,
                                                           import_wh_from=register and register[0],
                                                           import_wh_to=register and register[1])))
    events.append(Charged(account=state.account, at=at, wh=wh, wh_from_grant=from_grant, amount_minor=amount,
                          since=utc(since) if since is not None else None, exact_minor=priced,
                          from_credit=take_credit, from_emergency_credit=take_ec, to_accumulated_debt=to_debt))
    if to_debt:
        events.append(OverUsage(account=state.account, at=at, wh=wh - from_grant, amount_minor=to_debt,
                                relay=state.relay))
    return _flags(state, at, events), events


def _draw(state: AccountState, amount: int) -> tuple[int, int, int]:
    """The money order of a charge: (from credit, from accepted emergency credit, to debt)."""
    take_credit = min(amount, state.credit_balance)
    take_ec = min(amount - take_credit, state.emergency_credit_available)
    return take_credit, take_ec, amount - take_credit - take_ec


def charge_standing(state: AccountState, standing: StandingCharge | None,
                    at: datetime) -> tuple[AccountState, Events]:
    """Charge the daily standing charge of every local supply day not yet charged, up to and
    including the local day of `at` (the day is charged at its local midnight, or at the first
    evaluation after it: a gateway that was off charges each missed day once, here).

    Days are local dates in `standing.standing_zone` (a 23 h or 25 h DST day is one day). The first
    day ever charged is the local day of the first call with a standing charge: days before the
    gateway knew a tariff are never charged. `standing=None` (the flat fallback price, no tariff):
    nothing is charged, and the days while it is in force are skipped for good (when a tariff is
    in force again, the first day charged is the day of that evaluation, never a day already
    charged). Each day's exact gross (`standing_gross`) is rounded once with the consumption's
    residue (`charge_residue`) and drawn like consumption: credit, accepted emergency credit, then
    accumulated debt (never a disconnection by itself; `decide_supply` decides as after any charge).
    """
    state, events = _advance(state, at)
    at = state.at
    if standing is None:
        if state.standing_charged_through is not None and not state.standing_suspended:
            state = replace(state, standing_suspended=True)
        return state, events
    today = at.astimezone(ZoneInfo(standing.standing_zone)).date()
    through = state.standing_charged_through
    if through is None:
        first = today
    elif state.standing_suspended:
        first = max(through + timedelta(days=1), today)
    else:
        first = through + timedelta(days=1)
    day = first
    while day <= today:
        gross = standing.standing_gross(day)
        if gross is None:                     # before the tariff's first version: that day is not charged
            day += timedelta(days=1)
            continue
        exact_day = to_decimal(gross)
        if exact_day < 0:
            raise ValidationError(f"account {state.account}: negative standing charge {exact_day} on {day}")
        exact = exact_day + state.charge_residue
        amount = max(0, round_minor(exact, state.cfg.rounding))
        take_credit, take_ec, to_debt = _draw(state, amount)
        iso = day.isoformat()
        u = state.unreported
        state = replace(state, charge_residue=exact - amount, credit_balance=state.credit_balance - take_credit,
                        emergency_credit_used=state.emergency_credit_used + take_ec,
                        accumulated_debt=state.accumulated_debt + to_debt,
                        unreported=replace(u.add(standing_minor=amount, standing_days=1,
                                                 standing_from_emergency=take_ec, standing_to_debt=to_debt),
                                           standing_first_day=u.standing_first_day or iso, standing_last_day=iso))
        events.append(StandingCharged(account=state.account, at=at, day=day, amount_minor=amount,
                                      from_credit=take_credit, from_emergency_credit=take_ec,
                                      to_accumulated_debt=to_debt, exact_minor=exact_day))
        day += timedelta(days=1)
    charged = any(isinstance(e, StandingCharged) for e in events)
    state = replace(state, standing_charged_through=today if through is None else max(through, today),
                    standing_suspended=False)
    return (_flags(state, at, events) if charged else state), events


def accept_emergency_credit(state: AccountState, at: datetime) -> tuple[AccountState, Events]:
    """The customer activates the offered emergency credit (only then may it be used)."""
    state, events = _advance(state, at)
    at = state.at
    if state.emergency_credit_accepted:
        events.append(EmergencyCreditRefused(account=state.account, at=at, reason="already_accepted"))
    elif not state.emergency_credit_offered:
        events.append(EmergencyCreditRefused(account=state.account, at=at, reason="not_offered"))
    else:
        state = replace(state, emergency_credit_accepted=True, emergency_exhausted_reported=False)
        events.append(EmergencyCreditTaken(account=state.account, at=at,
                                           amount_minor=state.emergency_credit_available))
    return state, events


def apply_topup(state: AccountState, amount_minor: int, token_id: str, at: datetime,
                *, currency: str | None = None) -> tuple[AccountState, Events]:
    """Apply a verified top-up: payment-based debt recovery (capped per period), accumulated
    debt, emergency credit used, then the balance. Refused WHOLE (state unchanged, one
    TopUpRefused event) when the resulting credit would exceed the maximum credit balance.

    Replay protection is the caller's (see `meterlink.gateway.tokens`); this function trusts
    that `token_id` has not been applied before.
    """
    _amount(amount_minor, f"top-up {token_id} amount")
    original = state
    state, events = _advance(state, at)
    at, cfg = state.at, state.cfg

    def refuse(reason: str) -> tuple[AccountState, Events]:
        return original, [TopUpRefused(account=state.account, at=at, reference=token_id,
                                       amount_minor=amount_minor, reason=reason)]

    if currency is not None and currency != cfg.currency:
        return refuse("currency_mismatch")
    if amount_minor <= 0:
        return refuse("not_positive")
    recovery = 0
    if state.arrears > 0 and cfg.payment_recovery_percent > 0:
        recovery = round_minor(Decimal(amount_minor) * cfg.payment_recovery_percent / 100, cfg.rounding)
        if cfg.payment_recovery_cap is not None:
            recovery = min(recovery, max(0, cfg.payment_recovery_cap - state.recovered_in_period))
        recovery = min(recovery, state.arrears, amount_minor)
    to_debt, to_ec, to_credit = _repay(state, amount_minor - recovery)
    if state.credit_balance + to_credit > cfg.max_credit_balance:
        return refuse("over_maximum_credit")
    state = replace(state, arrears=state.arrears - recovery, recovered_in_period=state.recovered_in_period + recovery,
                    accumulated_debt=state.accumulated_debt - to_debt,
                    emergency_credit_used=state.emergency_credit_used - to_ec,
                    credit_balance=state.credit_balance + to_credit, reconnect_confirmed=False,
                    unreported=state.unreported.add(repaid_debt=to_debt, repaid_emergency=to_ec,
                                                    recovered_arrears=recovery,
                                                    tokens=((token_id, amount_minor),)))
    events.append(TopUpApplied(account=state.account, at=at, reference=token_id, amount_minor=amount_minor,
                               to_debt_recovery=recovery, to_accumulated_debt=to_debt, to_emergency_credit=to_ec,
                               to_credit=to_credit, credit_balance=state.credit_balance))
    if recovery:
        events.append(DebtRecovered(account=state.account, at=at, amount_minor=recovery, method="payment",
                                    arrears_after=state.arrears))
    return _flags(state, at, events), events


def begin_report(state: AccountState) -> tuple[AccountState, Usage]:
    """Take the usage report for the next credit-control update: the report point.

    While an earlier report is unanswered (lost answer, head-end offline) the SAME report is
    returned, so a retransmission carries identical content (idempotent at the head-end)."""
    if state.in_flight is not None:
        return state, state.in_flight
    return replace(state, in_flight=state.unreported, unreported=Usage()), state.unreported


def abandon_report(state: AccountState) -> AccountState:
    """The session the in-flight report belonged to is gone (head-end lost it): its usage goes
    back into the next report (of a new session)."""
    if state.in_flight is None:
        return state
    return replace(state, unreported=state.in_flight.plus(state.unreported), in_flight=None)


def _replace_window(state: AccountState, amount: int) -> AccountState:
    """credit_balance := amount + tokens since the report point − window spending since then.
    Spending the new grant cannot cover (it came from the old window after the report) becomes
    accumulated debt, and the unreported usage says so."""
    u = state.unreported
    window = amount + u.token_minor - u.window_spend
    if window < 0:
        # undo, newest money first, what the new grant cannot cover: consumption from the window
        # becomes accumulated debt; repayments/recoveries are taken back (debt, EC, arrears return)
        deficit = -window
        shift = min(deficit, u.from_credit)
        u = replace(u, from_credit=u.from_credit - shift, to_debt=u.to_debt + shift)
        debt, ec, arrears = state.accumulated_debt + shift, state.emergency_credit_used, state.arrears
        deficit -= shift
        shift = min(deficit, u.standing_from_credit)      # standing charges from the window, likewise
        u = replace(u, standing_to_debt=u.standing_to_debt + shift)
        debt, deficit = debt + shift, deficit - shift
        back = min(deficit, u.recovered_arrears)
        u, arrears, deficit = replace(u, recovered_arrears=u.recovered_arrears - back), arrears + back, deficit - back
        back = min(deficit, u.repaid_emergency)
        u, ec, deficit = replace(u, repaid_emergency=u.repaid_emergency - back), ec + back, deficit - back
        back = min(deficit, u.repaid_debt)
        u, debt, deficit = replace(u, repaid_debt=u.repaid_debt - back), debt + back, deficit - back
        if deficit:
            raise ValidationError(f"account {state.account}: window deficit exceeds the unreported spending")
        state = replace(state, accumulated_debt=debt, emergency_credit_used=ec, arrears=arrears, unreported=u)
        window = 0
    return replace(state, credit_balance=window, in_flight=None)


def _with_balance(state: AccountState, balance_minor: int | None) -> AccountState:
    """Take the head-end's reported balance (after the report just answered; in_flight is cleared)."""
    if balance_minor is None:
        return state
    return replace(state, reported_balance=_amount(balance_minor, "reported balance"))


def _with_arrears(state: AccountState, arrears_minor: int | None) -> AccountState:
    """Take the head-end's arrears register (after the report just answered; in_flight cleared):
    arrears := what the head-end says is outstanding − what was recovered here since the report
    point (not booked there yet). None (an older head-end): keep what the gateway holds."""
    if arrears_minor is None:
        return state
    _amount(arrears_minor, "reported arrears")
    return replace(state, arrears=max(0, arrears_minor - state.unreported.recovered_arrears))


def set_reported_balance(state: AccountState, balance_minor: int,
                         arrears_minor: int | None = None) -> AccountState:
    """An answer that booked nothing (no session opened, nothing reported) still says the
    customer's balance (and the head-end's arrears); flags follow at the next transition."""
    if state.in_flight is not None:
        raise ValidationError(f"account {state.account}: a reported balance while a report is in flight "
                              f"must come with apply_grant/acknowledge")
    return _with_arrears(_with_balance(state, balance_minor), arrears_minor)


def acknowledge(state: AccountState, at: datetime, *, balance_minor: int | None = None,
                arrears_minor: int | None = None) -> tuple[AccountState, Events]:
    """The head-end answered the in-flight report WITHOUT a grant (credit limit reached,
    termination): the old window is given back, only what was applied since stays.
    `balance_minor`: the customer's prepaid balance the answer reported (None: keep the last);
    `arrears_minor`: the head-end's arrears outstanding (None: keep)."""
    state, events = _advance(state, at)
    state = _with_arrears(_replace_window(state, 0), arrears_minor)
    if balance_minor is not None:
        state = replace(state, reported_balance=_amount(balance_minor, "reported balance"))
    return _flags(state, state.at, events), events


def apply_grant(state: AccountState, grant: Grant, at: datetime) -> tuple[AccountState, Events]:
    """Apply a verified head-end grant once; it answers the in-flight report (if any) and
    REPLACES the unused rest of the previous window (see the module doc). The new window repays
    accumulated debt, then emergency credit (reported as repayments in the next update); Wh
    replace the energy quota; validity and final-unit action are remembered."""
    state, events = _advance(state, at)
    at = state.at

    def refuse(reason: str) -> tuple[AccountState, Events]:
        events.append(GrantRefused(account=state.account, at=at, session_id=grant.session_id,
                                   request_number=grant.request_number, reason=reason))
        if reason != "replay" and state.in_flight is not None:
            # the grant is unusable but it ANSWERS the in-flight report, which the head-end booked:
            # acknowledge it (old window given back), or the next request would report it again
            return _flags(_with_arrears(_with_balance(_replace_window(state, 0), grant.balance_minor),
                                        grant.arrears_minor), at, events), events
        return state, events

    _amount(grant.amount_minor, f"grant {grant.session_id}/{grant.request_number} amount")
    _amount(grant.wh, f"grant {grant.session_id}/{grant.request_number} wh")
    if grant.amount_minor < 0 or grant.wh < 0 or grant.final_unit_action not in FINAL_UNIT_ACTIONS:
        return refuse("bad_grant")
    if grant.currency != state.cfg.currency and grant.amount_minor:
        return refuse("currency_mismatch")
    if at >= utc(grant.valid_until):
        return refuse("expired")
    if grant.session_id == state.grant_session and grant.request_number <= state.grant_number:
        return refuse("replay")
    state = _with_arrears(_with_balance(_replace_window(state, grant.amount_minor), grant.balance_minor),
                          grant.arrears_minor)
    to_debt, to_ec, to_credit = _repay(state, state.credit_balance)
    state = replace(state, accumulated_debt=state.accumulated_debt - to_debt,
                    emergency_credit_used=state.emergency_credit_used - to_ec,
                    credit_balance=to_credit, granted_wh=grant.wh,
                    unreported=state.unreported.add(repaid_debt=to_debt, repaid_emergency=to_ec),
                    grant_session=grant.session_id, grant_number=grant.request_number,
                    grant_valid_until=utc(grant.valid_until), grant_expiry_reported=False,
                    final_unit_action=grant.final_unit_action)
    events.append(GrantApplied(account=state.account, at=at, session_id=grant.session_id,
                               request_number=grant.request_number, amount_minor=grant.amount_minor, wh=grant.wh,
                               to_accumulated_debt=to_debt, to_emergency_credit=to_ec, to_credit=to_credit,
                               valid_until=state.grant_valid_until))
    return _flags(state, at, events), events


def set_arrears(state: AccountState, arrears_minor: int, at: datetime) -> tuple[AccountState, Events]:
    """Set the arrears to recover directly (tests, a local register). Synced gateways take them
    from the credit-control answers instead (`Grant.arrears_minor`, `acknowledge(arrears_minor=)`)."""
    _amount(arrears_minor, "arrears")
    if arrears_minor < 0:
        raise ValidationError(f"account {state.account}: negative arrears {arrears_minor}")
    state, events = _advance(state, at)
    return replace(state, arrears=arrears_minor), events


def confirm_reconnect(state: AccountState, at: datetime) -> tuple[AccountState, Events]:
    """The customer confirms re-arming the supply (used when reconnect = customer_confirms)."""
    state, events = _advance(state, at)
    return replace(state, reconnect_confirmed=True), events


def decide_supply(state: AccountState, friendly_cfg: FriendlyConfig | None, at: datetime) -> Decision:
    """Decide the relay position at `at`.

    * credit available: closed; an open relay is re-armed and closed automatically, or after
      the customer confirms (cfg.reconnect);
    * exhausted inside a friendly-credit period: stays closed, FriendlyPeriodWarning once per span
      (debt accrues through `charge`);
    * exhausted with a restrict_access final-unit action: stays closed;
    * exhausted otherwise (including at the end of a friendly span): opened — emergency credit,
      once accepted, counts as credit, so it is used up before disablement.
    An open relay is never closed for lack of credit and never opened inside a friendly period.
    """
    state, events = _advance(state, at)
    at, acct = state.at, state.account

    def done(relay: str, reason: str, **changes) -> Decision:
        new = replace(state, relay=relay, **changes)
        return Decision(relay, reason, tuple(events), new)

    if not state.exhausted:
        if state.relay == "open":
            if state.cfg.reconnect == "automatic" or state.reconnect_confirmed:
                events.append(Reconnected(account=acct, at=at, reason="credit_restored"))
                return done("closed", "credit_restored", reconnect_confirmed=False, reconnect_armed=False,
                            friendly_warning_until=None)
            if not state.reconnect_armed:
                events.append(ReconnectArmed(account=acct, at=at, available_credit=state.available_credit))
            return done("open", "awaiting_customer_confirmation", reconnect_armed=True)
        return done("closed", "credit_available", friendly_warning_until=None)
    if state.relay == "open":
        return done("open", "credit_exhausted")
    if state.final_unit_action == "restrict_access":
        return done("closed", "final_unit_action_restrict_access")
    if friendly_cfg is not None and in_friendly_period(friendly_cfg, at):
        end = friendly_period_end(friendly_cfg, at)
        if state.friendly_warning_until is None or state.friendly_warning_until != end:
            events.append(FriendlyPeriodWarning(account=acct, at=at, period_end=end,
                                                available_credit=state.available_credit))
        return done("closed", "friendly_credit_period", friendly_warning_until=end)
    if state.friendly_warning_until is not None:
        reason = "friendly_period_ended"
    elif state.emergency_credit_accepted:
        reason = "emergency_credit_exhausted"
    else:
        reason = "credit_exhausted"
    events.append(Disconnected(account=acct, at=at, reason=reason))
    return done("open", reason, friendly_warning_until=None, reconnect_armed=False)


def reevaluate(state: AccountState, friendly_cfg: FriendlyConfig | None, at: datetime,
               relay_read_back: str | None = None) -> Decision:
    """On boot: take the relay position read back from the meter (if any) as the truth, then
    decide before anything is switched. The shell switches only if `Decision.switch`."""
    if relay_read_back is not None:
        if relay_read_back not in ("closed", "open"):
            raise ValidationError(f"account {state.account}: relay read-back {relay_read_back!r} "
                                  f"is not 'closed' or 'open'")
        state = replace(state, relay=relay_read_back)
    return decide_supply(state, friendly_cfg, at)
