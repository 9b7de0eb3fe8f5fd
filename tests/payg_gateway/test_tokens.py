"""Token gateway: signed top-up tokens applied once, bounded replay window, offline card top-ups."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings, strategies as st

from meterlink.errors import ValidationError
from meterlink.gateway import credit as C
from meterlink.gateway import tokens as T

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)
HEAD_END = Ed25519PrivateKey.generate()
HEAD_END_PUB = T.public_bytes(HEAD_END)


def token(counter=1, amount=1000, meter="M1", token_id=None, currency="GBP", key=HEAD_END, **kw) -> T.TopUpToken:
    t = T.TopUpToken(token_id=token_id or f"tok-{counter}", meter=meter, counter=counter, amount_minor=amount,
                     currency=currency, issued_at=kw.pop("issued_at", T0),
                     expires_at=kw.pop("expires_at", T0 + timedelta(days=30)))
    return t.signed(key)


def account(**kw) -> C.AccountState:
    return C.AccountState(account="M1", **kw)


def test_the_same_token_applied_twice_changes_the_balance_once():
    s, w = account(), T.ReplayWindow()
    s, w, ev1 = T.apply_token(s, w, token(), HEAD_END_PUB, T0)
    s, w, ev2 = T.apply_token(s, w, token(), HEAD_END_PUB, T0 + timedelta(minutes=1))
    assert s.credit_balance == 1000
    assert isinstance(ev1[0], C.TopUpApplied)
    assert isinstance(ev2[0], C.TopUpRefused) and ev2[0].reason == "replay" and ev2[0].reference == "tok-1"


def test_a_token_survives_its_text_encoding_and_still_verifies():
    t = token(counter=7, amount=2550)
    back = T.TopUpToken.decode(t.encode())
    assert back == t
    assert T.token_refusal(back, "M1", "GBP", HEAD_END_PUB, T.ReplayWindow(), T0) is None


def test_a_malformed_token_text_is_a_validation_error():
    with pytest.raises(ValidationError, match="malformed top-up token"):
        T.TopUpToken.decode("not-a-token!!")


@pytest.mark.parametrize("tamper, reason", [
    (lambda t: replace(t, amount_minor=100_000), "bad_signature"),
    (lambda t: replace(t, signature=b""), "bad_signature"),
    (lambda t: token(key=Ed25519PrivateKey.generate()), "bad_signature"),
    (lambda t: token(meter="M2"), "wrong_meter"),
    (lambda t: token(currency="EUR"), "currency_mismatch"),
    (lambda t: token(expires_at=T0), "expired"),
    (lambda t: token(issued_at=T0 + timedelta(hours=1)), "not_yet_valid"),
])
def test_a_bad_token_is_refused_before_any_credit_moves(tamper, reason):
    s = account(credit_balance=10)
    s2, w2, ev = T.apply_token(s, T.ReplayWindow(), tamper(token()), HEAD_END_PUB, T0)
    assert s2 == s and w2 == T.ReplayWindow()
    assert [(type(e).__name__, e.reason) for e in ev] == [("TopUpRefused", reason)]


def test_a_token_refused_over_the_maximum_can_be_entered_again_later():
    s = account(credit_balance=99_500)
    w = T.ReplayWindow()
    s, w, ev = T.apply_token(s, w, token(amount=1000), HEAD_END_PUB, T0)
    assert ev[0].reason == "over_maximum_credit" and not w.is_spent(1)
    s = replace(s, credit_balance=0)
    s, w, ev = T.apply_token(s, w, token(amount=1000), HEAD_END_PUB, T0 + timedelta(minutes=1))
    assert isinstance(ev[0], C.TopUpApplied) and w.is_spent(1)


def test_out_of_order_tokens_are_each_applied_once():
    s, w = account(), T.ReplayWindow()
    for c in (3, 1, 2, 5):
        s, w, ev = T.apply_token(s, w, token(counter=c, amount=100), HEAD_END_PUB, T0)
        assert isinstance(ev[0], C.TopUpApplied)
    assert s.credit_balance == 400 and w.floor == 3 and w.seen == frozenset({5})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 600), max_size=120), st.integers(1, 64))
def test_replay_window_never_accepts_a_counter_twice_and_stays_bounded(counters, size):
    w = T.ReplayWindow(size=size)
    accepted: set[int] = set()
    for c in counters:
        if w.is_spent(c):
            continue
        assert c not in accepted
        accepted.add(c)
        w = w.remember(c)
        assert w.is_spent(c)
        assert len(w.seen) <= size
        assert all(s > w.floor for s in w.seen)


# --------------------------------------------------------------------------- offline cards

CARD = Ed25519PrivateKey.generate()


def lists(blacklisted=(), key=HEAD_END):
    cards = T.CardList(1, T0, (T.CardEntry("C1", "M1", T.public_bytes(CARD)),
                               T.CardEntry("C2", "M2", T.public_bytes(Ed25519PrivateKey.generate())))).signed(key)
    return cards, T.Blacklist(3, T0, frozenset(blacklisted)).signed(key)


def card_topup(nonce=b"n" * 16, amount=500, at=T0, card_id="C1", card_key=CARD, meter="M1"):
    return T.CardTopUp(card_id, T.CardChallenge(meter, nonce, amount, "GBP", at)).signed(card_key)


def test_offline_card_topup_with_a_valid_signature_is_applied():
    cards, bl = lists()
    s, ev = T.card_topup(account(), card_topup(), b"n" * 16, cards, bl, HEAD_END_PUB, T0 + timedelta(seconds=5))
    assert s.credit_balance == 500 and ev[0].reference == "card:C1:" + (b"n" * 16).hex()


def test_offline_gateway_refuses_a_card_on_its_last_signed_blacklist():
    cards, bl = lists(blacklisted={"C1"})
    s, ev = T.card_topup(account(), card_topup(), b"n" * 16, cards, bl, HEAD_END_PUB, T0)
    assert s.credit_balance == 0 and ev[0].reason == "blacklisted"


@pytest.mark.parametrize("make, expected_nonce, at, reason", [
    (lambda: card_topup(card_id="C9"), b"n" * 16, T0, "unknown_card"),
    (lambda: card_topup(card_id="C2"), b"n" * 16, T0, "wrong_meter"),
    (lambda: card_topup(), b"other-nonce-0000", T0, "replay"),
    (lambda: card_topup(), None, T0, "replay"),
    (lambda: card_topup(card_key=Ed25519PrivateKey.generate()), b"n" * 16, T0, "bad_signature"),
    (lambda: replace(card_topup(), challenge=replace(card_topup().challenge, amount_minor=9999)),
     b"n" * 16, T0, "bad_signature"),
    (lambda: card_topup(), b"n" * 16, T0 + timedelta(minutes=6), "expired"),
    (lambda: card_topup(at=T0 + timedelta(minutes=10)), b"n" * 16, T0, "not_yet_valid"),
])
def test_bad_offline_card_topups_are_refused_with_a_reason(make, expected_nonce, at, reason):
    cards, bl = lists()
    s, ev = T.card_topup(account(), make(), expected_nonce, cards, bl, HEAD_END_PUB, at)
    assert s.credit_balance == 0 and ev[0].reason == reason


def test_lists_not_signed_by_the_head_end_are_not_trusted():
    forged_cards, forged_bl = lists(key=Ed25519PrivateKey.generate())
    cards, bl = lists()
    assert T.card_topup(account(), card_topup(), b"n" * 16, cards, forged_bl, HEAD_END_PUB, T0)[1][0].reason \
        == "blacklist_unverified"
    assert T.card_topup(account(), card_topup(), b"n" * 16, forged_cards, bl, HEAD_END_PUB, T0)[1][0].reason \
        == "card_list_unverified"
