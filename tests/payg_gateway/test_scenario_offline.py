"""Acceptance scenario 6: a gateway offline for 3 days with a PAYG meter (firmware-sim over Modbus TCP),
consumption limited by grant + emergency credit, and after reconnection the head-end ledger and the gateway agree."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.clock import SimClock
from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway import tokens as T
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master
from meterlink.headend import creditcontrol as CC
from meterlink.headend import ledger as L
from meterlink.headend.payg_store import PaygStore
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer

UTC = timezone.utc
PRICE = Decimal("35")                  # gross minor units per kWh, the tariff the gateway pulled


def test_scenario_6_three_days_offline_is_limited_by_grant_and_emergency_credit_and_agrees_on_reconnection(tmp_path):
    clock = SimClock(datetime(2026, 3, 9, 6, tzinfo=UTC))
    profile = load_profile("eastron_sdm630")
    meter = MeterModel.starting_at(profile, clock, unit=1, seed=11, import_wh=20_000)
    server = TcpServer({1: meter}).start()
    master = open_master(f"tcp://{server.address}")
    store = PaygStore(f"sqlite:///{tmp_path}/headend.db")
    vat = L.PrepaidVat(Decimal("0.05"))
    store.append([L.top_up("seed", clock.now(), "ACC1", "SHOP1", 5000, "GBP", vat)])
    cc = CC.CreditControl(store, CC.InMemorySessionStore(),
                          CC.GrantPolicy(validity=timedelta(hours=12), min_grant_minor=100, max_grant_minor=800,
                                         initial_burn_rate_minor_per_h=Decimal(50)), vat)
    try:
        pm = P.PaygMeter("M1", P.RelaySwitch(master, 1, profile.relay_coil, meter_id="M1"), clock,
                         cfg=C.PrepaymentConfig(), friendly=None, price=PRICE,
                         head_end_key=T.public_bytes(Ed25519PrivateKey.generate()))
        start_wh = P.read_import_wh(master, 1, profile)
        pm.boot(start_wh)
        # online: the gateway reserves its grant, then the link to the head-end goes down for 3 days
        answer = cc.reserve(CC.initial("S1", "ACC1", "M1", "GBP"), clock.now()).answer
        grant = answer.grant.amount_minor
        assert grant == 750                                            # 50/h x 12 h x 1.25
        pm.apply_grant(C.Grant("S1", 0, answer.grant.expires_at, amount_minor=grant))
        charged = 0
        for _ in range(3 * 96):
            clock.advance(timedelta(minutes=15))
            pm.on_reading(P.read_import_wh(master, 1, profile))
            if pm.state.emergency_credit_offered and not pm.state.emergency_credit_accepted:
                pm.accept_emergency_credit()
        usage = pm.usage_report()
        charged, used_wh = usage.used_minor, usage.used_wh
        assert charged == sum(e.amount_minor for e, _ in pm.journal if isinstance(e, C.Charged))
        assert used_wh == P.read_import_wh(master, 1, profile) - start_wh
        limit = grant + pm.cfg.emergency_credit_limit
        assert pm.state.relay == "open" and not meter.relay_closed
        # consumption limited by grant + emergency credit (plus the last 15-minute step that crossed it)
        assert limit <= charged < limit + 100
        assert used_wh * PRICE / 1000 < limit + 100
        assert usage.from_credit == grant and usage.from_emergency == pm.cfg.emergency_credit_limit
        assert any(isinstance(e, C.GrantValidityExpired) for e, _ in pm.journal)
        # reconnection: the gateway reports what it used, by source; the head-end books each once
        out = cc.update(CC.CreditControlRequest(
            "S1", CC.RequestType.UPDATE_REQUEST, 1, "ACC1", "M1", "GBP", charged, used_wh,
            from_emergency_minor=usage.from_emergency, to_debt_minor=usage.to_debt), clock.now())
        assert out.answer.ok
        new = out.answer.grant
        pm.apply_grant(C.Grant("S1", 1, new.expires_at, amount_minor=new.amount_minor))
        ledger = list(store.transactions())
        # the new grant repaid the debt, then the emergency credit: the next report says so
        follow = pm.usage_report()
        assert follow.repaid_debt == usage.to_debt
        assert follow.repaid_emergency == min(new.amount_minor - usage.to_debt, pm.cfg.emergency_credit_limit)
        out2 = cc.update(CC.CreditControlRequest(
            "S1", CC.RequestType.UPDATE_REQUEST, 2, "ACC1", "M1", "GBP", 0, 0,
            repaid_debt_minor=follow.repaid_debt, repaid_emergency_minor=follow.repaid_emergency), clock.now())
        pm.apply_grant(C.Grant("S1", 2, out2.answer.grant.expires_at, amount_minor=out2.answer.grant.amount_minor))
        # the session ends: the termination reports what the last grant repaid; no new window
        last = pm.usage_report()
        out3 = cc.terminate(CC.CreditControlRequest(
            "S1", CC.RequestType.TERMINATION_REQUEST, 3, "ACC1", "M1", "GBP", 0, 0,
            repaid_debt_minor=last.repaid_debt, repaid_emergency_minor=last.repaid_emergency), clock.now())
        assert out3.answer.ok and last.repaid_emergency == out2.answer.grant.amount_minor
        pm.acknowledge()
        ledger = list(store.transactions())
        # to the cent: debt and emergency credit outstanding are the same figures on both sides
        assert L.balance(ledger, L.debt("ACC1"), "GBP") == pm.state.accumulated_debt == 0
        assert (L.balance(ledger, L.emergency_credit_account("ACC1"), "GBP") == pm.state.emergency_credit_used
                == pm.cfg.emergency_credit_limit - follow.repaid_emergency - last.repaid_emergency > 0)
        # the prepaid credit fell by exactly what the gateway spent from its windows
        spent = usage.from_credit + follow.repaid_debt + follow.repaid_emergency + last.repaid_emergency
        assert L.customer_credit(ledger, "ACC1", "GBP") == 5000 - spent
        assert pm.state.credit_balance == 0
        assert L.totals_by_currency(ledger) == {"GBP": 0}
    finally:
        master.close()
        server.stop()
        store.close()
