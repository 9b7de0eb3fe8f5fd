"""Double-entry ledger for PAYG money: transactions whose postings sum to zero, idempotent on a business key; never does I/O, reads a clock or rounds outside `round_minor`.

Conventions
-----------
* A `Posting` is `(account, amount_minor, currency)`; **debit is positive, credit is negative**.
  Every `Transaction` sums to zero per currency, or it is refused (the error names its key).
* Every balance is a sum of postings (`balance`); nothing else is ever stored as "the balance".
* A transaction is identified by its **business key** (e.g. ``sale:V1:0042:top-up``).
  Appending the same key with the same content (kind, instant, postings as a multiset) is a
  no-op; the same key with different content is a `BusinessKeyConflict` naming the key.
* Money is integer minor units; amounts are computed as `Decimal` and turned into integers only
  by `meterlink.money.round_minor` with the market's rounding mode.

Chart of accounts (`{c}` customer account id, `{v}` vendor id; normal side in brackets)
-------------------------------------------------------------------------------------
``customer:{c}:prepaid``           [credit]  the customer's spendable prepaid credit (a liability);
                                             `customer_credit` = minus its balance
``customer:{c}:debt``              [debit]   debt owed by the customer (over-usage, friendly-credit use,
                                             standing charges neither credit nor emergency credit paid)
``customer:{c}:emergency-credit``  [debit]   emergency credit advanced and not yet repaid
``customer:{c}:arrears``           [debit]   arrears registered at the head-end (debt from a previous
                                             supply, over-usage booked centrally; against
                                             ``adjustments``), recovered at the gateway from top-ups
                                             and credit (`arrears_recovery`)
``vendor:{v}:receivable``          [debit]   sale proceeds a vendor holds for us, net of its commission
``expense:vendor-commission:{v}``  [debit]   commission earned by a vendor
``vat:output``                     [credit]  VAT due to the tax authority
``vat:input``                      [debit]   VAT reclaimable (on vendor commission invoices)
``vat:prepaid-clearing``           [debit]   in markets taxing top-ups: VAT already paid on top-ups
                                             and not yet matched by supply (tends to zero)
``revenue:energy``                 [credit]  energy sold, net of VAT
``revenue:standing``               [credit]  standing charges, net of VAT
``rounding:residue``               [either]  rounding differences, booked instead of lost
``adjustments``                    [either]  goodwill credits and corrections
``cash:bank``                      [debit]   money remitted by vendors

VAT on prepaid credit (per market, `PrepaidVat.charged_at`)
----------------------------------------------------------
* ``"consumption"``: a top-up is a plain payment (no VAT); each charge books its VAT to
  ``vat:output`` when energy or a standing day is supplied.
* ``"top_up"``: VAT contained in the gross top-up is due at once
  (``Dr vat:prepaid-clearing / Cr vat:output``); charges then release their VAT share from
  ``vat:prepaid-clearing`` instead of ``vat:output``, so VAT is never charged twice.
In both cases the customer's balance is gross (what the customer paid and sees).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Iterable, Iterator, Literal, Mapping, Protocol, Sequence

from meterlink.errors import ValidationError
from meterlink.money import ROUNDING_MODES, round_minor, to_decimal

# --------------------------------------------------------------------------- chart of accounts

VAT_OUTPUT = "vat:output"
VAT_INPUT = "vat:input"
VAT_PREPAID_CLEARING = "vat:prepaid-clearing"
REVENUE_ENERGY = "revenue:energy"
REVENUE_STANDING = "revenue:standing"
ROUNDING_RESIDUE = "rounding:residue"
ADJUSTMENTS = "adjustments"
CASH_BANK = "cash:bank"


def prepaid(customer: str) -> str:
    """The customer's prepaid-credit account (credit-normal)."""
    return f"customer:{_id(customer, 'customer')}:prepaid"


def debt(customer: str) -> str:
    """The customer's debt account (debit-normal)."""
    return f"customer:{_id(customer, 'customer')}:debt"


def emergency_credit_account(customer: str) -> str:
    """Emergency credit advanced to the customer and not yet repaid (debit-normal)."""
    return f"customer:{_id(customer, 'customer')}:emergency-credit"


