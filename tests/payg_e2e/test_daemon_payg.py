"""Acceptance, end to end with real processes on a scaled clock (600x): `meterlink-headend serve --payg`
(mutual TLS), `meterlink-sim modbus-tcp` (an SDM630 with a relay coil), `meterlink-gateway run` with a
``[[payg]]`` meter. Credit runs out outside friendly hours -> the relay opens in the simulator
(consumption stops) and the disconnect event reaches the head-end; a top-up sold at the head-end
is delivered as a signed token -> the relay closes; the ledger and the gateway agree to the cent."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meterlink.chain import Event
from meterlink.clock import SystemClock
from meterlink.gateway import tokens as T
from meterlink.gateway.journal import Journal
from meterlink.gateway.payg import RelaySwitch, read_import_wh, usage_from_json
from meterlink.gateway.profiles import load_profile
from meterlink.gateway.transport import open_master
from meterlink.headend import ledger as L
from meterlink.headend import payg_store as S
from meterlink.headend import vendors as V

from .processes import BIN, ENV, evening_peak_start, headend_cli, start_payg_headend, start_sim, stop, wait_until, write_key

SPEED = 600


def sell(store: S.PaygStore, card_key, sale_id: str, amount: int, token_key) -> str:
    now = SystemClock().now()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    challenge = store.issue_challenge(now)
    msg = V.sale_challenge_message(challenge, sale_id, "SHOP1", "CARD1", "ACC1", amount, "GBP")
    result = store.authorise(V.SaleRequest(sale_id, "SHOP1", "CARD1", "ACC1", amount, "GBP", challenge,
                                           T.sign_ed25519(card_key, msg)), now)
    assert result.authorised, result
    return S.token_for_sale(store, "SHOP1", sale_id, "P-1", token_key, now).token_id


def test_credit_runs_out_the_relay_opens_a_topup_closes_it_and_ledger_and_gateway_agree(tmp_path):
    db = tmp_path / "headend.db"
    token_key = write_key(tmp_path / "token.pem")
    procs: list[subprocess.Popen] = []
    try:
        serve, address, enrol_address, ca_fingerprint = start_payg_headend(tmp_path, db, max_grant=200)
        procs.append(serve)

        added = json.loads(headend_cli(tmp_path, "gateways", "add", "GW-P", "--json").stdout)
        headend_cli(tmp_path, "gateways", "meters", "GW-P", "--add", "P-1")

        # PAYG set-up at the head-end: account, meter bound to it, vendor, card, a first sale of 3.00
        store = S.PaygStore(f"sqlite:///{db}")
        now = SystemClock().now()
        store.put_account("ACC1", "GBP")
        store.bind_meter("P-1", "ACC1", now)
        store.put_vendor(V.VendorContract("SHOP1", "GBP", Decimal(2), 0, Decimal("0.20")))
        card = Ed25519PrivateKey.generate()
        store.register_card("CARD1", "ACC1", T.public_bytes(card), now)
        sell(store, card, "S-1", 300, token_key)

        # the simulated meter and the gateway share one scaled clock (600x), anchored at the next evening
        # peak so that credit runs out at the same pace whenever the test runs (the gateway's clock is
        # then up to a day ahead of the head-end's: grants last 30 days, tokens are already issued)
        start = evening_peak_start()
        clock = f"scaled:{start.isoformat()},{SPEED},{time.time():.3f}"
        sim, sim_address = start_sim(clock)
        procs.append(sim)
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(
            f'[gateway]\nid = "GW-P"\ndatabase = "{tmp_path / "gw.db"}"\npoll_interval_s = 300\npush_batch = 500\n'
            f'\n[headend]\naddress = "{address}"\npki_dir = "{tmp_path / "gw-pki"}"\n'
            f'\n[[bus]]\nport = "tcp://{sim_address}"\ntimeout_s = 1.0\n'
            f'\n[[bus.meter]]\nid = "P-1"\nunit = 1\nprofile = "eastron_sdm630"\n'
            f'\n[[payg]]\nmeter_id = "P-1"\naccount = "ACC1"\nprice_minor_per_kwh = "100"\n'
            f'token_public_key = "{T.public_bytes(token_key).hex()}"\nstate_dir = "{tmp_path / "payg"}"\n'
            f'sync_s = 3600\ntimeout_s = 2\n')
        out = subprocess.run([str(BIN / "meterlink-gateway"), "enroll", "--config", str(cfg), "--headend",
                              enrol_address, "--code", added["code"], "--ca-fingerprint", ca_fingerprint],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        log = tmp_path / "gw.log"
        gw = subprocess.Popen([str(BIN / "meterlink-gateway"), "-v", "run", "--config", str(cfg), "--clock", clock],
                              stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV)
        procs.append(gw)

        profile = load_profile("eastron_sdm630")
        master = open_master(f"tcp://{sim_address}")
        relay = RelaySwitch(master, 1, profile.relay_coil, meter_id="P-1")
        try:
            # 3.00 at 1.00/kWh lasts ~1.25 simulated hours (~8 s): then the relay opens
            assert wait_until(lambda: relay.read() == "open", 40, 0.2), log.read_text()[-3000:]
            held = read_import_wh(master, 1, profile)
            time.sleep(1.5)                                   # 15 simulated minutes: nothing flows
            assert read_import_wh(master, 1, profile) == held

            def headend_events():
                with sqlite3.connect(db) as c:
                    return [r[0] for r in c.execute(
                        "SELECT kind FROM gateway_event WHERE gateway_id = 'GW-P' AND meter_id = 'P-1'")]
            assert wait_until(lambda: "relay.open" in headend_events(), 20), headend_events()

            # a top-up of 20.00 sold at the head-end reaches the gateway as a token in the next answer
            sell(store, card, "S-2", 2_000, token_key)
            assert wait_until(lambda: relay.read() == "closed", 20, 0.2), log.read_text()[-3000:]
            assert wait_until(lambda: "relay.close" in headend_events(), 20), headend_events()
            time.sleep(1.0)
            assert read_import_wh(master, 1, profile) > held  # consumption flows again
        finally:
            master.close()
        assert stop(gw) == 0
        procs.remove(gw)

        # to the cent: what the head-end booked plus what the gateway has not reported yet
        state = json.loads((tmp_path / "payg" / "P-1.json").read_text())["state"]
        pending = usage_from_json(state["unreported"])
        if state.get("in_flight"):
            pending = pending.plus(usage_from_json(state["in_flight"]))
        journal = Journal(tmp_path / "gw.db")
        charged = sum(json.loads(r.body.payload)["amount_minor"] for r in journal.records()
                      if isinstance(r.body, Event) and r.body.kind == "credit.charged")
        journal.close()
        ledger = list(store.transactions())
        gross = sum(p.amount_minor for t in ledger if t.kind in ("consumption", "emergency-consumption",
                                                                  "over-usage-debt")
                    for p in t.postings if p.amount_minor > 0)
        assert charged > 300
        assert gross + pending.used_minor == charged
        assert (L.balance(ledger, L.debt("ACC1"), "GBP") + pending.to_debt - pending.repaid_debt
                == state["accumulated_debt"])
        assert (L.balance(ledger, L.emergency_credit_account("ACC1"), "GBP") + pending.from_emergency
                - pending.repaid_emergency == state["emergency_credit_used"])
        assert L.customer_credit(ledger, "ACC1", "GBP") >= 0
        assert L.totals_by_currency(ledger) == {"GBP": 0}
        assert S.unapplied_tokens(store, "P-1") == [] or state["in_flight"] or state["unreported"]["tokens"]
        store.close()
    finally:
        for p in procs:
            stop(p)
