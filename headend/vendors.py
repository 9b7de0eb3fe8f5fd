"""Vendor sales of prepaid credit: contracts, sale authorisation, reversals and settlement statements; never does I/O, reads a clock, or moves money for a refused sale.

A vendor (shop, online agent) sells credit to a customer who presents a card. The head-end
authorises each sale with `authorise_sale`, a pure function that checks, in this order:

1. the request is well formed (positive amount, the account's currency, vendor of the contract);
2. the card is registered, active and belongs to the account;
3. the card is authenticated: it signed the head-end's challenge, bound to this sale's fields
   (`sale_challenge_message`), with its Ed25519 key;
4. the card is not blacklisted at `now` (entries take effect at a millisecond instant, inclusive:
   blacklisted at 12:00:00.000 → refused at 12:00:00.000 and 12:00:00.001; allowed at 11:59:59.999);
5. velocity limits (count and amount per rolling window, per card or per account) hold;
6. the account is active and the sale would not take its balance above the maximum balance.

Only an `Authorisation` carries ledger transactions (top-up + vendor commission); a `Refusal`
carries a reason and nothing else. Issuing challenges and remembering that each is used once is
the shell's job (storage); this module only verifies the signature over the challenge.

Commission by contract (per sale): ``commission = round(gross × percent / 100) + fixed``,
``vat_on_commission = round(commission × vat_rate)``; a reversal reverses both exactly.
Statement: ``net_payable = gross_sales − reversed_sales − commission − vat_on_commission``, where
commission and its VAT are net of reversed sales' — what the vendor owes us for the period, which
is exactly the period's movement on ``vendor:{v}:receivable`` (`reconcile_statement_to_ledger`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from meterlink.clock import to_ms
from meterlink.errors import ValidationError
from meterlink.money import ROUNDING_MODES, round_minor, to_decimal

from . import ledger as L

# --------------------------------------------------------------------------- contracts


@dataclass(frozen=True)
class VendorContract:
    """A vendor's terms: commission percent of each sale and/or a fixed amount per sale, VAT on commission."""

    vendor_id: str
    currency: str
    commission_percent: Decimal = Decimal(0)
    commission_fixed_minor: int = 0
    vat_rate_on_commission: Decimal = Decimal(0)
    rounding: str = "half_up"
    contract_id: str = ""

    def __post_init__(self) -> None:
        for name in ("commission_percent", "vat_rate_on_commission"):
            object.__setattr__(self, name, to_decimal(getattr(self, name)))
        if not 0 <= self.commission_percent <= 100:
            raise ValidationError(f"vendor {self.vendor_id}: commission_percent {self.commission_percent} not in 0..100")
        if self.commission_fixed_minor < 0:
            raise ValidationError(f"vendor {self.vendor_id}: commission_fixed_minor must be >= 0")
        if not 0 <= self.vat_rate_on_commission < 1:
            raise ValidationError(f"vendor {self.vendor_id}: vat_rate_on_commission {self.vat_rate_on_commission} "
                                  f"not in [0, 1)")
        if self.rounding not in ROUNDING_MODES:
            raise ValidationError(f"vendor {self.vendor_id}: unknown rounding mode {self.rounding!r}")

    def commission(self, gross_minor: int) -> tuple[int, int]:
        """(commission, VAT on commission) in minor units for one sale of `gross_minor`."""
        commission = round_minor(Decimal(gross_minor) * self.commission_percent / 100, self.rounding) \
            + self.commission_fixed_minor
        return commission, round_minor(Decimal(commission) * self.vat_rate_on_commission, self.rounding)


# --------------------------------------------------------------------------- cards, blacklist, accounts


@dataclass(frozen=True)
class Card:
    """A registered customer card and its Ed25519 public key (32 raw bytes)."""

    card_id: str
    account_id: str
    public_key: bytes
    active: bool = True


