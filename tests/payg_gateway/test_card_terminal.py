"""Card top-ups at a running gateway through its card socket (gateway/cardterminal.py) and the CLI
(`meterlink-gateway payg card-challenge|card-topup`): the daemon's hook on a real `Gateway` with a
simulated meter and relay, offline, holding the head-end's last signed card list and blacklist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import Event
from meterlink.gateway import tokens as T
from meterlink.gateway.cardterminal import challenge_from_json, request

BIN = Path(sys.executable).parent
HEAD_END = Ed25519PrivateKey.generate()
CARD = Ed25519PrivateKey.generate()
STOLEN = Ed25519PrivateKey.generate()


def pem(tmp_path: Path, key: Ed25519PrivateKey, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.fixture
def terminal(tmp_path, payg_gateway):
    sock = tmp_path / "cards.sock"
    gw, hook, clock, meter = payg_gateway(f'token_public_key = "{T.public_bytes(HEAD_END).hex()}"\n'
                                          f'card_socket = "{sock}"\n')
    hook.boot()                                          # offline: no credit, the relay opens; the socket opens
    pm = hook.meters["H-1"]
    now = clock.now()
    pm.set_card_lists(T.CardList(4, now, (T.CardEntry("CARD1", "H-1", T.public_bytes(CARD)),
                                          T.CardEntry("CARD9", "H-1", T.public_bytes(STOLEN)))).signed(HEAD_END),
                      T.Blacklist(4, now, frozenset({"CARD9"})).signed(HEAD_END))
    return gw, hook, clock, meter, pm, sock


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "meterlink-gateway"), "payg", *args], capture_output=True, text=True)


def journal_kinds(gw) -> list[tuple[str, dict]]:
    return [(r.body.kind, json.loads(r.body.payload)) for r in gw.journal.records() if isinstance(r.body, Event)]


def test_a_valid_card_top_up_applies_once_and_the_supply_is_re_armed_at_once(terminal, tmp_path):
    gw, hook, clock, meter, pm, sock = terminal
    assert pm.state.relay == "open" and not meter.relay_closed
    at = clock.now()
    out = cli("card-topup", "--socket", str(sock), "--meter", "H-1", "--card", "CARD1",
              "--card-key", str(pem(tmp_path, CARD, "card.pem")), "--amount", "500", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["applied"] and answer["amount_minor"] == 500 and answer["reference"].startswith("card:CARD1:")
    assert pm.state.credit_balance == 500 and pm.peek_usage().tokens == ((answer["reference"], 500),)
    kinds = journal_kinds(gw)
    applied = [p for k, p in kinds if k == "card.topup"]
    assert [p["reference"] for p in applied] == [answer["reference"]]       # hash-chained at once
    # no bus thread runs here: the decision runs at once on the terminal's thread (not at the next poll)
    assert meter.relay_closed and pm.state.relay == "closed" and clock.now() == at
    [close] = [p for k, p in kinds if k == "relay.close"]
    assert close["reason"] == "credit_restored" and close["at"] == applied[0]["at"]


def test_the_same_signed_challenge_presented_again_is_refused_as_a_replay(terminal):
    gw, hook, clock, meter, pm, sock = terminal
    got = request(sock, {"op": "challenge", "meter": "H-1", "amount_minor": 700})
    ch = challenge_from_json(got["challenge"])
    assert bytes.fromhex(got["message"]) == ch.signing_bytes() and ch.currency == "GBP"
    signed = {"op": "topup", "meter": "H-1", "card_id": "CARD1", "nonce": ch.nonce.hex(),
              "signature": T.sign_ed25519(CARD, ch.signing_bytes()).hex()}
    assert request(sock, signed)["applied"]
    again = request(sock, signed)
    assert again == {"ok": True, "applied": False, "reason": "replay", "amount_minor": 0,
                     "reference": f"card:CARD1:{ch.nonce.hex()}"}
    assert pm.state.credit_balance == 700


def test_a_card_on_the_last_signed_blacklist_is_refused_and_the_attempt_logged(terminal, tmp_path):
    gw, hook, clock, meter, pm, sock = terminal
    out = cli("card-topup", "--socket", str(sock), "--meter", "H-1", "--card", "CARD9",
              "--card-key", str(pem(tmp_path, STOLEN, "stolen.pem")), "--amount", "500")
    assert out.returncode == 3 and "refused: blacklisted" in out.stdout
    assert pm.state.credit_balance == 0 and pm.peek_usage().tokens == ()
    refused = [p for k, p in journal_kinds(gw) if k == "credit.top_up_refused"]
    assert [p["reason"] for p in refused] == ["blacklisted"]
    assert any(r.payload["kind"] == "blacklisted_card_attempt" for r in pm.unpublished)   # CRM event queued


@pytest.mark.parametrize("case", ["other_key", "amount_raised", "unknown_nonce"])
def test_a_forged_or_tampered_card_answer_is_refused_before_any_credit_moves(terminal, case):
    gw, hook, clock, meter, pm, sock = terminal
    ch = challenge_from_json(request(sock, {"op": "challenge", "meter": "H-1", "amount_minor": 500})["challenge"])
    if case == "other_key":                              # a card that is not the registered CARD1
        signature, nonce = T.sign_ed25519(Ed25519PrivateKey.generate(), ch.signing_bytes()), ch.nonce
    elif case == "amount_raised":                        # the card signed 50.00, the gateway asked for 5.00
        bigger = T.CardChallenge(ch.meter, ch.nonce, 5_000, ch.currency, ch.at)
        signature, nonce = T.sign_ed25519(CARD, bigger.signing_bytes()), ch.nonce
    else:                                                # a nonce the gateway never issued
        other = T.CardChallenge(ch.meter, b"x" * 16, 500, ch.currency, ch.at)
        signature, nonce = T.sign_ed25519(CARD, other.signing_bytes()), other.nonce
    answer = request(sock, {"op": "topup", "meter": "H-1", "card_id": "CARD1", "nonce": nonce.hex(),
                            "signature": signature.hex()})
    assert not answer["applied"]
    assert answer["reason"] == ("replay" if case == "unknown_nonce" else "bad_signature")
    assert pm.state.credit_balance == 0


def test_the_two_step_cli_for_a_terminal_that_signs_with_the_card_itself(terminal):
    gw, hook, clock, meter, pm, sock = terminal
    out = cli("card-challenge", "--socket", str(sock), "--meter", "H-1", "--amount", "250", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    signature = T.sign_ed25519(CARD, bytes.fromhex(got["message"])).hex()   # what the card does
    out = cli("card-topup", "--socket", str(sock), "--meter", "H-1", "--card", "CARD1",
              "--nonce", got["challenge"]["nonce"], "--signature", signature)
    assert out.returncode == 0 and "applied" in out.stdout, out.stdout + out.stderr
    assert pm.state.credit_balance == 250


def test_malformed_requests_and_unknown_meters_get_an_error_not_a_crash(terminal):
    gw, hook, clock, meter, pm, sock = terminal
    assert request(sock, {"op": "challenge", "meter": "NOPE", "amount_minor": 5})["error"].startswith(
        "meter 'NOPE' is not a PAYG meter")
    assert "positive integer" in request(sock, {"op": "challenge", "meter": "H-1", "amount_minor": -5})["error"]
    assert "hex 'nonce'" in request(sock, {"op": "topup", "meter": "H-1", "card_id": "CARD1"})["error"]
    assert request(sock, {"op": "refund"})["ok"] is False
    out = cli("card-challenge", "--socket", str(sock), "--meter", "NOPE", "--amount", "5")
    assert out.returncode == 2 and "not a PAYG meter" in out.stderr


def test_a_challenge_does_not_survive_a_restart_of_the_daemon(terminal, payg_gateway, tmp_path):
    gw, hook, clock, meter, pm, sock = terminal
    ch = challenge_from_json(request(sock, {"op": "challenge", "meter": "H-1", "amount_minor": 500})["challenge"])
    hook.close()
    assert not sock.exists()
    hook.start_card_terminals()                          # the socket again, with no open challenge
    answer = request(sock, {"op": "topup", "meter": "H-1", "card_id": "CARD1", "nonce": ch.nonce.hex(),
                            "signature": T.sign_ed25519(CARD, ch.signing_bytes()).hex()})
    assert answer["reason"] == "replay" and pm.state.credit_balance == 0
