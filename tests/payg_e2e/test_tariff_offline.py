"""Offline PAYG pricing with the PULLED tariff (acceptance scenario 6 with a two-band tariff).

The head-end publishes Economy 7 (night 23:30-06:30, day otherwise, Europe/London) and assigns it
to the PAYG account with the PAYG ledger's VAT rate and the market's 30-minute grid; the gateway
pulls the signed configuration over mutual TLS, verifies it and prices every reading with it. Three
days offline with readings at irregular instants crossing band boundaries, then reconnection: the
head-end ledger books exactly what the gateway charged, and that equals the head-end's own rating
of the same readings plus one standing charge per local day (VEE intervals -> rating.rate_intervals
+ rating.standing_charges -> + VAT, rounded once) to the minor unit -- while a flat price (the fallback) or pricing each reading at its end instant would not."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

from meterlink.clock import from_ms, to_ms
from meterlink.gateway import credit as C
from meterlink.gateway import payg as P
from meterlink.gateway import tokens as T
from meterlink.gateway.configpull import ConfigPuller
from meterlink.gateway.enrol import secure_channel
from meterlink.gateway.payg_sync import CreditSession
from meterlink.gateway.pricing import TariffPrice, price_for_account
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S
from meterlink.headend import rating
from meterlink.headend.configpub import publish_payg_tariff, publish_tariff
from meterlink.headend.rating import rate_intervals
from meterlink.headend.tariff import bundled_tariffs
from meterlink.headend.vee import VeeConfig, derive_intervals
from meterlink.money import round_minor
from meterlink.readings import Reading
from meterlink.sim.meter import MeterModel
from meterlink.sim.server import TcpServer

GRID = timedelta(minutes=30)
STEPS_MIN = (7, 11, 13, 17, 19, 23, 29, 31, 37)          # irregular poll gaps: boundaries fall inside them
WH = (200, 475, 650, 1050, 375, 800, 275, 1500, 600)


def economy7_text() -> str:
    return next(p for p in bundled_tariffs() if "economy7" in p.name).read_text()


def consumption_gross(ledger) -> int:
    return sum(p.amount_minor for t in ledger if t.kind in ("consumption", "emergency-consumption", "over-usage-debt")
               for p in t.postings if p.amount_minor > 0)


def standing_gross(ledger) -> int:
    return sum(p.amount_minor for t in ledger if t.kind.startswith("standing-charge")
               for p in t.postings if p.amount_minor > 0)


def test_three_days_offline_priced_with_the_pulled_two_band_tariff_agree_with_the_headend_to_the_minor_unit(
        payg_headend, tmp_path):
    hd = payg_headend
    now = hd.clock.now()
    hd.clock.set(from_ms(-(-to_ms(now) // 1_800_000) * 1_800_000))            # start on the 30-minute grid
    identity = hd.enrolled(tmp_path, "gw-t", meters=["MTR-1"])
    hd.store.bind_meter("MTR-1", "ACC1", hd.clock.now())
    hd.store.append([L.top_up("seed", hd.clock.now(), "ACC1", "SHOP1", 50_000, "GBP", hd.store.vat)])
    vat = hd.store.vat.rate
    publish_tariff(hd.registry, "gb-economy7", economy7_text(), hd.clock.now())
    publish_payg_tariff(hd.registry, "ACC1", "gb-economy7", hd.clock.now(), vat_rate=vat, interval_minutes=30)

    profile = load_profile("eastron_sdm630")
    sim = MeterModel.starting_at(profile, hd.clock, unit=1, seed=3, import_wh=10_000)
    server = TcpServer({1: sim}).start()
    master = open_master(f"tcp://{server.address}")
    channel = secure_channel(hd.address, identity)
    try:
        state = ConfigPuller.for_identity(channel, identity).pull_once()     # signed, verified, applied
        price = price_for_account(state, "ACC1", "GBP")
        assert isinstance(price, TariffPrice) and price.vat_rate == vat and price.interval == GRID
        pm = P.PaygMeter("MTR-1", P.RelaySwitch(master, 1, profile.relay_coil, meter_id="MTR-1"), hd.clock,
                         cfg=C.PrepaymentConfig(), friendly=None, price=Decimal("999"),
                         head_end_key=T.public_bytes(hd.token_key), state_path=tmp_path / "MTR-1.json")
        pm.set_price(price, price.describe())
        register = 10_000
        readings = [Reading("MTR-1", "1.8.0", hd.clock.now(), register, "Wh")]
        pm.boot(register)
        cs = CreditSession(pm, channel, gateway_id="gw-t", account="ACC1", state_path=tmp_path / "cc.json")
        assert cs.sync().outcome == "granted"

        def read(step: int) -> None:
            nonlocal register
            hd.clock.advance(timedelta(minutes=STEPS_MIN[step % len(STEPS_MIN)]))
            register += WH[step % len(WH)] if pm.state.relay == "closed" else 0
            readings.append(Reading("MTR-1", "1.8.0", hd.clock.now(), register, "Wh"))
            pm.on_reading(register)
            if pm.state.emergency_credit_offered and not pm.state.emergency_credit_accepted:
                pm.accept_emergency_credit()

        step = 0
        for _ in range(3):                                      # online for a while: grants every few readings
            for _ in range(4):
                read(step)
                step += 1
            cs.sync()
        token = S.issue_token(hd.store, "sale:SHOP1:T-1", "MTR-1", "ACC1", 3_000, "GBP", hd.token_key, hd.clock.now())
        hd.store.append([L.top_up("sale:SHOP1:T-1", hd.clock.now(), "ACC1", "SHOP1", 3_000, "GBP", hd.store.vat)])
        offline_from = hd.clock.now()
        typed_in = False
        while hd.clock.now() < offline_from + timedelta(days=3):   # 3 days offline: reports made, never answered
            read(step)
            step += 1
            if step % 6 == 0:
                pm.usage_report()
            if not typed_in and hd.clock.now() >= offline_from + timedelta(days=1):
                assert pm.state.relay == "open"                 # grant + emergency credit used up: supply limited
                pm.enter_token(token.encode())                  # the customer types in a token sold earlier
                assert pm.state.relay == "closed"
                typed_in = True
        end = hd.clock.now()                                    # finish on the grid so VEE covers every reading
        last = from_ms(-(-to_ms(end) // 1_800_000) * 1_800_000)
        if last > end:
            hd.clock.set(last)
            register += 33
            readings.append(Reading("MTR-1", "1.8.0", last, register, "Wh"))
            pm.on_reading(register)
        for _ in range(2):                                      # back online: the in-flight report, then the rest
            assert cs.sync().outcome in ("granted", "no_grant")
        cs.sync(terminate=True)
        assert pm.state.in_flight is None and pm.state.unreported.empty

        charged = sum(e.amount_minor for e, _ in pm.journal if isinstance(e, C.Charged))
        standing = [e for e, _ in pm.journal if isinstance(e, C.StandingCharged)]
        standing_charged = sum(e.amount_minor for e in standing)
        ledger = list(hd.store.transactions())
        assert consumption_gross(ledger) == charged              # the head-end booked what the gateway charged
        assert standing_gross(ledger) == standing_charged        # ... and each standing charge
        assert L.totals_by_currency(ledger) == {"GBP": 0}
        assert L.balance(ledger, L.debt("ACC1"), "GBP") == pm.state.accumulated_debt
        assert L.balance(ledger, L.emergency_credit_account("ACC1"), "GBP") == pm.state.emergency_credit_used
        # the head-end's own rating of the same readings, with the same tariff and VAT
        intervals = derive_intervals(readings, VeeConfig(interval=GRID)).intervals
        assert sum(i.wh for i in intervals) == register - 10_000
        aggs = rate_intervals({}, intervals, price.tariff, "ACC1")
        bands = {a.band for a in aggs.values() if a.wh}
        assert bands == {"day", "night"}                        # both bands, boundaries crossed inside readings
        exact_net = sum(a.amount_dec for a in aggs.values())
        # standing: one charge per LOCAL day from the day the gateway first priced with the tariff
        # (its boot, the first reading's instant) to the day of the last reading, as the head-end
        # rates them (rating.standing_charges); each day charged once by the gateway, offline too
        zone = price.tariff.zone
        first_day, last_day = (r.taken_at.astimezone(zone).date() for r in (readings[0], readings[-1]))
        days = rating.standing_charges(price.tariff, "ACC1", first_day, last_day + timedelta(days=1))
        assert [e.day for e in standing] == sorted(d for (_, d, _) in days)
        assert 4 <= len(days) <= 5                               # 3 days offline + the online hours
        standing_net = sum(a.amount_dec for a in days.values())  # 52.14 a day (version 2026-01-01)
        assert standing_net == Decimal("52.14") * len(days)
        # The agreement, everything rounded once (with 4 days, e.g.: standing 4 x 52.14 = 208.56 net,
        # x 1.05 = 218.988; total = round((exact energy net + 208.56) x 1.05)). The gateway's charges
        # share one rounding residue, so energy and standing are not rounded apart.
        total = charged + standing_charged
        assert total == round_minor((exact_net + standing_net) * (1 + vat), "half_up")
        # each day's charge takes the carried residue in (|r_before - r_after| < 1 per day)
        assert abs(standing_charged - standing_net * (1 + vat)) < len(days)
        print(f"\nagreement: energy net {exact_net} + standing {len(days)} x 52.14 = {standing_net} net; "
              f"x {1 + vat} = {(exact_net + standing_net) * (1 + vat)} -> {total} minor units "
              f"(energy {charged} + standing {standing_charged}), head-end ledger "
              f"{consumption_gross(ledger) + standing_gross(ledger)}")
        # what the alternatives would have charged: neither agrees
        flat = round_minor(Decimal(register - 10_000) * Decimal("999") / 1000, "half_up")
        at_end = round_minor(sum(Decimal(b.value - a.value) * price.tariff.band_at(
            b.taken_at.astimezone(price.tariff.zone)).rate * (1 + vat) / 1000 for a, b in zip(readings, readings[1:]))
            + standing_net * (1 + vat), "half_up")
        assert total != flat and total != at_end
        assert json.loads((tmp_path / "MTR-1.json").read_text())["last_import_at"] is not None
    finally:
        channel.close()
        master.close()
        server.stop()


def test_a_payg_tariff_assignment_with_a_bad_vat_rate_or_grid_is_refused_at_the_headend(tmp_path):
    import pytest

    from meterlink.headend.registry import open_registry
    registry = open_registry(f"sqlite:///{tmp_path / 'r.db'}")
    now = from_ms(1_764_000_000_000)
    try:
        with pytest.raises(ValueError, match="VAT rate 1.5 out of range"):
            publish_payg_tariff(registry, "ACC1", "gb-economy7", now, vat_rate="1.5")
        with pytest.raises(ValueError, match="interval_minutes 7 must divide a day"):
            publish_payg_tariff(registry, "ACC1", "gb-economy7", now, interval_minutes=7)
        v = publish_payg_tariff(registry, "ACC1", None, now)          # a withdrawal is a change like any other
        assert registry.changes_since("gw", 0)[1][-1].kind == "payg.tariff" and v >= 1
    finally:
        registry.close()