def arrears_account(customer: str) -> str:
    """Arrears registered at the head-end and not yet recovered (debit-normal)."""
    return f"customer:{_id(customer, 'customer')}:arrears"


def vendor_receivable(vendor: str) -> str:
    """What a vendor owes us from its sales, net of its commission (debit-normal)."""
    return f"vendor:{_id(vendor, 'vendor')}:receivable"


def commission_expense(vendor: str) -> str:
    """Commission earned by a vendor (debit-normal expense)."""
    return f"expense:vendor-commission:{_id(vendor, 'vendor')}"


def _id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or ":" in value or value != value.strip():
        raise ValidationError(f"bad {what} id {value!r}: non-empty, no ':' and no surrounding blanks")
    return value


# --------------------------------------------------------------------------- errors


class LedgerError(ValidationError):
    """A transaction the ledger cannot accept; the message names its business key."""


class UnbalancedTransaction(LedgerError):
    """Postings do not sum to zero in some currency."""


class BusinessKeyConflict(LedgerError):
    """The business key was already used for a transaction with different content."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, order=True)
class Posting:
    """One leg of a transaction: debit positive, credit negative, integer minor units."""

    account: str
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount_minor, int) or isinstance(self.amount_minor, bool):
            raise TypeError(f"posting to {self.account!r}: amount_minor must be int, "
                            f"got {type(self.amount_minor).__name__}")
        if not self.account or not isinstance(self.account, str):
            raise ValidationError(f"posting with empty account name ({self.amount_minor} {self.currency})")
        if len(self.currency) != 3 or not self.currency.isupper():
            raise ValidationError(f"posting to {self.account!r}: bad ISO 4217 currency {self.currency!r}")


@dataclass(frozen=True)
class Transaction:
    """A set of postings booked together under one business key; sums to zero per currency."""

    business_key: str
    at: datetime
    postings: tuple[Posting, ...]
    kind: str = "manual"
    memo: str = field(default="", compare=False)   # free text, not part of the content

    def __post_init__(self) -> None:
        if not self.business_key or not isinstance(self.business_key, str):
            raise LedgerError(f"transaction without a business key ({self.kind})")
        if self.at.tzinfo is None:
            raise LedgerError(f"transaction {self.business_key!r}: naive instant {self.at.isoformat()}")
        object.__setattr__(self, "postings", tuple(self.postings))
        if not self.postings:
            raise LedgerError(f"transaction {self.business_key!r} has no postings (moves no money)")
        for p in self.postings:
            if not isinstance(p, Posting):
                raise LedgerError(f"transaction {self.business_key!r}: {p!r} is not a Posting")
        sums: dict[str, int] = defaultdict(int)
        for p in self.postings:
            sums[p.currency] += p.amount_minor
        off = {cur: s for cur, s in sums.items() if s != 0}
        if off:
            detail = ", ".join(f"{cur} {s:+d}" for cur, s in sorted(off.items()))
            raise UnbalancedTransaction(
                f"transaction {self.business_key!r} does not sum to zero: {detail} minor units")

    def content(self) -> tuple:
        """What idempotency compares: kind, instant and the postings as a multiset."""
        return (self.kind, self.at, tuple(sorted(self.postings)))

    def same_content(self, other: "Transaction") -> bool:
        return self.content() == other.content()

    def amount(self, account: str, currency: str | None = None) -> int:
        """Sum of this transaction's postings to `account` (optionally in one currency)."""
        return sum(p.amount_minor for p in self.postings
                   if p.account == account and (currency is None or p.currency == currency))


# --------------------------------------------------------------------------- pure ledger functions


def balance(entries: Iterable[Transaction], account: str, currency: str | None = None) -> int:
    """Balance of `account` = the sum of its postings (debit positive)."""
    return sum(t.amount(account, currency) for t in entries)


def trial_balance(entries: Iterable[Transaction]) -> dict[tuple[str, str], int]:
    """(account, currency) -> balance, for every account touched."""
    out: dict[tuple[str, str], int] = defaultdict(int)
    for t in entries:
        for p in t.postings:
            out[(p.account, p.currency)] += p.amount_minor
    return dict(out)


