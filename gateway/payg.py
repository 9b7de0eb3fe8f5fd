"""Gateway PAYG shell: prices each meter reading with the pulled tariff (flat configured price until one is pulled), applies grants, tokens and card top-ups through the pure core, switches the meter's relay coil and publishes CRM events; all decisions are `credit`/`tokens`'.

One `PaygMeter` per PAYG meter. It owns:

* the `AccountState` and the token `ReplayWindow`, persisted after every change in a small JSON
  file (atomic replace), so a reboot resumes where it stopped;
* a `RelaySwitch` on the meter's Modbus relay coil (FC05 write single coil, FC01 read-back);
* a `publish(topic, payload_bytes)` callable for CRM events (`MqttPublisher` or a test list).

On `boot` the meter's relay is READ first and credit is re-evaluated (`credit.reevaluate`) at
the current instant before anything is switched; the relay is commanded only if the decision
differs from what the meter reports.

Relay commands carry a unique command id (``{meter}-{seq:06d}-{open|close}``, `seq` persisted)
that is logged, published and journaled with the Disconnected/Reconnected event. The coil write
is an absolute position, so a retry is always safe: each attempt reads the coil back first and
stops as soon as the meter reports the commanded position (a lost answer to a write that did
happen costs one read, never a second switch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Callable

from meterlink import modbus
from meterlink.clock import Clock, parse_instant, utc
from meterlink.errors import DeviceError, ProtocolError, ValidationError

from . import credit as C
from . import tokens as T
from .friendly import FriendlyConfig
from .profiles import decode

log = logging.getLogger("meterlink.gateway.payg")

Publish = Callable[[str, bytes], None]
CRM_TOPIC_PREFIX = "meterlink/v1/crm"

# credit-core event -> CRM event kind (documented in docs/payg.md)
CRM_KINDS: dict[type, str] = {
    C.LowBalance: "low_balance",
    C.EmergencyCreditTaken: "emergency_credit_taken",
    C.EmergencyCreditExhausted: "emergency_credit_exhausted",
    C.Disconnected: "disconnected",
    C.Reconnected: "reconnected",
    C.OverUsage: "over_usage",
    C.FriendlyPeriodWarning: "friendly_credit_warning",
}


# --------------------------------------------------------------------------- pricing

def price_from_tariff(tariff, vat_rate: Decimal | int | str = 0) -> C.PriceFn:
    """Gross minor units per kWh at an instant from a `meterlink.headend.tariff.Tariff`: the band
    rate in force at the instant's local time, plus VAT. Tiers are not applied offline."""
    factor = 1 + Decimal(vat_rate)

    def price(at: datetime) -> Decimal:
        return tariff.band_at(utc(at).astimezone(tariff.zone)).rate * factor

    return price


# --------------------------------------------------------------------------- CRM events

@dataclass(frozen=True)
class CrmRecord:
    topic: str
    payload: dict

    def encode(self) -> bytes:
        return json.dumps(self.payload, sort_keys=True, separators=(",", ":")).encode()


def _jsonable(value):
    if isinstance(value, C.Usage):
        d = dataclasses.asdict(value)
        d["tokens"] = [list(t) for t in value.tokens]
        return d
    if isinstance(value, datetime):
        return utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def crm_record(event: C.CreditEvent, gateway_id: str, *, command_id: str | None = None) -> CrmRecord | None:
    """The CRM record of a credit-core event, or None if the CRM does not want it.

    Topic ``meterlink/v1/crm/{kind}/{account}``; payload: ``event_id`` (stable hash, for
    de-duplication of re-publications), ``kind``, ``account``, ``gateway``, ``at`` (UTC, ms) and
    the event's own fields. A refused top-up is only published when the card was blacklisted."""
    kind = CRM_KINDS.get(type(event))
    if kind is None and isinstance(event, C.TopUpRefused) and event.reason == "blacklisted":
        kind = "blacklisted_card_attempt"
    if kind is None:
        return None
    fields = {f.name: _jsonable(getattr(event, f.name)) for f in dataclasses.fields(event)
              if f.name not in ("account", "at")}
    if kind == "blacklisted_card_attempt":
        fields["card_id"] = event.reference.split(":")[1] if event.reference.startswith("card:") else None
        fields["channel"] = "gateway_offline"
    if command_id is not None:
        fields["command_id"] = command_id
    at = _jsonable(event.at)
    event_id = hashlib.sha256(json.dumps([kind, event.account, at, fields], sort_keys=True).encode()).hexdigest()[:32]
    payload = {"event_id": event_id, "kind": kind, "account": event.account, "gateway": gateway_id, "at": at,
               **fields}
    return CrmRecord(f"{CRM_TOPIC_PREFIX}/{kind}/{event.account}", payload)


