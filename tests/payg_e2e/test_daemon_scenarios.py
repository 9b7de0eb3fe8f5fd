"""Acceptance scenarios 1-4 of issue 6 as daemon runs: the real `Gateway.run` (bus scheduler thread,
journal writer, push thread, PAYG sync worker, card socket) with a firmware-sim SDM630 (relay coil)
over Modbus TCP, enrolled at the real head-end (sync + PAYG services over mutual TLS, SQLite), on
ONE simulated clock shared by gateway, meter and head-end.

The test takes part in the lock step of simulated time (`LockstepSleeper`): time moves only while
the test waits (`Daemon.step_to`), so what it inspects between steps is quiescent, and what it does
(sell, blacklist, accept emergency credit through the CLI, top up at the card socket) happens at an
instant of its choosing.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import Event
from meterlink.clock import from_ms, parse_instant, to_ms
from meterlink.gateway import scheduler as sched
from meterlink.gateway import tokens as T
from meterlink.gateway.cardterminal import challenge_from_json, request
from meterlink.gateway.config import load_config
from meterlink.gateway.daemon import Gateway
from meterlink.gateway.payg import usage_from_json
from meterlink.gateway.profiles import load_profile
from meterlink.headend import ledger as L
from meterlink.headend import vendors as V
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer
from meterlink.v1 import payg_pb2, payg_pb2_grpc

from .processes import BIN, wait_until

UTC = timezone.utc
LONDON = ZoneInfo("Europe/London")
FRIENDLY = ('[friendly_credit]\ntimezone = "Europe/London"\ncountry = "GB"\npublic_holidays = false\n'
            'windows = [{ days = ["weekday"], start = "18:00", end = "10:00" }, '
            '{ days = ["weekend"], start = "00:00", end = "24:00" }]\n')


def next_local(after: datetime, weekday: int, hour: int) -> datetime:
    """The first `weekday` (0 = Monday) at `hour`:00 London time at least a day after `after`, in UTC."""
    d = after.astimezone(LONDON).date() + timedelta(days=1)
    while d.weekday() != weekday:
        d += timedelta(days=1)
    return datetime(d.year, d.month, d.day, hour, tzinfo=LONDON).astimezone(UTC)


def local(day: datetime, hour: int, minute: int = 0) -> datetime:
    d = day.astimezone(LONDON).date()
    return datetime(d.year, d.month, d.day, hour, minute, tzinfo=LONDON).astimezone(UTC)


class Daemon:
    """`meterlink-gateway run`'s `Gateway.run` in a thread, enrolled at the fixture's head-end."""

    def __init__(self, hd, tmp_path: Path, monkeypatch, *, start: datetime, market: str, balance: int,
                 cards: dict[str, Ed25519PrivateKey] = {}, poll_s: int = 900, price: str = "100",
                 sync_s: int | None = None) -> None:
        self.hd, self.tmp_path = hd, tmp_path
        identity = hd.enrolled(tmp_path, "GW-S", meters=["S-1"],     # certificates: real time
                               signing_key_path=tmp_path / "signing.key")   # the key the daemon signs with
        self.identity = identity
        hd.store.bind_meter("S-1", "ACC1", hd.clock.now())
        if balance:
            hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", balance, "GBP", hd.store.vat)])
        for card_id, key in cards.items():
            hd.store.register_card(card_id, "ACC1", T.public_bytes(key), hd.clock.now())
        hd.clock.set(start)
        self.meter = MeterModel.starting_at(load_profile("eastron_sdm630"), hd.clock, unit=1, seed=3, import_wh=10_000)
        self.server = TcpServer({1: self.meter}).start()
        self.sock = tmp_path / "cards.sock"
        self.state_dir = tmp_path / "payg"
        (tmp_path / "market.toml").write_text(market)
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(
            f'[gateway]\nid = "GW-S"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = {poll_s}\n'
            f'\n[headend]\naddress = "{hd.address}"\npki_dir = "{identity.state_dir}"\n'
            f'\n[[bus]]\nport = "tcp://{self.server.address}"\ntimeout_s = 1.0\n'
            f'\n[[bus.meter]]\nid = "S-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
            f'\n[[payg]]\nmeter_id = "S-1"\naccount = "ACC1"\nprice_minor_per_kwh = "{price}"\nmarket = "market.toml"\n'
            f'token_public_key = "{T.public_bytes(hd.token_key).hex()}"\nstate_dir = "{self.state_dir}"\n'
            f'card_socket = "{self.sock}"\nsync_s = {sync_s or poll_s}\ntimeout_s = 2\n')
        self.gw = Gateway(load_config(str(cfg)), hd.clock)
        self.hook = self.gw.payg
        self.pm = self.hook.meters["S-1"]
        self.sleeper = sched.LockstepSleeper(hd.clock)
        self.sleeper.join()                                   # simulated time waits for the test
        monkeypatch.setattr(sched, "make_sleeper", lambda clock: self.sleeper)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.gw.run, args=(self.stop_event,), daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.gw.workers and all(w.thread.is_alive() for w in self.gw.workers)), \
            "the daemon did not start"

    def step_to(self, when: datetime) -> None:
        """Let simulated time run to `when` (everything due before it is done when this returns)."""
        self.sleeper.sleep_until(when, threading.Event())

    def events(self, kind: str | None = None) -> list[dict]:
        return [dict(json.loads(r.body.payload), _kind=r.body.kind) for r in self.gw.journal.records()
                if isinstance(r.body, Event) and (kind is None or r.body.kind == kind)]

    def headend_events(self, kind: str) -> list[dict]:
        with sqlite3.connect(self.tmp_path / "headend.db") as c:
            return [json.loads(p) for (p,) in c.execute(
                "SELECT payload FROM gateway_event WHERE gateway_id = 'GW-S' AND meter_id = 'S-1' AND kind = ?",
                (kind,))]

    def card_topup(self, card_id: str, key: Ed25519PrivateKey, amount: int) -> dict:
        ch = challenge_from_json(request(self.sock, {"op": "challenge", "meter": "S-1",
                                                     "amount_minor": amount})["challenge"])
        return request(self.sock, {"op": "topup", "meter": "S-1", "card_id": card_id, "nonce": ch.nonce.hex(),
                                   "signature": T.sign_ed25519(key, ch.signing_bytes()).hex()})

    def pending(self):
        """What the gateway has charged/applied and not yet had answered by the head-end."""
        st = json.loads((self.state_dir / "S-1.json").read_text())["state"]
        usage = usage_from_json(st["unreported"])
        return usage.plus(usage_from_json(st["in_flight"])) if st.get("in_flight") else usage

    def close(self) -> None:
        self.stop_event.set()
        for w in self.gw.workers:
            w.wake.set()
        self.sleeper.leave()
        self.thread.join(30)
        self.gw.close()
        self.server.stop()


def at(event: dict) -> datetime:
    return parse_instant(event["at"])


def sell(hd, card_key, sale_id: str, amount: int, card_id: str = "CARD1"):
    """A vendor sale over the real Vending service (mutual TLS with vendor SHOP1's certificate), for meter S-1."""
    channel = hd.vendor_channel("SHOP1")
    try:
        stub = payg_pb2_grpc.VendingStub(channel)
        challenge = stub.Challenge(payg_pb2.ChallengeRequest(vendor_id="SHOP1"), timeout=5).challenge
        msg = V.sale_challenge_message(challenge, sale_id, "SHOP1", card_id, "ACC1", amount, "GBP")
        return stub.Authorise(payg_pb2.AuthoriseRequest(
            vendor_id="SHOP1", sale_id=sale_id, card_id=card_id, account_id="ACC1", amount_minor=amount,
            currency="GBP", challenge=challenge, card_signature=T.sign_ed25519(card_key, msg), meter_id="S-1"),
            timeout=5)
    finally:
        channel.close()


# --------------------------------------------------------------------------- scenario 1

def test_scenario_1_credit_out_on_friday_night_keeps_the_relay_closed_until_monday_10(payg_headend, tmp_path,
                                                                                       monkeypatch):
    hd = payg_headend
    friday = next_local(hd.clock.now(), 4, 21)                 # Friday 21:00 London: inside the friendly period
    monday_10 = local(friday + timedelta(days=3), 10)
    d = Daemon(hd, tmp_path, monkeypatch, start=friday, market="[prepayment]\n" + FRIENDLY, balance=80,
               poll_s=3600)                               # hourly polls: Monday 10:00 is one
    try:
        d.step_to(local(friday, 23, 59) + timedelta(seconds=1))
        [warning] = d.events("credit.friendly_period_warning")
        assert friday < at(warning) <= local(friday, 23)       # credit ran out on Friday night...
        assert parse_instant(warning["period_end"]) == monday_10
        assert d.events("relay.open") == [] and d.meter.relay_closed   # ...and the supply stays on
        debt_saturday = d.pm.state.accumulated_debt
        assert debt_saturday > 0
        d.step_to(monday_10 - timedelta(minutes=59))
        assert d.events("relay.open") == [] and d.meter.relay_closed and d.pm.state.relay == "closed"
        assert d.pm.state.accumulated_debt > debt_saturday     # debt accrued over the weekend
        assert len(d.events("credit.friendly_period_warning")) == 1
        d.step_to(monday_10 + timedelta(minutes=1))
        [opened] = d.events("relay.open")
        assert at(opened) == monday_10 and opened["reason"] == "friendly_period_ended"
        assert not d.meter.relay_closed and d.pm.state.relay == "open"
        assert d.pm.state.emergency_credit_used == 0           # offered, never accepted, never used
        # the head-end booked the reported consumption as debt: its debt account and the gateway agree
        assert wait_until(lambda: d.pm.state.in_flight is None, 5)
        ledger = list(hd.store.transactions())
        pending = d.pending()
        assert (L.balance(ledger, L.debt("ACC1"), "GBP") + pending.to_debt - pending.repaid_debt
                == d.pm.state.accumulated_debt)
        assert L.totals_by_currency(ledger) == {"GBP": 0}
        d.step_to(monday_10 + timedelta(hours=1, minutes=1))      # the next poll's push carries the event
        assert wait_until(lambda: any(e["reason"] == "friendly_period_ended" for e in d.headend_events("relay.open")))
    finally:
        d.close()


# --------------------------------------------------------------------------- scenarios 2 and 3

EMERGENCY = "[prepayment]\nemergency_credit_limit = 60\nemergency_credit_threshold = 100\nmax_credit_balance = 2000\n"
QUARTER = timedelta(minutes=15)


def step_until(d: Daemon, t: datetime, condition, limit: datetime) -> datetime:
    """Step poll by poll (15 min, just after each poll) until `condition()`; returns the instant reached."""
    while not condition():
        assert t < limit, "condition never met"
        t += QUARTER
        d.step_to(t)
    return t


def accept_emergency_credit(d: Daemon) -> None:
    out = subprocess.run([str(BIN / "meterlink-gateway"), "payg", "accept-emergency-credit", "--meter", "S-1",
                          "--state-dir", str(d.state_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_scenario_2_emergency_credit_is_used_only_after_acceptance_and_its_exhaustion_reaches_the_headend(
        payg_headend, tmp_path, monkeypatch):
    hd = payg_headend
    tuesday = next_local(hd.clock.now(), 1, 12)                # Tuesday noon: no friendly period until 18:00
    evening = local(tuesday, 18)
    d = Daemon(hd, tmp_path, monkeypatch, start=tuesday, market=EMERGENCY + FRIENDLY, balance=120)
    pm = d.pm
    try:
        t = step_until(d, tuesday + timedelta(seconds=1), lambda: pm.state.emergency_credit_offered, evening)
        assert d.events("credit.emergency_credit_offered") and not pm.state.emergency_credit_accepted
        # offered, not accepted: it is not used — the window runs out and the relay opens
        t = step_until(d, t, lambda: pm.state.relay == "open", evening)
        [opened] = d.events("relay.open")
        assert opened["reason"] == "credit_exhausted" and not d.meter.relay_closed
        assert pm.state.emergency_credit_used == 0 and d.events("credit.emergency_credit_taken") == []
        # the customer accepts (CLI request file): picked up at the next poll, the supply is re-armed
        accept_emergency_credit(d)
        t += QUARTER
        d.step_to(t)
        assert pm.state.emergency_credit_accepted and d.meter.relay_closed and pm.state.relay == "closed"
        [taken] = d.events("credit.emergency_credit_taken")
        assert taken["amount_minor"] == 60
        # used up outside friendly hours: the relay opens again
        t = step_until(d, t, lambda: pm.state.relay == "open", evening)
        opens = d.events("relay.open")
        assert [o["reason"] for o in opens] == ["credit_exhausted", "emergency_credit_exhausted"]
        assert at(opens[-1]) < evening and not d.meter.relay_closed
        # used up: emergency credit (60, less what it had to cover of the first step's overrun) and debt
        used = pm.state.emergency_credit_used
        assert used > 0 and pm.state.available_credit <= 0 and used + pm.state.accumulated_debt >= 60
        # the event reaches the head-end (hash-chained journal, pushed with the next poll's readings),
        # and the emergency credit the reports drew is on the head-end's emergency-credit account
        d.step_to(t + QUARTER)
        assert wait_until(lambda: [e["reason"] for e in d.headend_events("relay.open")]
                          == ["credit_exhausted", "emergency_credit_exhausted"])
        ledger = list(hd.store.transactions())
        pending = d.pending()
        assert (L.balance(ledger, L.emergency_credit_account("ACC1"), "GBP") + pending.from_emergency
                - pending.repaid_emergency == used)
        assert L.totals_by_currency(ledger) == {"GBP": 0}
    finally:
        d.close()


CARD = Ed25519PrivateKey.generate()


def test_scenario_3_a_top_up_with_debt_is_split_in_order_and_one_over_the_maximum_is_refused_whole(
        payg_headend, tmp_path, monkeypatch):
    hd = payg_headend
    tuesday = next_local(hd.clock.now(), 1, 12)
    evening = local(tuesday, 18)
    hd.store.put_account("ACC1", "GBP", max_balance_minor=5_000)    # the account's maximum balance: 50.00
    d = Daemon(hd, tmp_path, monkeypatch, start=tuesday, market=EMERGENCY + FRIENDLY, balance=120,
               cards={"CARD1": CARD})
    pm = d.pm
    try:
        t = step_until(d, tuesday + timedelta(seconds=1), lambda: pm.state.emergency_credit_offered, evening)
        accept_emergency_credit(d)
        t = step_until(d, t, lambda: pm.state.relay == "open" and pm.state.emergency_credit_accepted, evening)
        debt, emergency = pm.state.accumulated_debt, pm.state.emergency_credit_used
        assert emergency > 0 and debt > 0                       # the last step overran the emergency credit
        # a top-up of 10.00 sold at the head-end (Vending over mutual TLS); its token comes with the next answer
        reply = sell(hd, CARD, "S-1", 1_000)
        assert reply.authorised and reply.token
        t += QUARTER
        d.step_to(t)
        [applied] = d.events("credit.top_up_applied")
        assert (applied["to_debt_recovery"], applied["to_accumulated_debt"], applied["to_emergency_credit"],
                applied["to_credit"]) == (0, debt, emergency, 1_000 - debt - emergency)
        assert (pm.state.accumulated_debt, pm.state.emergency_credit_used) == (0, 0)
        # re-armed at once: the relay closed at the instant the token was applied
        close = d.events("relay.close")[-1]
        assert close["reason"] == "credit_restored" and at(close) == at(applied) and d.meter.relay_closed
        # over the maximum balance: refused whole, at the head-end (no money moves) ...
        before = [tx.business_key for tx in hd.store.transactions()]
        prepaid = L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP")
        refused = sell(hd, CARD, "S-2", 5_000 - prepaid + 1)
        assert not refused.authorised and refused.reason == V.RefusalReason.MAX_BALANCE.value
        assert [tx.business_key for tx in hd.store.transactions()] == before
        # ... and at the gateway: a card top-up that would take the window over max_credit_balance (20.00)
        window, tokens = pm.state.credit_balance, pm.peek_usage().tokens
        answer = d.card_topup("CARD1", CARD, 2_000 - window + 1)
        assert answer["applied"] is False and answer["reason"] == "over_maximum_credit"
        assert pm.state.credit_balance == window and pm.peek_usage().tokens == tokens    # nothing applied
        answer = d.card_topup("CARD1", CARD, 2_000 - window)     # exactly up to the maximum: applied whole
        assert answer["applied"] and pm.state.credit_balance == 2_000
    finally:
        d.close()


RECOVERY = 'payment_recovery_percent = 25\npayment_recovery_cap = 200\nrecovery_period = "week"\n'


def test_scenario_3_arrears_registered_at_the_headend_are_recovered_first_and_booked_once(
        payg_headend, tmp_path, monkeypatch):
    """Arrears booked centrally reach the gateway in the credit-control answers; a top-up is split
    recovery (25 %, capped at 2.00 a week) -> debt -> emergency credit -> balance; the report carrying
    the recovery is booked once and both sides agree to the minor unit afterwards."""
    hd = payg_headend
    tuesday = next_local(hd.clock.now(), 1, 12)
    evening = local(tuesday, 18)
    hd.store.register_arrears("ACC1", "previous-supply", 1_000, hd.clock.now(), "debt from the previous supply")
    d = Daemon(hd, tmp_path, monkeypatch, start=tuesday, market=EMERGENCY + RECOVERY + FRIENDLY, balance=120,
               cards={"CARD1": CARD})
    pm = d.pm
    try:
        t = step_until(d, tuesday + timedelta(seconds=1), lambda: pm.state.emergency_credit_offered, evening)
        assert pm.state.arrears == 1_000                        # the head-end's register, from an answer
        accept_emergency_credit(d)
        t = step_until(d, t, lambda: pm.state.relay == "open" and pm.state.emergency_credit_accepted, evening)
        debt, emergency = pm.state.accumulated_debt, pm.state.emergency_credit_used
        assert emergency > 0 and debt > 0
        reply = sell(hd, CARD, "S-1", 1_000)
        assert reply.authorised and reply.token
        t += QUARTER
        d.step_to(t)
        [applied] = d.events("credit.top_up_applied")
        assert (applied["to_debt_recovery"], applied["to_accumulated_debt"], applied["to_emergency_credit"],
                applied["to_credit"]) == (200, debt, emergency, 1_000 - 200 - debt - emergency)
        assert pm.state.arrears == 800 and d.meter.relay_closed
        t += QUARTER
        d.step_to(t)                                            # the next report carries the recovery
        pending = d.pending()
        assert pending.recovered_arrears == 0                   # reported and answered
        txns = list(hd.store.transactions())
        recoveries = [tx for tx in txns if tx.kind == "arrears-recovery"]
        assert sum(tx.amount(L.prepaid("ACC1")) for tx in recoveries) == 200     # booked once
        assert hd.store.arrears("ACC1", "GBP") == 800 == pm.state.arrears
        # both sides agree to the minor unit: debt, emergency credit, the prepaid balance
        assert hd.store.balance(L.debt("ACC1"), "GBP") == \
            pm.state.accumulated_debt - pending.to_debt + pending.repaid_debt
        assert hd.store.balance(L.emergency_credit_account("ACC1"), "GBP") == \
            pm.state.emergency_credit_used - pending.from_emergency + pending.repaid_emergency
        assert pm.state.reported_balance == -hd.store.balance(L.prepaid("ACC1"), "GBP")
        assert L.totals_by_currency(txns) == {"GBP": 0}
    finally:
        d.close()


# --------------------------------------------------------------------------- scenario 4

OTHER = Ed25519PrivateKey.generate()


def test_scenario_4_a_blacklisted_card_is_refused_online_the_instant_after_and_offline_from_the_last_list(
        payg_headend, tmp_path, monkeypatch):
    hd = payg_headend
    wednesday = next_local(hd.clock.now(), 2, 12)
    d = Daemon(hd, tmp_path, monkeypatch, start=wednesday, market="[prepayment]\n", balance=500,
               cards={"CARD1": CARD, "CARD2": OTHER})
    pm = d.pm
    try:
        t = wednesday + QUARTER + timedelta(seconds=1)
        d.step_to(t)                                       # boot and a poll, online: signed card lists held
        assert d.hook.online["S-1"] and pm.blacklist is not None and pm.blacklist.card_ids == frozenset()
        assert pm.card_list.find("CARD1") and d.meter.relay_closed
        # online: CARD1 is blacklisted at B; a sale at B + 1 ms is refused, and no money moves
        b = from_ms(to_ms(hd.clock.now()))
        hd.store.blacklist_card("CARD1", b, "stolen")
        hd.clock.set(b + timedelta(milliseconds=1))
        before = [(tx.business_key, tx.postings) for tx in hd.store.transactions()]
        reply = sell(hd, CARD, "S-1", 500)
        assert not reply.authorised and reply.reason == V.RefusalReason.CARD_BLACKLISTED.value
        assert [(tx.business_key, tx.postings) for tx in hd.store.transactions()] == before
        # the next credit-control answer carries the new signed blacklist to the gateway
        t += QUARTER
        d.step_to(t)
        assert pm.blacklist.card_ids == frozenset({"CARD1"})
        # the head-end goes away: the running gateway refuses the card from its last blacklist
        hd.servers.stop(None)
        t += QUARTER
        d.step_to(t)
        assert wait_until(lambda: d.hook.online["S-1"] is False, 5)
        window = pm.state.credit_balance
        refused = d.card_topup("CARD1", CARD, 300)
        assert refused["applied"] is False and refused["reason"] == "blacklisted"
        assert pm.state.credit_balance == window and pm.peek_usage().tokens == ()
        [logged] = d.events("credit.top_up_refused")
        assert logged["reason"] == "blacklisted" and logged["reference"] == refused["reference"]
        assert [r.payload["card_id"] for r in pm.unpublished if r.payload["kind"] == "blacklisted_card_attempt"] \
            == ["CARD1"]                                   # the CRM event waits for a broker (none configured)
        # the gateway is really offline and working: another card of the account is taken
        ok = d.card_topup("CARD2", OTHER, 300)
        assert ok["applied"] and pm.state.credit_balance == window + 300
    finally:
        d.close()


# --------------------------------------------------------------------------- no flapping while online

def test_online_a_used_up_window_is_refilled_by_the_next_grant_before_the_relay_moves(payg_headend, tmp_path,
                                                                                      monkeypatch):
    """The bus thread decides locally, but while the head-end answers an OPEN decision waits for the
    answer the used-up window asked for: with money left at the head-end the relay never opens
    between grants (grants of at most 6.00 out of a 20.00 balance); it opens once, when the
    balance is spent."""
    hd = payg_headend
    tuesday = next_local(hd.clock.now(), 1, 11)                # Tuesday 11:00 - 18:00: no friendly period
    d = Daemon(hd, tmp_path, monkeypatch, start=tuesday, market="[prepayment]\nemergency_credit_threshold = 0\n",
               balance=2_000, price="1000",                     # 10.00/kWh: a 6.00 grant lasts about an hour
               sync_s=6 * 3600)                                 # no routine exchange: each window is used up
    pm = d.pm
    try:
        step_until(d, tuesday + timedelta(seconds=1), lambda: pm.state.relay == "open", local(tuesday, 18))
        grants = d.events("credit.grant_applied")
        assert len(grants) >= 3 and sum(g["amount_minor"] for g in grants) >= 2_000
        [opened] = d.events("relay.open")                      # once, at the end: never between grants
        assert opened["reason"] == "credit_exhausted" and d.events("relay.close") == []
        assert at(opened) > at(grants[-1])
        assert L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP") <= 0 or pm.state.in_flight
    finally:
        d.close()