def totals_by_currency(entries: Iterable[Transaction]) -> dict[str, int]:
    """Sum of every posting per currency; zero in a sound ledger."""
    out: dict[str, int] = defaultdict(int)
    for (_, cur), amount in trial_balance(entries).items():
        out[cur] += amount
    return dict(out)


def customer_credit(entries: Iterable[Transaction], customer: str, currency: str) -> int:
    """The customer's spendable prepaid credit as the customer sees it (positive = in credit)."""
    return -balance(entries, prepaid(customer), currency)


def merge(existing: Mapping[str, Transaction], incoming: Sequence[Transaction]) -> tuple[Transaction, ...]:
    """The transactions of `incoming` that are new, after idempotency checks against `existing`.

    Raises `BusinessKeyConflict` (naming the key) if a key is reused with other content, either
    against `existing` or inside `incoming` itself; replays are dropped silently.
    """
    fresh: dict[str, Transaction] = {}
    for txn in incoming:
        prior = existing.get(txn.business_key) or fresh.get(txn.business_key)
        if prior is None:
            fresh[txn.business_key] = txn
        elif not prior.same_content(txn):
            raise BusinessKeyConflict(
                f"business key {txn.business_key!r} already booked with different content "
                f"(booked {prior.kind} at {prior.at.isoformat()} {_legs(prior)}; "
                f"offered {txn.kind} at {txn.at.isoformat()} {_legs(txn)})")
    return tuple(fresh.values())


def _legs(t: Transaction) -> str:
    return "[" + ", ".join(f"{p.account} {p.amount_minor:+d} {p.currency}" for p in sorted(t.postings)) + "]"


def reverse(txn: Transaction, business_key: str, at: datetime, kind: str | None = None) -> Transaction:
    """A transaction that exactly undoes `txn` (every posting negated)."""
    return Transaction(business_key, at,
                       tuple(Posting(p.account, -p.amount_minor, p.currency) for p in txn.postings),
                       kind or f"{txn.kind}-reversal", memo=f"reverses {txn.business_key}")


# --------------------------------------------------------------------------- storage contract


class LedgerStore(Protocol):
    """What the credit-control and vendor cores need from ledger storage.

    `append` is atomic: either every new transaction of the batch is stored or none (a conflict
    raises `BusinessKeyConflict` and stores nothing). It returns the transactions actually added
    (replays are left out). Implementations: `InMemoryLedger` here; SQLite/PostgreSQL in the shell.
    """

    def append(self, transactions: Sequence[Transaction]) -> tuple[Transaction, ...]: ...

    def exists(self, business_key: str) -> bool: ...

    def get(self, business_key: str) -> Transaction | None: ...

    def balance(self, account: str, currency: str | None = None) -> int: ...

    def transactions(self) -> Iterator[Transaction]: ...


class InMemoryLedger:
    """The reference `LedgerStore`: a dict of transactions plus running balances."""

    def __init__(self, transactions: Iterable[Transaction] = ()) -> None:
        self._by_key: dict[str, Transaction] = {}
        self._balances: dict[tuple[str, str], int] = defaultdict(int)
        self.append(list(transactions))

    def append(self, transactions: Sequence[Transaction]) -> tuple[Transaction, ...]:
        fresh = merge(self._by_key, list(transactions))
        for txn in fresh:
            self._by_key[txn.business_key] = txn
            for p in txn.postings:
                self._balances[(p.account, p.currency)] += p.amount_minor
        return fresh

    def exists(self, business_key: str) -> bool:
        return business_key in self._by_key

    def get(self, business_key: str) -> Transaction | None:
        return self._by_key.get(business_key)

    def balance(self, account: str, currency: str | None = None) -> int:
        if currency is not None:
            return self._balances.get((account, currency), 0)
        return sum(v for (a, _), v in self._balances.items() if a == account)

    def transactions(self) -> Iterator[Transaction]:
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)


# --------------------------------------------------------------------------- VAT helpers

ChargedAt = Literal["top_up", "consumption"]