class MqttPublisher:
    """Publishes CRM records to an MQTT broker (paho-mqtt, QoS 1, waits for the broker's ack)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, client_id: str = "", timeout: float = 5.0) -> None:
        import paho.mqtt.client as mqtt
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.timeout = timeout
        try:
            self._client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise DeviceError(f"MQTT broker {host}:{port}: {exc}") from None
        self._client.loop_start()

    def __call__(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise DeviceError(f"MQTT publish to {topic} not acknowledged within {self.timeout:g} s")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


# --------------------------------------------------------------------------- relay

@dataclass(frozen=True)
class RelayOutcome:
    command_id: str
    position: str
    attempts: int
    writes: int


class RelaySwitch:
    """The meter's supply relay on one Modbus coil (1 = closed/connected, 0 = open)."""

    def __init__(self, master, unit: int, coil: int, *, meter_id: str = "", attempts: int = 3) -> None:
        self.master, self.unit, self.coil, self.attempts = master, unit, coil, attempts
        self.meter_id = meter_id or f"unit {unit}"

    def read(self) -> str:
        bits = self.master.execute(modbus.Request(self.unit, modbus.READ_COILS, self.coil, 1))
        return "closed" if bits[0] else "open"

    def command(self, position: str, command_id: str) -> RelayOutcome:
        """Bring the relay to `position` and confirm it by reading back; retried safely."""
        if position not in ("closed", "open"):
            raise ValidationError(f"meter {self.meter_id}: relay position {position!r}")
        value = 0xFF00 if position == "closed" else 0x0000
        writes, last_error = 0, None
        for attempt in range(1, self.attempts + 1):
            try:
                if self.read() == position:
                    log.info("meter %s relay command %s: %s confirmed (attempt %d, %d write(s))",
                             self.meter_id, command_id, position, attempt, writes)
                    return RelayOutcome(command_id, position, attempt, writes)
                writes += 1
                self.master.execute(modbus.Request(self.unit, modbus.WRITE_SINGLE_COIL, self.coil, value=value))
                if self.read() == position:
                    log.info("meter %s relay command %s: %s confirmed (attempt %d, %d write(s))",
                             self.meter_id, command_id, position, attempt, writes)
                    return RelayOutcome(command_id, position, attempt, writes)
                last_error = DeviceError(f"read-back after write shows the relay not {position}")
            except (DeviceError, ProtocolError) as exc:
                last_error = exc
                log.warning("meter %s relay command %s attempt %d: %s", self.meter_id, command_id, attempt, exc)
        raise DeviceError(f"meter {self.meter_id} relay coil {self.coil}: command {command_id} ({position}) "
                          f"not confirmed after {self.attempts} attempts: {last_error}")


def read_import_wh(master, unit: int, profile, obis: str = "1.8.0") -> int:
    """The meter's cumulative import register (Wh) in one Modbus read, decoded by its profile."""
    q = profile.quantity(obis)
    words = master.execute(modbus.read_request(unit, q.function, q.address, q.count))
    value = decode(q, words)
    if value is None:
        raise DeviceError(f"unit {unit}: register {obis} at {q.address:#06x} holds no value")
    return value


# --------------------------------------------------------------------------- persisted state

_DT_FIELDS = {"at", "grant_valid_until", "friendly_warning_until"}
_DATE_FIELDS = {"standing_charged_through"}
_DEC_FIELDS = {"time_recovery_residue", "charge_residue"}


