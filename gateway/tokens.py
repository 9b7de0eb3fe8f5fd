"""Token gateway (DLMS/COSEM): signed top-up tokens, replay window, offline card top-ups against the signed card list and blacklist; never reads a clock, a file or a socket.

Every check happens BEFORE any credit moves; a refusal is a `TopUpRefused` event with a reason
(`bad_signature`, `wrong_meter`, `currency_mismatch`, `expired`, `not_yet_valid`, `replay`,
`blacklisted`, `unknown_card`, `card_list_unverified`, `blacklist_unverified`, and from
`credit.apply_topup`: `over_maximum_credit`, `not_positive`), which the shell journals.

Signatures are Ed25519 over canonical bytes (a domain-separating header line + compact JSON with
sorted keys, instants as integer UTC milliseconds). `verify_ed25519` is the ONE place that checks
a signature here, so it can be swapped for `meterlink.signed` when that lands.

Replay: each token carries a per-meter `counter` the head-end increases by one per token it
issues for that meter, and an expiry. The gateway remembers, per meter, a `ReplayWindow`: a
floor (every counter at or below it is spent) plus the set of applied counters above the floor.
Contiguous applied counters fold into the floor, and the set never holds more than `size`
counters: when the newest applied counter runs more than `size` ahead of the floor, the floor
jumps up and older unapplied counters are given up (refused as `replay`; the head-end sees them
unapplied at reconciliation and re-issues them under a new counter). Memory is O(size) per
meter whatever the number of tokens ever applied (after the IPsec anti-replay window, RFC 4303
§3.4.3); the expiry bounds how long a token can be outstanding, so a window a little larger than
the number of tokens a meter is sold within one expiry period refuses no honest token.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meterlink.clock import from_ms, to_ms, utc
from meterlink.errors import ValidationError

from .credit import AccountState, CreditEvent, TopUpApplied, TopUpRefused, apply_topup

PublicKey = Union[bytes, Ed25519PublicKey]
CLOCK_SKEW = timedelta(minutes=5)       # tolerated gateway clock error for "not yet valid"
CARD_CHALLENGE_MAX_AGE = timedelta(minutes=5)


# --------------------------------------------------------------------------- signatures

def verify_ed25519(public_key: PublicKey, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` under `public_key`
    (raw 32 bytes or a key object). Never raises for a bad signature or a malformed key."""
    try:
        key = public_key if isinstance(public_key, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(
            bytes(public_key))
        key.verify(bytes(signature), message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def sign_ed25519(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Head-end / card side of `verify_ed25519` (tests, CLI issuing, the card simulator)."""
    return private_key.sign(message)


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Raw 32-byte Ed25519 public key (as registered in card lists and gateway config)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _canonical(kind: str, payload: dict[str, Any]) -> bytes:
    return f"meterlink/{kind}/v1\n".encode() + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- top-up tokens

@dataclass(frozen=True)
class TopUpToken:
    """A top-up sold at the head-end for one meter, signed by the head-end key."""

    token_id: str
    meter: str
    counter: int                  # per-meter, +1 per issued token (replay window)
    amount_minor: int
    currency: str
    issued_at: datetime
    expires_at: datetime
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        return _canonical("topup-token", {
            "token_id": self.token_id, "meter": self.meter, "counter": self.counter,
            "amount_minor": self.amount_minor, "currency": self.currency,
            "issued_at": to_ms(self.issued_at), "expires_at": to_ms(self.expires_at)})

    def signed(self, head_end_key: Ed25519PrivateKey) -> "TopUpToken":
        return replace(self, signature=sign_ed25519(head_end_key, self.signing_bytes()))

    def encode(self) -> str:
        """Compact text form for the wire, QR codes and the CLI (base64url of JSON)."""
        body = {"token_id": self.token_id, "meter": self.meter, "counter": self.counter,
                "amount_minor": self.amount_minor, "currency": self.currency,
                "issued_at": to_ms(self.issued_at), "expires_at": to_ms(self.expires_at),
                "signature": self.signature.hex()}
        return base64.urlsafe_b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> "TopUpToken":
        """Inverse of `encode`; a malformed token is a ValidationError naming what is wrong."""
        try:
            body = json.loads(base64.urlsafe_b64decode(text.strip().encode()))
            token = cls(token_id=str(body["token_id"]), meter=str(body["meter"]), counter=body["counter"],
                        amount_minor=body["amount_minor"], currency=str(body["currency"]),
                        issued_at=from_ms(body["issued_at"]), expires_at=from_ms(body["expires_at"]),
                        signature=bytes.fromhex(body["signature"]))
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValidationError(f"malformed top-up token {text[:24]!r}...: {exc!r}") from None
        for name in ("counter", "amount_minor"):
            value = getattr(token, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValidationError(f"top-up token {token.token_id}: {name} must be an integer, got {value!r}")
        return token


@dataclass(frozen=True)
class ReplayWindow:
    """Applied token counters of ONE meter, bounded to `size` entries (see module docstring)."""

    floor: int = 0                                   # every counter <= floor is spent
    seen: frozenset[int] = frozenset()               # applied counters above the floor
    size: int = 256

    def is_spent(self, counter: int) -> bool:
        return counter <= self.floor or counter in self.seen

    def remember(self, counter: int) -> "ReplayWindow":
        seen = set(self.seen)
        seen.add(counter)
        floor = self.floor
        while floor + 1 in seen:                     # fold the contiguous prefix into the floor
            floor += 1
            seen.discard(floor)
        top = max(seen, default=floor)
        if top - floor > self.size:                  # keep at most `size` counters remembered
            floor = top - self.size
            seen = {c for c in seen if c > floor}
        return ReplayWindow(floor, frozenset(seen), self.size)


def token_refusal(token: TopUpToken, meter: str, currency: str, head_end_key: PublicKey,
                  window: ReplayWindow, at: datetime) -> str | None:
    """Why this token must not be applied to `meter` at `at` (None: it may be).

    Order: signature first (nothing else in an unsigned token is trusted), then meter, currency,
    validity, replay."""
    at = utc(at)
    if not token.signature or not verify_ed25519(head_end_key, token.signing_bytes(), token.signature):
        return "bad_signature"
    if token.meter != meter:
        return "wrong_meter"
    if token.currency != currency:
        return "currency_mismatch"
    if at >= utc(token.expires_at):
        return "expired"
    if at < utc(token.issued_at) - CLOCK_SKEW:
        return "not_yet_valid"
    if window.is_spent(token.counter):
        return "replay"
    return None


def apply_token(state: AccountState, window: ReplayWindow, token: TopUpToken, head_end_key: PublicKey,
                at: datetime) -> tuple[AccountState, ReplayWindow, list[CreditEvent]]:
    """Verify a token and, if it passes, apply it once. Returns (state, window, events).

    A token refused for any reason (including `over_maximum_credit`) is not remembered, so it
    can be entered again later (e.g. after credit has been used)."""
    reason = token_refusal(token, state.account, state.cfg.currency, head_end_key, window, at)
    if reason is not None:
        return state, window, [TopUpRefused(account=state.account, at=utc(at), reference=token.token_id,
                                            amount_minor=token.amount_minor, reason=reason)]
    new_state, events = apply_topup(state, token.amount_minor, token.token_id, at, currency=token.currency)
    if any(isinstance(e, TopUpApplied) for e in events):
        window = window.remember(token.counter)
    return new_state, window, events


# --------------------------------------------------------------------------- cards

@dataclass(frozen=True)
class CardEntry:
    card_id: str
    meter: str                    # the meter this card may top up
    public_key: bytes             # raw 32-byte Ed25519 key of the card


@dataclass(frozen=True)
class CardList:
    """Registered cards, signed by the head-end (pulled with the configuration)."""

    version: int
    issued_at: datetime
    cards: tuple[CardEntry, ...]
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        return _canonical("card-list", {
            "version": self.version, "issued_at": to_ms(self.issued_at),
            "cards": sorted([c.card_id, c.meter, c.public_key.hex()] for c in self.cards)})

    def signed(self, head_end_key: Ed25519PrivateKey) -> "CardList":
        return replace(self, signature=sign_ed25519(head_end_key, self.signing_bytes()))

    def find(self, card_id: str) -> CardEntry | None:
        return next((c for c in self.cards if c.card_id == card_id), None)


@dataclass(frozen=True)
class Blacklist:
    """Blacklisted card ids, signed by the head-end; the gateway uses the last one it verified."""

    version: int
    issued_at: datetime
    card_ids: frozenset[str] = frozenset()
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        return _canonical("blacklist", {"version": self.version, "issued_at": to_ms(self.issued_at),
                                        "card_ids": sorted(self.card_ids)})

    def signed(self, head_end_key: Ed25519PrivateKey) -> "Blacklist":
        return replace(self, signature=sign_ed25519(head_end_key, self.signing_bytes()))


def card_lists_digest(cards: "CardList | None", blacklist: "Blacklist | None") -> bytes:
    """SHA-256 of what a card list and blacklist say (not their versions or signatures); b"" for none."""
    import hashlib
    if cards is None or blacklist is None:
        return b""
    content = json.dumps({"cards": sorted([c.card_id, c.meter, c.public_key.hex()] for c in cards.cards),
                          "blacklisted": sorted(blacklist.card_ids)}, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(content.encode()).digest()


@dataclass(frozen=True)
class CardChallenge:
    """What the card signs: the gateway's fresh nonce, the meter, the amount and the time."""

    meter: str
    nonce: bytes                  # fresh random bytes from the gateway shell, single use
    amount_minor: int
    currency: str
    at: datetime

    def signing_bytes(self) -> bytes:
        return _canonical("card-challenge", {"meter": self.meter, "nonce": self.nonce.hex(),
                                             "amount_minor": self.amount_minor, "currency": self.currency,
                                             "at": to_ms(self.at)})


@dataclass(frozen=True)
class CardTopUp:
    card_id: str
    challenge: CardChallenge
    signature: bytes = b""

    @property
    def reference(self) -> str:
        """Transaction id journaled and reconciled by the head-end: card id + nonce."""
        return f"card:{self.card_id}:{self.challenge.nonce.hex()}"

    def signed(self, card_key: Ed25519PrivateKey) -> "CardTopUp":
        return replace(self, signature=sign_ed25519(card_key, self.challenge.signing_bytes()))


def card_refusal(topup: CardTopUp, meter: str, currency: str, expected_nonce: bytes | None,
                 card_list: CardList, blacklist: Blacklist, head_end_key: PublicKey, at: datetime) -> str | None:
    """Why this card top-up must be refused at `at` (None: it may be applied).

    The blacklist is consulted first: a blacklisted card is refused whatever else it presents."""
    at = utc(at)
    if not verify_ed25519(head_end_key, blacklist.signing_bytes(), blacklist.signature):
        return "blacklist_unverified"
    if not verify_ed25519(head_end_key, card_list.signing_bytes(), card_list.signature):
        return "card_list_unverified"
    if topup.card_id in blacklist.card_ids:
        return "blacklisted"
    entry = card_list.find(topup.card_id)
    if entry is None:
        return "unknown_card"
    ch = topup.challenge
    if entry.meter != meter or ch.meter != meter:
        return "wrong_meter"
    if ch.currency != currency:
        return "currency_mismatch"
    if expected_nonce is None or ch.nonce != expected_nonce:
        return "replay"
    if not verify_ed25519(entry.public_key, ch.signing_bytes(), topup.signature):
        return "bad_signature"
    if at - utc(ch.at) > CARD_CHALLENGE_MAX_AGE:
        return "expired"
    if utc(ch.at) - at > CLOCK_SKEW:
        return "not_yet_valid"
    return None


def card_topup(state: AccountState, topup: CardTopUp, expected_nonce: bytes | None, card_list: CardList,
               blacklist: Blacklist, head_end_key: PublicKey, at: datetime) -> tuple[AccountState, list[CreditEvent]]:
    """Offline card top-up at the gateway: all card checks, then `apply_topup`.

    `expected_nonce` is the nonce the shell issued for this transaction (None if none is
    outstanding); the shell discards it after this call whatever the outcome, so a signed
    challenge can never be presented twice."""
    reason = card_refusal(topup, state.account, state.cfg.currency, expected_nonce, card_list, blacklist,
                          head_end_key, at)
    if reason is not None:
        return state, [TopUpRefused(account=state.account, at=utc(at), reference=topup.reference,
                                    amount_minor=topup.challenge.amount_minor, reason=reason)]
    return apply_topup(state, topup.challenge.amount_minor, topup.reference, at, currency=topup.challenge.currency)
