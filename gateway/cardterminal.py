"""Card top-ups at a running gateway from a local card terminal: a Unix-socket service (challenge, then the card's signed answer) and its client; never decides whether a card may top up (`tokens.card_refusal` does).

A terminal (card reader/keypad on the concentrator, or ``meterlink-gateway payg card-topup``)
talks to the daemon over the ``card_socket`` of a ``[[payg]]`` table: one JSON object per line
each way, one request per connection.

1. ``{"op": "challenge", "meter": "MTR-1", "amount_minor": 500}`` ->
   ``{"ok": true, "challenge": {"meter", "nonce", "amount_minor", "currency", "at_ms"},
   "message": HEX}``. The gateway draws a fresh 16-byte nonce and remembers the challenge (in
   memory, single use, at most `MAX_OUTSTANDING` per meter, expires after
   `tokens.CARD_CHALLENGE_MAX_AGE`). ``message`` is exactly what the card signs
   (`tokens.CardChallenge.signing_bytes`).
2. ``{"op": "topup", "meter": "MTR-1", "card_id": "CARD1", "nonce": HEX, "signature": HEX}`` ->
   ``{"ok": true, "applied": true|false, "reference", "amount_minor", "reason"?, "credit_balance_minor"}``.
   The nonce is consumed whatever the outcome; the challenge checked is the gateway's own record of
   it (a terminal cannot change the amount), so a replayed, unknown or expired nonce is refused
   as ``replay`` and a tampered one as ``bad_signature``. The card checks (last signed blacklist
   first, card list, meter, currency, nonce, signature, age) are `tokens.card_refusal`'s; the
   top-up is applied by `PaygMeter.card_topup`, journaled (``card.topup`` / ``credit.top_up_refused``)
   and reported to the head-end at the next credit-control exchange, which reconciles it
   (``card:{card}:{nonce}``, booked once; a card blacklisted since is raised there).

Malformed requests get ``{"ok": false, "error": "..."}``. The socket file is created mode 0660:
who may top up is whoever may open it (the terminal's user/group).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import socketserver
import stat
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable

from meterlink.clock import Clock, from_ms, to_ms, utc
from meterlink.errors import DeviceError, ValidationError

from . import credit as C
from . import tokens as T

log = logging.getLogger("meterlink.gateway.cards")

MAX_OUTSTANDING = 8               # open challenges per meter; the oldest is dropped beyond
MAX_LINE = 16 * 1024


def _ms_instant(at: datetime) -> datetime:
    """`at` truncated to whole milliseconds (what the signed challenge carries)."""
    return from_ms(to_ms(at))


class CardDesk:
    """Open card challenges of a gateway's meters and the submission of signed answers (thread-safe).

    `apply(meter, topup, expected_nonce) -> events` is the daemon's `PaygDaemonHook.card_topup`."""

    def __init__(self, clock: Clock, currencies: dict[str, str],
                 apply: Callable[[str, T.CardTopUp, bytes | None], list]) -> None:
        self.clock, self.currencies, self.apply = clock, dict(currencies), apply
        self._open: dict[str, dict[bytes, T.CardChallenge]] = {m: {} for m in currencies}
        self._lock = threading.Lock()

    def _meter(self, meter: object) -> str:
        if not isinstance(meter, str) or meter not in self.currencies:
            raise ValidationError(f"meter {meter!r} is not a PAYG meter of this card terminal "
                                  f"(known: {', '.join(sorted(self.currencies))})")
        return meter

    def challenge(self, meter: str, amount_minor: int) -> T.CardChallenge:
        meter = self._meter(meter)
        if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
            raise ValidationError(f"meter {meter}: card top-up amount {amount_minor!r} must be a positive "
                                  f"integer of minor units")
        ch = T.CardChallenge(meter, secrets.token_bytes(16), amount_minor, self.currencies[meter],
                             _ms_instant(self.clock.now()))
        with self._lock:
            pending = self._open[meter]
            self._expire(pending)
            pending[ch.nonce] = ch
            while len(pending) > MAX_OUTSTANDING:
                pending.pop(next(iter(pending)))
        return ch

    def _expire(self, pending: dict[bytes, T.CardChallenge]) -> None:
        now = utc(self.clock.now())
        for nonce in [n for n, ch in pending.items() if now - utc(ch.at) > T.CARD_CHALLENGE_MAX_AGE]:
            del pending[nonce]

    def submit(self, meter: str, card_id: str, nonce: bytes, signature: bytes) -> dict:
        meter = self._meter(meter)
        if not isinstance(card_id, str) or not card_id:
            raise ValidationError("card_id must be a non-empty string")
        with self._lock:
            ch = self._open[meter].pop(nonce, None)         # single use, whatever the outcome
        expected = ch.nonce if ch is not None else None
        if ch is None:                                      # never issued, used, dropped or lost at a restart
            ch = T.CardChallenge(meter, nonce, 0, self.currencies[meter], _ms_instant(self.clock.now()))
        topup = T.CardTopUp(card_id, ch, signature)
        events = self.apply(meter, topup, expected)
        applied = next((e for e in events if isinstance(e, C.TopUpApplied)), None)
        refused = next((e for e in events if isinstance(e, C.TopUpRefused)), None)
        out = {"ok": True, "applied": applied is not None, "reference": topup.reference,
               "amount_minor": ch.amount_minor}
        if applied is not None:
            out["credit_balance_minor"] = applied.credit_balance
        if refused is not None:
            out["reason"] = refused.reason
        return out

    def handle(self, request: object) -> dict:
        """One request document -> its answer (errors as ``{"ok": false, "error": ...}``)."""
        try:
            if not isinstance(request, dict):
                raise ValidationError("a request is a JSON object")
            op = request.get("op")
            if op == "challenge":
                ch = self.challenge(request.get("meter"), request.get("amount_minor"))
                return {"ok": True, "challenge": challenge_to_json(ch), "message": ch.signing_bytes().hex()}
            if op == "topup":
                try:
                    nonce = bytes.fromhex(request["nonce"])
                    signature = bytes.fromhex(request["signature"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValidationError(f"topup needs hex 'nonce' and 'signature' ({exc})") from None
                return self.submit(request.get("meter"), request.get("card_id"), nonce, signature)
            raise ValidationError(f"unknown op {op!r} (challenge, topup)")
        except ValidationError as exc:
            return {"ok": False, "error": str(exc)}


def challenge_to_json(ch: T.CardChallenge) -> dict:
    return {"meter": ch.meter, "nonce": ch.nonce.hex(), "amount_minor": ch.amount_minor, "currency": ch.currency,
            "at_ms": to_ms(ch.at)}


def challenge_from_json(d: dict) -> T.CardChallenge:
    return T.CardChallenge(d["meter"], bytes.fromhex(d["nonce"]), int(d["amount_minor"]), d["currency"],
                           from_ms(int(d["at_ms"])))


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            answer = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        else:
            try:
                answer = self.server.desk.handle(json.loads(line))
            except json.JSONDecodeError as exc:
                answer = {"ok": False, "error": f"not JSON: {exc.msg}"}
            except Exception as exc:  # noqa: BLE001 - a terminal gets an answer, the daemon goes on
                log.exception("card terminal request failed")
                answer = {"ok": False, "error": f"internal error: {exc}"}
        self.wfile.write(json.dumps(answer, sort_keys=True).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class CardTerminalServer:
    """Serves a `CardDesk` on a Unix socket in a background thread."""

    def __init__(self, path: str | Path, desk: CardDesk) -> None:
        self.path, self.desk = Path(path), desk
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "CardTerminalServer":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()                  # left by a daemon that did not stop cleanly
        except FileNotFoundError:
            pass
        old = os.umask(0o117)
        try:
            self._server = _Server(str(self.path), _Handler)
        finally:
            os.umask(old)
        self._server.desk = self.desk
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"card terminal {self.path}",
                                        daemon=True)
        self._thread.start()
        log.info("card terminal listening on %s for meter(s) %s", self.path, ", ".join(sorted(self.desk.currencies)))
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.path.unlink(missing_ok=True)


def request(path: str | Path, doc: dict, timeout: float = 10.0) -> dict:
    """Client: send one request to a gateway's card socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(json.dumps(doc).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise DeviceError(f"card terminal socket {path}: {exc}") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise DeviceError(f"card terminal socket {path}: no answer (daemon stopped?)") from None


__all__ = ["CardDesk", "CardTerminalServer", "challenge_from_json", "challenge_to_json", "request"]