def state_to_json(state: C.AccountState) -> dict:
    out = {}
    for f in dataclasses.fields(state):
        if f.name == "cfg":
            continue
        out[f.name] = _jsonable(getattr(state, f.name))
    return out


def state_from_json(data: dict, cfg: C.PrepaymentConfig) -> C.AccountState:
    known = {f.name for f in dataclasses.fields(C.AccountState)} - {"cfg"}
    kw = {}
    for k, v in data.items():
        if k not in known:
            raise ValidationError(f"PAYG state: unknown field {k!r}")
        if k in _DT_FIELDS and v is not None:
            v = parse_instant(v)
        elif k in _DEC_FIELDS:
            v = Decimal(v)
        elif k in _DATE_FIELDS and v is not None:
            v = date.fromisoformat(v)
        elif k in ("unreported", "in_flight") and v is not None:
            v = usage_from_json(v)
        kw[k] = v
    return C.AccountState(cfg=cfg, **kw)


def usage_from_json(d: dict) -> C.Usage:
    d = dict(d)
    d["tokens"] = tuple((str(r), int(a)) for r, a in d.get("tokens", ()))
    return C.Usage(**d)


def _atomic_write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, sort_keys=True, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _card_list_to_json(cl: T.CardList) -> dict:
    return {"version": cl.version, "issued_at": _jsonable(cl.issued_at), "signature": cl.signature.hex(),
            "cards": [[c.card_id, c.meter, c.public_key.hex()] for c in cl.cards]}


def _card_list_from_json(d: dict) -> T.CardList:
    return T.CardList(d["version"], parse_instant(d["issued_at"]),
                      tuple(T.CardEntry(c, m, bytes.fromhex(k)) for c, m, k in d["cards"]), bytes.fromhex(d["signature"]))


def _blacklist_to_json(bl: T.Blacklist) -> dict:
    return {"version": bl.version, "issued_at": _jsonable(bl.issued_at), "signature": bl.signature.hex(),
            "card_ids": sorted(bl.card_ids)}


def _blacklist_from_json(d: dict) -> T.Blacklist:
    return T.Blacklist(d["version"], parse_instant(d["issued_at"]), frozenset(d["card_ids"]),
                       bytes.fromhex(d["signature"]))


# --------------------------------------------------------------------------- the shell