@dataclass(frozen=True)
class PrepaidVat:
    """A market's VAT treatment of prepaid credit: the rate and when VAT becomes due."""

    rate: Decimal                      # e.g. Decimal("0.05") for 5 %
    charged_at: ChargedAt = "consumption"
    rounding: str = "half_up"          # a `meterlink.money.ROUNDING_MODES` name

    def __post_init__(self) -> None:
        rate = to_decimal(self.rate)
        object.__setattr__(self, "rate", rate)
        if rate < 0 or rate >= 1:
            raise ValidationError(f"VAT rate {rate} out of range [0, 1)")
        if self.charged_at not in ("top_up", "consumption"):
            raise ValidationError(f"VAT charged_at {self.charged_at!r}: use 'top_up' or 'consumption'")
        if self.rounding not in ROUNDING_MODES:
            raise ValidationError(f"unknown rounding mode {self.rounding!r}")


def vat_on_net(net: Decimal | int, rate: Decimal, rounding: str = "half_up") -> tuple[int, int]:
    """Exact net amount (minor units) -> (net_minor, vat_minor); VAT is computed on the rounded net."""
    net_minor = round_minor(to_decimal(net), rounding)
    return net_minor, round_minor(Decimal(net_minor) * to_decimal(rate), rounding)


def vat_in_gross(gross_minor: int, rate: Decimal, rounding: str = "half_up") -> tuple[int, int]:
    """Gross amount incl. VAT -> (net_minor, vat_minor) with net + vat == gross exactly."""
    rate = to_decimal(rate)
    vat = round_minor(Decimal(gross_minor) * rate / (1 + rate), rounding)
    return gross_minor - vat, vat


# --------------------------------------------------------------------------- builders


def _txn(key: str, at: datetime, kind: str, legs: Iterable[tuple[str, int]], currency: str,
         memo: str = "") -> Transaction:
    postings = tuple(Posting(acc, amt, currency) for acc, amt in legs if amt != 0)
    return Transaction(key, at, postings, kind, memo)


def _positive(amount: int, what: str, key: str) -> int:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"{key!r}: {what} must be int minor units, got {type(amount).__name__}")
    if amount <= 0:
        raise LedgerError(f"{key!r}: {what} must be positive, got {amount}")
    return amount


def top_up(business_key: str, at: datetime, customer: str, vendor: str, gross_minor: int, currency: str,
           vat: PrepaidVat) -> Transaction:
    """A vendor sold `gross_minor` of credit: Dr vendor receivable, Cr customer prepaid (+ VAT if due at top-up)."""
    _positive(gross_minor, "top-up amount", business_key)
    legs = [(vendor_receivable(vendor), gross_minor), (prepaid(customer), -gross_minor)]
    if vat.charged_at == "top_up":
        _, vat_minor = vat_in_gross(gross_minor, vat.rate, vat.rounding)
        legs += [(VAT_PREPAID_CLEARING, vat_minor), (VAT_OUTPUT, -vat_minor)]
    return _txn(business_key, at, "top-up", legs, currency)


def _charge(business_key: str, at: datetime, kind: str, debit_account: str, revenue: str, net_minor: int,
            vat_minor: int, currency: str, vat: PrepaidVat) -> Transaction:
    vat_account = VAT_PREPAID_CLEARING if vat.charged_at == "top_up" else VAT_OUTPUT
    return _txn(business_key, at, kind,
                [(debit_account, net_minor + vat_minor), (revenue, -net_minor), (vat_account, -vat_minor)],
                currency)


def _split(business_key: str, net: Decimal | int | None, gross_minor: int | None, vat: PrepaidVat) -> tuple[int, int]:
    if (net is None) == (gross_minor is None):
        raise LedgerError(f"{business_key!r}: give exactly one of net (Decimal minor units) or gross_minor")
    if gross_minor is not None:
        _positive(gross_minor, "gross amount", business_key)
        return vat_in_gross(gross_minor, vat.rate, vat.rounding)
    net_minor, vat_minor = vat_on_net(net, vat.rate, vat.rounding)
    _positive(net_minor + vat_minor, "charge", business_key)
    return net_minor, vat_minor


def consumption_charge(business_key: str, at: datetime, customer: str, currency: str, vat: PrepaidVat, *,
                       net: Decimal | int | None = None, gross_minor: int | None = None) -> Transaction:
    """Energy supplied, paid from prepaid credit: Dr prepaid (gross), Cr revenue:energy (net), Cr VAT."""
    n, v = _split(business_key, net, gross_minor, vat)
    return _charge(business_key, at, "consumption", prepaid(customer), REVENUE_ENERGY, n, v, currency, vat)


