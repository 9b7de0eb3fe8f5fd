"""End to end with real processes on a scaled clock (600x): the running `meterlink-gateway run` prices
its PAYG meter with the tariff the head-end published and assigned to the account (pulled over
mutual TLS, verified), not with its flat fallback; and a card top-up made at the running daemon
through its card socket (`meterlink-gateway payg card-topup`) is booked once by the head-end at
the next sync."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo


from meterlink.chain import Event
from meterlink.clock import SystemClock, parse_instant
from meterlink.gateway import tokens as T
from meterlink.gateway.journal import Journal
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S
from meterlink.headend.configpub import publish_payg_tariff, publish_tariff
from meterlink.headend.registry import open_registry
from meterlink.money import round_minor

from .processes import BIN, ENV, headend_cli, start_payg_headend, start_sim, stop, wait_until, write_key

SPEED = 600
LONDON = ZoneInfo("Europe/London")
RATES = {"even": Decimal("20.00"), "odd": Decimal("40.00")}      # pence/kWh, alternating every local hour


def hourly_tariff() -> str:
    """Two bands that alternate every hour (so a short run crosses band boundaries)."""
    def windows(parity: int) -> str:
        return ", ".join(f'{{ days = ["all"], from = "{h:02d}:00", to = "{h + 1:02d}:00" }}'
                         for h in range(24) if h % 2 == parity)
    return ('[tariff]\nid = "hourly"\nname = "Alternating hours"\ncurrency = "GBP"\n'
            'timezone = "Europe/London"\ncountry = "GB"\nsubdivision = "ENG"\n'
            '\n[[version]]\nvalid_from = "2020-01-01"\nstanding_charge = "50.00"\n'
            f'\n[[version.band]]\nname = "even"\nrate = "{RATES["even"]}"\nwindows = [{windows(0)}]\n'
            f'\n[[version.band]]\nname = "odd"\nrate = "{RATES["odd"]}"\nwindows = [{windows(1)}]\n')


def test_the_running_gateway_prices_with_the_pulled_tariff_and_a_card_top_up_at_it_is_booked_on_sync(tmp_path):
    db = tmp_path / "headend.db"
    token_key = write_key(tmp_path / "token.pem")
    card = write_key(tmp_path / "card.pem")
    procs: list[subprocess.Popen] = []
    try:
        serve, address, enrol_address, ca_fingerprint = start_payg_headend(tmp_path, db, max_grant=400)
        procs.append(serve)

        added = json.loads(headend_cli(tmp_path, "gateways", "add", "GW-T", "--json").stdout)
        headend_cli(tmp_path, "gateways", "meters", "GW-T", "--add", "T-1")

        store = S.PaygStore(f"sqlite:///{db}")
        now = SystemClock().now().replace(microsecond=0)
        store.put_account("ACC1", "GBP")
        store.bind_meter("T-1", "ACC1", now)
        store.append([L.top_up("seed", now, "ACC1", "SHOP1", 20_000, "GBP", store.vat)])
        store.register_card("CARD1", "ACC1", T.public_bytes(card), now)
        registry = open_registry(f"sqlite:///{db}")
        publish_tariff(registry, "hourly", hourly_tariff(), now)
        publish_payg_tariff(registry, "ACC1", "hourly", now, vat_rate=store.vat.rate, interval_minutes=30)
        registry.close()

        start = datetime.now(timezone.utc).replace(microsecond=0)
        clock = f"scaled:{start.isoformat()},{SPEED},{time.time():.3f}"
        sim, sim_address = start_sim(clock)
        procs.append(sim)
        sock = tmp_path / "cards.sock"
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(
            f'[gateway]\nid = "GW-T"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 300\npush_batch = 500\n'
            f'\n[headend]\naddress = "{address}"\npki_dir = "{tmp_path / "gw-pki"}"\n'
            f'\n[[bus]]\nport = "tcp://{sim_address}"\ntimeout_s = 1.0\n'
            f'\n[[bus.meter]]\nid = "T-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
            f'\n[[payg]]\nmeter_id = "T-1"\naccount = "ACC1"\nprice_minor_per_kwh = "999"\n'
            f'token_public_key = "{T.public_bytes(token_key).hex()}"\nstate_dir = "{tmp_path / "payg"}"\n'
            f'card_socket = "{sock}"\nsync_s = 600\ntimeout_s = 2\n')
        out = subprocess.run([str(BIN / "meterlink-gateway"), "enroll", "--config", str(cfg), "--headend",
                              enrol_address, "--code", added["code"], "--ca-fingerprint", ca_fingerprint],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([str(BIN / "meterlink-gateway"), "pull-config", "--headend", address,
                              "--state-dir", str(tmp_path / "gw-pki")], capture_output=True, text=True)
        assert out.returncode == 0 and "hourly" in json.loads(out.stdout)["tariffs"], out.stderr
        log = tmp_path / "gw.log"
        gw = subprocess.Popen([str(BIN / "meterlink-gateway"), "-v", "run", "--config", str(cfg), "--clock", clock],
                              stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV)
        procs.append(gw)
        assert wait_until(sock.exists, 20), log.read_text()[-3000:]
        assert "pricing with the pulled tariff 'hourly'" in log.read_text()
        assert "FALLBACK" not in log.read_text()

        # a card top-up at the running daemon, once it holds the signed card list from an answer
        def top_up():
            r = subprocess.run([str(BIN / "meterlink-gateway"), "payg", "card-topup", "--socket", str(sock),
                                "--meter", "T-1", "--card", "CARD1", "--card-key", str(tmp_path / "card.pem"),
                                "--amount", "500", "--json"], capture_output=True, text=True)
            return json.loads(r.stdout) if r.returncode == 0 else None
        answer = wait_until(top_up, 20, 0.5)
        assert answer and answer["applied"], log.read_text()[-3000:]
        key = f"card-topup:{answer['reference']}"
        assert wait_until(lambda: any(t.business_key == key for t in store.transactions()), 30), \
            log.read_text()[-3000:]
        time.sleep(max(0.0, 14 - (time.time() - float(clock.rsplit(",", 1)[1]))))   # >2 simulated hours in all
        assert stop(gw) == 0
        procs.remove(gw)

        journal = Journal(tmp_path / "gw.db")
        records = [r.body for r in journal.records() if isinstance(r.body, Event)]
        charges = [json.loads(b.payload) for b in records if b.kind == "credit.charged"]
        standing = [json.loads(b.payload) for b in records if b.kind == "credit.standing_charged"]
        journal.close()
        state = json.loads((tmp_path / "payg" / "T-1.json").read_text())["state"]
        assert len(charges) >= 12 and all(c["since"] for c in charges)
        bands_seen = set()
        for c in charges:
            since, at = parse_instant(c["since"]), parse_instant(c["at"])
            assert at - since <= timedelta(minutes=10)
            exact = Decimal(c["exact_minor"])
            hours = {since.astimezone(LONDON).replace(minute=0, second=0, microsecond=0),
                     (at - timedelta(microseconds=1)).astimezone(LONDON).replace(minute=0, second=0, microsecond=0)}
            if len(hours) == 1 and c["wh"]:                # inside one local hour: exactly that band's gross price
                band = "even" if hours.pop().hour % 2 == 0 else "odd"
                assert exact == Decimal(c["wh"]) * RATES[band] * (1 + store.vat.rate) / 1000, c
                bands_seen.add(band)
        assert bands_seen == {"even", "odd"}
        # the tariff's standing charge (50.00 a day + 5 % = 52.5), once per local day from the first
        # evaluation with the pulled tariff, rounded with the consumption's carried residue
        days = [c["day"] for c in standing]
        assert 1 <= len(days) <= 2 and days == sorted(set(days)), standing
        assert all(Decimal(c["exact_minor"]) == Decimal("52.5") for c in standing)
        assert state["standing_charged_through"] == days[-1]
        total = sum(c["amount_minor"] for c in charges + standing)
        exact = sum(Decimal(c["exact_minor"]) for c in charges + standing)
        assert total == round_minor(exact, "half_up")
        assert Decimal(state["charge_residue"]) == exact - total
        ledger = list(store.transactions())
        assert sum(1 for t in ledger if t.business_key == key) == 1
        assert L.totals_by_currency(ledger) == {"GBP": 0}
        store.close()
    finally:
        for p in procs:
            stop(p)