class PaygMeter:
    """One PAYG meter at the gateway (imperative shell over `credit` and `tokens`)."""

    def __init__(self, meter_id: str, relay: RelaySwitch, clock: Clock, *, cfg: C.PrepaymentConfig,
                 friendly: FriendlyConfig | None, price: C.Price, head_end_key: T.PublicKey,
                 state_path: str | Path | None = None, publish: Publish | None = None,
                 gateway_id: str = "gateway") -> None:
        self.meter_id, self.relay, self.clock = meter_id, relay, clock
        self.cfg, self.friendly, self.price, self.head_end_key = cfg, friendly, price, head_end_key
        self.state_path = Path(state_path) if state_path else None
        self.publish, self.gateway_id = publish, gateway_id
        self.state = C.AccountState(account=meter_id, cfg=cfg)
        self.window = T.ReplayWindow()
        self.last_import_wh: int | None = None
        self.last_import_at: datetime | None = None   # instant of that reading: charges price [then, now)
        self.command_seq = 0
        self.card_list: T.CardList | None = None
        self.blacklist: T.Blacklist | None = None
        self.journal: list[tuple[C.CreditEvent, str | None]] = []   # (event, relay command id)
        self.unpublished: list[CrmRecord] = []
        self.defer_decisions = False              # True until boot: grants/tokens applied, relay untouched
        # an answer of the head-end said it books used.standing_*: standing charges are deducted only then
        # (an older head-end drops them; until the first answer the days are skipped like fallback days)
        self.headend_books_standing = False
        self._load()

    # ---------------------------------------------------------------- persistence

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        data = json.loads(self.state_path.read_text())
        self.state = state_from_json(data["state"], self.cfg)
        self.window = T.ReplayWindow(data["window"]["floor"], frozenset(data["window"]["seen"]),
                                     data["window"]["size"])
        self.last_import_wh = data["last_import_wh"]
        at = data.get("last_import_at")
        self.last_import_at = parse_instant(at) if at else None
        self.command_seq = data["command_seq"]
        self.headend_books_standing = bool(data.get("headend_books_standing", False))
        self.unpublished = [CrmRecord(r["topic"], r["payload"]) for r in data.get("unpublished", [])]
        if data.get("card_list"):
            self.card_list = _card_list_from_json(data["card_list"])
        if data.get("blacklist"):
            self.blacklist = _blacklist_from_json(data["blacklist"])

    def _save(self) -> None:
        if self.state_path is None:
            return
        _atomic_write(self.state_path, {
            "meter": self.meter_id, "state": state_to_json(self.state),
            "window": {"floor": self.window.floor, "seen": sorted(self.window.seen), "size": self.window.size},
            "last_import_wh": self.last_import_wh, "command_seq": self.command_seq,
            "headend_books_standing": self.headend_books_standing,
            "last_import_at": _jsonable(self.last_import_at) if self.last_import_at else None,
            "unreported": [self.state.unreported.used_minor + (self.state.in_flight or C.Usage()).used_minor,
                           self.state.unreported.used_wh + (self.state.in_flight or C.Usage()).used_wh],
            "unpublished": [{"topic": r.topic, "payload": r.payload} for r in self.unpublished],
            "card_list": _card_list_to_json(self.card_list) if self.card_list else None,
            "blacklist": _blacklist_to_json(self.blacklist) if self.blacklist else None})

    # ---------------------------------------------------------------- events

    def _emit(self, events, command_id: str | None = None) -> None:
        for e in events:
            cid = command_id if isinstance(e, (C.Disconnected, C.Reconnected)) else None
            self.journal.append((e, cid))
            rec = crm_record(e, self.gateway_id, command_id=cid)
            if rec is not None:
                self.unpublished.append(rec)
        self.flush_events()

    def flush_events(self) -> int:
        """Publish pending CRM records in order; those that fail stay queued for the next call."""
        sent = 0
        while self.unpublished and self.publish is not None:
            rec = self.unpublished[0]
            try:
                self.publish(rec.topic, rec.encode())
            except (DeviceError, OSError) as exc:
                log.warning("meter %s: CRM event %s not published yet: %s", self.meter_id, rec.payload["kind"], exc)
                break
            self.unpublished.pop(0)
            sent += 1
        if sent:
            self._save()
        return sent

    # ---------------------------------------------------------------- decisions

    def _enforce(self, decision: C.Decision) -> C.Decision:
        """Switch the relay if the decision says so; keep the old position if the meter cannot be reached."""
        command_id = None
        if decision.switch:
            self.command_seq += 1
            command_id = f"{self.meter_id}-{self.command_seq:06d}-{'close' if decision.relay == 'closed' else 'open'}"
            try:
                self.relay.command(decision.relay, command_id)
            except (DeviceError, ProtocolError) as exc:
                log.error("meter %s: relay command %s failed, will retry at the next evaluation: %s",
                          self.meter_id, command_id, exc)
                self.state = replace(decision.state, relay=self.state.relay)
                self._emit([e for e in decision.events if not isinstance(e, (C.Disconnected, C.Reconnected))])
                self._save()
                return decision
        self.state = decision.state
        self._emit(decision.events, command_id)
        self._save()
        return decision

    def boot(self, import_wh: int | None = None) -> C.Decision:
        """Read the relay, re-evaluate credit at the current instant, and only then switch (if needed)."""
        now = self.clock.now()
        read_back = self.relay.read()
        if import_wh is None:
            self._standing(now)
        else:
            self._charge(import_wh, now)                  # standing days first, then the consumption since
        self.defer_decisions = False
        log.info("meter %s boot: relay reads %s, credit %d, available %d", self.meter_id, read_back,
                 self.state.credit_balance, self.state.available_credit)
        return self._enforce(C.reevaluate(self.state, self.friendly, now, relay_read_back=read_back))

    def _standing(self, now: datetime) -> None:
        """Charge the standing charge of every local day not yet charged (`credit.charge_standing`):
        the pulled tariff's; none while the flat fallback price is in force or while the head-end has
        not said it books standing charges (`headend_books_standing`)."""
        standing = self.price if hasattr(self.price, "standing_gross") and self.headend_books_standing else None
        self.state, events = C.charge_standing(self.state, standing, now)
        self._emit(events)

    def _charge(self, import_wh: int, now: datetime) -> None:
        self._standing(now)
        if self.last_import_wh is None:
            self.last_import_wh, self.last_import_at = import_wh, now
            return
        delta = import_wh - self.last_import_wh
        if delta < 0:
            raise ValidationError(f"meter {self.meter_id}: import register went back from "
                                  f"{self.last_import_wh} to {import_wh} Wh (meter exchange or reset?)")
        self.state, events = C.charge(self.state, delta, self.price, now, since=self.last_import_at,
                                      register=(self.last_import_wh, import_wh))
        self.last_import_wh, self.last_import_at = import_wh, now
        self._emit(events)

    def set_headend_books_standing(self, books: bool) -> None:
        """What the last credit-control answer said (`books_standing_charges`); kept in the state file."""
        if books == self.headend_books_standing:
            return
        self.headend_books_standing = books
        if books:
            log.info("PAYG meter %s: the head-end books standing charges: deducting them from today", self.meter_id)
        else:
            log.warning("PAYG meter %s: the head-end does not book standing charges (an older version): none "
                        "deducted until it does", self.meter_id)
        self._save()

    def set_price(self, price: C.Price, description: str) -> None:
        """Price consumption from the next reading on with `price` (the pulled tariff, or the
        configured flat fallback); logs which one is in force."""
        self.price = price
        log.info("PAYG meter %s: pricing with %s", self.meter_id, description)

    def charge_reading(self, import_wh: int) -> None:
        """Charge a new 1.8.0 value without deciding yet (the shell may ask for a grant first, so an
        exhausted window is refilled before any relay moves); call `evaluate` after."""
        self._charge(import_wh, self.clock.now())
        self._save()

    def on_reading(self, import_wh: int) -> C.Decision:
        """A new 1.8.0 import register value (Wh): charge the consumption since the last one, then decide."""
        now = self.clock.now()
        self._charge(import_wh, now)
        return self.evaluate()

    def usage_report(self) -> C.Usage:
        """The used service units (by source), repayments and tokens since the last report point,
        for the next credit-control update. Sets the report point (`credit.begin_report`); until
        the answer is applied the same report is returned (retransmission)."""
        self.state, usage = C.begin_report(self.state)
        self._save()
        return usage

    def peek_usage(self) -> C.Usage:
        """Everything not yet acknowledged (in-flight report + since), without setting a report point."""
        return (self.state.in_flight or C.Usage()).plus(self.state.unreported)

    def acknowledge(self, balance_minor: int | None = None,
                    arrears_minor: int | None = None) -> list[C.CreditEvent]:
        """The head-end answered the in-flight report without a grant: the old window is given back.
        `balance_minor`: the customer's prepaid balance the answer reported; `arrears_minor`: the
        head-end's arrears outstanding (None: keep)."""
        return self._then_decide(*C.acknowledge(self.state, self.clock.now(), balance_minor=balance_minor,
                                                arrears_minor=arrears_minor))

    def set_reported_balance(self, balance_minor: int, arrears_minor: int | None = None) -> None:
        """The customer's balance (and arrears) from an answer that booked nothing (no report in flight)."""
        self.state = C.set_reported_balance(self.state, balance_minor, arrears_minor)
        self._save()

    def abandon_report(self) -> None:
        """The head-end lost the session: the in-flight usage goes into the next session's first update."""
        self.state = C.abandon_report(self.state)
        self._save()

    def evaluate(self) -> C.Decision:
        now = self.clock.now()
        self._standing(now)
        return self._enforce(C.decide_supply(self.state, self.friendly, now))

    def _then_decide(self, new_state: C.AccountState, events) -> list[C.CreditEvent]:
        self.state = new_state
        self._emit(events)
        if self.defer_decisions:
            self._save()
            return list(events)
        decision = self.evaluate()
        return list(events) + list(decision.events)

    def apply_grant(self, grant: C.Grant) -> list[C.CreditEvent]:
        return self._then_decide(*C.apply_grant(self.state, grant, self.clock.now()))

    def enter_token(self, text: str) -> list[C.CreditEvent]:
        """A top-up token typed in or received: verified, applied once, then the supply re-evaluated."""
        token = T.TopUpToken.decode(text)
        state, self.window, events = T.apply_token(self.state, self.window, token, self.head_end_key,
                                                   self.clock.now())
        for e in events:
            if isinstance(e, C.TopUpRefused):
                log.warning("meter %s: top-up token %s refused: %s", self.meter_id, e.reference, e.reason)
        return self._then_decide(state, events)

    def set_card_lists(self, card_list: T.CardList, blacklist: T.Blacklist) -> None:
        """Install the signed card list and blacklist pulled at the last sync (kept only if they verify
        and are not older than the ones held)."""
        if not T.verify_ed25519(self.head_end_key, blacklist.signing_bytes(), blacklist.signature):
            raise ValidationError(f"meter {self.meter_id}: blacklist version {blacklist.version} is not signed "
                                  f"by the head-end")
        if not T.verify_ed25519(self.head_end_key, card_list.signing_bytes(), card_list.signature):
            raise ValidationError(f"meter {self.meter_id}: card list version {card_list.version} is not signed "
                                  f"by the head-end")
        if self.blacklist is None or blacklist.version >= self.blacklist.version:
            self.blacklist = blacklist
        if self.card_list is None or card_list.version >= self.card_list.version:
            self.card_list = card_list
        self._save()

    def card_topup(self, topup: T.CardTopUp, expected_nonce: bytes | None, *,
                   decide: bool = True) -> list[C.CreditEvent]:
        """Offline card top-up against the last signed card list and blacklist. `decide=False`
        (a card terminal's thread): credit only, the relay is left to the next `evaluate`."""
        if self.card_list is None or self.blacklist is None:
            ev = C.TopUpRefused(account=self.meter_id, at=self.clock.now(), reference=topup.reference,
                                amount_minor=topup.challenge.amount_minor, reason="card_list_unverified")
            self._emit([ev])
            self._save()
            return [ev]
        state, events = T.card_topup(self.state, topup, expected_nonce, self.card_list, self.blacklist,
                                     self.head_end_key, self.clock.now())
        for e in events:
            if isinstance(e, C.TopUpRefused):
                log.warning("meter %s: card top-up %s refused: %s", self.meter_id, e.reference, e.reason)
            elif isinstance(e, C.TopUpApplied):
                log.info("meter %s: card top-up %s of %d applied", self.meter_id, e.reference, e.amount_minor)
        if not decide:
            self.state = state
            self._emit(events)
            self._save()
            return list(events)
        return self._then_decide(state, events)

    def accept_emergency_credit(self) -> list[C.CreditEvent]:
        return self._then_decide(*C.accept_emergency_credit(self.state, self.clock.now()))

    def confirm_reconnect(self) -> list[C.CreditEvent]:
        return self._then_decide(*C.confirm_reconnect(self.state, self.clock.now()))