STANDING_PAID_FROM = {"prepaid": ("standing-charge", prepaid),
                      "emergency-credit": ("standing-charge-emergency", emergency_credit_account),
                      "debt": ("standing-charge-debt", debt)}


def standing_charge(business_key: str, at: datetime, customer: str, currency: str, vat: PrepaidVat, *,
                    net: Decimal | int | None = None, gross_minor: int | None = None,
                    paid_from: str = "prepaid", memo: str = "") -> Transaction:
    """Standing-charge days: Dr the account they were paid from (gross), Cr revenue:standing (net),
    Cr VAT. `paid_from`: "prepaid" (credit, kind standing-charge), "emergency-credit" (advanced,
    owed back; kind standing-charge-emergency) or "debt" (accumulated debt; kind standing-charge-debt)."""
    if paid_from not in STANDING_PAID_FROM:
        raise LedgerError(f"{business_key!r}: standing charge paid_from {paid_from!r} not one of "
                          f"{', '.join(STANDING_PAID_FROM)}")
    kind, account = STANDING_PAID_FROM[paid_from]
    n, v = _split(business_key, net, gross_minor, vat)
    t = _charge(business_key, at, kind, account(customer), REVENUE_STANDING, n, v, currency, vat)
    return replace(t, memo=memo) if memo else t


def over_usage_debt(business_key: str, at: datetime, customer: str, gross_minor: int, currency: str,
                    vat: PrepaidVat) -> Transaction:
    """Energy used beyond a grant: supplied, but charged to the customer's debt instead of credit."""
    n, v = _split(business_key, None, gross_minor, vat)
    return _charge(business_key, at, "over-usage-debt", debt(customer), REVENUE_ENERGY, n, v, currency, vat)


def emergency_consumption_charge(business_key: str, at: datetime, customer: str, gross_minor: int, currency: str,
                                 vat: PrepaidVat) -> Transaction:
    """Energy paid with emergency credit at the gateway: Dr emergency-credit (advanced, owed back), Cr revenue, Cr VAT."""
    n, v = _split(business_key, None, gross_minor, vat)
    return _charge(business_key, at, "emergency-consumption", emergency_credit_account(customer), REVENUE_ENERGY,
                   n, v, currency, vat)


def debt_recovery(business_key: str, at: datetime, customer: str, amount_minor: int, currency: str) -> Transaction:
    """Recover debt from prepaid credit: Dr prepaid, Cr debt."""
    _positive(amount_minor, "debt recovery", business_key)
    return _txn(business_key, at, "debt-recovery", [(prepaid(customer), amount_minor), (debt(customer), -amount_minor)],
                currency)


def arrears_registered(business_key: str, at: datetime, customer: str, amount_minor: int, currency: str,
                       reason: str) -> Transaction:
    """Register arrears the customer owes (previous supply, a central over-usage booking):
    Dr customer arrears, Cr adjustments, with a reason. Recovered at the gateway."""
    _positive(amount_minor, "arrears", business_key)
    if not reason:
        raise LedgerError(f"{business_key!r}: registering arrears needs a reason")
    return _txn(business_key, at, "arrears-registered",
                [(arrears_account(customer), amount_minor), (ADJUSTMENTS, -amount_minor)], currency, memo=reason)


def arrears_recovery(business_key: str, at: datetime, customer: str, amount_minor: int, currency: str) -> Transaction:
    """Arrears recovered at the gateway (from a top-up or from credit over time): Dr prepaid, Cr arrears."""
    _positive(amount_minor, "arrears recovery", business_key)
    return _txn(business_key, at, "arrears-recovery",
                [(prepaid(customer), amount_minor), (arrears_account(customer), -amount_minor)], currency)


def emergency_credit(business_key: str, at: datetime, customer: str, amount_minor: int, currency: str) -> Transaction:
    """Emergency credit accepted by the customer: Dr emergency-credit, Cr prepaid."""
    _positive(amount_minor, "emergency credit", business_key)
    return _txn(business_key, at, "emergency-credit",
                [(emergency_credit_account(customer), amount_minor), (prepaid(customer), -amount_minor)], currency)