@dataclass(frozen=True)
class BlacklistEntry:
    """A card blacklisted from `effective_at` (inclusive, millisecond precision) until `lifted_at` (exclusive)."""

    card_id: str
    effective_at: datetime
    reason: str = ""
    lifted_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("effective_at", "lifted_at"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.tzinfo is None:
                raise ValidationError(f"blacklist entry for card {self.card_id}: naive {name}")
            if value.microsecond % 1000:
                raise ValidationError(f"blacklist entry for card {self.card_id}: {name} {value.isoformat()} "
                                      f"has sub-millisecond precision")

    def applies(self, now: datetime) -> bool:
        ms = to_ms(now)
        return to_ms(self.effective_at) <= ms and (self.lifted_at is None or ms < to_ms(self.lifted_at))


def blacklisted(blacklist: Iterable[BlacklistEntry], card_id: str, now: datetime) -> BlacklistEntry | None:
    """The entry that blacklists `card_id` at `now` (compared in whole milliseconds), if any."""
    for entry in blacklist:
        if entry.card_id == card_id and entry.applies(now):
            return entry
    return None


@dataclass(frozen=True)
class AccountState:
    """What authorisation needs to know about the customer account at `now`."""

    account_id: str
    currency: str
    active: bool
    balance_minor: int                 # prepaid credit the top-up would add to
    max_balance_minor: int


@dataclass(frozen=True)
class VelocityLimit:
    """At most `max_count` sales and/or `max_amount_minor` in any rolling `window`, per card or per account."""

    window: timedelta
    max_count: int | None = None
    max_amount_minor: int | None = None
    per: str = "card"                  # "card" | "account"

    def __post_init__(self) -> None:
        if self.per not in ("card", "account"):
            raise ValidationError(f"velocity limit per {self.per!r}: use 'card' or 'account'")
        if self.window <= timedelta(0):
            raise ValidationError("velocity limit window must be positive")


DEFAULT_VELOCITY = (VelocityLimit(timedelta(hours=24), max_count=5),
                    VelocityLimit(timedelta(hours=24), max_amount_minor=50_000, per="account"))


# --------------------------------------------------------------------------- requests and results


@dataclass(frozen=True)
class SaleRequest:
    """A vendor asks to sell `amount_minor` of credit on `account_id` to the holder of `card_id`."""

    sale_id: str
    vendor_id: str
    card_id: str
    account_id: str
    amount_minor: int
    currency: str
    challenge: bytes                   # issued by the head-end for this sale
    signature: bytes                   # the card's Ed25519 signature over `sale_challenge_message`


def sale_challenge_message(challenge: bytes, sale_id: str, vendor_id: str, card_id: str, account_id: str,
                           amount_minor: int, currency: str) -> bytes:
    """The exact bytes a card signs: the head-end's challenge bound to the sale's fields."""
    fields = [sale_id, vendor_id, card_id, account_id, str(int(amount_minor)), currency]
    for f in fields:
        if "\n" in f:
            raise ValidationError(f"sale field {f!r} contains a newline")
    return b"meterlink-sale-v1\n" + challenge.hex().encode() + b"\n" + "\n".join(fields).encode()


def request_message(request: SaleRequest) -> bytes:
    return sale_challenge_message(request.challenge, request.sale_id, request.vendor_id, request.card_id,
                                  request.account_id, request.amount_minor, request.currency)


class RefusalReason(str, Enum):
    BAD_REQUEST = "bad-request"
    CARD_UNKNOWN = "card-unknown"
    CARD_INACTIVE = "card-inactive"
    CARD_ACCOUNT_MISMATCH = "card-account-mismatch"
    CARD_NOT_AUTHENTICATED = "card-not-authenticated"
    CARD_BLACKLISTED = "card-blacklisted"
    VELOCITY_COUNT = "velocity-count"
    VELOCITY_AMOUNT = "velocity-amount"
    ACCOUNT_INACTIVE = "account-inactive"
    MAX_BALANCE = "max-balance"
    INSUFFICIENT_CREDIT_FOR_REVERSAL = "insufficient-credit-for-reversal"


@dataclass(frozen=True)
class Sale:
    """An authorised sale as booked (and the input of settlement and velocity checks)."""

    sale_id: str
    vendor_id: str
    card_id: str
    account_id: str
    amount_minor: int
    currency: str
    at: datetime
    commission_minor: int
    vat_on_commission_minor: int


@dataclass(frozen=True)
class Authorisation:
    """The sale is allowed; append `transactions` (atomically) to move the money."""

    sale: Sale
    transactions: tuple[L.Transaction, ...]

    authorised = True


@dataclass(frozen=True)
class Refusal:
    """The sale (or reversal) is refused; no money moves. Logged, and a CRM event when the card is blacklisted."""

    reason: RefusalReason
    detail: str
    sale_id: str
    vendor_id: str
    card_id: str
    account_id: str
    amount_minor: int
    at: datetime

    authorised = False


@dataclass(frozen=True)
class Reversal:
    """A sale undone: the exact negation of its top-up and commission transactions."""

    reversal_id: str
    sale: Sale
    at: datetime
    reason: str
    transactions: tuple[L.Transaction, ...]


def sale_keys(sale_id: str, vendor_id: str) -> tuple[str, str]:
    """Ledger business keys of a sale's top-up and commission transactions."""
    return f"sale:{vendor_id}:{sale_id}:top-up", f"sale:{vendor_id}:{sale_id}:commission"


def sale_transactions(sale: Sale, vat: L.PrepaidVat) -> tuple[L.Transaction, ...]:
    """The top-up and (if any) commission transactions of an authorised sale."""
    top_key, com_key = sale_keys(sale.sale_id, sale.vendor_id)
    txns = [L.top_up(top_key, sale.at, sale.account_id, sale.vendor_id, sale.amount_minor, sale.currency, vat)]
    if sale.commission_minor or sale.vat_on_commission_minor:
        txns.append(L.vendor_commission(com_key, sale.at, sale.vendor_id, sale.commission_minor,
                                        sale.vat_on_commission_minor, sale.currency))
    return tuple(txns)


# --------------------------------------------------------------------------- authorisation


def _verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def authorise_sale(request: SaleRequest, card_registry: Mapping[str, Card], blacklist: Iterable[BlacklistEntry],
                   velocity_history: Sequence[Sale], account: AccountState, now: datetime, *,
                   contract: VendorContract, vat: L.PrepaidVat,
                   velocity_limits: Sequence[VelocityLimit] = DEFAULT_VELOCITY) -> Authorisation | Refusal:
    """Authorise one sale at `now` (checks in the order of the module doc) or refuse it with a reason."""
    r = request

    def refuse(reason: RefusalReason, detail: str) -> Refusal:
        return Refusal(reason, detail, r.sale_id, r.vendor_id, r.card_id, r.account_id, r.amount_minor, now)

    if not isinstance(r.amount_minor, int) or isinstance(r.amount_minor, bool) or r.amount_minor <= 0:
        return refuse(RefusalReason.BAD_REQUEST, f"sale {r.sale_id}: amount {r.amount_minor!r} must be a positive int")
    if r.currency != account.currency or r.currency != contract.currency:
        return refuse(RefusalReason.BAD_REQUEST, f"sale {r.sale_id}: currency {r.currency} but account "
                      f"{account.account_id} is in {account.currency} and vendor contract in {contract.currency}")
    if r.vendor_id != contract.vendor_id or r.account_id != account.account_id:
        return refuse(RefusalReason.BAD_REQUEST, f"sale {r.sale_id}: vendor/account {r.vendor_id}/{r.account_id} "
                      f"do not match contract {contract.vendor_id} / account {account.account_id}")
    if len(r.challenge) < 16:
        return refuse(RefusalReason.BAD_REQUEST, f"sale {r.sale_id}: challenge shorter than 16 bytes")

    card = card_registry.get(r.card_id)
    if card is None:
        return refuse(RefusalReason.CARD_UNKNOWN, f"card {r.card_id} is not registered")
    if not card.active:
        return refuse(RefusalReason.CARD_INACTIVE, f"card {r.card_id} is not active")
    if card.account_id != r.account_id:
        return refuse(RefusalReason.CARD_ACCOUNT_MISMATCH,
                      f"card {r.card_id} belongs to account {card.account_id}, not {r.account_id}")
    if not _verify(card.public_key, r.signature, request_message(r)):
        return refuse(RefusalReason.CARD_NOT_AUTHENTICATED,
                      f"card {r.card_id}: signature over the challenge of sale {r.sale_id} does not verify")

    entry = blacklisted(blacklist, r.card_id, now)
    if entry is not None:
        return refuse(RefusalReason.CARD_BLACKLISTED, f"card {r.card_id} blacklisted since "
                      f"{entry.effective_at.isoformat(timespec='milliseconds')}" + (f": {entry.reason}" if entry.reason else ""))

    for limit in velocity_limits:
        start = now - limit.window
        if limit.per == "card":
            recent = [s for s in velocity_history if s.card_id == r.card_id and start < s.at <= now]
        else:
            recent = [s for s in velocity_history if s.account_id == r.account_id and start < s.at <= now]
        who = f"{limit.per} {r.card_id if limit.per == 'card' else r.account_id}"
        if limit.max_count is not None and len(recent) + 1 > limit.max_count:
            return refuse(RefusalReason.VELOCITY_COUNT, f"{who}: {len(recent)} sales in the last {limit.window}, "
                          f"limit {limit.max_count}")
        if limit.max_amount_minor is not None:
            total = sum(s.amount_minor for s in recent) + r.amount_minor
            if total > limit.max_amount_minor:
                return refuse(RefusalReason.VELOCITY_AMOUNT, f"{who}: {total} {r.currency} in the last "
                              f"{limit.window} would exceed {limit.max_amount_minor}")

    if not account.active:
        return refuse(RefusalReason.ACCOUNT_INACTIVE, f"account {account.account_id} is not active")
    if account.balance_minor + r.amount_minor > account.max_balance_minor:
        return refuse(RefusalReason.MAX_BALANCE, f"account {account.account_id}: balance {account.balance_minor} + "
                      f"{r.amount_minor} would exceed the maximum balance {account.max_balance_minor}")

    commission, vat_on_commission = contract.commission(r.amount_minor)
    sale = Sale(r.sale_id, r.vendor_id, r.card_id, r.account_id, r.amount_minor, r.currency, now,
                commission, vat_on_commission)
    return Authorisation(sale, sale_transactions(sale, vat))


def reverse_sale(sale: Sale, reversal_id: str, at: datetime, reason: str, account: AccountState,
                 vat: L.PrepaidVat) -> Reversal | Refusal:
    """Undo a sale (e.g. the token never reached the meter): refused if the credit was already spent."""
    if account.account_id != sale.account_id:
        raise ValidationError(f"reversal {reversal_id}: account {account.account_id} is not the sale's "
                              f"{sale.account_id}")
    if account.balance_minor < sale.amount_minor:
        return Refusal(RefusalReason.INSUFFICIENT_CREDIT_FOR_REVERSAL,
                       f"sale {sale.sale_id}: account {sale.account_id} holds {account.balance_minor}, "
                       f"less than the {sale.amount_minor} to reverse", sale.sale_id, sale.vendor_id, sale.card_id,
                       sale.account_id, sale.amount_minor, at)
    originals = sale_transactions(sale, vat)
    suffixes = ("top-up-reversal", "commission-reversal")
    txns = tuple(L.reverse(t, f"sale:{sale.vendor_id}:{sale.sale_id}:{sfx}", at) for t, sfx in zip(originals, suffixes))
    return Reversal(reversal_id, sale, at, reason, txns)


# --------------------------------------------------------------------------- settlement


@dataclass(frozen=True)
class Period:
    """A half-open interval of UTC instants [start, end)."""

    start: datetime
    end: datetime
    label: str = ""

    def __contains__(self, at: datetime) -> bool:
        return self.start <= at < self.end


@dataclass(frozen=True)
class StatementLine:
    kind: str                          # "sale" | "reversal"
    sale_id: str
    at: datetime
    gross_minor: int                   # negative for a reversal
    commission_minor: int
    vat_on_commission_minor: int


@dataclass(frozen=True)
class Statement:
    """A vendor's settlement statement for one period (all amounts in minor units of `currency`)."""

    vendor_id: str
    contract_id: str
    period: Period
    currency: str
    sales_count: int
    gross_sales_minor: int
    refused_count: int
    refused_minor: int
    reversed_count: int
    reversed_minor: int
    commission_minor: int              # net of reversed sales' commission
    vat_on_commission_minor: int
    net_payable_minor: int             # the vendor owes us this for the period
    lines: tuple[StatementLine, ...]


def settlement_statement(vendor: str, period: Period, sales: Iterable[Sale], refusals: Iterable[Refusal],
                         reversals: Iterable[Reversal], contract: VendorContract) -> Statement:
    """The vendor's statement for `period`: sales and reversals dated in the period, commission by contract."""
    if contract.vendor_id != vendor:
        raise ValidationError(f"contract {contract.contract_id or '?'} is vendor {contract.vendor_id}'s, not {vendor}'s")
    lines: list[StatementLine] = []
    for s in sales:
        if s.vendor_id == vendor and s.at in period:
            _same_currency(s, contract)
            # the commission booked at authorisation (the contract then in force), not today's terms
            lines.append(StatementLine("sale", s.sale_id, s.at, s.amount_minor, s.commission_minor,
                                       s.vat_on_commission_minor))
    for rv in reversals:
        s = rv.sale
        if s.vendor_id == vendor and rv.at in period:
            _same_currency(s, contract)
            lines.append(StatementLine("reversal", s.sale_id, rv.at, -s.amount_minor, -s.commission_minor,
                                       -s.vat_on_commission_minor))
    lines.sort(key=lambda ln: (ln.at, ln.kind, ln.sale_id))
    refused = [f for f in refusals if f.vendor_id == vendor and f.at in period]
    sale_lines = [ln for ln in lines if ln.kind == "sale"]
    rev_lines = [ln for ln in lines if ln.kind == "reversal"]
    gross = sum(ln.gross_minor for ln in sale_lines)
    reversed_ = -sum(ln.gross_minor for ln in rev_lines)
    commission = sum(ln.commission_minor for ln in lines)
    vat = sum(ln.vat_on_commission_minor for ln in lines)
    return Statement(vendor, contract.contract_id, period, contract.currency, len(sale_lines), gross,
                     len(refused), sum(f.amount_minor for f in refused), len(rev_lines), reversed_,
                     commission, vat, gross - reversed_ - commission - vat, tuple(lines))


def _same_currency(sale: Sale, contract: VendorContract) -> None:
    if sale.currency != contract.currency:
        raise ValidationError(f"sale {sale.sale_id} in {sale.currency}, vendor {contract.vendor_id}'s contract "
                              f"in {contract.currency}")


@dataclass(frozen=True)
class Reconciliation:
    """Statement figures against the same figures summed from the ledger; `ok` when all agree to the cent."""

    vendor_id: str
    period: Period
    figures: tuple[tuple[str, int, int], ...]       # (name, statement, ledger)

    @property
    def differences(self) -> tuple[tuple[str, int, int], ...]:
        return tuple(f for f in self.figures if f[1] != f[2])

    @property
    def ok(self) -> bool:
        return not self.differences


def reconcile_statement_to_ledger(statement: Statement, ledger_entries: Iterable[L.Transaction]) -> Reconciliation:
    """Recompute the statement's money figures from the ledger's postings on the vendor's accounts.

    gross sales = Dr receivable of `top-up` transactions; reversed = Cr receivable of
    `top-up-reversal`; commission = net expense postings; VAT on commission = the VAT-input legs
    of commission transactions; net payable = the period's net movement on the receivable,
    excluding remittances (which settle it).
    """
    v, cur, period = statement.vendor_id, statement.currency, statement.period
    receivable, expense = L.vendor_receivable(v), L.commission_expense(v)
    gross = reversed_ = commission = vat = movement = 0
    for t in ledger_entries:
        if t.at not in period:
            continue
        rec = t.amount(receivable, cur)
        if rec == 0 and t.amount(expense, cur) == 0:
            continue
        if t.kind == "vendor-remittance":
            continue
        movement += rec
        if t.kind == "top-up":
            gross += rec
        elif t.kind == "top-up-reversal":
            reversed_ -= rec
        elif t.kind in ("vendor-commission", "vendor-commission-reversal"):
            commission += t.amount(expense, cur)
            vat += t.amount(L.VAT_INPUT, cur)
    figures = (("gross_sales", statement.gross_sales_minor, gross),
               ("reversed", statement.reversed_minor, reversed_),
               ("commission", statement.commission_minor, commission),
               ("vat_on_commission", statement.vat_on_commission_minor, vat),
               ("net_payable", statement.net_payable_minor, movement))
    return Reconciliation(v, period, figures)


__all__ = [
    "AccountState", "Authorisation", "BlacklistEntry", "Card", "DEFAULT_VELOCITY", "Period", "Reconciliation",
    "Refusal", "RefusalReason", "Reversal", "Sale", "SaleRequest", "Statement", "StatementLine", "VelocityLimit",
    "VendorContract", "authorise_sale", "blacklisted", "reconcile_statement_to_ledger", "request_message",
    "reverse_sale", "sale_challenge_message", "sale_keys", "sale_transactions", "settlement_statement",
]