# --------------------------------------------------------------------------- CLI (meterlink-gateway payg ...)

def status(state_path: str | Path) -> dict:
    """What a PAYG meter's state file says: credit, emergency credit, debt, relay, pending reports."""
    path = Path(state_path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read the PAYG state file: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{path}:{exc.lineno}: not a PAYG state file: {exc.msg}") from None
    st = state_from_json(data["state"], C.PrepaymentConfig())
    return {"meter": data.get("meter", st.account), "at": data["state"].get("at"), "relay": st.relay,
            "credit_balance_minor": st.credit_balance, "granted_wh": st.granted_wh,
            "emergency_credit": {"offered": st.emergency_credit_offered, "accepted": st.emergency_credit_accepted,
                                 "used_minor": st.emergency_credit_used},
            "accumulated_debt_minor": st.accumulated_debt, "arrears_minor": st.arrears,
            "standing_charged_through": data["state"].get("standing_charged_through"),
            "headend_books_standing": bool(data.get("headend_books_standing", False)),
            "grant": {"session": st.grant_session, "request_number": st.grant_number,
                      "valid_until": data["state"].get("grant_valid_until")},
            "unreported_usage": {"minor": data.get("unreported", [0, 0])[0], "wh": data.get("unreported", [0, 0])[1]},
            "report_in_flight": st.in_flight is not None,
            "unpublished_crm_events": len(data.get("unpublished", [])),
            "relay_commands": data.get("command_seq", 0),
            "blacklist_version": (data.get("blacklist") or {}).get("version"),
            "card_list_version": (data.get("card_list") or {}).get("version")}


def _cmd_status(args) -> int:
    info = status(args.state)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ec = info["emergency_credit"]
    print(f"meter {info['meter']} at {info['at']}: relay {info['relay']}")
    print(f"  credit {info['credit_balance_minor']} minor, granted {info['granted_wh']} Wh, debt "
          f"{info['accumulated_debt_minor']}, arrears {info['arrears_minor']}")
    print(f"  emergency credit: offered {ec['offered']}, accepted {ec['accepted']}, used {ec['used_minor']}")
    if info["standing_charged_through"]:
        print(f"  standing charge charged through {info['standing_charged_through']} (local day)")
    if not info["headend_books_standing"]:
        print("  standing charges not deducted: no answer yet from a head-end that books them")
    print(f"  unreported usage {info['unreported_usage']['minor']} minor / {info['unreported_usage']['wh']} Wh, "
          f"{info['unpublished_crm_events']} CRM event(s) waiting")
    return 0


CUSTOMER_REQUESTS = ("accept-emergency-credit", "confirm-reconnect")


def request_path(state_dir: str | Path, meter_id: str, request: str) -> Path:
    """The marker file a customer request leaves for the running daemon (picked up at the next poll)."""
    if request not in CUSTOMER_REQUESTS:
        raise ValidationError(f"unknown customer request {request!r} (known: {', '.join(CUSTOMER_REQUESTS)})")
    return Path(state_dir) / f"{meter_id}.{request}"


def _cmd_request(args) -> int:
    path = request_path(args.state_dir, args.meter, args.payg_command)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    print(f"meter {args.meter}: {args.payg_command} requested; the daemon applies it at the next poll ({path})")
    return 0


def _cmd_card_challenge(args) -> int:
    from .cardterminal import request
    answer = request(args.socket, {"op": "challenge", "meter": args.meter, "amount_minor": args.amount})
    if not answer.get("ok"):
        raise ValidationError(f"card terminal: {answer.get('error')}")
    print(json.dumps(answer, indent=None if args.json else 2, sort_keys=True))
    return 0


def _cmd_card_topup(args) -> int:
    """Submit a card's signed answer (or, with --card-key, be a software card: challenge, sign, submit)."""
    from meterlink import pki

    from .cardterminal import challenge_from_json, request
    if args.card_key:
        if args.amount is None:
            raise ValidationError("--card-key needs --amount (the top-up the card is asked to sign)")
        path = Path(args.card_key)
        try:
            key = pki.load_private_key(path.read_bytes(), str(path))
        except OSError as exc:
            raise ValidationError(f"{path}: cannot read the card key: {exc.strerror}") from None
        got = request(args.socket, {"op": "challenge", "meter": args.meter, "amount_minor": args.amount})
        if not got.get("ok"):
            raise ValidationError(f"card terminal: {got.get('error')}")
        ch = challenge_from_json(got["challenge"])
        nonce, signature = ch.nonce.hex(), T.sign_ed25519(key, ch.signing_bytes()).hex()
    elif args.nonce and args.signature:
        nonce, signature = args.nonce, args.signature
    else:
        raise ValidationError("give --nonce and --signature (from the card), or --card-key and --amount")
    answer = request(args.socket, {"op": "topup", "meter": args.meter, "card_id": args.card, "nonce": nonce,
                                   "signature": signature})
    if not answer.get("ok"):
        raise ValidationError(f"card terminal: {answer.get('error')}")
    if args.json:
        print(json.dumps(answer, sort_keys=True))
    elif answer["applied"]:
        print(f"meter {args.meter}: card top-up {answer['reference']} of {answer['amount_minor']} applied; "
              f"credit {answer['credit_balance_minor']} (the supply is re-evaluated at once)")
    else:
        print(f"meter {args.meter}: card top-up {answer['reference']} refused: {answer['reason']}")
    return 0 if answer["applied"] else 3


def add_parsers(sub) -> None:
    payg = sub.add_parser("payg", help="pay-as-you-go meters held by this gateway (status, customer requests, card top-ups)",
                          epilog="example: meterlink-gateway payg status --state var/payg/MTR-0001.json")
    psub = payg.add_subparsers(dest="payg_command", required=True)
    st = psub.add_parser("status", help="credit, emergency credit, debt and relay of one PAYG meter",
                         epilog="example: meterlink-gateway payg status --state var/payg/MTR-0001.json --json")
    st.add_argument("--state", required=True, help="the meter's PAYG state file")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
    for name, what in (("accept-emergency-credit", "the customer activates the offered emergency credit"),
                       ("confirm-reconnect", "the customer confirms re-arming the supply (reconnect = customer_confirms)")):
        rq = psub.add_parser(name, help=what + " (the running daemon applies it at the next poll)",
                             epilog=f"example: meterlink-gateway payg {name} --meter MTR-0001 --state-dir var/payg")
        rq.add_argument("--meter", required=True)
        rq.add_argument("--state-dir", default="var/payg", help="the [[payg]] state_dir (default var/payg)")
        rq.set_defaults(func=_cmd_request)
    cc = psub.add_parser("card-challenge",
                         help="ask the running daemon for a card challenge (what the card must sign) over its card_socket",
                         epilog="example: meterlink-gateway payg card-challenge --socket /run/meterlink/cards.sock "
                                "--meter MTR-0001 --amount 500")
    cc.add_argument("--socket", required=True, help="the [[payg]] card_socket of the running daemon")
    cc.add_argument("--meter", required=True)
    cc.add_argument("--amount", type=int, required=True, help="top-up in minor units (e.g. 500 = 5.00)")
    cc.add_argument("--json", action="store_true", help="one line of JSON")
    cc.set_defaults(func=_cmd_card_challenge)
    ct = psub.add_parser("card-topup",
                         help="top up at the gateway with a card (offline too): the daemon checks the card's "
                              "signature and its last signed blacklist; exit 0 applied, 3 refused",
                         epilog="example: meterlink-gateway payg card-topup --socket /run/meterlink/cards.sock "
                                "--meter MTR-0001 --card CARD-0042 --nonce 5f0c... --signature 9a1b...")
    ct.add_argument("--socket", required=True, help="the [[payg]] card_socket of the running daemon")
    ct.add_argument("--meter", required=True)
    ct.add_argument("--card", required=True, help="card id")
    ct.add_argument("--nonce", help="the challenge's nonce (hex, from card-challenge)")
    ct.add_argument("--signature", help="the card's Ed25519 signature of the challenge message (hex)")
    ct.add_argument("--card-key", help="software card: Ed25519 PEM key that signs a fresh challenge (tests, demos)")
    ct.add_argument("--amount", type=int, help="with --card-key: top-up in minor units")
    ct.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    ct.set_defaults(func=_cmd_card_topup)


__all__ = ["CRM_KINDS", "CRM_TOPIC_PREFIX", "CrmRecord", "MqttPublisher", "PaygMeter", "RelayOutcome", "RelaySwitch",
           "add_parsers", "crm_record", "price_from_tariff", "read_import_wh", "request_path", "status",
           "state_from_json", "state_to_json"]