def emergency_credit_repayment(business_key: str, at: datetime, customer: str, amount_minor: int,
                               currency: str) -> Transaction:
    """Repay emergency credit from a top-up: Dr prepaid, Cr emergency-credit."""
    _positive(amount_minor, "emergency credit repayment", business_key)
    return _txn(business_key, at, "emergency-credit-repayment",
                [(prepaid(customer), amount_minor), (emergency_credit_account(customer), -amount_minor)], currency)


def vendor_commission(business_key: str, at: datetime, vendor: str, commission_minor: int, vat_minor: int,
                      currency: str) -> Transaction:
    """A vendor's commission on a sale and the VAT on it: Dr expense, Dr vat:input, Cr vendor receivable."""
    if commission_minor < 0 or vat_minor < 0 or commission_minor + vat_minor == 0:
        raise LedgerError(f"{business_key!r}: commission {commission_minor} / VAT {vat_minor} must be >= 0, not both 0")
    return _txn(business_key, at, "vendor-commission",
                [(commission_expense(vendor), commission_minor), (VAT_INPUT, vat_minor),
                 (vendor_receivable(vendor), -(commission_minor + vat_minor))], currency)


def vendor_remittance(business_key: str, at: datetime, vendor: str, amount_minor: int, currency: str) -> Transaction:
    """A vendor paid what it owes: Dr cash:bank, Cr vendor receivable."""
    _positive(amount_minor, "remittance", business_key)
    return _txn(business_key, at, "vendor-remittance",
                [(CASH_BANK, amount_minor), (vendor_receivable(vendor), -amount_minor)], currency)


def adjustment(business_key: str, at: datetime, customer: str, amount_minor: int, currency: str,
               reason: str) -> Transaction:
    """Credit (+) or debit (-) a customer's prepaid credit against `adjustments`, with a reason."""
    if amount_minor == 0:
        raise LedgerError(f"{business_key!r}: an adjustment of 0 moves no money")
    if not reason:
        raise LedgerError(f"{business_key!r}: an adjustment needs a reason")
    return _txn(business_key, at, "adjustment",
                [(ADJUSTMENTS, amount_minor), (prepaid(customer), -amount_minor)], currency, memo=reason)


def rounding_residue(business_key: str, at: datetime, amount_minor: int, currency: str,
                     against: str = REVENUE_ENERGY) -> Transaction:
    """Book a whole-minor-unit rounding difference: Dr `against`, Cr rounding:residue (sign follows amount).

    `amount_minor` = rounded total booked − exact total (e.g. `round_minor(sum of exact residues)`),
    so a positive amount moves over-booked revenue into the residue account.
    """
    if amount_minor == 0:
        raise LedgerError(f"{business_key!r}: a residue of 0 moves no money")
    return _txn(business_key, at, "rounding-residue", [(against, amount_minor), (ROUNDING_RESIDUE, -amount_minor)],
                currency)


def residue_to_book(exact_total: Decimal, booked_total: int, rounding: str = "half_up") -> int:
    """Whole minor units of residue between what was booked (rounded pieces) and the exact total."""
    return round_minor(Decimal(booked_total) - to_decimal(exact_total), rounding)


__all__ = [
    "ADJUSTMENTS", "arrears_account", "arrears_recovery", "arrears_registered", "BusinessKeyConflict", "CASH_BANK", "InMemoryLedger", "LedgerError", "LedgerStore", "Posting",
    "PrepaidVat", "REVENUE_ENERGY", "REVENUE_STANDING", "ROUNDING_RESIDUE", "Transaction", "UnbalancedTransaction",
    "VAT_INPUT", "VAT_OUTPUT", "VAT_PREPAID_CLEARING", "adjustment", "balance", "commission_expense",
    "consumption_charge", "customer_credit", "emergency_consumption_charge", "debt", "debt_recovery", "emergency_credit",
    "emergency_credit_account", "emergency_credit_repayment", "merge", "over_usage_debt", "prepaid",
    "residue_to_book", "reverse", "rounding_residue", "standing_charge", "top_up", "totals_by_currency",
    "trial_balance", "vat_in_gross", "vat_on_net", "vendor_commission", "vendor_receivable", "vendor_remittance",
]
