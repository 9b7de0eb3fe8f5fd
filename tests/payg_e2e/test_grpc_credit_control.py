"""Credit control and vending over real gRPC with mutual TLS on loopback: the gateway's
`CreditSession` against the head-end's PAYG servicers, a simulated meter (Modbus TCP) with a relay."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway import tokens as T
from meterlink.gateway.enrol import secure_channel
from meterlink.gateway.payg_sync import CreditSession
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master
from meterlink.headend import ledger as L
from meterlink.headend import vendors as V
from meterlink.headend.gatewayauth import refusal_of
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer
from meterlink.v1 import payg_pb2, payg_pb2_grpc

PRICE = Decimal("30")


@pytest.fixture
def sim_meter(payg_headend):
    profile = load_profile("eastron_sdm630")
    meter = MeterModel.starting_at(profile, payg_headend.clock, unit=1, seed=3, import_wh=10_000)
    server = TcpServer({1: meter}).start()
    master = open_master(f"tcp://{server.address}")
    yield meter, master, profile
    master.close()
    server.stop()


def gateway_meter(payg_headend, master, profile, tmp_path, meter_id="MTR-1"):
    return P.PaygMeter(meter_id, P.RelaySwitch(master, 1, profile.relay_coil, meter_id=meter_id), payg_headend.clock,
                       cfg=C.PrepaymentConfig(), friendly=None, price=PRICE,
                       head_end_key=T.public_bytes(payg_headend.token_key), state_path=tmp_path / f"{meter_id}.json")


def sell(payg_headend, channel, card_key, sale_id, amount, meter="MTR-1"):
    """A vendor sale over the Vending service with vendor SHOP1's certificate (`channel`, a gateway's,
    is not used: Vending refuses gateways): challenge, card signature, authorisation (+ token)."""
    vendor = payg_headend.vendor_channel("SHOP1")
    try:
        stub = payg_pb2_grpc.VendingStub(vendor)
        challenge = stub.Challenge(payg_pb2.ChallengeRequest(vendor_id="SHOP1"), timeout=5).challenge
        msg = V.sale_challenge_message(challenge, sale_id, "SHOP1", "CARD1", "ACC1", amount, "GBP")
        return stub.Authorise(payg_pb2.AuthoriseRequest(
            vendor_id="SHOP1", sale_id=sale_id, card_id="CARD1", account_id="ACC1", amount_minor=amount,
            currency="GBP", challenge=challenge, card_signature=T.sign_ed25519(card_key, msg), meter_id=meter),
            timeout=5)
    finally:
        vendor.close()


def test_a_gateway_reserves_updates_and_gets_a_sold_token_delivered_over_mutual_tls(payg_headend, sim_meter, tmp_path):
    hd = payg_headend
    meter, master, profile = sim_meter
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    card = Ed25519PrivateKey.generate()
    hd.store.register_card("CARD1", "ACC1", T.public_bytes(card), hd.clock.now())
    channel = secure_channel(hd.address, identity)
    try:
        reply = sell(hd, channel, card, "S-1", 2_000)
        assert reply.authorised and reply.token                 # token for the meter, signed by the head-end
        pm = gateway_meter(hd, master, profile, tmp_path)
        pm.boot(10_000)
        cs = CreditSession(pm, channel, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json")
        first = cs.sync()                                       # Reserve: the sold token is reserved, not granted
        assert first.outcome == "no_grant" and first.tokens_applied == 1
        assert pm.state.credit_balance == 2_000
        second = cs.sync()                                      # Initial reports the token: its money is granted
        assert second.outcome == "granted" and second.granted_minor == 300
        assert pm.state.credit_balance == 300 and cs.balance_minor == 2_000
        hd.clock.advance(timedelta(hours=1))
        pm.on_reading(15_000)                                   # 5 kWh x 30 = 150 from the window
        third = cs.sync()
        assert third.outcome == "granted" and pm.state.credit_balance == third.granted_minor
        ledger = list(hd.store.transactions())
        assert L.customer_credit(ledger, "ACC1", "GBP") == 2_000 - 150 == cs.balance_minor
        assert L.totals_by_currency(ledger) == {"GBP": 0}
        assert meter.relay_closed and pm.state.relay == "closed"
    finally:
        channel.close()


def test_a_retransmitted_update_gets_the_stored_answer_and_books_nothing_twice(payg_headend, tmp_path):
    hd = payg_headend
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 5_000, "GBP", hd.store.vat)])
    channel = secure_channel(hd.address, identity)
    stub = payg_pb2_grpc.CreditControlStub(channel)
    try:
        base = dict(gateway_id="gw-a", session_id="gw-a/MTR-1/1", account_id="ACC1", meter_id="MTR-1", currency="GBP")
        assert stub.Reserve(payg_pb2.CreditControlRequest(request_number=0, **base), timeout=5).result_code == 2001
        upd = payg_pb2.CreditControlRequest(request_number=1, used=payg_pb2.UsedUnits(used_minor=120, used_wh=4000),
                                            **base)
        a1 = stub.Update(upd, timeout=5)
        a2 = stub.Update(upd, timeout=5)
        assert a1 == a2 and a1.result_code == 2001
        other = payg_pb2.CreditControlRequest(request_number=1, used=payg_pb2.UsedUnits(used_minor=1, used_wh=1), **base)
        assert stub.Update(other, timeout=5).result_code == 5004
        assert L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP") == 5_000 - 120
    finally:
        channel.close()


def test_a_gateway_may_only_credit_control_meters_provisioned_to_it_and_bound_to_the_account(payg_headend, tmp_path):
    hd = payg_headend
    a = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.enrolled(tmp_path, "gw-b", meters=["MTR-2"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.bind_meter("MTR-2", "ACC1", hd.clock.now())
    channel = secure_channel(hd.address, a)
    stub = payg_pb2_grpc.CreditControlStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Reserve(payg_pb2.CreditControlRequest(gateway_id="gw-a", session_id="x", account_id="ACC1",
                                                       meter_id="MTR-2", currency="GBP"), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refusal_of(err.value) == "ACCESS_REFUSAL_METER_NOT_PROVISIONED"
        with pytest.raises(grpc.RpcError) as err:
            stub.Reserve(payg_pb2.CreditControlRequest(gateway_id="gw-b", session_id="x", account_id="ACC1",
                                                       meter_id="MTR-1", currency="GBP"), timeout=5)
        assert refusal_of(err.value) == "ACCESS_REFUSAL_IDENTITY_MISMATCH"
        with pytest.raises(grpc.RpcError) as err:
            stub.Reserve(payg_pb2.CreditControlRequest(gateway_id="gw-a", session_id="x", account_id="ACC2",
                                                       meter_id="MTR-1", currency="GBP"), timeout=5)
        assert refusal_of(err.value) == "METER_NOT_BOUND" and "bound to account ACC1" in err.value.details()
        assert list(hd.store.transactions()) == []
    finally:
        channel.close()


def test_a_revoked_gateway_is_refused_credit_control_at_once_and_the_refusal_is_counted(payg_headend, tmp_path):
    """Credit control is checked once per call by the servicer (not also by the interceptor), from
    the registry as it is now: a revocation takes effect on the next call."""
    hd = payg_headend
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 5_000, "GBP", hd.store.vat)])
    assert "/meterlink.v1.CreditControl/Update" in hd.servers.auth.exempt
    channel = secure_channel(hd.address, identity)
    stub = payg_pb2_grpc.CreditControlStub(channel)
    try:
        first = stub.Reserve(payg_pb2.CreditControlRequest(gateway_id="gw-a", session_id="S1", account_id="ACC1",
                                                           meter_id="MTR-1", currency="GBP"), timeout=5)
        assert first.result_code == 2001
        hd.registry.revoke("gw-a", hd.clock.now())
        with pytest.raises(grpc.RpcError) as err:
            stub.Update(payg_pb2.CreditControlRequest(gateway_id="gw-a", session_id="S1", request_number=1,
                                                      account_id="ACC1", meter_id="MTR-1", currency="GBP",
                                                      used=payg_pb2.UsedUnits(used_minor=10)), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refusal_of(err.value) == "ACCESS_REFUSAL_GATEWAY_REVOKED"
        assert hd.servers.auth.refusals == {"ACCESS_REFUSAL_GATEWAY_REVOKED": 1}
        assert [t.business_key for t in hd.store.transactions()] == ["seed"]     # the usage was not booked
    finally:
        channel.close()


def test_a_blacklisted_card_is_refused_over_grpc_with_no_posting(payg_headend, tmp_path):
    hd = payg_headend
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    card = Ed25519PrivateKey.generate()
    hd.store.register_card("CARD1", "ACC1", T.public_bytes(card), hd.clock.now())
    hd.store.blacklist_card("CARD1", hd.clock.now(), "lost")
    hd.clock.advance(timedelta(milliseconds=1))
    channel = secure_channel(hd.address, identity)
    try:
        reply = sell(hd, channel, card, "S-9", 1_000)
        assert not reply.authorised and reply.reason == "card-blacklisted" and not reply.token
        assert list(hd.store.transactions()) == []
    finally:
        channel.close()


def test_offline_the_gateway_keeps_its_report_and_the_next_exchange_books_it_once(payg_headend, sim_meter, tmp_path):
    hd = payg_headend
    meter, master, profile = sim_meter
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 5_000, "GBP", hd.store.vat)])
    pm = gateway_meter(hd, master, profile, tmp_path)
    pm.boot(10_000)
    good = secure_channel(hd.address, identity)
    dead = secure_channel("127.0.0.1:9", identity)             # nothing listens: the link is down
    try:
        cs = CreditSession(pm, good, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json", timeout=2)
        assert cs.sync().granted_minor == 300
        offline = CreditSession(pm, dead, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json",
                                timeout=0.5)
        hd.clock.advance(timedelta(hours=2))
        pm.on_reading(16_000)                                   # 6 kWh x 30 = 180
        assert offline.sync().outcome == "offline"
        hd.clock.advance(timedelta(hours=1))
        pm.on_reading(17_000)                                   # + 30 after the report point
        back = CreditSession(pm, good, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json", timeout=2)
        res = back.sync()                                       # same request number, same report
        assert res.outcome == "granted"
        assert pm.state.credit_balance == res.granted_minor - 30
        assert L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP") == 5_000 - 180
    finally:
        good.close()
        dead.close()


def test_a_grant_that_expired_on_the_way_still_acknowledges_the_booked_report(payg_headend, sim_meter, tmp_path):
    hd = payg_headend
    meter, master, profile = sim_meter
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 5_000, "GBP", hd.store.vat)])
    from meterlink.clock import SimClock
    gw_clock = SimClock(hd.clock.now())
    pm = P.PaygMeter("MTR-1", P.RelaySwitch(master, 1, profile.relay_coil, meter_id="MTR-1"), gw_clock,
                     cfg=C.PrepaymentConfig(), friendly=None, price=PRICE,
                     head_end_key=T.public_bytes(hd.token_key), state_path=tmp_path / "MTR-1.json")
    pm.boot(10_000)
    channel = secure_channel(hd.address, identity)
    try:
        cs = CreditSession(pm, channel, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json")
        assert cs.sync().granted_minor == 300
        pm.on_reading(12_000)                                 # 60 from the window
        gw_clock.advance(timedelta(days=2))                   # the gateway's clock is far ahead: grants arrive expired
        res = cs.sync()
        assert res.outcome == "granted" and pm.state.in_flight is None
        assert any(isinstance(e, C.GrantRefused) and e.reason == "expired" for e, _ in pm.journal)
        cs.sync()                                             # the next report is empty: nothing booked twice
        assert L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP") == 5_000 - 60
    finally:
        channel.close()


def test_an_offline_card_topup_reported_in_an_update_is_booked_once_and_counts_in_the_window(
        payg_headend, sim_meter, tmp_path):
    hd = payg_headend
    meter, master, profile = sim_meter
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 1_000, "GBP", hd.store.vat)])
    card = Ed25519PrivateKey.generate()
    hd.store.register_card("CARD1", "ACC1", T.public_bytes(card), hd.clock.now())
    pm = gateway_meter(hd, master, profile, tmp_path)
    pm.boot(10_000)
    lists_at = hd.clock.now()
    pm.set_card_lists(T.CardList(1, lists_at, (T.CardEntry("CARD1", "MTR-1", T.public_bytes(card)),)).signed(hd.token_key),
                      T.Blacklist(1, lists_at).signed(hd.token_key))
    channel = secure_channel(hd.address, identity)
    try:
        cs = CreditSession(pm, channel, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json")
        assert cs.sync().granted_minor == 300
        # offline, the customer tops up 5.00 with the card at the gateway
        nonce = b"k" * 16
        topup = T.CardTopUp("CARD1", T.CardChallenge("MTR-1", nonce, 500, "GBP", hd.clock.now())).signed(card)
        events = pm.card_topup(topup, nonce)
        assert any(isinstance(e, C.TopUpApplied) for e in events) and pm.state.credit_balance == 800
        hd.clock.advance(timedelta(minutes=30))
        pm.on_reading(14_000)                                  # 4 kWh x 30 = 120
        res = cs.sync()                                        # the report carries the card top-up
        assert res.outcome == "granted"
        cs.sync()                                              # and again: booked once
        ledger = list(hd.store.transactions())
        assert sum(1 for t in ledger if t.business_key == f"card-topup:{topup.reference}") == 1
        assert L.customer_credit(ledger, "ACC1", "GBP") == 1_000 + 500 - 120
        assert not any(t.kind == "over-usage-debt" for t in ledger)
    finally:
        channel.close()


def test_signed_card_lists_ride_on_answers_and_a_card_blacklisted_since_is_refused_offline(
        payg_headend, sim_meter, tmp_path):
    hd = payg_headend
    meter, master, profile = sim_meter
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 1_000, "GBP", hd.store.vat)])
    card = Ed25519PrivateKey.generate()
    hd.store.register_card("CARD1", "ACC1", T.public_bytes(card), hd.clock.now())
    pm = gateway_meter(hd, master, profile, tmp_path)
    pm.boot(10_000)
    channel = secure_channel(hd.address, identity)
    stub = payg_pb2_grpc.CreditControlStub(channel)
    try:
        cs = CreditSession(pm, channel, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json")
        cs.sync()
        assert pm.card_list is not None and pm.card_list.find("CARD1") and pm.blacklist.card_ids == frozenset()
        # the gateway already holds the head-end's lists: an answer does not repeat them
        same = stub.Update(payg_pb2.CreditControlRequest(
            gateway_id="gw-a", session_id=cs.session_id, request_number=cs.number, account_id="ACC1",
            meter_id="MTR-1", currency="GBP", card_lists_digest=T.card_lists_digest(pm.card_list, pm.blacklist)),
            timeout=5)
        assert same.result_code == 2001 and not same.card_list and not same.blacklist
        cs.number += 1
        hd.store.blacklist_card("CARD1", hd.clock.now(), "stolen")
        hd.clock.advance(timedelta(milliseconds=1))
        cs.sync()                                              # the new blacklist arrives with the answer
        assert pm.blacklist.card_ids == frozenset({"CARD1"})
        nonce = b"z" * 16                                      # offline now: the gateway refuses the card itself
        topup = T.CardTopUp("CARD1", T.CardChallenge("MTR-1", nonce, 500, "GBP", hd.clock.now())).signed(card)
        events = pm.card_topup(topup, nonce)
        assert [e.reason for e in events if isinstance(e, C.TopUpRefused)] == ["blacklisted"]
    finally:
        channel.close()
