"""CRM events from the gateway PAYG shell, published through a real Mosquitto broker."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.clock import SimClock
from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway import tokens as T
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer

UTC = timezone.utc
HEAD_END = Ed25519PrivateKey.generate()
CARD = Ed25519PrivateKey.generate()


@pytest.fixture
def rig(tmp_path):
    clock = SimClock(datetime(2026, 3, 9, 11, tzinfo=UTC))
    profile = load_profile("eastron_sdm630")
    meter = MeterModel.starting_at(profile, clock, unit=1, seed=3, import_wh=10_000)
    server = TcpServer({1: meter}).start()
    master = open_master(f"tcp://{server.address}")
    yield clock, profile, meter, master
    master.close()
    server.stop()


def test_every_crm_event_kind_reaches_the_broker_with_its_documented_payload(rig, mqtt_broker, subscriber, tmp_path):
    clock, profile, meter, master = rig
    meter_id = f"M-{uuid.uuid4().hex[:8]}"
    sub = subscriber(f"meterlink/v1/crm/+/{meter_id}")
    publisher = P.MqttPublisher(*mqtt_broker, client_id=f"gw-{meter_id}")
    try:
        pm = P.PaygMeter(meter_id, P.RelaySwitch(master, 1, profile.relay_coil, meter_id=meter_id), clock,
                         cfg=C.PrepaymentConfig(), friendly=None, price=Decimal(300),
                         head_end_key=T.public_bytes(HEAD_END), publish=publisher, gateway_id="GW-TEST")
        pm.boot(P.read_import_wh(master, 1, profile))

        def token(n, amount):
            return T.TopUpToken(f"tok-{n}", meter_id, n, amount, "GBP", clock.now(),
                                clock.now() + timedelta(days=1)).signed(HEAD_END).encode()

        pm.enter_token(token(1, 200))                                   # low balance, reconnected
        for _ in range(40):
            clock.advance(timedelta(minutes=15))
            pm.on_reading(P.read_import_wh(master, 1, profile))
            if pm.state.emergency_credit_offered and not pm.state.emergency_credit_accepted:
                pm.accept_emergency_credit()
            if pm.state.relay == "open":
                break
        assert pm.state.relay == "open"
        # a card blacklisted in the gateway's last signed list is refused offline
        cards = T.CardList(1, clock.now(), (T.CardEntry("CARD9", meter_id, T.public_bytes(CARD)),)).signed(HEAD_END)
        pm.set_card_lists(cards, T.Blacklist(2, clock.now(), frozenset({"CARD9"})).signed(HEAD_END))
        nonce = b"x" * 16
        topup = T.CardTopUp("CARD9", T.CardChallenge(meter_id, nonce, 1000, "GBP", clock.now())).signed(CARD)
        assert pm.card_topup(topup, nonce)[0].reason == "blacklisted"
        pm.enter_token(token(2, 5000))                                  # reconnected
        kinds_wanted = {"low_balance", "emergency_credit_taken", "disconnected", "reconnected", "over_usage",
                        "blacklisted_card_attempt"}
        expected = sum(1 for e, cid in pm.journal if P.crm_record(e, "GW-TEST", command_id=cid) is not None)
        messages = sub.wait_for(expected)
        assert len(messages) == expected and not pm.unpublished
    finally:
        publisher.close()
    by_kind = {}
    for topic, payload in messages:
        assert topic == f"meterlink/v1/crm/{payload['kind']}/{meter_id}"
        assert payload["account"] == meter_id and payload["gateway"] == "GW-TEST" and payload["at"].endswith("Z")
        by_kind[payload["kind"]] = payload                              # the last of each kind
    assert kinds_wanted <= set(by_kind)
    assert by_kind["disconnected"]["reason"] == "emergency_credit_exhausted"
    assert by_kind["disconnected"]["command_id"].startswith(f"{meter_id}-")
    assert by_kind["emergency_credit_taken"]["amount_minor"] == 1000
    assert by_kind["over_usage"]["amount_minor"] > 0
    assert by_kind["blacklisted_card_attempt"]["card_id"] == "CARD9"
    assert by_kind["blacklisted_card_attempt"]["channel"] == "gateway_offline"
    assert len({p["event_id"] for _, p in messages}) == len(messages)


def test_events_are_queued_while_the_broker_is_unreachable_and_sent_in_order_later():
    sent, fail = [], [True]

    def flaky(topic, payload):
        if fail[0]:
            raise OSError("broker down")
        sent.append(topic)

    clock = SimClock(datetime(2026, 3, 9, 11, tzinfo=UTC))

    class NoRelay:
        def read(self):
            return "closed"

        def command(self, position, command_id):
            return None

    pm = P.PaygMeter("M1", NoRelay(), clock, cfg=C.PrepaymentConfig(), friendly=None, price=Decimal(30),
                     head_end_key=T.public_bytes(HEAD_END), publish=flaky)
    pm.boot(0)                                      # no credit: disconnected
    pm.on_reading(0)                                # first charge: low balance
    assert len(pm.unpublished) == 2 and sent == []
    fail[0] = False
    assert pm.flush_events() == 2
    assert [t.split("/")[3] for t in sent] == ["disconnected", "low_balance"]


def test_crm_event_ids_are_stable_so_a_republication_can_be_deduplicated():
    at = datetime(2026, 3, 9, 11, tzinfo=UTC)
    e = C.Disconnected(account="M1", at=at, reason="credit_exhausted")
    a, b = P.crm_record(e, "GW", command_id="M1-000001-open"), P.crm_record(e, "GW", command_id="M1-000001-open")
    assert a == b and a.payload["event_id"] == b.payload["event_id"]
    assert P.crm_record(C.TopUpRefused(account="M1", at=at, reference="tok-1", amount_minor=1, reason="replay"),
                        "GW") is None


def test_queued_events_and_signed_card_lists_survive_a_gateway_restart(tmp_path):
    clock = SimClock(datetime(2026, 3, 9, 11, tzinfo=UTC))
    sent = []

    def down(topic, payload):
        raise OSError("broker down")

    class NoRelay:
        def read(self):
            return "open"

        def command(self, position, command_id):
            return None

    def gateway(publish):
        return P.PaygMeter("M1", NoRelay(), clock, cfg=C.PrepaymentConfig(), friendly=None, price=Decimal(30),
                           head_end_key=T.public_bytes(HEAD_END), publish=publish, state_path=tmp_path / "m1.json")

    pm = gateway(down)
    pm.boot(0)
    cards = T.CardList(1, clock.now(), (T.CardEntry("CARD9", "M1", T.public_bytes(CARD)),)).signed(HEAD_END)
    pm.set_card_lists(cards, T.Blacklist(1, clock.now(), frozenset()).signed(HEAD_END))
    pm.on_reading(0)                                              # low balance, not publishable now
    queued = [r.payload["kind"] for r in pm.unpublished]
    assert queued
    again = gateway(lambda t, p: sent.append(t))                 # restart, broker back
    assert [r.payload["kind"] for r in again.unpublished] == queued
    assert again.flush_events() == len(queued)
    nonce = b"z" * 16
    topup = T.CardTopUp("CARD9", T.CardChallenge("M1", nonce, 700, "GBP", clock.now())).signed(CARD)
    again.card_topup(topup, nonce)                                # offline card top-up with the persisted lists
    assert again.state.credit_balance == 700 and again.state.relay == "closed"


def test_payg_status_command_shows_the_persisted_account(tmp_path, capsys):
    import json as _json

    from meterlink.gateway.cli import main
    clock = SimClock(datetime(2026, 3, 9, 11, tzinfo=UTC))

    class NoRelay:
        def read(self):
            return "closed"

        def command(self, position, command_id):
            return None

    pm = P.PaygMeter("M1", NoRelay(), clock, cfg=C.PrepaymentConfig(), friendly=None, price=Decimal(30),
                     head_end_key=T.public_bytes(HEAD_END), state_path=tmp_path / "m1.json")
    pm.boot(0)
    pm.enter_token(T.TopUpToken("t1", "M1", 1, 1500, "GBP", clock.now(),
                                clock.now() + timedelta(days=1)).signed(HEAD_END).encode())
    clock.advance(timedelta(hours=1))
    pm.on_reading(2000)
    assert main(["payg", "status", "--state", str(tmp_path / "m1.json"), "--json"]) == 0
    info = _json.loads(capsys.readouterr().out)
    assert info["relay"] == "closed" and info["credit_balance_minor"] == 1440
    assert info["unreported_usage"] == {"minor": 60, "wh": 2000} and info["relay_commands"] == 2
    assert main(["payg", "status", "--state", str(tmp_path / "nope.json")]) == 2
