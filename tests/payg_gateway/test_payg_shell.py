"""Gateway PAYG shell against the real firmware simulator over Modbus TCP and RTU (pty): relay coil, boot, retries."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink import modbus
from meterlink.clock import SimClock
from meterlink.errors import DeviceError
from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway import tokens as T
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import RtuPtyServer, TcpServer

UTC = timezone.utc
MONDAY_11 = datetime(2026, 3, 9, 11, tzinfo=UTC)           # outside the GB friendly hours
HEAD_END = Ed25519PrivateKey.generate()
PRICE = Decimal(300)                                        # minor units per kWh: credit runs out fast


@pytest.fixture(scope="module")
def sdm630():
    return load_profile("eastron_sdm630")


@pytest.fixture
def clock():
    return SimClock(MONDAY_11)


@pytest.fixture
def sim(clock, sdm630):
    meter = MeterModel.starting_at(sdm630, clock, unit=1, seed=3, import_wh=10_000)
    server = TcpServer({1: meter}).start()
    master = open_master(f"tcp://{server.address}", timeout=1.0)
    yield meter, master
    master.close()
    server.stop()


def make(meter_id, master, clock, gb_friendly, tmp_path, sdm630, *, published=None, **cfg):
    relay = P.RelaySwitch(master, 1, sdm630.relay_coil, meter_id=meter_id)
    return P.PaygMeter(meter_id, relay, clock, cfg=C.PrepaymentConfig(**cfg), friendly=gb_friendly, price=PRICE,
                       head_end_key=T.public_bytes(HEAD_END), state_path=tmp_path / f"{meter_id}.json",
                       publish=(lambda t, p: published.append((t, json.loads(p)))) if published is not None else None)


def token(counter, amount, at, meter="M1"):
    return T.TopUpToken(f"tok-{counter}", meter, counter, amount, "GBP", at, at + timedelta(days=30)).signed(HEAD_END)


def test_relay_opens_when_credit_runs_out_consumption_stops_and_a_top_up_closes_it(sim, clock, gb_friendly,
                                                                                 tmp_path, sdm630):
    meter, master = sim
    published = []
    pm = make("M1", master, clock, gb_friendly, tmp_path, sdm630, published=published)
    pm.boot(P.read_import_wh(master, 1, sdm630))
    pm.enter_token(token(1, 200, clock.now()).encode())
    opened_at = None
    for _ in range(16):
        clock.advance(timedelta(minutes=15))
        d = pm.on_reading(P.read_import_wh(master, 1, sdm630))
        if d.relay == "open":
            opened_at = clock.now()
            break
    assert opened_at is not None and not meter.relay_closed
    assert P.RelaySwitch(master, 1, sdm630.relay_coil).read() == "open"      # FC01 read-back
    frozen = meter.import_wh
    clock.advance(timedelta(hours=2))
    assert meter.import_wh == frozen                                            # consumption stopped
    pm.on_reading(P.read_import_wh(master, 1, sdm630))
    events = pm.enter_token(token(2, 2000, clock.now()).encode())
    assert [e.kind for e in events if isinstance(e, (C.Reconnected, C.TopUpApplied))] == ["TopUpApplied",
                                                                                     "Reconnected"]
    assert meter.relay_closed
    clock.advance(timedelta(minutes=15))
    assert meter.import_wh > frozen                                             # supply restored
    kinds = [p["kind"] for _, p in published]
    assert "disconnected" in kinds and "reconnected" in kinds and "low_balance" in kinds
    off = next(p for _, p in published if p["kind"] == "disconnected")
    assert off["command_id"] == "M1-000001-open" and off["reason"] == "credit_exhausted"
    on = next(p for t, p in published if p["kind"] == "reconnected")
    assert on["command_id"] == "M1-000002-close"
    assert published[0][0].startswith("meterlink/v1/crm/")


def test_the_same_token_entered_twice_at_the_gateway_changes_the_balance_once(sim, clock, gb_friendly, tmp_path,
                                                                             sdm630):
    meter, master = sim
    pm = make("M1", master, clock, gb_friendly, tmp_path, sdm630)
    pm.boot(P.read_import_wh(master, 1, sdm630))
    text = token(1, 1500, clock.now()).encode()
    pm.enter_token(text)
    second = pm.enter_token(text)
    assert pm.state.credit_balance == 1500 and second[0].reason == "replay"


def test_friendly_hours_keep_the_relay_closed_with_exhausted_credit(sim, sdm630, gb_friendly, tmp_path):
    meter, master = sim
    clock = SimClock(datetime(2026, 3, 6, 23, tzinfo=UTC))                     # Friday night
    meter.clock = clock
    meter._last_ms = None
    pm = make("M1", master, clock, gb_friendly, tmp_path, sdm630)
    d = pm.boot(P.read_import_wh(master, 1, sdm630))
    assert d.relay == "closed" and meter.relay_closed
    assert [e.kind for e, _ in pm.journal] == ["FriendlyPeriodWarning"]


def test_boot_reads_the_relay_and_reevaluates_before_switching(sim, clock, gb_friendly, tmp_path, sdm630):
    meter, master = sim
    pm = make("M1", master, clock, gb_friendly, tmp_path, sdm630)
    pm.boot(P.read_import_wh(master, 1, sdm630))                                 # no credit: opened
    assert not meter.relay_closed
    pm.enter_token(token(1, 5000, clock.now()).encode())
    assert meter.relay_closed
    # the gateway restarts; meanwhile somebody opened the relay by hand and energy was used
    meter.set_relay(False)
    clock.advance(timedelta(hours=1))
    writes = []
    again = make("M1", master, clock, gb_friendly, tmp_path, sdm630)
    assert again.state.credit_balance == 5000 and again.window.is_spent(1)      # resumed from its state file
    orig = master.execute
    master.execute = lambda req: (writes.append(req) if req.function == modbus.WRITE_SINGLE_COIL else None, orig(req))[1]
    d = again.boot(P.read_import_wh(master, 1, sdm630))
    assert d.relay == "closed" and meter.relay_closed and len(writes) == 1
    # a second boot with everything consistent switches nothing
    writes.clear()
    make("M1", master, clock, gb_friendly, tmp_path, sdm630).boot(P.read_import_wh(master, 1, sdm630))
    assert writes == []


class LostAnswer:
    """A bus where the first coil write reaches the meter but its answer is lost (timeout)."""

    def __init__(self, master):
        self.master, self.lost = master, 0

    def execute(self, req):
        result = self.master.execute(req)
        if req.function == modbus.WRITE_SINGLE_COIL and self.lost == 0:
            self.lost += 1
            raise DeviceError("no answer from unit 1 (simulated lost answer)")
        return result


def test_a_relay_command_whose_answer_is_lost_is_confirmed_by_read_back_without_a_second_write(sim, sdm630):
    meter, master = sim
    relay = P.RelaySwitch(LostAnswer(master), 1, sdm630.relay_coil, meter_id="M1")
    out = relay.command("open", "M1-000001-open")
    assert not meter.relay_closed and out.writes == 1 and out.attempts == 2


def test_an_unreachable_relay_is_not_marked_switched_and_is_retried_at_the_next_evaluation(sim, clock, gb_friendly,
                                                                                        tmp_path, sdm630):
    meter, master = sim
    pm = make("M1", master, clock, gb_friendly, tmp_path, sdm630, published=[])
    pm.last_import_wh = 0
    meter.faults.silent = True
    master.timeout = 0.05
    master.close()
    d = pm.evaluate()
    assert d.relay == "open" and pm.state.relay == "closed" and meter.relay_closed
    assert not any(isinstance(e, C.Disconnected) for e, _ in pm.journal)
    meter.faults.silent = False
    pm.evaluate()
    assert pm.state.relay == "open" and not meter.relay_closed
    assert [e.kind for e, cid in pm.journal if cid] == ["Disconnected"]


def test_the_relay_is_switched_over_modbus_rtu_on_a_pty_too(clock, sdm630, gb_friendly, tmp_path):
    meter = MeterModel.starting_at(sdm630, clock, unit=1, seed=4, import_wh=10_000)
    server = RtuPtyServer({1: meter}).start()
    master = open_master(server.client_path, baud=19200, timeout=1.0)
    try:
        pm = make("M1", master, clock, gb_friendly, tmp_path, sdm630)
        pm.boot(P.read_import_wh(master, 1, sdm630))
        assert not meter.relay_closed
        pm.enter_token(token(1, 500, clock.now()).encode())
        assert meter.relay_closed
    finally:
        master.close()
        server.stop()


def test_state_round_trips_through_json_exactly():
    s = C.AccountState(account="M1", credit_balance=5, charge_residue=Decimal("0.3333"), at=MONDAY_11,
                       grant_valid_until=MONDAY_11 + timedelta(hours=1), relay="open")
    assert P.state_from_json(json.loads(json.dumps(P.state_to_json(s))), s.cfg) == s


def test_tariff_prices_consumption_by_the_band_in_force_locally():
    from meterlink.headend.tariff import bundled_tariffs, load_tariff
    path = next(p for p in bundled_tariffs() if "economy7" in p.name)
    price = P.price_from_tariff(load_tariff(path), Decimal("0.05"))
    night, day = price(datetime(2026, 3, 9, 2, tzinfo=UTC)), price(datetime(2026, 3, 9, 14, tzinfo=UTC))
    assert night < day and isinstance(night, Decimal)
