"""Over real gRPC with mutual TLS: the head-end's answers carry the customer's balance, and the
gateway's low-balance warning and emergency-credit offer follow it, not the small grant windows."""

from __future__ import annotations

from datetime import timedelta

from meterlink.gateway import credit as C
from meterlink.gateway.enrol import secure_channel
from meterlink.gateway.payg_sync import CreditSession
from meterlink.headend import ledger as L

from .test_grpc_credit_control import gateway_meter, sim_meter  # noqa: F401  (fixture)


def flag_kinds(pm) -> list[str]:
    return [e.kind for e, _ in pm.journal if isinstance(e, (C.LowBalance, C.EmergencyCreditOffered))]


def test_small_grants_warn_only_when_the_head_end_balance_really_runs_low(payg_headend, sim_meter, tmp_path):
    hd = payg_headend
    meter, master, profile = sim_meter
    identity = hd.enrolled(tmp_path, "gw-a", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 1_100, "GBP", hd.store.vat)])
    channel = secure_channel(hd.address, identity)
    try:
        pm = gateway_meter(hd, master, profile, tmp_path)
        pm.boot(10_000)
        cs = CreditSession(pm, channel, gateway_id="gw-a", account="ACC1", state_path=tmp_path / "cc.json")
        first = cs.sync()
        assert first.outcome == "granted" and first.granted_minor < pm.cfg.low_credit_threshold   # a small window
        assert cs.balance_minor == 1_100 and pm.state.balance_remaining == 1_100
        assert flag_kinds(pm) == []                           # the window is small, the balance is not
        register, history = 10_000, []
        for hour in range(1, 7):                              # 5 kWh x 30 = 150 an hour, synced hourly
            hd.clock.advance(timedelta(hours=1))
            register += 5_000
            before = len(pm.journal)
            pm.on_reading(register)                           # the local decrement already counts
            assert cs.sync().outcome == "granted"
            credit = L.customer_credit(list(hd.store.transactions()), "ACC1", "GBP")
            assert pm.state.balance_remaining == credit == cs.balance_minor == 1_100 - 150 * hour
            history.append((credit, [e.kind for e, _ in pm.journal[before:]
                                     if isinstance(e, (C.LowBalance, C.EmergencyCreditOffered))]))
        assert history == [(950, []), (800, []), (650, []), (500, []), (350, ["LowBalance"]),
                           (200, [])]
        # offline now: the local decrement raises the offer at the reading that takes it below 100
        offers = []
        for step in range(1, 5):
            hd.clock.advance(timedelta(minutes=20))
            register += 1_000
            pm.on_reading(register)                           # 30 each, within the 200 window
            offers.append(("EmergencyCreditOffered" in flag_kinds(pm), pm.state.balance_remaining))
        assert offers == [(False, 170), (False, 140), (False, 110), (True, 80)]
        assert meter.relay_closed and pm.state.relay == "closed"
    finally:
        channel.close()
